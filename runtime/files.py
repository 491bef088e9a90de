"""Files the tools read and write, handled so that nothing the user has is lost.

Inputs: `regular_file` refuses anything but a regular file before it is opened (a FIFO would hang
the read, a device would stream forever).

Outputs (an artifact directory, a video, a folder of frames) are built under a hidden *partial*
name beside the target and then moved in with one rename:

    .NAME.partial.PID.TOKEN.HOST[.suffix]   being built by process PID on host HOST (a hash)
    .NAME.old.PID.TOKEN.HOST[.suffix]       the replaced output, set aside until the new one is in

`commit` moves a partial in without ever replacing what is there (`renameat2(RENAME_NOREPLACE)`
on Linux): a target that appeared while the work ran, made by the user or by a concurrent run,
is kept and the commit fails in one line. Replacing is only done with the caller's consent
(`--force`, `--overwrite`) and only for a target that its `owned` test accepts as something
this tool wrote (an artifact directory, a video, a folder holding only frames).

Leftovers: an interrupted run removes its partials (SIGINT, and SIGTERM/SIGHUP, which `run_cli`
turns into the same exception); a killed one cannot, so `clean_stale` removes the partials of
processes on this host that are no longer alive, and puts back an output set aside by a run
that died before its replacement was in place. A live process's partials are never touched.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import sys
from pathlib import Path
from typing import Callable

from runtime.errors import WanError, raise_if_terminated

log = logging.getLogger(__name__)

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
# Names of earlier versions (`.NAME.partial-PID`, `.NAME.partial-PID-HEX.mp4`, `.NAME.old-PID`).
_LEGACY = r"(?P<ltag>partial|old)-(?P<lpid>\d+)(?:-[0-9a-f]+)?(?:\.[^.]+)?"
_CURRENT = r"(?P<tag>partial|old)\.(?P<pid>\d+)\.[0-9a-f]{8}\.(?P<host>[0-9a-f]{8})(?:\.[^.]+)?"


def regular_file(path: str | os.PathLike, what: str) -> Path:
    """`path` if it is an existing regular file (symlinks followed), else a one-line WanError."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise WanError(f"{what} '{path}' does not exist") from None
    except OSError as exc:
        raise WanError(f"{what} '{path}' cannot be read: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        raise WanError(f"{what} '{path}' is a directory, not a file")
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise WanError(f"{what} '{path}' is {kind}, not a regular file")
    return path


def absolute(path: str | os.PathLike) -> Path:
    """The path made absolute without resolving links ('.' becomes the current directory's name,
    so a sibling partial can be named after it)."""
    return Path(os.path.abspath(os.fspath(path)))


def check_replaceable_place(target: Path, what: str) -> None:
    """Refuse to replace the filesystem root, the current directory or one of its parents: the
    process (and the user's shell) would be left inside a deleted directory."""
    here = Path.cwd()
    if target == Path(target.anchor) or target == here or target in here.parents:
        raise WanError(f"{what} '{target}' is the current directory or one of its parents; "
                       "not replaced (choose another name)")


def partial_name(target: Path, tag: str = "partial") -> Path:
    """A hidden sibling of `target` that names this process and host; the suffix is kept."""
    return target.with_name(f".{target.name}.{tag}.{os.getpid()}.{secrets.token_hex(4)}.{_HOST}"
                            f"{target.suffix}")


def exists(path: Path) -> bool:
    """A dangling symlink still occupies the name, so it counts."""
    return path.exists() or path.is_symlink()


# --- renaming without replacing ----------------------------------------------------------------

_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCL = -100, 1, 4


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; FileExistsError if `dst` exists (atomically where the OS can)."""
    fn = None
    if sys.platform.startswith("linux") and _LIBC is not None:
        fn = getattr(_LIBC, "renameat2", None)
        args = (_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
    elif sys.platform == "darwin" and _LIBC is not None:
        fn = getattr(_LIBC, "renamex_np", None)
        args = (os.fsencode(src), os.fsencode(dst), _RENAME_EXCL)
    if fn is not None:
        if fn(*args) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST or (err == errno.ENOTEMPTY):
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # not a filesystem without it
            raise OSError(err, os.strerror(err), str(dst))
    # Fallback for filesystems without an exclusive rename: a file via a hard link (which never
    # replaces); a directory by checking first (a non-empty directory is never replaced by
    # rename; only an empty one made in the instant between check and rename could be).
    if src.is_dir() and not src.is_symlink():
        if exists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        os.rename(src, dst)
        return
    os.link(src, dst, follow_symlinks=False)
    os.unlink(src)


def remove(path: Path) -> None:
    """Delete a file, a link (not what it points to) or a directory tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def commit(partial: Path, target: Path, replace: bool, owned: Callable[[Path], str | None],
           what: str, on_refusal: str) -> None:
    """Move the finished `partial` to `target`.

    Without `replace`, an existing target is never touched: FileExistsError becomes a one-line
    WanError (`on_refusal` says what to do). With `replace`, the target is replaced only if
    `owned(target)` returns None (else its return value says why not); it is set aside, the new
    one moved in, and then the old one deleted, so the old survives any failure before that.
    Errors leave `partial` where it is; the caller removes it.
    """
    raise_if_terminated()  # a stop whose exception was lost still writes nothing
    if not replace:
        try:
            rename_noreplace(partial, target)
        except FileExistsError:
            raise WanError(f"{what} '{target}' appeared while this run was working; it was left "
                           f"as it is and the new one discarded ({on_refusal})") from None
        return
    while True:
        if not exists(target):
            try:
                rename_noreplace(partial, target)
                return
            except FileExistsError:  # appeared just now: look at what it is
                continue
        why = owned(target)
        if why is not None:
            raise WanError(f"{what} '{target}' {why}; not replaced")
        old = partial_name(target, "old")
        os.rename(target, old)  # `old` is a fresh name: nothing is replaced
        try:
            rename_noreplace(partial, target)
        except BaseException:
            os.rename(old, target)  # put the old one back before reporting
            raise
        try:
            remove(old)
        except OSError as exc:  # the new output is complete and in place; this is clutter
            log.warning("could not remove the replaced %s '%s': %s", what, old, exc)
        return


# --- leftovers of killed runs ----------------------------------------------------------------


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(target: Path) -> list[Path]:
    """Remove partials of `target` left by dead processes on this host; put back an output a
    dead run set aside (`.old`) when nothing took its place. Returns what was removed."""
    parent = target.parent
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:{_CURRENT}|{_LEGACY})")
    removed = []
    try:
        entries = list(parent.iterdir()) if target.name else []
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None:
            continue
        tag, pid = m.group("tag") or m.group("ltag"), int(m.group("pid") or m.group("lpid"))
        if (m.group("host") or _HOST) != _HOST or _alive(pid):
            continue
        try:
            if tag == "old" and not exists(target):
                os.rename(entry, target)
                log.warning("restored '%s', set aside by a run (pid %d) that did not finish", target, pid)
                continue
            remove(entry)
            removed.append(entry)
            log.info("removed '%s', left by a run (pid %d) that was killed", entry, pid)
        except OSError as exc:
            log.warning("could not remove the leftover '%s': %s", entry, exc)
    return removed


def os_reason(exc: OSError) -> str:
    """Why an OSError happened, in words (no errno decoration)."""
    reasons = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted"}
    return reasons.get(exc.errno, exc.strerror or type(exc).__name__)


def environment_error(exc: OSError, what: str, path: Path | str) -> WanError:
    """A one-line error for an OSError that the user's environment caused while writing."""
    return WanError(f"cannot write {what} '{path}': {os_reason(exc)}; nothing was written")


def check_writable_dir(folder: Path, what: str) -> None:
    """Create and delete a file in `folder`: the only test that holds for root, read-only mounts
    and ACLs alike (os.access says yes to root everywhere)."""
    probe = folder / f".wan-probe.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise WanError(f"{what} '{folder}' is not writable ({os_reason(exc)})") from None
    try:
        os.close(fd)
    finally:  # even when a signal lands here
        os.unlink(probe)
