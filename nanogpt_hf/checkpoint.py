"""Crash-safe checkpoints: the model folder (save_pretrained) and resumable accelerator states.

Layout of a run's out_dir (out_dir is "the model", as in nanoGPT):

    out_dir/                    best (or latest, with always_save_checkpoint) model: from_pretrained(out_dir) works
    out_dir/state/step-N/       accelerator.save_state + trainer_state.json, config.json and the tokenizer; the newest
                                `keep` are kept
    out_dir/metrics.jsonl, loss.png, train_config.yaml

Everything is first written under a temporary name, flushed to disk, then renamed: a state directory is visible
only once complete (trainer_state.json is written last, inside the temporary directory), and the model files are
replaced one by one with os.replace, weights last. Within a run only the weights and the model card change between
saves (config and tokenizer are the same), so a kill at any instant leaves a loadable model and a resumable state.
A state directory is never deleted in place (a half-deleted one could still look complete): it is first renamed to a
hidden .trash-* name, then removed. Leftovers of a killed run (.tmp-*, .trash-*) are removed by the next save.

A save that fails (disk full, no permission, read-only file system) raises UserError with one line; the previous
model files and states are left as they were.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid

from .errors import UserError, first_line

STATE_DIR = "state"
TRAINER_STATE = "trainer_state.json"
_STEP = re.compile(r"^step-(\d+)$")


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Disk full and friends do not always arrive as OSError: safetensors raises SafetensorError("... I/O error: No space
# left on device (os error 28)"), torch.save a RuntimeError("[enforce fail at inline_container.cc] unexpected pos").
_IO_REASONS = ("No space left on device", "Disk quota exceeded", "Read-only file system", "Permission denied",
               "File too large")
_IO_MARKERS = _IO_REASONS + ("I/O error", "os error", "file write failed", "unexpected pos")


def io_failure(exc: BaseException, path: str | None = None) -> str | None:
    """A short reason when exc is a failed write (disk full, permissions...), else None (a bug: keep the traceback)."""
    if isinstance(exc, OSError):
        return exc.strerror or first_line(exc)
    text = str(exc)
    if not any(marker in text for marker in _IO_MARKERS):
        return None
    for reason in _IO_REASONS:
        if reason in text:
            return reason
    try:  # torch's zip writer does not say why a write failed: look at the disk
        if path is not None and shutil.disk_usage(_existing_parent(path)).free < (1 << 20):
            return os.strerror(errno.ENOSPC)
    except OSError:
        pass
    return "a write failed (is the disk full?)"


def _existing_parent(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def save_failed(what: str, path: str, reason: str) -> UserError:
    return UserError(f"could not save the {what} to {path}: {reason}; the previous checkpoint is intact "
                     f"(free some space or fix the permissions, then resume with --init_from=resume)")


def _discard(path: str) -> None:
    """Remove a directory so that no half-deleted copy stays visible under its name: rename, then delete."""
    trash = os.path.join(os.path.dirname(path), f".trash-{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _is_leftover(name: str) -> bool:
    """Temporaries of a killed run in out_dir: ours (.tmp-model-PID), the metrics and plot writers' (NAME.tmp-PID*)
    and the out_dir write probe (.write-test-PID)."""
    return name.startswith((".tmp-model-", ".write-test-")) or ".tmp-" in name


def _remove_leftovers(folder: str, match) -> None:
    """Temporary and trash entries left by a run killed mid-save (one run writes an out_dir at a time)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        path = os.path.join(folder, name)
        if match(name):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.remove(path)
                except OSError:
                    pass


def save_model_folder(write, out_dir: str) -> None:
    """Call write(tmp_dir) to produce a save_pretrained folder, then move its files into out_dir atomically."""
    tmp = os.path.join(out_dir, f".tmp-model-{os.getpid()}")
    try:
        _remove_leftovers(out_dir, _is_leftover)
        os.makedirs(tmp)
        write(tmp)
        _fsync_tree(tmp)
        names = sorted(os.listdir(tmp), key=lambda n: n.endswith(".safetensors"))  # weights last
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        _fsync_dir(out_dir)
    except Exception as exc:
        reason = io_failure(exc, out_dir)
        if reason is None:
            raise
        raise save_failed("model", out_dir, reason) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def state_dirs(out_dir: str) -> list[tuple[int, str]]:
    """Complete resumable states in out_dir, oldest first, as (step, path)."""
    root = os.path.join(out_dir, STATE_DIR)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP.match(name)
        if m and os.path.isfile(os.path.join(root, name, TRAINER_STATE)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest_state(out_dir: str) -> str | None:
    states = state_dirs(out_dir)
    return states[-1][1] if states else None


def discard_states(out_dir: str) -> None:
    """Remove every resumable state in out_dir (a new run starts there: the old states are not its own)."""
    for _, path in state_dirs(out_dir):
        _discard(path)


def prune_states(out_dir: str, keep: int) -> None:
    """Keep the newest `keep` states (all with 0). Also run on resume: a run killed between writing a state and
    pruning the old ones left one too many."""
    for _, old in state_dirs(out_dir)[:-keep] if keep > 0 else []:
        _discard(old)


def tokenizer_folder(checkpoint: str) -> str:
    """Where a checkpoint's tokenizer is: its own folder, or for a resumable state saved without one (before states
    held their tokenizer) its run folder's."""
    run = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
    if (os.path.isfile(os.path.join(checkpoint, TRAINER_STATE)) and not os.path.isfile(os.path.join(checkpoint,
            "tokenizer.json")) and os.path.isfile(os.path.join(run, "tokenizer.json"))):
        return run
    return checkpoint


def read_trainer_state(path: str) -> dict:
    with open(os.path.join(path, TRAINER_STATE), encoding="utf-8") as fh:
        return json.load(fh)


def save_state(accelerator, out_dir: str, step: int, trainer_state: dict, keep: int, write=None) -> str:
    """accelerator.save_state (model, optimizer, RNG of every rank, scaler) into out_dir/state/step-N, atomically.

    Called on every process; write(tmp_dir), if given, adds files on the main process (e.g. config.json) before the
    directory becomes visible. Returns the final path. A failure on any process (disk full, no permission) raises
    UserError on every process, after removing the incomplete temporary directory; older states are untouched.
    """
    root = os.path.join(out_dir, STATE_DIR)
    final = os.path.join(root, f"step-{step}")
    tmp = os.path.join(root, f".tmp-step-{step}")
    failure = None  # (reason, exception) of this process
    if accelerator.is_main_process:
        try:
            os.makedirs(root, exist_ok=True)
            _remove_leftovers(root, lambda name: name.startswith((".tmp-step-", ".trash-")))  # killed mid-save
        except OSError as exc:
            failure = (io_failure(exc), exc)
    accelerator.wait_for_everyone()
    if _any_failed(accelerator, failure) is None:
        try:
            accelerator.save_state(tmp)
        except Exception as exc:
            failure = (io_failure(exc, tmp), exc)
    failed = _any_failed(accelerator, failure)
    if failed is None and accelerator.is_main_process:
        try:
            if write is not None:
                write(tmp)
            with open(os.path.join(tmp, TRAINER_STATE), "w", encoding="utf-8") as fh:
                json.dump(trainer_state, fh, indent=1)
            _fsync_tree(tmp)
            if os.path.exists(final):  # the same step saved twice (e.g. stopped right after an evaluation)
                _discard(final)
            os.replace(tmp, final)
            _fsync_dir(root)
            prune_states(out_dir, keep)
        except Exception as exc:
            failure = (io_failure(exc, tmp), exc)
    if failed is None:
        failed = _any_failed(accelerator, failure)
    if failed is not None:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        if failure is not None and failure[0] is None:
            raise failure[1]  # not an I/O failure: our bug, keep the traceback
        raise save_failed("training state", final, failed) from None
    return final


def load_state(accelerator, state_dir: str) -> None:
    """accelerator.load_state: weights, optimizer, RNG of every process, loss scale. A state saved without loss
    scaling (bf16 or fp32) and resumed in fp16 (dtype auto on a GPU without bf16, or --dtype=float16) has no
    scaler.pt, which accelerate would fail to open: the loss scale then starts afresh, as in a new fp16 run."""
    from accelerate.utils import SCALER_NAME

    scaler = accelerator.scaler
    if scaler is None or os.path.exists(os.path.join(state_dir, SCALER_NAME)):
        accelerator.load_state(state_dir)
        return
    accelerator.scaler = None
    try:
        accelerator.load_state(state_dir)
    finally:
        accelerator.scaler = scaler


def _any_failed(accelerator, failure) -> str | None:
    """Agree across processes whether any failed (every process must take the same path, or the next collective
    hangs). Returns this process' reason, another process' failure as a generic reason, or None."""
    failed = failure is not None
    if accelerator.num_processes > 1:
        import torch

        flag = torch.tensor(1.0 if failed else 0.0, device=accelerator.device)
        failed = bool(accelerator.reduce(flag, reduction="sum").item())
    if not failed:
        return None
    if failure is not None:
        reason, exc = failure
        return reason or f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    return "another process failed to write its part"
