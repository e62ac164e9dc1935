"""Console scripts, and the one place where mistakes become one line: `error: ...` on stderr, exit status 2.

Our own checks raise UserError. Ordinary mistakes that the libraries find first (a missing or unreadable file, bad
JSON or YAML, a damaged safetensors file, a Hub or datasets error, an impossible config value) arrive as the
library's exception and are printed the same way (NANOGPT_DEBUG=1 shows their tracebacks). Anything else is our bug.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from .common import UserError


def library_errors() -> tuple[type[BaseException], ...]:
    import yaml
    from datasets.exceptions import DatasetsError
    from safetensors import SafetensorError

    # OSError covers missing files, permissions, a full disk and every huggingface_hub error; ValueError covers bad
    # JSON and the values transformers refuses
    return OSError, ValueError, yaml.YAMLError, SafetensorError, DatasetsError


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    if not sys.stderr.isatty():  # a log file gets the commands' log lines, not progress-bar redraws
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        return int(main(argv) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("NANOGPT_DEBUG") or not isinstance(exc, library_errors()):
            raise
        # the library's message on one line, with its location (a YAML line, the checkpoint being loaded)
        text = " ".join(" ".join([str(exc) or type(exc).__name__, *getattr(exc, "__notes__", [])][:2]).split())
        print(f"error: {text[:400]} ({type(exc).__name__})", file=sys.stderr)
        return 2


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
