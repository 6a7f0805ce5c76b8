"""Tests for saekit.data.idx: the IDX reader, load_digits' checks, lookup order, downloads.

Small IDX files are built here with `struct` (independent of the reader's own dtype table).
The real MNIST / Fashion-MNIST files are checked against numbers from the data README.
"""

import gzip
import hashlib
import http.client
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import find_mnist_dir

from saekit.data import idx
from saekit.errors import UserError

TEST_IMAGES, TEST_LABELS = idx.FILES["test"]


def idx_bytes(code: int, dims: tuple, payload: bytes) -> bytes:
    """An IDX file: magic (0, 0, code, ndim), big-endian uint32 dims, then payload."""
    return struct.pack(">BBBB", 0, 0, code, len(dims)) + struct.pack(f">{len(dims)}I", *dims) + payload


def write(path: Path, content: bytes, compress: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(content) if compress else content)
    return path


# ---------------------------------------------------------------- read_idx: exact values

# (type code, struct format, values): one hand-chosen case per IDX type, with the extremes.
CASES = [
    (0x08, "B", [0, 1, 127, 128, 254, 255]),
    (0x09, "b", [-128, -1, 0, 1, 100, 127]),
    (0x0B, "h", [-32768, -2, 0, 300, 4660, 32767]),
    (0x0C, "i", [-(2**31), -70000, 0, 1, 305419896, 2**31 - 1]),
    (0x0D, "f", [-1.5, -0.25, 0.0, 1.0, 3.140625, 2.0**100]),  # all exact in float32
    (0x0E, "d", [-1e300, -0.1, 0.0, 1 / 3, 2.5, 1e-300]),
]


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("code, fmt, values", CASES)
def test_read_idx_returns_exact_values(tmp_path, code, fmt, values, compress):
    payload = struct.pack(f">6{fmt}", *values)
    path = write(tmp_path / "x.idx", idx_bytes(code, (2, 3), payload), compress)
    array = idx.read_idx(path)
    assert array.shape == (2, 3)
    assert array.dtype.isnative
    np.testing.assert_array_equal(array.ravel(), values)


def test_read_idx_detects_gzip_by_content_not_name(tmp_path):
    content = idx_bytes(0x08, (4,), bytes([9, 8, 7, 6]))
    gz_named_raw = write(tmp_path / "raw.gz", content, compress=False)
    raw_named_gz = write(tmp_path / "compressed.idx", content, compress=True)
    for path in (gz_named_raw, raw_named_gz):
        np.testing.assert_array_equal(idx.read_idx(path), [9, 8, 7, 6])


def test_read_idx_three_dims_row_major(tmp_path):
    path = write(tmp_path / "x", idx_bytes(0x08, (2, 2, 3), bytes(range(12))), compress=True)
    array = idx.read_idx(str(path))  # str paths work too
    assert array.shape == (2, 2, 3)
    assert array[1, 0, 2] == 1 * 6 + 0 * 3 + 2


# ---------------------------------------------------------------- read_idx: corrupt files


def assert_user_error(path, *fragments):
    with pytest.raises(UserError) as info:
        idx.read_idx(path)
    message = str(info.value)
    for fragment in (str(path), *fragments):
        assert fragment in message, message


@pytest.mark.parametrize("compress", [True, False])
def test_bad_magic(tmp_path, compress):
    path = write(tmp_path / "f", b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x05", compress)
    assert_user_error(path, "not an IDX file", "delete it")


def test_zero_ndim_and_empty_file(tmp_path):
    assert_user_error(write(tmp_path / "a", b"\0\0\x08\0", compress=False), "not an IDX file")
    assert_user_error(write(tmp_path / "b", b"", compress=False), "not an IDX file")


def test_unknown_type_code(tmp_path):
    path = write(tmp_path / "f", idx_bytes(0x0A, (1,), b"\x00"), compress=True)
    assert_user_error(path, "unknown IDX type code 0x0A")


def test_zero_dimension(tmp_path):
    path = write(tmp_path / "f", idx_bytes(0x08, (3, 0), b""), compress=True)
    assert_user_error(path, "zero dimension")


def test_header_cut_short(tmp_path):
    path = write(tmp_path / "f", idx_bytes(0x08, (3, 4, 5), b"")[:10], compress=False)
    assert_user_error(path, "header")


@pytest.mark.parametrize("compress", [True, False])
def test_truncated_payload_names_both_byte_counts(tmp_path, compress):
    path = write(tmp_path / "f", idx_bytes(0x0B, (2, 3), bytes(11)), compress)  # needs 2*3*2 = 12
    assert_user_error(path, "truncated", "12", "found 11")


def test_extra_bytes_names_both_byte_counts(tmp_path):
    path = write(tmp_path / "f", idx_bytes(0x08, (5,), bytes(7)), compress=True)
    assert_user_error(path, "extra bytes", "need 5", "found 7")


def test_corrupt_gzip(tmp_path):
    good = gzip.compress(idx_bytes(0x08, (1000,), bytes(range(256)) * 3 + bytes(232)))
    cut = tmp_path / "cut.gz"
    cut.write_bytes(good[: len(good) // 2])
    assert_user_error(cut, "gzip", "delete it")
    flipped = bytearray(good)
    flipped[-6] ^= 0xFF  # inside the CRC/length trailer: the stream no longer checks out
    bad = tmp_path / "flipped.gz"
    bad.write_bytes(bytes(flipped))
    assert_user_error(bad, "gzip")


def test_missing_file(tmp_path):
    assert_user_error(tmp_path / "nope.idx", "cannot read", "--data-dir")


# ---------------------------------------------------------------- load_digits on small files


def write_split(
    folder: Path, images: np.ndarray, labels: np.ndarray, monkeypatch, image_code=0x08, label_code=0x08, register=True
):
    """Write TEST_IMAGES / TEST_LABELS into folder; register their SHA-256 in idx.SHA256."""
    files = {
        TEST_IMAGES: idx_bytes(image_code, images.shape, images.astype(np.uint8).tobytes()),
        TEST_LABELS: idx_bytes(label_code, labels.shape, labels.astype(np.uint8).tobytes()),
    }
    for fname, content in files.items():
        path = write(folder / fname, content, compress=True)
        if register:
            monkeypatch.setitem(idx.SHA256, ("mnist", fname), hashlib.sha256(path.read_bytes()).hexdigest())


def small_set(n=3, side=28):
    images = (np.arange(n * side * side) * 7 % 256).reshape(n, side, side)
    return images, np.arange(n) % 10


def test_load_digits_small(tmp_path, monkeypatch):
    images, labels = small_set()
    write_split(tmp_path / "mnist", images, labels, monkeypatch)
    x, y = idx.load_digits("mnist", "test", data_dir=tmp_path, download=False)
    assert x.shape == (3, 784) and x.dtype == np.float32
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, [0, 1, 2])
    expected = np.array([[p / 255 for p in image.ravel()] for image in images], dtype=np.float32)
    np.testing.assert_array_equal(x, expected)
    assert x[0, 0] == 0.0 and x[0, 1] == np.float32(7 / 255)


def assert_load_error(tmp_path, *fragments):
    with pytest.raises(UserError) as info:
        idx.load_digits("mnist", "test", data_dir=tmp_path, download=False)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_wrong_image_size(tmp_path, monkeypatch):
    write_split(tmp_path / "mnist", *small_set(side=27), monkeypatch)
    assert_load_error(tmp_path, "28x28", "(3, 27, 27)", TEST_IMAGES)


def test_label_out_of_range(tmp_path, monkeypatch):
    images, _ = small_set()
    write_split(tmp_path / "mnist", images, np.array([0, 10, 3]), monkeypatch)
    assert_load_error(tmp_path, "label 10", "0..9", TEST_LABELS)


def test_count_mismatch(tmp_path, monkeypatch):
    images, _ = small_set(n=3)
    write_split(tmp_path / "mnist", images, np.array([1, 2]), monkeypatch)
    assert_load_error(tmp_path, "3 images", "2 labels")


def test_wrong_magic_numbers(tmp_path, monkeypatch):
    images, labels = small_set()
    write_split(tmp_path / "mnist", images, labels, monkeypatch, image_code=0x09)  # int8 images
    assert_load_error(tmp_path, "magic 2307", TEST_IMAGES)  # 0x0903
    write_split(tmp_path / "mnist", images, labels, monkeypatch, label_code=0x09)  # int8 labels
    assert_load_error(tmp_path, "magic 2305", TEST_LABELS)  # 0x0901


def test_local_checksum_mismatch(tmp_path, monkeypatch):
    write_split(tmp_path / "mnist", *small_set(), monkeypatch, register=False)
    assert_load_error(tmp_path, "SHA-256", "delete it")


def test_bad_name_and_split(tmp_path):
    with pytest.raises(UserError, match="unknown dataset"):
        idx.load_digits("cifar", data_dir=tmp_path)
    with pytest.raises(UserError, match="unknown split"):
        idx.load_digits("mnist", "val", data_dir=tmp_path)


# ---------------------------------------------------------------- where load_digits looks


@pytest.fixture
def places(tmp_path, monkeypatch):
    """Three candidate folders holding files with a *wrong* checksum: loading from any of
    them fails, so a successful load proves which folder was used."""
    folders = {key: tmp_path / key for key in ("data_dir", "env", "cache")}
    for folder in (folders["data_dir"], folders["env"], folders["cache"] / "saekit"):
        write_split(folder / "mnist", *small_set(), monkeypatch, register=False)
    monkeypatch.setenv("SAEKIT_DATA_DIR", str(folders["env"]))
    monkeypatch.setenv("XDG_CACHE_HOME", str(folders["cache"]))
    return folders


def make_good(folder: Path, monkeypatch):
    images, labels = small_set()
    write_split(folder, images, labels[::-1].copy(), monkeypatch)
    return labels[::-1]


def test_data_dir_comes_first(places, monkeypatch):
    expected = make_good(places["data_dir"] / "mnist", monkeypatch)
    _, y = idx.load_digits("mnist", "test", data_dir=places["data_dir"], download=False)
    np.testing.assert_array_equal(y, expected)


def test_env_var_comes_second(places, monkeypatch):
    expected = make_good(places["env"] / "mnist", monkeypatch)
    _, y = idx.load_digits("mnist", "test", download=False)
    np.testing.assert_array_equal(y, expected)


def test_cache_comes_last(places, monkeypatch):
    monkeypatch.delenv("SAEKIT_DATA_DIR")
    expected = make_good(places["cache"] / "saekit" / "mnist", monkeypatch)
    _, y = idx.load_digits("mnist", "test", download=False)
    np.testing.assert_array_equal(y, expected)


def test_cache_defaults_to_home(tmp_path, monkeypatch):
    monkeypatch.delenv("SAEKIT_DATA_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert idx.default_data_dir() == tmp_path / ".cache" / "saekit"


def test_files_directly_in_data_dir(tmp_path, monkeypatch):
    expected = make_good(tmp_path, monkeypatch)  # no mnist/ subfolder
    _, y = idx.load_digits("mnist", "test", data_dir=tmp_path, download=False)
    np.testing.assert_array_equal(y, expected)


def test_missing_without_download(tmp_path):
    with pytest.raises(UserError) as info:
        idx.load_digits("mnist", "test", data_dir=tmp_path, download=False)
    message = str(info.value)
    for fragment in (
        TEST_IMAGES,
        TEST_LABELS,
        str(tmp_path / "mnist"),
        "downloading is off",
        "--data-dir",
        "SAEKIT_DATA_DIR",
    ):
        assert fragment in message, message
    assert list(tmp_path.iterdir()) == []  # nothing fetched, nothing created


# ---------------------------------------------------------------- downloads from file:// mirrors


@pytest.fixture
def mirrors(tmp_path, monkeypatch):
    """A 'bad' mirror whose files have the wrong checksum, a 'good' one with the registered
    files, and a 'dead' one that does not exist."""
    images, labels = small_set()
    write_split(tmp_path / "good", images, labels, monkeypatch)
    write_split(tmp_path / "bad", images[::-1].copy(), labels, monkeypatch, register=False)
    return {key: (tmp_path / key).as_uri() + "/" for key in ("good", "bad", "dead")}


def test_download_skips_checksum_mismatch_and_uses_next_mirror(tmp_path, mirrors, monkeypatch):
    monkeypatch.setitem(idx.MIRRORS, "mnist", [mirrors["bad"], mirrors["good"]])
    monkeypatch.delenv("SAEKIT_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    x, y = idx.load_digits("mnist", "test")
    np.testing.assert_array_equal(y, [0, 1, 2])
    np.testing.assert_array_equal(x[0, :3], np.float32([0, 7, 14]) / np.float32(255))
    folder = tmp_path / "cache" / "saekit" / "mnist"
    assert sorted(p.name for p in folder.iterdir()) == sorted([TEST_IMAGES, TEST_LABELS])
    for fname in (TEST_IMAGES, TEST_LABELS):  # byte-identical to the good mirror's copy
        assert (folder / fname).read_bytes() == (tmp_path / "good" / fname).read_bytes()


def test_download_fetches_only_the_missing_file(tmp_path, mirrors, monkeypatch):
    monkeypatch.setitem(idx.MIRRORS, "mnist", [mirrors["good"]])
    root = tmp_path / "root"
    labels = (tmp_path / "good" / TEST_LABELS).read_bytes()
    write(root / TEST_LABELS, gzip.decompress(labels), compress=False)  # flat layout
    raw_sha = hashlib.sha256((root / TEST_LABELS).read_bytes()).hexdigest()
    monkeypatch.setitem(idx.SHA256, ("mnist", TEST_LABELS), raw_sha)
    _, y = idx.load_digits("mnist", "test", data_dir=root)
    np.testing.assert_array_equal(y, [0, 1, 2])
    assert [p.name for p in (root / "mnist").iterdir()] == [TEST_IMAGES]


def test_download_all_mirrors_fail(tmp_path, mirrors, monkeypatch):
    monkeypatch.setitem(idx.MIRRORS, "mnist", [mirrors["dead"], mirrors["bad"]])
    root = tmp_path / "root"
    with pytest.raises(UserError) as info:
        idx.load_digits("mnist", "test", data_dir=root)
    message = str(info.value)
    for fragment in (
        TEST_IMAGES,
        TEST_LABELS,
        str(root / "mnist"),
        "wrong SHA-256",
        mirrors["dead"],
        "--data-dir",
        "SAEKIT_DATA_DIR",
        "internet",
    ):
        assert fragment in message, message
    assert list((root / "mnist").iterdir()) == []  # no temp files, no half files


def test_download_broken_mid_transfer_leaves_no_temp_file(tmp_path, monkeypatch):
    class Response:  # sends one chunk, then the connection drops
        headers = {"Content-Length": "100"}
        chunks = [b"x" * 50]

        def read(self, size):
            if self.chunks:
                return self.chunks.pop()
            raise http.client.IncompleteRead(b"", 50)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(idx.urllib.request, "urlopen", lambda url, timeout: Response())
    monkeypatch.setitem(idx.MIRRORS, "mnist", ["https://example.invalid/"])
    with pytest.raises(UserError, match="IncompleteRead|more expected"):
        idx.load_digits("mnist", "test", data_dir=tmp_path)
    assert list((tmp_path / "mnist").iterdir()) == []


def test_download_into_unwritable_place(tmp_path, mirrors, monkeypatch):
    monkeypatch.setitem(idx.MIRRORS, "mnist", [mirrors["good"]])
    (tmp_path / "mnist").write_text("a file where the folder should be")
    with pytest.raises(UserError, match="cannot write to"):
        idx.load_digits("mnist", "test", data_dir=tmp_path)


# ---------------------------------------------------------------- the real files


real_data_dir = find_mnist_dir


# From the data README, not from the files.
COUNTS = {
    ("mnist", "train"): [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
    ("mnist", "test"): [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
    ("fashion-mnist", "train"): [6000] * 10,
    ("fashion-mnist", "test"): [1000] * 10,
}
DECOMPRESSED_MD5 = {
    ("mnist", "train"): ("6bbc9ace898e44ae57da46a324031adb", "a25bea736e30d166cdddb491f175f624"),
    ("mnist", "test"): ("2646ac647ad5339dbf082846283269ea", "27ae3e4e09519cfbb04c329615203637"),
    ("fashion-mnist", "train"): ("f4a8712d7a061bf5bd6d2ca38dc4d50a", "9018921c3c673c538a1fc5bad174d6f9"),
    ("fashion-mnist", "test"): ("8181f5470baa50b63fa0f6fddb340f0a", "15d484375f8d13e6eb1aabb0c3f46965"),
}


@pytest.mark.parametrize("name, split", list(COUNTS))
def test_real_files(name, split):
    data_dir = real_data_dir()
    x, y = idx.load_digits(name, split, data_dir=data_dir, download=False)
    n = sum(COUNTS[name, split])
    assert x.shape == (n, 784) and x.dtype == np.float32
    assert y.shape == (n,) and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    np.testing.assert_array_equal(np.bincount(y, minlength=10), COUNTS[name, split])

    # read_idx gives back exactly the decompressed files: rebuild header + values, hash them.
    images, labels = (idx.read_idx(data_dir / name / fname) for fname in idx.FILES[split])
    for raw, md5 in zip((images, labels), DECOMPRESSED_MD5[name, split]):
        assert hashlib.md5(idx_bytes(0x08, raw.shape, raw.tobytes())).hexdigest() == md5
    np.testing.assert_array_equal(np.rint(x * 255), images.reshape(n, 784))
    np.testing.assert_array_equal(y, labels)
