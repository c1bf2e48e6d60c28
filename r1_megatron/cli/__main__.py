"""`python -m r1_megatron.cli <command> ...`: the `r1m` entry point, as torchrun launches it."""

import sys

from r1_megatron.cli import main

sys.exit(main())
