"""Rebuild the tiny test tokenizer (byte-level BPE, 512 ids) into tests/assets/tokenizer/.

Usage: python tools/build_tokenizer.py [OUT_DIR]
The build is deterministic: rerunning it must leave the committed files unchanged.
"""

import sys

from r1_megatron.data.tokenizer import ASSET_DIR, build_tokenizer


def main(argv: list[str]) -> int:
    out = argv[0] if argv else ASSET_DIR
    for path in build_tokenizer(out):
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
