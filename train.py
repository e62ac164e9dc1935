"""`python train.py --help` (or `accelerate launch train.py ...`): see nanogpt_hf/cli.py."""

import sys

from nanogpt_hf.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
