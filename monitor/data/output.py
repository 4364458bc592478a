"""Writing the files a user names (`--out`): never through a symbolic link, always atomically.

Every command that writes a report, a study, rules or example data goes through here, so the
same three rules hold everywhere:

- The path the user named (an output directory, or a single output file) is refused when it
  is a symbolic link: a link planted at `--out` by someone else would otherwise redirect the
  write to a file of their choosing (`~/.bashrc`, a key file). The directory is opened once with
  O_NOFOLLOW and every file is then created relative to that descriptor, so a link swapped in
  after the check is not followed either. Links in the parent components are the user's own
  layout and are followed, as everywhere else.
- Temporary files get an unpredictable name and are created with O_CREAT | O_EXCL (which never
  follows a link and fails on any existing name) in the target directory, so a link planted at
  a predictable temporary name (the old `.report.html.tmp`) catches nothing.
- A file is written in full to its temporary name and renamed into place: a reader (a browser
  refreshing the demo's page, Prometheus reading rules) sees the old file or the new one, never
  half of one. rename(2) replaces a link at the final name instead of following it.

A refusal is `InvalidInput` with a one-line message: exit code 2 from the CLI.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from monitor.errors import InvalidInput

__all__ = ["OutputDir", "check_output_path", "write_file"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _link_refused(path: Path) -> InvalidInput:
    return InvalidInput(
        "unsafe_output",
        f"{path}: is a symbolic link; refusing to write through it (remove it or name the "
        "real path)",
    )


def _os_refused(path: Path, exc: OSError) -> InvalidInput:
    return InvalidInput("bad_output", f"{path}: {exc.strerror or exc}")


def check_output_path(path: Path, *, directory: bool) -> None:
    """Refuse early (before hours of measuring) an output path that writing would refuse.

    Only a courtesy: `OutputDir` and `write_file` check again when they write, on the object
    they then write to.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _os_refused(path, exc) from None
    if stat.S_ISLNK(mode):
        raise _link_refused(path)
    if directory and not stat.S_ISDIR(mode):
        raise InvalidInput("bad_output", f"{path}: exists and is not a directory")
    if not directory and stat.S_ISDIR(mode):
        raise InvalidInput("bad_output", f"{path}: is a directory")


def _open_dir(path: Path, create: bool) -> int:
    """A descriptor of the directory `path` itself, never of what a link there points to."""
    for attempt in (0, 1):
        try:
            return os.open(path, _DIR_FLAGS)
        except FileNotFoundError:
            if not create or attempt:
                raise InvalidInput("bad_output", f"{path}: no such directory") from None
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                os.mkdir(path)  # mkdir(2) never follows a link at the last component
            except FileExistsError:
                pass  # made by someone else meanwhile: opened (and checked) below
            except OSError as exc:
                raise _os_refused(path, exc) from None
        except OSError as exc:
            check_output_path(path, directory=True)  # ELOOP / ENOTDIR: say which, plainly
            raise _os_refused(path, exc) from None
    raise AssertionError("unreachable")


def _tmp_name(final: str) -> str:
    # Dot-prefixed and random: hidden from a listing, unguessable for a planted link.
    return f".{final}.{secrets.token_hex(8)}.tmp"


def _write_atomic(
    dir_fd: int, name: str, where: Path, fill: Callable[[BinaryIO], object], mode: int
) -> None:
    """`fill` writes into a fresh O_EXCL temporary file in the directory, renamed to `name`."""
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"not a plain file name: {name!r}")
    tmp = _tmp_name(name)
    try:
        fd = os.open(tmp, _TMP_FLAGS, mode, dir_fd=dir_fd)
    except OSError as exc:
        raise _os_refused(where, exc) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            fill(handle)
            handle.flush()
            os.fsync(handle.fileno())  # the rename must not publish a file still in the cache
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        if isinstance(exc, IsADirectoryError):
            raise InvalidInput("bad_output", f"{where / name}: is a directory") from None
        if isinstance(exc, OSError):  # disk full, read-only file system: one line, exit 2
            raise _os_refused(where / name, exc) from None
        raise


def _as_bytes(data: bytes | str) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else data


class OutputDir:
    """An output directory, opened once without following a link; files written inside it.

    Use as a context manager: `with OutputDir(out) as d: d.write_text("report.html", page)`.
    The directory (and its parents) is created when missing.
    """

    def __init__(self, path: Path, *, create: bool = True, mode: int = 0o666) -> None:
        self.path = path
        self._create = create
        self._mode = mode  # of new files, before the umask (as open() does)
        self._fd: int | None = None

    def __enter__(self) -> OutputDir:
        self._fd = _open_dir(self.path, self._create)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise RuntimeError("OutputDir used outside its `with` block")
        return self._fd

    def write_with(self, name: str, fill: Callable[[BinaryIO], object]) -> Path:
        """`name` holds whatever `fill(handle)` writes (a figure's savefig, np.save)."""
        _write_atomic(self.fd, name, self.path, fill, self._mode)
        return self.path / name

    def write_bytes(self, name: str, data: bytes) -> Path:
        return self.write_with(name, lambda handle: handle.write(data))

    def write_text(self, name: str, text: str) -> Path:
        return self.write_bytes(name, _as_bytes(text))

    def remove(self, name: str) -> None:
        """Delete `name` if present (unlink(2) removes a link itself, never its target)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)


def write_file(path: Path, data: bytes | str, *, mode: int = 0o666) -> Path:
    """Write one user-named file atomically; refuse a link (or a directory) at `path`.

    The parent directory must exist (a typo in it is an error, not a new tree).
    """
    parent = path.parent
    try:
        dir_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise _os_refused(parent, exc) from None
    try:
        try:
            st = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _os_refused(path, exc) from None
        else:
            if stat.S_ISLNK(st.st_mode):
                raise _link_refused(path)
            if stat.S_ISDIR(st.st_mode):
                raise InvalidInput("bad_output", f"{path}: is a directory")
        # A link swapped in after this check is replaced by the rename, not followed.
        payload = _as_bytes(data)
        _write_atomic(dir_fd, path.name, parent, lambda handle: handle.write(payload), mode)
    finally:
        os.close(dir_fd)
    return path
