"""Atomic writes: outputs appear complete or not at all.

Files and folders get the user's usual permissions (``0666``/``0777`` minus the umask),
not the private mode of a temporary file. A place that cannot be written (read-only or
full file system, a file where a folder should be, no permission) raises a one-line
:class:`~peftshield.errors.OutputError` naming the path; :func:`check_output_place` finds
that out before any compute.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator, Literal

from peftshield.errors import DataError, OutputError

# OSErrors that mean "this output place cannot be written"; they become an OutputError.
OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EACCES, errno.EISDIR, errno.EDQUOT, errno.EFBIG})
# Of those, the ones only a write can raise (a read never fails with them).
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG})
_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EROFS: "read-only file system",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this file system",
    errno.EACCES: "permission denied",
}
_SAFETENSORS_IO = re.compile(r"(?:os error|code:?)\s*(\d+)", re.IGNORECASE)


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    return 0o777 & ~current_umask()


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` that is not a folder."""
    for parent in path.parents:
        if os.path.lexists(parent):
            return None if parent.is_dir() else parent
    return None


def describe_os_error(exc: OSError, path: str | Path) -> str:
    """Why ``path`` cannot be written, in a few words (for a one-line error)."""
    path = Path(path)
    code = exc.errno
    if code in (errno.ENOTDIR, errno.EEXIST):
        blocker = _file_in_the_way(Path(exc.filename) if isinstance(exc.filename, str) else path) or _file_in_the_way(path)
        if blocker is not None:
            return f"{blocker} is a file, not a folder"
        return "a file is in the way" if code == errno.ENOTDIR else "it already exists"
    if code == errno.EISDIR:
        return "it is a folder"
    if code in _REASONS:
        return _REASONS[code]
    return (exc.strerror or type(exc).__name__).lower()


def output_error(path: str | Path, exc: OSError, label: str | None = None) -> OutputError:
    """The one-line :class:`OutputError` for an OSError met while writing ``path``."""
    name = f"{label} {path}" if label else str(path)
    error = OutputError(f"{name}: cannot write there ({describe_os_error(exc, path)})")
    error.path, error.os_error = Path(path), exc
    return error


def _under(path: str | os.PathLike, folder: Path) -> bool:
    path, folder = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    return path == folder or folder in path.parents


def is_output_failure(exc: BaseException, inside: Path | None = None) -> bool:
    """True for an OSError that says an output place cannot be written.

    Errors only a write can raise always count; the others (permission, a file in the way)
    only when they name a path under ``inside`` (so a failed *read* is not misreported).
    """
    if not isinstance(exc, OSError) or exc.errno not in OUTPUT_ERRNOS:
        return False
    if exc.errno in WRITE_ERRNOS or inside is None:
        return True
    names = [n for n in (exc.filename, getattr(exc, "filename2", None)) if isinstance(n, (str, os.PathLike))]
    return any(_under(n, inside) for n in names)


def as_os_error(exc: BaseException) -> BaseException:
    """safetensors reports I/O failures as ``SafetensorError('... os error 28 ...')``: make those OSErrors."""
    if type(exc).__name__ == "SafetensorError":
        found = _SAFETENSORS_IO.search(str(exc))
        if found and int(found.group(1)) in OUTPUT_ERRNOS:
            code = int(found.group(1))
            return OSError(code, os.strerror(code))
    return exc


def apply_umask_modes(root: str | Path) -> None:
    """Give ``root`` and everything under it the user's usual modes: folders ``0777 & ~umask``,
    files ``0666 & ~umask`` (``0777 & ~umask`` when executable). Writers such as safetensors and
    ``mkstemp``/``mkdtemp`` create private 0600/0700 files that would otherwise stay so."""
    files, folders = file_mode(), dir_mode()
    os.chmod(root, folders)
    for parent, dirnames, filenames in os.walk(root):
        for name in dirnames:
            path = os.path.join(parent, name)
            if not os.path.islink(path):
                os.chmod(path, folders)
        for name in filenames:
            path = os.path.join(parent, name)
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode):
                os.chmod(path, folders if info.st_mode & 0o111 else files)


def check_output_place(path: str | Path, kind: Literal["file", "dir"] = "file", label: str | None = "--out") -> Path:
    """Make sure ``path`` can be written before any compute starts; returns it as a Path.

    Creates the parent folder, then writes and removes a probe file there (where the atomic
    writes put their temporary file or folder). Raises a one-line :class:`OutputError`
    naming ``label`` and ``path`` (``--out x/y: cannot write there (read-only file system)``).
    ``kind`` is ``"file"`` for an output file, ``"dir"`` for an output folder.
    """
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', not {kind!r}")
    path = Path(path)
    name = f"{label} {path}" if label else str(path)
    if os.path.lexists(path):
        if kind == "dir" and not path.is_dir():
            what = "a file" if path.is_file() else "a device or special file"
            raise OutputError(f"{name}: cannot write there (it is {what}, not a folder)")
        if kind == "file" and path.is_dir():
            raise OutputError(f"{name}: cannot write there (it is a folder; give a file name)")
        if kind == "file" and path.exists() and not stat.S_ISREG(path.stat().st_mode):
            raise OutputError(f"{name}: cannot write there (it is a device or special file, not a regular file)")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.probe-", suffix=".tmp", dir=parent)
        try:
            try:
                os.write(fd, b"peftshield write probe\n")
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(probe)
    except OSError as exc:
        raise output_error(path, exc, label) from None
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and rename it."""
    with atomic_text_stream(path) as handle:
        handle.write(text)
    return Path(path)


@contextlib.contextmanager
def atomic_text_stream(path: str | Path) -> Iterator[Any]:
    """A text handle on a temporary file beside ``path``, renamed to ``path`` when the block
    ends without error (for outputs written piece by piece, such as a streamed scan); on any
    error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            yield handle
        os.chmod(tmp, file_mode())  # mkstemp's 0600 would otherwise stay
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if is_output_failure(exc):
            raise output_error(path, exc) from None
        raise


def atomic_write_json(path: str | Path, payload: Any) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a damaged one raises a one-line :class:`DataError` naming it."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: damaged file (not valid JSON: {exc.msg} at line {exc.lineno}); re-create it") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: damaged file (not UTF-8 text); re-create it") from None


MAX_CONFIG_BYTES = 1_000_000  # no model or adapter config is larger


def read_config_json(path: str | Path, what: str, max_bytes: int = MAX_CONFIG_BYTES) -> dict:
    """A small JSON object from a folder nobody vouches for (an adapter's config, a finetune
    manifest): never through a link, at most ``max_bytes``; a one-line :class:`DataError` naming
    the file otherwise, or when it is not ``what`` (a JSON object)."""
    path = Path(path)
    try:
        if path.is_symlink():
            raise DataError(f"{path}: a link; only files inside the folder are read")
        if path.stat().st_size > max_bytes:
            raise DataError(f"{path}: larger than {max_bytes} bytes; not {what}")
        payload = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: damaged file ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(payload, dict):
        raise DataError(f"{path}: not {what}")
    return payload


def check_safetensors(path: str | Path) -> Path:
    """Check that a safetensors file is whole: a readable header and every tensor's bytes present.

    Raises a one-line :class:`DataError` naming the file otherwise (cheap: reads the header only).
    """
    path = Path(path)

    def damaged(detail: str) -> DataError:
        return DataError(f"{path}: damaged or truncated file ({detail}); re-create it")

    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise damaged("cannot read safetensors header")
            length = int.from_bytes(head, "little")
            if length > size - 8 or length > 100_000_000:
                raise damaged("cannot read safetensors header")
            header = json.loads(handle.read(length))
    except FileNotFoundError:
        raise DataError(f"{path}: missing; re-create it") from None
    except (ValueError, UnicodeDecodeError):
        raise damaged("cannot read safetensors header") from None
    if not isinstance(header, dict):
        raise damaged("cannot read safetensors header")
    try:
        end = max((int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise damaged("cannot read safetensors header") from None
    if 8 + length + end > size:
        raise damaged(f"{size} of {8 + length + end} bytes present")
    return path


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` whole.

    On an exception the temporary folder is removed and ``path`` is left as it was. A write
    failure (full or read-only file system, a file in the way) becomes an :class:`OutputError`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        if is_output_failure(exc):
            raise output_error(path, exc) from None
        raise
    try:
        yield tmp
        apply_umask_modes(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OutputError) and isinstance(getattr(exc, "path", None), Path) and _under(exc.path, tmp):
            raise output_error(path, exc.os_error) from None  # name the output, not its temporary folder
        failure = as_os_error(exc)
        if is_output_failure(failure, inside=tmp):
            raise output_error(path, failure) from None
        raise
    old: Path | None = None
    try:
        if os.path.lexists(path):
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
    except OSError as exc:
        if old is not None and not os.path.lexists(path):
            with contextlib.suppress(OSError):
                os.replace(old, path)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        if is_output_failure(exc):
            raise output_error(path, exc) from None
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                old.unlink()
