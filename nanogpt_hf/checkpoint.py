"""Crash-safe checkpoints: the model folder (save_pretrained) and resumable accelerator states.

Layout of a run's out_dir (out_dir is "the model", as in nanoGPT):

    out_dir/                    best (or latest, with always_save_checkpoint) model: from_pretrained(out_dir) works
    out_dir/state/step-N/       accelerator.save_state + trainer_state.json; the newest `keep` are kept
    out_dir/metrics.jsonl, loss.png, train_config.yaml

Everything is first written under a temporary name, flushed to disk, then renamed: a state directory is visible
only once complete (trainer_state.json is written last, inside the temporary directory), and the model files are
replaced one by one with os.replace, weights last. Within a run only the weights and the model card change between
saves (config and tokenizer are the same), so a kill at any instant leaves a loadable model and a resumable state.
"""

from __future__ import annotations

import json
import os
import re
import shutil

from .errors import UserError

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


def save_failed(what: str, path: str, exc: OSError) -> UserError:
    reason = exc.strerror or str(exc)
    return UserError(f"could not save the {what} to {path}: {reason}; the previous checkpoint is intact "
                     f"(free some space or fix the permissions, then resume with --init_from=resume)")


def save_model_folder(write, out_dir: str) -> None:
    """Call write(tmp_dir) to produce a save_pretrained folder, then move its files into out_dir atomically."""
    tmp = os.path.join(out_dir, f".tmp-model-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        write(tmp)
        _fsync_tree(tmp)
        names = sorted(os.listdir(tmp), key=lambda n: n.endswith(".safetensors"))  # weights last
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        _fsync_dir(out_dir)
    except OSError as exc:
        raise save_failed("model", out_dir, exc) from None
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


def read_trainer_state(path: str) -> dict:
    with open(os.path.join(path, TRAINER_STATE), encoding="utf-8") as fh:
        return json.load(fh)


def save_state(accelerator, out_dir: str, step: int, trainer_state: dict, keep: int) -> str:
    """accelerator.save_state (model, optimizer, RNG of every rank, scaler) into out_dir/state/step-N, atomically.

    Called on every process. Returns the final path.
    """
    root = os.path.join(out_dir, STATE_DIR)
    final = os.path.join(root, f"step-{step}")
    tmp = os.path.join(root, f".tmp-step-{step}")
    error = None
    if accelerator.is_main_process:
        try:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left over by a run killed mid-save
        except OSError as exc:
            error = exc
    accelerator.wait_for_everyone()
    try:
        if error is None:
            accelerator.save_state(tmp)
    except OSError as exc:
        error = exc
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            if error is not None:
                raise error
            with open(os.path.join(tmp, TRAINER_STATE), "w", encoding="utf-8") as fh:
                json.dump(trainer_state, fh, indent=1)
            _fsync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)  # same step saved twice (e.g. interrupted right after an eval)
            os.replace(tmp, final)
            _fsync_dir(root)
            for _, old in state_dirs(out_dir)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise save_failed("training state", final, exc) from None
    elif error is not None:
        raise save_failed("training state", final, error) from None
    accelerator.wait_for_everyone()
    return final
