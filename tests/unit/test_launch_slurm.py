"""The sbatch scripts under a fake Slurm: each one's step runs locally through launch/torchrun.sh and a
real torchrun at 4 CPU ranks with DRY_RUN=1 (`r1m validate` on every rank); convert.sbatch builds the
`convert hf-to-mcore` command line; the `r1m doctor --require-gpu` preflight stops a job on this CPU
machine before torchrun starts; gloo gets one interface name, never NCCL's `^` exclusion; torchrun.sh
finds the checkout's interpreter without an activated venv."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _fake_slurm import REPO, env_of, fake_slurm, free_port, lines


def _run(args: list[str], env: dict, timeout: int = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


DRY_RUNS = [
    (
        "grpo.sbatch",
        "configs/demo_cpu.yaml",
        {},
        ["parallel.tp=2", "parallel.sequence_parallel=true"],
        "world 4 = tp 2 x pp 1 x dp 2",
    ),
    (
        "sft.sbatch",
        "configs/micro_moe_sft.yaml",
        {},
        ["parallel.tp=2", "parallel.pp=2"],
        "world 4 = tp 2 x pp 2 x dp 1",
    ),
    (
        "convert.sbatch",
        "configs/micro_moe_sft.yaml",
        {"HF_DIR": "/hf", "OUT_DIR": "/out", "TP": "2", "PP": "2", "EP": "2"},
        [],
        "world 4 = tp 2 x pp 2 x dp 1",
    ),
]


def _one_node(tmp_path, **env: str) -> dict:
    """A fake Slurm job of one node with 4 CPU ranks: srun and scontrol are stand-ins, torchrun is real."""
    return fake_slurm(tmp_path, fakes=("srun", "scontrol"), SLURM_JOB_NUM_NODES="1", FAKE_HOSTS="127.0.0.1",
                      NPROC_PER_NODE="4", MASTER_PORT=str(free_port()), TORCHRUN="", OMP_NUM_THREADS="1", **env)


@pytest.mark.parametrize("script,config,extra_env,overrides,layout", DRY_RUNS, ids=[d[0] for d in DRY_RUNS])
def test_sbatch_dry_run_validates_on_four_cpu_ranks(tmp_path, script, config, extra_env, overrides, layout):
    """One fake node with 4 CPU ranks: srun's step is launch/torchrun.sh, torchrun is real, every rank
    runs `r1m validate` on the config."""
    env = _one_node(tmp_path, DRY_RUN="1", CONFIG=config, R1M_VALIDATE_TIMEOUT="120", **extra_env)
    r = _run(["bash", f"launch/slurm/{script}", *overrides], env, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert layout in r.stdout and "fits: yes" in r.stdout
    srun = lines(tmp_path / "log/srun.argv")
    assert "--no-container-mount-home" in srun and "--cpus-per-task=96" in srun
    assert "--container-image=/images/r1-megatron.sqsh" in srun
    if script == "convert.sbatch":  # the target layout goes to validate as overrides
        assert srun[-3:] == ["parallel.tp=2", "parallel.pp=2", "parallel.ep=2"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_grpo_sbatch_trains_on_four_cpu_ranks(tmp_path):
    """The GRPO job itself, not a dry run: grpo.sbatch's step under the fake srun runs `r1m train` through
    launch/torchrun.sh at (tp2, ep2) on 4 gloo ranks with colocated vLLM-CPU engines, and leaves its
    metrics and a checkpoint where the script says (the shared run dir)."""
    env = _one_node(tmp_path, CONFIG="configs/demo_cpu.yaml", VLLM_ENABLE_V1_MULTIPROCESSING="0",
                    VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    overrides = ["parallel.tp=2", "parallel.ep=2", "rl.steps=1", "rl.prompts_per_step=2", "rl.group_size=2",
                 "rollout.max_new_tokens=8", "rl.eval_every=0", "logging.progress=false",
                 "logging.tensorboard=false", "checkpoint.save_every=1"]
    r = _run(["bash", "launch/slurm/grpo.sbatch", *overrides], env, timeout=540)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    run_dir = tmp_path / "shared/runs/demo_cpu"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1] and rows[0]["update_ok"] == 1
    assert (run_dir / "checkpoints/latest").read_text().strip() == "step_000001"


def test_convert_sbatch_builds_hf_to_mcore(tmp_path):
    env = fake_slurm(
        tmp_path, HF_DIR="/data/DeepSeek-V3", OUT_DIR="/data/dsv3-mcore", TP="1", PP="16", EP="16"
    )
    del env["CONFIG"]  # conversion needs no job config
    r = _run(["bash", "launch/slurm/convert.sbatch", "--card", "deepseek_v3_671b"], env)
    assert r.returncode == 0, r.stderr
    argv = lines(tmp_path / "log/torchrun.argv")
    assert argv[argv.index("-m") :] == [
        "-m",
        "r1_megatron.cli",
        "convert",
        "hf-to-mcore",
        "--hf",
        "/data/DeepSeek-V3",
        "--out",
        "/data/dsv3-mcore",
        "--tp",
        "1",
        "--pp",
        "16",
        "--ep",
        "16",
        "--card",
        "deepseek_v3_671b",
    ]
    assert "--nnodes=4" in argv and "--rdzv-id=4242" in argv
    assert (tmp_path / "shared/runs/convert-dsv3-mcore/logs/job-4242").is_dir()

    del env["HF_DIR"]
    r = _run(["bash", "launch/slurm/convert.sbatch"], env)
    assert r.returncode != 0 and "set HF_DIR" in r.stderr


def test_sbatch_needs_a_prebuilt_image(tmp_path):
    env = fake_slurm(tmp_path)
    del env["R1M_IMAGE"]
    r = _run(["bash", "launch/slurm/grpo.sbatch"], env)
    assert r.returncode != 0 and "launch/container/Dockerfile" in r.stderr
    assert not (tmp_path / "log/srun.argv").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the preflight passes on a GPU machine")
def test_preflight_stops_the_job_on_a_cpu_machine(tmp_path):
    env = fake_slurm(tmp_path)
    del env["PREFLIGHT"]  # the sbatch default: on
    r = _run(["bash", "launch/slurm/grpo.sbatch"], env, timeout=120)
    assert r.returncode == 1
    assert "r1m doctor: FAILED: no CUDA device visible" in r.stderr and "r1m: preflight failed" in r.stderr
    assert env_of(tmp_path / "log/srun.env")["PREFLIGHT"] == "1"
    assert not (tmp_path / "log/torchrun.argv").exists()  # torchrun never started


def _gloo_init(ifname: str) -> subprocess.CompletedProcess:
    code = (
        "import torch.distributed as dist; "
        f"dist.init_process_group('gloo', init_method='tcp://127.0.0.1:{free_port()}', rank=0, world_size=1);"
        " "
        "dist.destroy_process_group()"
    )
    env = {**os.environ, "GLOO_SOCKET_IFNAME": ifname}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_gloo_rejects_nccl_exclusion_syntax():
    """Why common.sh must not copy NCCL_SOCKET_IFNAME: gloo opens '^lo' as an interface name."""
    assert _gloo_init("^lo,docker0").returncode != 0
    assert _gloo_init("lo").returncode == 0


def _default_route_interface() -> str | None:
    for row in Path("/proc/net/route").read_text().splitlines()[1:]:
        fields = row.split()
        if fields[1] == "00000000":
            return fields[0]
    return None


def _torchrun_gloo_env(tmp_path: Path, route: str, ifname: str | None) -> dict[str, str]:
    env = fake_slurm(
        tmp_path,
        fakes=("torchrun", "ip", "getent"),
        MASTER_ADDR="node01",
        CONFIG="configs/micro_moe_sft.yaml",
        FAKE_GETENT="10.1.2.3      STREAM node01",
        FAKE_IP_ROUTE=route,
    )
    if ifname is not None:
        env["GLOO_SOCKET_IFNAME"] = ifname
    r = _run(["bash", "launch/torchrun.sh"], env)
    assert r.returncode == 0, r.stderr
    return env_of(tmp_path / "log/torchrun.env")


def test_gloo_interface_from_an_exclusion(tmp_path):
    route = "10.1.2.3 via 10.1.2.254 dev ib0 src 10.1.2.9 uid 0"
    assert _torchrun_gloo_env(tmp_path / "a", route, "^lo,docker0")["GLOO_SOCKET_IFNAME"] == "ib0"
    # The route to the master goes through an excluded interface (NCCL's prefix match: docker0 -> docker01):
    # the default route's interface if it is not excluded, else unset.
    route = "10.1.2.3 dev docker01 src 172.17.0.2 uid 0"
    got = _torchrun_gloo_env(tmp_path / "b", route, "^lo,docker0").get("GLOO_SOCKET_IFNAME")
    default = _default_route_interface()
    assert got == (default if default and not default.startswith(("lo", "docker0")) else None)
    # A concrete name is the user's choice and passes unchanged; unset stays unset.
    assert _torchrun_gloo_env(tmp_path / "c", route, "eth1")["GLOO_SOCKET_IFNAME"] == "eth1"
    assert "GLOO_SOCKET_IFNAME" not in _torchrun_gloo_env(tmp_path / "d", route, None)


def test_sbatch_environment(tmp_path):
    """NCCL keeps its exclusion, gloo gets none; caches leave the unmounted $HOME for node-local /tmp;
    the step runs the image's python3."""
    env = fake_slurm(tmp_path)
    assert _run(["bash", "launch/slurm/grpo.sbatch"], env).returncode == 0
    srun_env = env_of(tmp_path / "log/srun.env")
    assert srun_env["NCCL_SOCKET_IFNAME"] == "^lo,docker0" and "GLOO_SOCKET_IFNAME" not in srun_env
    assert srun_env["XDG_CACHE_HOME"] == srun_env["TRITON_HOME"] == "/tmp/r1m-cache-4242"
    assert srun_env["R1M_PYTHON"] == "python3"  # the image's, not a CPU .venv in the mounted checkout


def test_torchrun_uses_the_checkout_interpreter(tmp_path):
    """No activated venv, no torchrun on PATH: the checkout's .venv/bin/python runs torch.distributed.run."""
    checkout = tmp_path / "checkout"
    (checkout / "launch").mkdir(parents=True)
    shutil.copy(REPO / "launch/torchrun.sh", checkout / "launch/torchrun.sh")
    env = fake_slurm(tmp_path, fakes=("python3",), CONFIG="configs/micro_moe_sft.yaml", TORCHRUN="")
    env["PATH"] = f"{tmp_path / 'bin'}:/usr/bin:/bin"
    r = _run(["bash", str(checkout / "launch/torchrun.sh"), "x=1"], env)
    assert r.returncode == 0, r.stderr
    argv = lines(tmp_path / "log/python3.argv")  # no .venv: python3 from PATH
    assert argv[:2] == ["-m", "torch.distributed.run"] and argv[-4:] == [
        "r1_megatron.cli",
        "train",
        "configs/micro_moe_sft.yaml",
        "x=1",
    ]

    (checkout / ".venv/bin").mkdir(parents=True)
    shutil.copy(tmp_path / "bin/python3", checkout / ".venv/bin/python")
    (tmp_path / "log/python3.argv").unlink()
    assert _run(["bash", str(checkout / "launch/torchrun.sh")], env).returncode == 0
    assert lines(tmp_path / "log/python.argv")[:2] == ["-m", "torch.distributed.run"]
    assert not (tmp_path / "log/python3.argv").exists()
