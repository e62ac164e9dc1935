"""`python sample.py --help` (or `accelerate launch sample.py ...`): see nanogpt_hf/cli.py."""

import sys

from nanogpt_hf.cli import sample_main

if __name__ == "__main__":
    sys.exit(sample_main())
