"""MNIST and Fashion-MNIST in their original IDX format.

An IDX file is a 4-byte magic (two zero bytes, a type code, the number of dims), one
big-endian uint32 per dim, then the values in row-major order; the published files are
gzip-compressed. `read_idx` reads any IDX file; `load_digits` finds (or downloads) the
four files of a dataset and returns images as rows of pixels in [0, 1].

Checksums: the SHA-256 of every local file is checked on every load, not only after a
download. Hashing costs about 0.01 s for MNIST's 9.9 MB training images and 0.02 s for
Fashion-MNIST's 26 MB (2-core machine, file in page cache), against 0.3-0.7 s for the
whole load (mostly gzip and the float32 conversion), so it is cheap insurance against a
corrupted or wrong file that the structural checks would miss (e.g. a flipped pixel).
"""

import gzip
import hashlib
import http.client
import os
import tempfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from saekit.errors import UserError

# IDX type code -> big-endian numpy dtype.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049  # 0x0803: uint8, 3 dims; 0x0801: uint8, 1 dim

FILES = {  # split -> (images, labels); the same names for both datasets
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Tried in order; tests point these at file:// URLs.
MIRRORS = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"],
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
}
SHA256 = {  # (dataset, file name) -> SHA-256 of the published .gz file
    ("mnist", "train-images-idx3-ubyte.gz"): "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    ("mnist", "train-labels-idx1-ubyte.gz"): "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    ("mnist", "t10k-images-idx3-ubyte.gz"): "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    ("mnist", "t10k-labels-idx1-ubyte.gz"): "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    ("fashion-mnist", "train-images-idx3-ubyte.gz"): "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    ("fashion-mnist", "train-labels-idx1-ubyte.gz"): "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    ("fashion-mnist", "t10k-images-idx3-ubyte.gz"): "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    ("fashion-mnist", "t10k-labels-idx1-ubyte.gz"): "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}
CLASS_NAMES = {
    "mnist": [str(d) for d in range(10)],
    "fashion-mnist": [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],
}
REFETCH = "delete it so it is downloaded again, or replace it with the original file"


def read_idx(path) -> np.ndarray:
    """Read an IDX file, raw or gzip-compressed, into a native-endian array of shape dims."""
    return _read_idx(Path(path))[1]


def _read_idx(path: Path) -> tuple[int, np.ndarray]:
    """Return (magic, array); every fault in the file raises UserError."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read IDX file {path}: {e.strerror}; check the path or --data-dir") from e
    if data[:2] == b"\x1f\x8b":  # gzip magic: decide by content, not by the file name
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"{path} is not a valid gzip file ({e}); {REFETCH}") from e
    if len(data) < 4 or data[:2] != b"\0\0" or data[3] == 0:
        raise UserError(f"{path} is not an IDX file (bad magic {data[:4].hex() or 'none'}); {REFETCH}")
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        raise UserError(f"{path} has unknown IDX type code 0x{code:02X}; {REFETCH}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path} ends inside its IDX header ({len(data)} bytes); {REFETCH}")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    if 0 in dims:
        raise UserError(f"{path} has a zero dimension {dims}; {REFETCH}")
    dtype = np.dtype(IDX_DTYPES[code])
    expected, actual = int(np.prod(dims)) * dtype.itemsize, len(data) - header
    if actual != expected:
        fault = "is truncated" if actual < expected else "has extra bytes"
        raise UserError(f"{path} {fault}: dims {dims} need {expected} payload bytes, found {actual}; {REFETCH}")
    array = np.frombuffer(data, dtype, offset=header).reshape(dims)
    return (code << 8) | ndim, array.astype(dtype.newbyteorder("="))  # copy: writable, native


def default_data_dir() -> Path:
    """$SAEKIT_DATA_DIR if set, else $XDG_CACHE_HOME/saekit, else ~/.cache/saekit."""
    if os.environ.get("SAEKIT_DATA_DIR"):
        return Path(os.environ["SAEKIT_DATA_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "saekit"


def load_digits(name="mnist", split="train", data_dir=None, download=True):
    """Load (images (n, 784) float32 in [0, 1], labels (n,) int64) of MNIST or Fashion-MNIST.

    Looks in data_dir, else $SAEKIT_DATA_DIR, else the cache (see `default_data_dir`); in
    that folder a file may sit in the `name/` subfolder or directly in the folder. Missing
    files are downloaded into `<folder>/<name>/` when `download` is true. Every file's
    SHA-256 is checked against `SHA256` on each load. Any fault raises UserError.
    """
    if name not in MIRRORS:
        raise UserError(f"unknown dataset {name!r}; choose one of {sorted(MIRRORS)}")
    if split not in FILES:
        raise UserError(f"unknown split {split!r}; choose 'train' or 'test'")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    paths = _locate(root, name, FILES[split], download)
    for path, fname in zip(paths, FILES[split]):
        _check_sha256(path, SHA256[name, fname])
    (image_magic, images), (label_magic, labels) = _read_idx(paths[0]), _read_idx(paths[1])
    if image_magic != IMAGE_MAGIC or images.shape[1:] != (28, 28):
        raise UserError(
            f"{paths[0]} is not a 28x28 uint8 image file (magic {image_magic}, shape {images.shape}); {REFETCH}"
        )
    if label_magic != LABEL_MAGIC:
        raise UserError(f"{paths[1]} is not a uint8 label file (magic {label_magic}); {REFETCH}")
    if len(images) != len(labels):
        raise UserError(f"{paths[0]} holds {len(images)} images but {paths[1]} holds {len(labels)} labels; {REFETCH}")
    if labels.max() > 9:
        raise UserError(f"{paths[1]} has label {labels.max()}, outside 0..9; {REFETCH}")
    pixels = np.divide(images.reshape(len(images), 28 * 28), np.float32(255), dtype=np.float32)
    return pixels, labels.astype(np.int64)


def _locate(root: Path, name: str, fnames: tuple, download: bool) -> list[Path]:
    """Paths of fnames under root/name or root; absent ones are downloaded into root/name."""
    paths: list[Path] = []
    failures: list[str] = []
    for fname in fnames:
        path = next((d / fname for d in (root / name, root) if (d / fname).is_file()), None)
        if path is None and download and not failures:  # after one failure, don't wait again
            failures = _download(name, fname, root / name)
        paths.append(path or root / name / fname)
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise UserError(
            f"{name} files missing: {', '.join(missing)} (looked in {root / name} and {root}; "
            f"{'; '.join(failures) or 'downloading is off'}). Fix: pass --data-dir (or set "
            f"SAEKIT_DATA_DIR) to a folder holding {name}/ with these files, or run with "
            f"internet access to download them into {root / name}"
        )
    return paths


def _download(name: str, fname: str, folder: Path) -> list[str]:
    """Fetch fname from each mirror in turn into folder; return why each try failed."""
    failures: list[str] = []
    for mirror in MIRRORS[name]:
        try:
            failure = _fetch(mirror + fname, folder / fname, SHA256[name, fname])
        except OSError as e:  # the folder is not writable: no other mirror can help
            return failures + [f"cannot write to {folder}: {e.strerror}"]
        if failure is None:
            return []
        failures.append(failure)
    return failures


def _fetch(url: str, dest: Path, sha256: str) -> str | None:
    """Download url to dest through a temporary file; return None, or why it failed.

    A local write problem before the transfer (mkdir, temp file) raises OSError.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != sha256:
            return f"{url} gave a file with the wrong SHA-256"
        os.replace(tmp, dest)  # atomic: dest is either absent or complete and verified
        return None
    except (OSError, http.client.HTTPException) as e:  # URLError and HTTPError are OSErrors
        return f"{url} failed: {e}"
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _check_sha256(path: Path, expected: str) -> None:
    with open(path, "rb") as f:
        actual = hashlib.file_digest(f, "sha256").hexdigest()
    if actual != expected:
        raise UserError(
            f"{path} has SHA-256 {actual}, expected {expected} (corrupt or not the published file); {REFETCH}"
        )
