"""Every command in a ```bash block of README.md and launch/README.md works as written, or is listed here
with the reason it is not run.

Each command runs in a fresh `bash -lc` shell from the repository root after `. .venv/bin/activate`,
as a new user would type it after the set-up. The quick ones run for real; a synopsis with
placeholders runs one concrete instance; a long one runs its dry form (`r1m validate` or `r1m plan`,
what `DRY_RUN=1` does), its `--help`, or `launch/torchrun.sh` with `TORCHRUN=echo` (the launch line it
would run, checked against the arguments), and the rest are in SKIPPED with why. A README command
that is in neither table fails the test, so a new command cannot go unchecked. PYTHONPATH points at
this checkout, so the shared .venv runs this checkout's code.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
READMES = ["README.md", "launch/README.md"]
ECHO = "TORCHRUN=echo "  # launch/torchrun.sh prints its launch line instead of starting ranks
TORCHRUN_DRY = "tests/unit/test_launch.py runs the 4-rank DRY_RUN for real"

# README command -> (shell steps, each expected to exit 0; text the last step must print, or "").
RUN: dict[str, tuple[list[str], str]] = {
    ". .venv/bin/activate": ([". .venv/bin/activate"], ""),
    "r1m demo [--out DIR] [seed=N] [key=value ...]": (["r1m demo --help"], "sft_steps=N"),
    "r1m train CONFIG [key=value ...]": (["r1m train --help", "r1m validate configs/demo_cpu.yaml"], "demo_cpu.yaml"),
    "r1m convert hf-to-mcore --hf DIR --out DIR": (["r1m convert hf-to-mcore --help"], "--hf"),
    "r1m convert mcore-to-hf --ckpt DIR --out DIR": (["r1m convert mcore-to-hf --help"], "--ckpt"),
    "r1m score --ckpt DIR --input IN.jsonl --output OUT.jsonl": (["r1m score --help"], "--input"),
    "r1m reward math --response TEXT --answer TEXT": (
        ["r1m reward math --response 'so \\boxed{4}' --answer 4"], '"score": 1.0'),
    "r1m reward code --program FILE --tests FILE.json": (["r1m reward code --help"], "--tests"),
    "r1m eplb plan --load FILE.json --slots R --gpus G --nodes N --groups K --out FILE.json": (
        ["d=$(mktemp -d) && echo '{\"load\": [[1, 2, 3, 4], [4, 3, 2, 1]]}' > $d/load.json && "
         "r1m eplb plan --load $d/load.json --slots 8 --gpus 4 --nodes 1 --groups 1 --out $d/plan.json"],
        "max/mean load"),
    "r1m plan CONFIG [--world-size N] [--json] [key=value ...]": (
        ["r1m plan configs/demo_cpu.yaml --world-size 1"], "fits"),
    "r1m doctor": (["r1m doctor"], ""),
    "NPROC_PER_NODE=4 CONFIG=configs/micro_moe_sft.yaml CMD=sft bash launch/torchrun.sh parallel.tp=2 "
    "parallel.pp=2 logging.run_dir=runs/sft_tp2pp2": (
        [ECHO + "NPROC_PER_NODE=4 CONFIG=configs/micro_moe_sft.yaml CMD=sft bash launch/torchrun.sh "
         "parallel.tp=2 parallel.pp=2 logging.run_dir=runs/sft_tp2pp2"],
        "--nproc-per-node=4 --rdzv-backend=c10d"),
    "DRY_RUN=1 NPROC_PER_NODE=4 CONFIG=configs/micro_moe_sft.yaml bash launch/torchrun.sh parallel.tp=2 "
    "parallel.pp=2": (
        [ECHO + "DRY_RUN=1 NPROC_PER_NODE=4 CONFIG=configs/micro_moe_sft.yaml bash launch/torchrun.sh "
         "parallel.tp=2 parallel.pp=2"],
        "-m r1_megatron.cli validate configs/micro_moe_sft.yaml parallel.tp=2 parallel.pp=2"),
    "torchrun --nproc-per-node 4 -m r1_megatron.cli score --ckpt STEP_DIR --input in.jsonl --output "
    "out.jsonl --tp 2 --pp 2": (["command -v torchrun", "r1m score --help"], "--tp"),
    "torchrun --nproc-per-node 4 -m r1_megatron.cli convert mcore-to-hf --ckpt STEP_DIR --out hf/ --tp 2 "
    "--pp 2 --ep 2": (["command -v torchrun", "r1m convert mcore-to-hf --help"], "--ep"),
    "torchrun --nproc-per-node 4 -m r1_megatron.cli convert hf-to-mcore --hf HF_DIR --out mc/ --tp 2 "
    "--pp 2 --ep 2": (["command -v torchrun", "r1m convert hf-to-mcore --help"], "--ep"),
    "torchrun --nproc-per-node 4 -m r1_megatron.cli train configs/demo_cpu.yaml parallel.tp=2 parallel.ep=2 "
    "rl.steps=2 logging.run_dir=runs/grpo_tp2ep2": (
        ["command -v torchrun", "r1m plan configs/demo_cpu.yaml parallel.tp=2 parallel.ep=2 rl.steps=2 "
         "logging.run_dir=runs/grpo_tp2ep2 --world-size 4"], "fits"),
    "torchrun --nproc-per-node 4 -m r1_megatron.cli demo --out runs/demo_tp2ep2 parallel.tp=2 "
    "parallel.ep=2": (
        ["command -v torchrun", "r1m plan configs/demo_cpu.yaml parallel.tp=2 parallel.ep=2 --world-size 4"],
        "fits"),
    "r1m train configs/demo_cpu.yaml rollout.placement=separate rollout.engines=2": (
        ["r1m validate configs/demo_cpu.yaml rollout.placement=separate rollout.engines=2"], "demo_cpu.yaml"),
    "r1m train configs/demo_cpu.yaml rollout.placement=separate rollout.async=one_step rl.tis=2": (
        ["r1m validate configs/demo_cpu.yaml rollout.placement=separate rollout.async=one_step rl.tis=2"],
        "demo_cpu.yaml"),
    "CONFIG=configs/micro_moe_sft.yaml NPROC_PER_NODE=4 DRY_RUN=1 launch/torchrun.sh parallel.tp=2 "
    "parallel.pp=2": (
        [ECHO + "CONFIG=configs/micro_moe_sft.yaml NPROC_PER_NODE=4 DRY_RUN=1 launch/torchrun.sh "
         "parallel.tp=2 parallel.pp=2"],
        "-m r1_megatron.cli validate configs/micro_moe_sft.yaml parallel.tp=2 parallel.pp=2"),
    "CONFIG=configs/moonlight_16b_grpo_16xh100.yaml NPROC_PER_NODE=8 launch/torchrun.sh parallel.dp=8 "
    "rollout.tp=2": (
        [ECHO + "CONFIG=configs/moonlight_16b_grpo_16xh100.yaml NPROC_PER_NODE=8 launch/torchrun.sh "
         "parallel.dp=8 rollout.tp=2"],
        "-m r1_megatron.cli train configs/moonlight_16b_grpo_16xh100.yaml parallel.dp=8 rollout.tp=2"),
    "export IMG=/shared/images/r1-megatron.sqsh": (["export IMG=/shared/images/r1-megatron.sqsh"], ""),
}

_SLURM = "needs Slurm with pyxis; tests/unit/test_launch.py runs the sbatch scripts against a fake srun"
# README command -> why it is not run here.
SKIPPED: dict[str, str] = {
    "bash launch/demo.sh": "pip-installs .venv, then the 9-minute demo; the coordinator runs it after a merge",
    "bash launch/test.sh": "pip-installs .venv, then the whole suite, this test included",
    "sbatch --nodes=32 --export=ALL,R1M_IMAGE=$IMG,CONFIG=configs/dsv3_671b_grpo_256xh100.yaml "
    "launch/slurm/grpo.sbatch": _SLURM,
    "sbatch --nodes=32 --export=ALL,R1M_IMAGE=$IMG,CONFIG=configs/dsv3_671b_grpo_256xh100.yaml,DRY_RUN=1 "
    "launch/slurm/grpo.sbatch": _SLURM,
    "sbatch --nodes=4 --export=ALL,R1M_IMAGE=$IMG,CONFIG=configs/<sft config>.yaml launch/slurm/sft.sbatch "
    "optim.lr=1e-5": _SLURM,
    "sbatch --nodes=32 --export=ALL,R1M_IMAGE=$IMG,HF_DIR=/data/DeepSeek-V3,OUT_DIR=/data/dsv3-mcore,TP=1,"
    "PP=16,EP=16 launch/slurm/convert.sbatch": _SLURM,
    "docker build -f launch/container/Dockerfile -t r1-megatron:0.1.0 .": "needs docker and network",
    "enroot import -o r1-megatron.sqsh dockerd://r1-megatron:0.1.0": "needs enroot and the docker image",
    "bash launch/gpu_check.sh [OUT_DIR]": "needs a CUDA GPU",
}


def readme_commands(text: str) -> list[str]:
    """The commands of every ```bash block: continuation lines joined, comments and extra spaces dropped."""
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = " ".join(re.sub(r"(^|\s)#.*$", "", line).split())
            if command:
                out.append(command)
    return out


COMMANDS = [c for name in READMES for c in readme_commands((ROOT / name).read_text())]


def test_every_readme_command_is_run_or_skipped_with_a_reason():
    unhandled = [c for c in COMMANDS if c not in RUN and c not in SKIPPED]
    assert not unhandled, "README commands this test neither runs nor skips:\n" + "\n".join(unhandled)
    stale = [c for c in [*RUN, *SKIPPED] if c not in COMMANDS]
    assert not stale, "entries for commands no README has any more:\n" + "\n".join(stale)


_done: dict[str, str] = {}


def _shell(step: str) -> str:
    """Run one step in a fresh login shell after activating .venv; its output (cached per step)."""
    if step not in _done:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(["bash", "-lc", f". .venv/bin/activate && {step}"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"`{step}` exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        _done[step] = proc.stdout + proc.stderr
    return _done[step]


@pytest.mark.parametrize("command", [c for c in COMMANDS if c in RUN])
def test_readme_command_works(command):
    steps, expected = RUN[command]
    for step in steps:
        out = _shell(step)
    assert expected in out, f"`{steps[-1]}` did not print {expected!r}:\n{out}"
