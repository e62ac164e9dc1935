"""Console scripts, and the one place where mistakes become one line: `error: ...` on stderr, exit status 2.

Our own checks raise UserError. Ordinary mistakes that the libraries find first (a missing or unreadable file, bad
JSON or YAML, a damaged safetensors file, a Hub or datasets error, an impossible config value) arrive as the
library's exception and are printed the same way (NANOGPT_DEBUG=1 shows their tracebacks). Anything else, and
anything raised in our own work (common.own_work: the training loop), is a bug and keeps its traceback."""

from __future__ import annotations

import functools
import gc
import importlib
import os
import sys
from typing import Callable

from transformers.utils import logging as hf_logging

from .common import UserError


def library_errors() -> tuple[type[BaseException], ...]:
    import yaml
    from datasets.exceptions import DatasetsError
    from safetensors import SafetensorError

    # OSError: missing files, permissions, a full disk, every huggingface_hub error; ValueError: bad JSON, config values
    return OSError, ValueError, yaml.YAMLError, SafetensorError, DatasetsError


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    try:
        return int(main(argv) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an input mistake that a library found first, unless it arose in our own work
        if os.environ.get("NANOGPT_DEBUG") or getattr(exc, "own_work", False) or not isinstance(exc, library_errors()):
            raise
        # the library's message on one line, with its location (a YAML line, the checkpoint being loaded)
        text = " ".join(" ".join([str(exc) or type(exc).__name__, *getattr(exc, "__notes__", [])][:2]).split())
        print(f"error: {text[:400]} ({type(exc).__name__}; NANOGPT_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2


def run_module(name: str, argv: list[str] | None = None) -> int:  # imported on use: a command loads only its own
    if not sys.stderr.isatty():  # a log file gets the commands' log lines, not progress-bar redraws
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is imported, below
        hf_logging.disable_progress_bar()  # transformers' and the Hub's (imported with the package)
    module = importlib.import_module(f"nanogpt_hf.{name}")
    if argv is None:  # the command itself: the collector leaves what is alive now alone (~1.2 s less in a laptop run,
        gc.collect()  # most of it at exit); what earlier runs left in this process (IPython's %run) is freed first
        gc.freeze()
    return run(module.main, argv)


train_main = functools.partial(run_module, "training")  # the console scripts (pyproject.toml) and top-level scripts
sample_main = functools.partial(run_module, "sampling")
bench_main = functools.partial(run_module, "bench")
prepare_main = functools.partial(run_module, "data")
hf_main = functools.partial(run_module, "convert")

if __name__ == "__main__":  # `python -m nanogpt_hf.cli ...` is nanogpt-hf (the others have top-level scripts)
    sys.exit(hf_main())
