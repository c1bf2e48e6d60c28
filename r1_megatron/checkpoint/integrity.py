"""Checkpoint integrity: a manifest of file sizes and CRC32s written at save, checked before a load.

Every directory r1m writes (dist checkpoints, single-rank megatron checkpoints, exported HF
directories) gets `r1m_manifest.json`: {"algorithm": "crc32", "files": {name: {"size", "crc32"}}}.
It lists the files whose damage would otherwise surface deep inside torch or safetensors; the YAML
card and config are parsed and checked on their own, and may be edited by hand.
The checksums are taken right after each file is written, by the rank that wrote it (the file is
still in the page cache), and gathered to rank 0, which writes the manifest before the commit.

Before a load the files listed are checked (`checkpoint.verify`):
  full  sizes and checksums (default)
  size  sizes only: a truncated or missing file, without reading terabytes
  off   nothing
A training save with `checkpoint.verify` other than full records sizes only (hashing a rank's
share of a 671B checkpoint with its optimizer state costs about a minute at ~1 GB/s).
Under torch.distributed every rank checks the sizes and hashes a round-robin share of the files,
and the results are exchanged, so every rank raises the same error and no file is hashed twice.
A failure is `CorruptCheckpoint`: one line naming the file and what is wrong with it.

A safetensors file is also checked against its own header (the tensors' byte ranges must end at the
end of the file), manifest or not, so a truncated download is named instead of failing inside
safetensors.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

MANIFEST = "r1m_manifest.json"
VERIFY_MODES = ("full", "size", "off")
_CHUNK = 16 * 1024**2


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: names the path and the reason."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint file is missing, truncated or altered (one line naming the file)."""


def digest(path: str | Path, checksum: bool = True) -> dict:
    """{"size": bytes, "crc32": 8 hex digits} of one file, read in 16 MiB chunks (only the size
    without `checksum`)."""
    if not checksum:
        return {"size": Path(path).stat().st_size}
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"size": size, "crc32": f"{crc:08x}"}


def digests(directory: str | Path, names: list[str], checksum: bool = True) -> dict[str, dict]:
    return {name: digest(Path(directory) / name, checksum) for name in names}


def write_manifest(directory: str | Path, files: dict[str, dict]) -> None:
    """Write the manifest (atomically: a crash leaves no half-written manifest)."""
    path = Path(directory) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps({"algorithm": "crc32", "files": dict(sorted(files.items()))}, indent=1))
    os.replace(tmp, path)


def read_manifest(directory: str | Path) -> dict[str, dict] | None:
    """The manifest's files, or None for a directory without one (written before manifests, or not by r1m)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(f"{path}: unreadable manifest ({type(e).__name__})") from None
    return files


def check_mode(mode: str) -> str:
    if mode not in VERIFY_MODES:
        raise CheckpointError(f"checkpoint.verify: '{mode}' is not one of {', '.join(VERIFY_MODES)}")
    return mode


def _size_error(path: Path, expected: dict) -> str | None:
    if not path.is_file():
        return f"corrupt checkpoint: {path}: missing (listed in {MANIFEST})"
    size = path.stat().st_size
    if size != expected["size"]:
        return (f"corrupt checkpoint: {path}: {size} bytes, the manifest says {expected['size']} "
                "(truncated or overwritten)")
    return None


def _hash_error(path: Path, expected: dict) -> str | None:
    if "crc32" not in expected:
        return None  # saved with checkpoint.verify=size: no checksum to compare
    got = digest(path)["crc32"]
    if got != expected["crc32"]:
        return (f"corrupt checkpoint: {path}: crc32 {got} differs from the manifest's {expected['crc32']} "
                "(altered file)")
    return None


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def verify(directory: str | Path, mode: str = "full", *, collective: bool = True) -> None:
    """Check `directory` against its manifest; `collective`: under torch.distributed every rank calls
    it and the hashing is shared out (otherwise this process checks everything alone).

    No manifest: nothing to check. Raises CorruptCheckpoint naming the first bad file."""
    if check_mode(mode) == "off":
        return
    rank, world = _world() if collective else (0, 1)
    try:
        files = read_manifest(directory)
        error = None
        if files:
            names = sorted(files)
            error = next((e for n in names if (e := _size_error(Path(directory) / n, files[n]))), None)
            if error is None and mode == "full":
                mine = names[rank::world]  # a round-robin share: each file is hashed by one rank
                error = next((e for n in mine if (e := _hash_error(Path(directory) / n, files[n]))), None)
    except CorruptCheckpoint as e:
        error = str(e)
    except OSError as e:  # unreadable here: still report it collectively, so no rank waits alone
        error = f"corrupt checkpoint: {e.filename or directory}: {e.strerror or e}"
    if world > 1:
        import torch.distributed as dist

        errors: list = [None] * world
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise CorruptCheckpoint(error)


def check_safetensors(path: str | Path) -> None:
    """The file holds its whole header and every tensor's bytes (8-byte length, JSON header, data)."""
    path = Path(path)
    if not path.is_file():
        raise CorruptCheckpoint(f"corrupt checkpoint: {path}: missing (named by the safetensors index)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        try:
            header = json.loads(f.read(n)) if 0 <= n <= size - 8 else None
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise CorruptCheckpoint(f"corrupt checkpoint: {path}: {size} bytes, no complete safetensors header")
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        raise CorruptCheckpoint(
            f"corrupt checkpoint: {path}: {size} bytes, its safetensors header needs {expected} (truncated?)"
        )


def gather_digests(directory: str | Path, checksum: bool = True) -> dict[str, dict]:
    """After a dist_checkpointing save (collective): each rank hashes the `__<rank>_*.distcp` files it
    wrote, rank 0 also the coordinator's (.metadata, metadata.json, common.pt). Rank 0 gets them all,
    the other ranks {}. Without `checksum` only the sizes are recorded."""
    rank, world = _world()
    directory = Path(directory)
    names = [p.name for p in directory.iterdir() if p.is_file()]
    mine = [n for n in names if n.startswith(f"__{rank}_")]
    if rank == 0:
        mine += [n for n in names if not n.startswith("__") and n != MANIFEST]
    local = digests(directory, sorted(mine), checksum)
    if world == 1:
        return local
    import torch.distributed as dist

    everyone: list | None = [None] * world if rank == 0 else None
    dist.gather_object(local, everyone, dst=0)
    return {k: v for part in everyone or [] for k, v in part.items()}
