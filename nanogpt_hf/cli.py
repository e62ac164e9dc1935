"""Console scripts. Each one parses its settings, runs, and turns a UserError into one line on stderr and exit 2."""

from __future__ import annotations

import sys
from typing import Callable

from .errors import UserError


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    try:
        return int(main(argv) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def train_main(argv: list[str] | None = None) -> int:
    from .training import main

    return run(main, argv)


def sample_main(argv: list[str] | None = None) -> int:
    from .sampling import main

    return run(main, argv)


def bench_main(argv: list[str] | None = None) -> int:
    from .bench import main

    return run(main, argv)


def prepare_main(argv: list[str] | None = None) -> int:
    from .data import main

    return run(main, argv)


def hf_main(argv: list[str] | None = None) -> int:
    from .convert import main

    return run(main, argv)


if __name__ == "__main__":  # `python -m nanogpt_hf.cli ...` is nanogpt-hf (the others have top-level scripts)
    sys.exit(hf_main())
