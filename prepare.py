"""`python prepare.py --help` (or `accelerate launch prepare.py ...`): see nanogpt_hf/cli.py."""

import sys

from nanogpt_hf.cli import prepare_main

if __name__ == "__main__":
    sys.exit(prepare_main())
