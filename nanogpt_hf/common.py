"""What every command shares: UserError (printed by the CLI as one `error:` line, exit 2), atomic_output (what we
write appears complete or not at all) and is_hub_id (the one rule for "local path or Hub id")."""

from __future__ import annotations

import contextlib
import os
import shutil

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's checkpoints on the Hub


class UserError(Exception):
    """A problem the user can fix; the message names the problem and the fix, on one line."""


@contextlib.contextmanager
def own_work():
    """Marks our own work (the training loop, past every input): an exception raised inside is a bug, ours or in a
    researcher's edit, and the CLI keeps its traceback even when its type is one that input mistakes raise; an
    OSError is still the disk's or the network's (one line)."""
    try:
        yield
    except Exception as exc:
        exc.own_work = not isinstance(exc, OSError)
        raise


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (library messages run on), or its type when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def is_hub_id(ref: str | None) -> bool:
    """'gpt2', 'user/name': a Hub id. Anything that exists locally or looks like a path ('./x', '/x', 'a/b/c', 'x/',
    '~/x', 'C:\\x', a file name with an extension we read) is local."""
    if not ref or os.path.exists(ref) or ref.startswith((".", "/", "~")) or ref.endswith("/"):
        return False
    return ref.count("/") <= 1 and "\\" not in ref and ":" not in ref and not ref.endswith(
        (".txt", ".json", ".jsonl", ".parquet", ".yaml", ".pt"))


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """Flush a file, or a folder and everything in it, to disk."""
    for root, _, files in os.walk(path):
        for name in files:
            _fsync(os.path.join(root, name))
    _fsync(path)


def share(path: str) -> None:
    """Give a file, or a folder and everything in it, the modes of what the user creates (0o777 or 0o666 less the
    umask): a library may write owner-only (safetensors' model.safetensors: 0600), and others read checkpoints."""
    umask = os.umask(0o077)  # reading the umask sets it: put back at once
    os.umask(umask)
    for p in [path] + [os.path.join(root, n) for root, dirs, files in os.walk(path) for n in dirs + files]:
        if not os.path.islink(p):
            with contextlib.suppress(OSError):  # a file system without modes (FAT, some mounts) keeps its own
                os.chmod(p, (0o777 if os.path.isdir(p) or os.access(p, os.X_OK) else 0o666) & ~umask)


def remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


@contextlib.contextmanager
def atomic_output(path: str, merge: bool = False):
    """Yield a temporary path to write a file or folder into (open(), save_pretrained or save_to_disk create it);
    when the block ends, share and fsync it, then rename it into place. An exception leaves `path` as it was.
    The temporary is a sibling of `path`: an existing folder is moved aside, replaced, then deleted. With merge=True
    it lies inside the folder (same file system, even for a mount point) and its entries are moved in one by one,
    weights (*.safetensors) last, keeping what else the folder holds (a run's out_dir: states, metrics). A symlink at
    `path` stays a link. Leftovers of a killed writer (one writer per path at a time) are removed first."""
    path = os.path.realpath(path)
    parent, base = os.path.split(path)
    home, stem = (path, "") if merge else (parent, f".{base}")
    os.makedirs(home, exist_ok=True)
    for name in os.listdir(home):
        if name.startswith((f"{stem}.tmp-", f"{stem}.old-")):
            remove(os.path.join(home, name))
    tmp = os.path.join(home, f"{stem}.tmp-{os.getpid()}")
    try:
        yield tmp
        share(tmp)
        fsync_tree(tmp)
        if merge:
            for name in sorted(os.listdir(tmp), key=lambda name: name.endswith(".safetensors")):  # weights last
                os.replace(os.path.join(tmp, name), os.path.join(path, name))
        elif os.path.isdir(tmp) and os.path.exists(path):
            old = os.path.join(parent, f".{base}.old-{os.getpid()}")
            os.rename(path, old)
            os.rename(tmp, path)
            remove(old)
        else:
            os.replace(tmp, path)  # a file, or a folder that is new
        _fsync(home)
    finally:
        remove(tmp)
