"""Writing files so that nothing is ever half-written: a temporary file in the same folder, then a rename."""

import json
import os
import uuid
from pathlib import Path

from .errors import UserError


def atomic_write(path, data: bytes) -> Path:
    """Write bytes to path atomically, creating its folder; readers see the old file or the new one.

    The temporary file is opened with os.open (mode 0666 less the umask) rather than tempfile,
    whose 0600 files would keep run folders and pictures from being shared.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
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
