"""Tests for saekit.data.vectors: sources, the shuffled stream, resume, data parallel, statistics.

The data set X has a row id in column 0, so a batch tells which rows it holds. It is
written by hand as .npy, .safetensors and a folder of mixed shards; every check compares
with X itself, with NumPy, or with a brute-force minimisation (scipy), never with numbers
the code under test produced.
"""

import io
import json
from itertools import islice

import numpy as np
import pytest
import scipy.optimize
import torch
from safetensors.torch import save_file

from saekit.data.vectors import VectorSource, VectorStream, geometric_median, mean_and_mean_squared_norm, open_vectors
from saekit.errors import UserError

N, D = 103, 4  # a prime row count: no batch or chunk size divides it
X = np.column_stack([np.arange(N), np.random.default_rng(7).normal(size=(N, D - 1))]).astype(np.float32)
KINDS = ["numpy", "tensor", "npy", "safetensors", "folder"]
SMALL = dict(batch_size=8, shuffle_buffer=24, chunk_size=5)  # windows of 4 chunks, 20 rows


def write_folder(folder, x=X):
    """Shards a.npy (rows 0-39), b.safetensors (40-72), c.npy (73-): read in name order."""
    folder.mkdir()
    np.save(folder / "a.npy", x[:40])
    save_file({"vectors": torch.from_numpy(x[40:73])}, folder / "b.safetensors")
    np.save(folder / "c.npy", x[73:])
    (folder / "notes.txt").write_text("not a shard: ignored")
    return folder


def make_source(kind, tmp_path, x=X):
    if kind == "numpy":
        return x
    if kind == "tensor":
        return torch.from_numpy(x)
    if kind == "npy":
        np.save(tmp_path / "x.npy", x)
        return tmp_path / "x.npy"
    if kind == "safetensors":
        save_file({"vectors": torch.from_numpy(x)}, tmp_path / "x.safetensors")
        return tmp_path / "x.safetensors"
    return write_folder(tmp_path / "shards", x)


def ids(batch):
    return batch[:, 0].long().tolist()


def take(stream, steps):
    return list(islice(stream, steps))


# ---------------------------------------------------------------- sources


@pytest.mark.parametrize("kind", KINDS)
def test_source_reads_the_rows_of_each_kind(tmp_path, kind):
    source = open_vectors(make_source(kind, tmp_path))
    assert (source.n, source.d) == (N, D)
    np.testing.assert_array_equal(source.read(0, N).numpy(), X)
    np.testing.assert_array_equal(source.read(35, 80).numpy(), X[35:80])  # across shards


def test_integer_bfloat16_and_big_endian_data_are_converted(tmp_path):
    pixels = np.arange(24, dtype=np.uint8).reshape(6, 4) * 10
    np.save(tmp_path / "pixels.npy", pixels)
    batch = next(iter(VectorStream(tmp_path / "pixels.npy", batch_size=6, shuffle_buffer=6)))
    assert batch.dtype == torch.float32
    assert sorted(map(tuple, batch.tolist())) == sorted(map(tuple, pixels.astype(float).tolist()))

    halves = torch.tensor([[0.5, -2.0], [1.25, 3.0]], dtype=torch.bfloat16)  # exact in bfloat16
    save_file({"h": halves}, tmp_path / "h.safetensors")
    np.testing.assert_array_equal(
        open_vectors(tmp_path / "h.safetensors").read(0, 2).float(), [[0.5, -2.0], [1.25, 3.0]]
    )

    np.save(tmp_path / "big.npy", X.astype(">f8"))
    stream = VectorStream(tmp_path / "big.npy", batch_size=N, shuffle_buffer=N, dtype=torch.float64)
    assert sorted(ids(next(iter(stream)))) == list(range(N))


def test_safetensors_key_picks_among_several_matrices(tmp_path):
    save_file({"a": torch.zeros(3, 2), "b": torch.ones(5, 7), "bias": torch.ones(7)}, tmp_path / "m.safetensors")
    source = open_vectors(tmp_path / "m.safetensors", key="b")
    assert (source.n, source.d) == (5, 7)
    with pytest.raises(UserError, match=r"exactly one 2-D tensor.*a \(3, 2\), b \(5, 7\)"):
        open_vectors(tmp_path / "m.safetensors")
    with pytest.raises(UserError, match="no tensor 'c'"):
        open_vectors(tmp_path / "m.safetensors", key="c")


# ---------------------------------------------------------------- the stream


@pytest.mark.parametrize("kind", KINDS)
def test_an_epoch_yields_every_row_exactly_once(tmp_path, kind):
    stream = VectorStream(make_source(kind, tmp_path), **SMALL, drop_last=False, epochs=1)
    batches = list(stream)
    assert [len(b) for b in batches] == [8] * 12 + [N - 96]
    rows = torch.cat(batches)
    np.testing.assert_array_equal(rows[rows[:, 0].argsort()].numpy(), X)


def test_drop_last_yields_full_batches_of_distinct_rows():
    stream = VectorStream(X, **SMALL, epochs=2)
    batches = list(stream)
    assert len(batches) == 2 * (N // 8) and all(b.shape == (8, D) for b in batches)
    for epoch in (batches[:12], batches[12:]):
        seen = [i for b in epoch for i in ids(b)]
        assert len(set(seen)) == 96


def test_batches_mix_chunks_and_epochs_differ():
    batches = list(VectorStream(X, **SMALL, epochs=2))
    first = ids(batches[0])
    assert len({i // 5 for i in first}) > 1  # rows of several chunks
    assert first != sorted(first)  # and not in file order
    assert [ids(b) for b in batches[:12]] != [ids(b) for b in batches[12:]]
    one_window = list(VectorStream(X, batch_size=8, shuffle_buffer=N, chunk_size=N, epochs=2))
    assert [ids(b) for b in one_window[:12]] != [ids(b) for b in one_window[12:]]


class CountingSource(VectorSource):
    """Wraps a source and records the size of every read."""

    def __init__(self, inner):
        self.inner, self.n, self.d, self.name = inner, inner.n, inner.d, inner.name
        self.reads = []

    def read(self, start, stop):
        self.reads.append(stop - start)
        return self.inner.read(start, stop)


def test_stream_reads_chunks_and_holds_at_most_a_buffer(tmp_path):
    source = CountingSource(open_vectors(make_source("npy", tmp_path)))
    reads_per_batch = []  # the reads made to produce each batch
    for _ in VectorStream(source, **SMALL, drop_last=False, epochs=2):
        reads_per_batch.append(source.reads)
        source.reads = []
    assert max(r for reads in reads_per_batch for r in reads) <= SMALL["chunk_size"]
    assert max(sum(reads) for reads in reads_per_batch) <= SMALL["shuffle_buffer"]
    assert sum(sum(reads) for reads in reads_per_batch) == 2 * N  # each row once per epoch


def test_same_seed_same_batches_other_seed_other_batches():
    first, again, other = (take(VectorStream(X, **SMALL, seed=s), 20) for s in (3, 3, 4))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert [ids(b) for b in first] != [ids(b) for b in other]


@pytest.mark.parametrize("k", [0, 1, 5, 12, 13, 25])  # 12 batches per epoch: boundaries too
def test_resume_after_k_steps_equals_the_uninterrupted_run(tmp_path, k):
    source = make_source("folder", tmp_path)
    reference = take(VectorStream(source, **SMALL), 30)
    interrupted = VectorStream(source, **SMALL)
    take(interrupted, k)
    state = json.loads(json.dumps(interrupted.state_dict()))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    resumed = VectorStream(source, **SMALL)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    rest = take(resumed, 30 - k)
    assert len(rest) == 30 - k and all(torch.equal(a, b) for a, b in zip(rest, reference[k:]))
    continued = take(interrupted, 30 - k)  # iterating the same stream again continues too
    assert all(torch.equal(a, b) for a, b in zip(continued, reference[k:]))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_union_equals_the_single_process_global_batch(tmp_path, world_size):
    source = make_source("folder", tmp_path)
    single = take(VectorStream(source, batch_size=4 * world_size, shuffle_buffer=24, chunk_size=5), 20)
    ranks = [
        take(VectorStream(source, batch_size=4, shuffle_buffer=24, chunk_size=5, rank=r, world_size=world_size), 20)
        for r in range(world_size)
    ]
    for t, batch in enumerate(single):
        assert torch.equal(torch.cat([ranks[r][t] for r in range(world_size)]), batch)


def test_single_process_state_resumes_on_three_ranks():
    single = VectorStream(X, batch_size=12, shuffle_buffer=24, chunk_size=5)
    take(single, 5)
    state, reference = single.state_dict(), take(single, 10)
    ranks = [VectorStream(X, batch_size=4, shuffle_buffer=24, chunk_size=5, rank=r, world_size=3) for r in range(3)]
    for stream in ranks:
        stream.load_state_dict(state)
    for batch, parts in zip(reference, zip(*(take(s, 10) for s in ranks))):
        assert torch.equal(torch.cat(parts), batch)


def test_state_from_other_settings_is_refused():
    state = VectorStream(X, **SMALL, seed=1).state_dict()
    with pytest.raises(UserError, match=r"seed=1 \(now 2\)"):
        VectorStream(X, **SMALL, seed=2).load_state_dict(state)
    with pytest.raises(UserError, match=r"rows=103 \(now 50\)"):
        VectorStream(X[:50], **SMALL, seed=1).load_state_dict(state)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e300])  # 1e300 overflows float32
def test_non_finite_row_is_named_by_file_and_row(tmp_path, bad):
    x = X.astype(np.float64)
    x[80, 2] = bad  # shard c.npy starts at row 73
    folder = make_source("folder", tmp_path, x)
    with pytest.raises(UserError, match=r"c\.npy row 7 holds NaN or inf"):
        list(VectorStream(folder, **SMALL, epochs=1))
    if bad != 1e300:  # finite in float64, which the statistics use
        with pytest.raises(UserError, match=r"c\.npy row 7 holds NaN or inf"):
            mean_and_mean_squared_norm(folder)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(batch_size=0), "batch_size is 0"),
        (dict(batch_size=8, shuffle_buffer=4, chunk_size=5), "exceeds shuffle_buffer"),
        (dict(batch_size=8, rank=2, world_size=2), "rank 2 is outside"),
        (dict(batch_size=8, world_size=2, drop_last=False), "drop_last=False needs world_size=1"),
        (dict(batch_size=60, world_size=2), "fewer than one global batch"),
        (dict(batch_size=8, seed=-1), "must not be negative"),
    ],
)
def test_bad_stream_settings_raise(settings, message):
    with pytest.raises(UserError, match=message):
        VectorStream(X, **settings)


# ---------------------------------------------------------------- bad sources


def test_bad_sources_raise_a_user_error_naming_the_problem(tmp_path):
    cases = []
    np.save(tmp_path / "flat.npy", np.zeros(5))
    cases.append((tmp_path / "flat.npy", r"shape \(5,\); vectors must be a 2-D"))
    cases.append((np.zeros((2, 3, 4)), r"shape \(2, 3, 4\)"))
    cases.append((torch.zeros(3), r"shape \(3,\)"))
    np.save(tmp_path / "empty.npy", np.zeros((0, 3)))
    cases.append((tmp_path / "empty.npy", "no data"))
    cases.append((tmp_path / "missing.npy", "does not exist"))
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "readme.txt").write_text("no shards")
    cases.append((tmp_path / "empty_dir", "holds no .npy or .safetensors"))
    (tmp_path / "x.csv").write_text("1,2\n")
    cases.append((tmp_path / "x.csv", r"unsupported type '\.csv'"))
    np.save(tmp_path / "whole.npy", np.zeros((100, 5)))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "whole.npy").read_bytes()[:-40])
    cases.append((tmp_path / "cut.npy", r"cut\.npy as a \.npy file .*truncated or corrupt"))
    (tmp_path / "junk.npy").write_bytes(b"junk")
    cases.append((tmp_path / "junk.npy", r"junk\.npy as a \.npy file"))
    np.savez(tmp_path / "arch.npz", a=np.zeros((2, 2)))
    (tmp_path / "arch.npy").write_bytes((tmp_path / "arch.npz").read_bytes())
    cases.append((tmp_path / "arch.npy", "is an .npz archive"))
    save_file({"v": torch.zeros(50, 4)}, tmp_path / "whole.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "whole.safetensors").read_bytes()[:-16])
    cases.append((tmp_path / "cut.safetensors", r"cut\.safetensors as a \.safetensors file"))
    save_file({"v": torch.zeros(2, 2, dtype=torch.bool)}, tmp_path / "bool.safetensors")
    cases.append((tmp_path / "bool.safetensors", "dtype BOOL"))
    cases.append((np.array([["a", "b"]]), "dtype <U1"))
    cases.append((np.zeros((2, 2), dtype=np.complex64), "dtype complex64"))
    cases.append((torch.zeros(2, 2, dtype=torch.bool), "dtype torch.bool"))
    widths = tmp_path / "widths"
    widths.mkdir()
    np.save(widths / "0.npy", np.zeros((3, 4)))
    save_file({"v": torch.zeros(3, 5)}, widths / "1.safetensors")
    cases.append((widths, r"differ in width: .*0\.npy has d=4 but .*1\.safetensors has d=5"))
    for source, message in cases:
        with pytest.raises(UserError, match=message):
            open_vectors(source)


# ---------------------------------------------------------------- statistics


def test_mean_and_mean_squared_norm_match_numpy(tmp_path):
    folder = make_source("folder", tmp_path)
    x = X.astype(np.float64)
    for max_rows, rows in [(None, x), (50, x[:50]), (10_000, x)]:
        mean, msn = mean_and_mean_squared_norm(folder, max_rows=max_rows, chunk_size=7)
        np.testing.assert_allclose(mean.numpy(), rows.mean(axis=0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(msn, (rows**2).sum(axis=1).mean(), rtol=1e-12)


def sum_of_distances(points, y):
    return np.linalg.norm(points - y, axis=1).sum()


def test_geometric_median_matches_brute_force_minimisation():
    points = np.random.default_rng(0).normal(size=(25, 3)) * [1.0, 3.0, 0.5] + [2.0, -1.0, 0.0]
    ours = geometric_median(points).numpy()
    brute = scipy.optimize.minimize(
        lambda y: sum_of_distances(points, y),
        points.mean(axis=0),
        method="Nelder-Mead",
        options=dict(xatol=1e-10, fatol=1e-12, maxiter=20_000),
    ).x
    assert sum_of_distances(points, ours) <= sum_of_distances(points, brute) + 1e-9
    np.testing.assert_allclose(ours, brute, atol=1e-5)


def test_geometric_median_in_one_dimension_is_the_median():
    values = np.array([[0.0], [1.0], [2.0], [10.0], [50.0]])
    np.testing.assert_allclose(geometric_median(values, iters=2000).numpy(), [2.0], atol=1e-6)


def test_geometric_median_stays_on_a_heavy_data_point():
    # The mean is the point p = 0, repeated 4 times; the other rows pull on p with force
    # |1 + 1 - 1| = 1 <= 4, so p itself is the minimiser (optimality condition by hand).
    points = np.array([[0.0, 0.0]] * 4 + [[1.0, 0.0], [1.0, 0.0], [-2.0, 0.0]])
    np.testing.assert_array_equal(geometric_median(points).numpy(), [0.0, 0.0])


def test_geometric_median_of_a_sample_lands_near_the_centre():
    x = np.random.default_rng(1).normal(size=(20_000, 3)) + [5.0, -2.0, 1.0]
    np.testing.assert_allclose(geometric_median(x, max_rows=2000).numpy(), [5.0, -2.0, 1.0], atol=0.15)


def test_an_unshuffled_stream_yields_the_rows_in_their_stored_order_epoch_after_epoch():
    x = torch.arange(60.0).view(30, 2)
    stream = VectorStream(x, 4, shuffle_buffer=8, shuffle=False)
    batches = list(islice(iter(stream), 9))  # 7 whole batches per epoch (the last 2 rows dropped), then again
    assert [b[:, 0].tolist() for b in batches[:2]] == [[0.0, 2.0, 4.0, 6.0], [8.0, 10.0, 12.0, 14.0]]
    assert batches[7][:, 0].tolist() == [0.0, 2.0, 4.0, 6.0]
    assert stream.state_dict()["shuffle"] is False
