"""Saves that never leave a half-written folder or file: write into a staging folder next to the target,
then swap it in. Used by `UniMEModel.save_pretrained`, `UniMEProcessor.save_pretrained` and the training
side (merged models, Trainer checkpoints, teacher caches, evaluation results).

On Linux the staging folder `.<name>.tmp` and an existing `<name>` are swapped in one atomic step
(`renameat2(RENAME_EXCHANGE)`), so `<name>` is at every instant the complete old or the complete new
folder. Where the system or filesystem cannot exchange, the swap is two renames: the old folder goes to
`.<name>.old`, the staging folder becomes `<name>`; if the second rename fails the old folder is put
back, and a process killed between the two renames leaves `<name>` absent and the complete old folder
in `.<name>.old`: the next save to `<name>` puts it back before it starts, and clears any `.<name>.tmp`
left behind. Names starting with a dot never match `checkpoint-N`, so resume never
picks up a staging folder.

What we write is readable by others as the umask allows (755 folders / 644 files under umask 022):
`tempfile` and safetensors create 0700 / 0600 entries, so `make_readable` resets them before publishing.
"""

import contextlib
import ctypes
import ctypes.util
import errno
import fnmatch
import os
import shutil
from pathlib import Path


_RENAME_EXCHANGE = 2  # <linux/fs.h>
_AT_FDCWD = -100


def _load_renameat2():
    """libc's `renameat2`, or `None` where the C library has none (not Linux, or glibc before 2.28)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _load_renameat2()


def exchange_paths(first, second):
    """Swap two existing paths in one atomic step; `False` (nothing changed) where the system or the
    filesystem cannot, `OSError` for any other failure."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(first), None, os.fspath(second))


def staging_names(target):
    """`(staging, backup)` paths of a save to `target`: `.<name>.tmp` and `.<name>.old` next to it."""
    target = Path(target)
    return target.with_name(f".{target.name}.tmp"), target.with_name(f".{target.name}.old")


def current_umask():
    """The process umask: from /proc on Linux (setting it to read it races with other threads' file creation)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_readable(path):
    """Give `path` (a file, or a folder and everything in it) the permissions a plain `mkdir` / `open`
    would: 0o777 / 0o666 minus the umask."""
    mask = current_umask()
    path = Path(path)
    if path.is_file():
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for root, folders, files in os.walk(path):
        for name in folders:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def recover(target):
    """Undo what a killed save left next to `target`: put a complete old folder back if `target` is
    missing, and remove the staging and backup folders."""
    staging, backup = staging_names(target)
    if backup.exists() and not Path(target).exists():
        os.replace(backup, target)
    for leftover in (staging, backup):
        if leftover.exists():
            shutil.rmtree(leftover)


def publish_directory(staging, target):
    """Rename the complete folder `staging` to `target`, replacing what is there (see the module docstring).

    `staging` must be on the same filesystem as `target` (a sibling). Returns `target` as a `Path`.
    """
    staging, target = Path(staging), Path(target)
    make_readable(staging)
    _, backup = staging_names(target)
    if backup.exists():
        shutil.rmtree(backup)
    if not target.exists():
        os.replace(staging, target)
        return target
    if exchange_paths(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now the old folder: a leftover is only disk space
        return target
    os.replace(target, backup)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)  # the new folder is in place: a leftover is only disk space
    return target


def _carry_over(old, staging, replaced):
    """Hard-link (or copy, across filesystems) the entries of `old` that the save did not write into `staging`."""
    for entry in old.iterdir():
        destination = staging / entry.name
        if destination.exists() or any(fnmatch.fnmatch(entry.name, pattern) for pattern in replaced):
            continue
        if entry.is_dir():
            shutil.copytree(entry, destination, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, destination)


def _link_or_copy(source, destination):
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


@contextlib.contextmanager
def atomic_directory(target, keep_existing=False, replaced=(), seed=()):
    """Context manager yielding an empty staging folder that becomes `target` when the block succeeds.

    If the block raises, `target` keeps its old bytes and the staging folder is removed.

    Args:
        target (`str` or `Path`): the folder to (re)write.
        keep_existing (`bool`): carry over the files of an existing `target` that the block did not
            write (so `model.save_pretrained(d)` keeps the processor files already in `d`), except
            those matching a pattern of `replaced`.
        replaced (`tuple[str]`): glob patterns of files this save owns; old ones are dropped even when
            the new save did not write them (e.g. stale weight shards).
        seed (`tuple[str]`): names of files copied from `target` into the staging folder *before* the
            block runs, for writers that read what is there (a hand-written `README.md` is kept).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    staging, _ = staging_names(target)
    staging.mkdir()
    try:
        for name in seed:
            if (target / name).is_file():
                shutil.copy2(target / name, staging / name)
        yield staging
        if keep_existing and target.is_dir():
            _carry_over(target, staging, replaced)
        publish_directory(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def atomic_write_text(path, text):
    """Write `text` (UTF-8) to `path` through a temporary sibling and one rename: `path` holds the old or the
    new text, never a part. The file gets the umask's permissions."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        make_readable(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path
