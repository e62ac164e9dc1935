"""`python bench.py --help` (or `accelerate launch bench.py ...`): see nanogpt_hf/cli.py."""

import sys

from nanogpt_hf.cli import bench_main

if __name__ == "__main__":
    sys.exit(bench_main())
