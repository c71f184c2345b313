"""Small file helpers shared by the writers (stdlib only).

Every file qdiff writes goes through :func:`write_bytes_atomic`: a temporary file in the target's
folder, then a rename, so a failed run leaves no half-written file. Rules for the target:

* a symbolic link is followed and its target is written (as shell redirection does); the link
  stays a link;
* an existing target must be a regular file: a device (``/dev/null``), a FIFO, a socket or a
  folder is refused (a rename would replace it with a regular file);
* :func:`check_output` also refuses a target that is one of the run's input files and checks, by
  creating and removing a temporary file, that its folder can really be written.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from qdiff.errors import UsageError

__all__ = ["write_atomic", "write_bytes_atomic", "check_output", "check_folder", "resolve_output"]


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def resolve_output(path: str | os.PathLike[str], option: str = "output") -> Path:
    """The file a write to ``path`` replaces: symbolic links followed; refused unless it is a
    regular file or does not exist yet.

    Raises:
        UsageError: ``path`` (or what its link points to) exists and is not a regular file.
    """
    shown = os.fspath(path)
    real = Path(os.path.realpath(shown))
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return real
    except NotADirectoryError:
        bad = next((a for a in real.parents if a.exists() and not a.is_dir()), real.parent)
        raise UsageError(f"{option} {shown}: '{bad}' is a file, not a folder; give a path in an existing folder") from None
    except OSError as exc:
        raise UsageError(f"{option} {shown}: cannot check it ({exc.strerror}); give another file name") from None
    if not stat.S_ISREG(st.st_mode):
        via = f" (a link to {real})" if os.path.islink(shown) else ""
        raise UsageError(
            f"{option} {shown}{via} is {_kind(st.st_mode)}; qdiff writes only regular files, give a file name"
        )
    return real


def check_output(
    path: str | os.PathLike[str] | None, option: str, *, inputs: Iterable[str | os.PathLike[str] | None] = ()
) -> None:
    """Fail now, before any work, when ``path`` could not be written at the end.

    Checks that ``path`` is a regular file or a new name (links followed), that it is none of the
    ``inputs`` (the run's model, data, map or config files), that its folder exists, and that a
    file can really be created there (a temporary one, removed at once).

    Raises:
        UsageError: naming the option, the path and what to do.
    """
    if not path:
        return
    shown = os.fspath(path)
    real = resolve_output(shown, option)
    for given in inputs:
        if not given:
            continue
        try:
            same = os.path.exists(given) and real.exists() and os.path.samefile(given, real)
        except OSError:
            same = False
        if same:
            raise UsageError(f"{option} {shown} is the input file {os.fspath(given)}; writing it would destroy it, give another name")
    check_folder(real.parent, f"{option} {shown}:")


def check_folder(folder: str | os.PathLike[str], where: str) -> None:
    """Check that ``folder`` exists and that a file can really be created in it (a temporary
    file is created and removed: permission bits alone say nothing for root, read-only mounts or
    full disks).

    Raises:
        UsageError: starting with ``where`` (e.g. ``"--json out/r.json:"``).
    """
    parent = Path(folder)
    if not parent.exists():
        raise UsageError(f"{where} folder '{parent}' does not exist; create it first")
    if not parent.is_dir():
        raise UsageError(f"{where} '{parent}' is not a folder; give a path in an existing folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".qdiff-", suffix=".check", dir=parent)
    except OSError as exc:
        raise UsageError(
            f"{where} cannot create a file in folder '{parent}' ({exc.strerror}); choose a folder you can write to"
        ) from None
    os.close(fd)
    os.unlink(tmp)


def write_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    A link is followed (its target is replaced, the link kept); a target that exists and is not a
    regular file is refused; on any failure the target is left as it was and nothing else stays.

    Raises:
        UsageError: the target is not a regular file, or the folder cannot be written (disk
            full, read-only, ...).
    """
    shown = os.fspath(path)
    real = resolve_output(shown)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".tmp", dir=real.parent)
    except OSError as exc:
        raise UsageError(f"cannot write {shown}: {exc.strerror} (folder '{real.parent}')") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, real)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise UsageError(f"cannot write {shown}: {exc.strerror or exc}") from None
        raise
