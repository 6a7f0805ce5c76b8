"""Writing files so that nothing is ever half-written, and saying in one line why a write failed.

- `atomic_write`: a temporary file in the same folder, flushed to disk, then renamed over the
  target: readers see the old file or the new one.
- `write_unit` / `read_unit`: several files that belong together (a checkpoint) are written into
  a hidden temporary folder with a manifest of their SHA-256 written last, then the folder is
  renamed into place: a unit either exists whole, or not at all, and reading it checks every
  file against the manifest.
- `append_line`: a line added to a log and flushed to disk; a kill leaves at worst a partial
  last line, which `read_lines` drops.
- `os_error_message`: what went wrong with the file system (read-only folder, no space left, a
  file where a folder should be, ...) as one line naming the path and the fix.

Temporary names start with "." and end with ".tmp"; `remove_leftovers` clears those a killed
process left behind.
"""

import errno
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from .errors import UserError

MANIFEST = "manifest.json"


class DamagedUnit(UserError):
    """A unit whose manifest is missing or unreadable, or whose files do not match it."""


def _temporary(path: Path) -> Path:
    return path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"


def _write_synced(path: Path, data: bytes) -> None:
    """Create path (0666 less the umask, unlike tempfile's 0600) with data, flushed to disk."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename) to disk; not every system can open a folder for that."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, data: bytes) -> Path:
    """Write bytes to path atomically, creating its folder; readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        _write_synced(tmp, data)
        os.replace(tmp, path)
        _sync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path, obj) -> Path:
    """obj as indented JSON, atomically."""
    return atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def read_json(path):
    """The JSON at path; a missing or corrupt file is a UserError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing; is {path.parent} a saekit run folder?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupt ({e}); the run folder cannot be read.") from None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_unit(path, files: dict[str, bytes], meta: dict) -> Path:
    """Write files (name -> bytes) as the folder `path`, whole or not at all (see the module docstring).

    The manifest holds `meta` and each file's SHA-256. A unit already at path is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    old = _temporary(path)
    try:
        tmp.mkdir()
        for name, data in files.items():
            _write_synced(tmp / name, data)
        manifest = {**meta, "files": {name: sha256(data) for name, data in files.items()}}
        _write_synced(tmp / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        _sync_folder(tmp)
        if path.exists():
            os.rename(path, old)  # a folder cannot be renamed over another; the old one goes aside first
        os.rename(tmp, path)
        _sync_folder(path.parent)
    finally:
        for leftover in (tmp, old):
            shutil.rmtree(leftover, ignore_errors=True)
    return path


def read_unit(path) -> tuple[dict, dict[str, bytes]]:
    """(manifest, files) of a unit written by write_unit; DamagedUnit names what does not match."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_bytes())
        expected = manifest["files"]
        files = {name: (path / name).read_bytes() for name in expected}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DamagedUnit(f"{path / MANIFEST} or a file it lists cannot be read ({type(e).__name__}: {e})") from None
    for name, digest in expected.items():
        if sha256(files[name]) != digest:
            raise DamagedUnit(f"{path / name} does not match its checksum in {MANIFEST}: it was changed or damaged")
    return manifest, files


def append_line(path, line: str) -> None:
    """Add one line to the text file at path and flush it to disk."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_lines(path) -> list[str]:
    """The complete lines of a text file (a last line cut short by a kill is dropped); [] if absent."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    return lines[:-1]  # the part after the last newline is empty, or a line whose write was cut short


def remove_leftovers(folder) -> list[Path]:
    """Delete the temporary files and folders a killed process left in folder; returns them."""
    folder = Path(folder)
    leftovers = [p for p in folder.glob(".*.tmp")] if folder.is_dir() else []
    for p in leftovers:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return leftovers


# What the file system's errors mean, and what to do about them.
_OS_ERRORS = {
    errno.EACCES: "permission denied; choose a folder you can write to",
    errno.EPERM: "not permitted; choose a folder you can write to",
    errno.EROFS: "the file system is read-only; choose a folder on a writable one",
    errno.ENOSPC: "no space left on the device; free some space (then --resume an interrupted run)",
    errno.EDQUOT: "the disk quota is exceeded; free some space (then --resume an interrupted run)",
    errno.ENOTDIR: "a file stands where a folder should be; choose another path",
    errno.EEXIST: "a file stands where a folder should be; choose another path",
    errno.EISDIR: "a folder stands where a file should be; choose another path",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter path",
    errno.ENOENT: "no such file or folder; check the path",
}


def os_error_message(error: OSError) -> str:
    """One line: which path, what went wrong, what to do."""
    where = error.filename if error.filename is not None else "a file"
    if error.filename2 is not None:
        where = f"{error.filename} -> {error.filename2}"
    advice = _OS_ERRORS.get(error.errno or -1)
    what = error.strerror or type(error).__name__
    return f"cannot write or read {where}: {advice or what}." if advice else f"{where}: {what}."
