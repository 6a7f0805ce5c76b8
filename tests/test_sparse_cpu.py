"""The compiled k-sparse loops (saekit.kernels.sparse_cpu) against plain torch computations written
here, and the dense kinds' sparse decoding against their dense decoding."""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model

from saekit.kernels import sparse_cpu
from saekit.kernels.sparse import at_least, row_support, row_topk, unit_sums

pytestmark = pytest.mark.skipif(sparse_cpu.nb is None, reason="Numba is not installed")


def _case(dtype, n=300, batch=37, d=11, k=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, n, generator=g, dtype=dtype)
    W = torch.randn(n, d, generator=g, dtype=dtype)
    rows = torch.randn(batch, d, generator=g, dtype=dtype)
    idx = torch.randint(0, n, (batch, k), generator=g)  # repeats allowed: they add up
    w = torch.randn(batch, k, generator=g, dtype=dtype)
    return z, W, rows, idx, w


FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _stable_topk_columns(z, k):
    """Each row's k largest entries' columns, ties to the lower column: a stable sort, written independently."""
    return z.float().sort(dim=1, descending=True, stable=True).indices[:, :k].sort(dim=1).values


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("k", [1, 7, 300])
def test_row_topk_keeps_each_rows_k_largest(dtype, k):
    z, *_ = _case(dtype)
    z[3, :] = -torch.inf  # a row of AuxK's masked pre-activations
    z[4, 10:20] = -torch.inf
    z[5] -= 3  # a row with fewer than k positive entries: negatives are kept, in order
    z[6] = -z[6].abs()  # no positive entry at all
    z[7, ::2] = z[7, 1]  # many ties, kept by lower column
    z[8] = torch.arange(300, 0, -1)  # sorted: the selection's bound is reached only in the first segments
    z[9] = -0.0
    values, indices = sparse_cpu.row_topk(z, k)
    assert torch.equal(indices.sort(dim=1).values, _stable_topk_columns(z, k))
    assert torch.equal(z.gather(1, indices), values)


def test_row_topk_ranks_nan_above_inf_as_torch_does():
    z = torch.tensor([[1.0, float("nan"), torch.inf, -torch.inf, 0.0, -1.0]])
    assert sorted(sparse_cpu.row_topk(z, 2)[1][0].tolist()) == [1, 2]
    assert sorted(sparse_cpu.row_topk(z, 2)[1][0].tolist()) == sorted(z.topk(2).indices[0].tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unit_sums_is_the_weight_and_bias_gradient_of_a_sparse_layer(dtype):
    _, W, rows, idx, w = _case(dtype)
    w[2, :] = 0.0  # zero weights are skipped, and must change nothing
    out, sums = sparse_cpu.unit_sums(idx, w, rows, W.shape[0])
    expected = torch.zeros_like(W)
    expected_sums = torch.zeros(W.shape[0], dtype=dtype)
    for b in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            expected[idx[b, j]] += w[b, j] * rows[b]
            expected_sums[idx[b, j]] += w[b, j]
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    torch.testing.assert_close(sums, expected_sums, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gather_dot_and_gather_sum_against_torch(dtype):
    _, W, rows, idx, w = _case(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(
        sparse_cpu.gather_dot(idx, W, rows, None), (W[idx] * rows[:, None, :]).sum(-1), rtol=tol, atol=tol
    )
    lengths = torch.randint(0, idx.shape[1] + 1, (idx.shape[0],), generator=torch.Generator().manual_seed(3))
    padding = torch.arange(idx.shape[1]) >= lengths[:, None]
    torch.testing.assert_close(
        sparse_cpu.gather_dot(idx, W, rows, lengths),
        (W[idx] * rows[:, None, :]).sum(-1).masked_fill(padding, 0),
        rtol=tol,
        atol=tol,
    )
    decoded = (w[:, :, None] * W[idx]).sum(1)
    torch.testing.assert_close(sparse_cpu.gather_sum(idx, w, W, None), decoded, rtol=tol, atol=tol)
    decoded_to_lengths = (w.masked_fill(padding, 0)[:, :, None] * W[idx]).sum(1)
    torch.testing.assert_close(sparse_cpu.gather_sum(idx, w, W, lengths), decoded_to_lengths, rtol=tol, atol=tol)


def test_row_support_lists_every_true_column_and_pads_with_false_ones():
    mask = torch.rand(20, 50, generator=torch.Generator().manual_seed(1)) < 0.1
    mask[0] = False
    width = int(mask.sum(1).max()) + 2
    for indices in (sparse_cpu.row_support(mask, width), row_support(mask, width)):
        for b in range(20):
            chosen = indices[b].tolist()
            assert len(set(chosen)) == width
            assert set(torch.nonzero(mask[b]).flatten().tolist()) <= set(chosen)


def test_the_dispatchers_give_what_torch_gives_without_numba(monkeypatch):
    z, W, rows, idx, w = _case(torch.float32)
    low = float(z.quantile(0.9))
    fast = (row_topk(z, 5), unit_sums(idx, w, rows, W.shape[0]), at_least(z, low))
    monkeypatch.setattr(sparse_cpu, "nb", None)
    slow = (row_topk(z, 5), unit_sums(idx, w, rows, W.shape[0]), at_least(z, low))
    assert torch.equal(fast[0][0].sort(1).values, slow[0][0].sort(1).values)
    torch.testing.assert_close(fast[1][0], slow[1][0])
    torch.testing.assert_close(fast[1][1], slow[1][1])
    for mine, theirs in zip(fast[2], slow[2]):
        assert torch.equal(mine, theirs)


def test_at_least_lists_each_rows_entries_at_or_above_the_bound_in_column_order():
    z = torch.tensor([[0.5, 2.0, 1.0, 3.0], [0.0, 0.2, 0.1, 0.3], [1.0, 1.0, 9.0, -1.0]])
    counts, values, columns = at_least(z, 1.0)
    assert counts.tolist() == [3, 0, 3]
    assert values.tolist() == [2.0, 1.0, 3.0, 1.0, 1.0, 9.0]
    assert columns.tolist() == [1, 2, 3, 0, 1, 2]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("low", [-torch.inf, -1.3, -0.0, 0.0, 0.1, 1.0 / 3, 2.5, torch.inf])
def test_at_least_matches_a_comparison_in_every_float_dtype(dtype, low):
    z, *_ = _case(dtype)
    z[0, :5] = torch.tensor([0.0, -0.0, -torch.inf, torch.inf, 1.0 / 3]).to(dtype)
    counts, values, columns = at_least(z, low)
    mask = z.double() >= low  # compared in float64, where low is exact
    assert counts.tolist() == mask.sum(1).tolist()
    assert torch.equal(values, z[mask])
    assert torch.equal(columns, mask.nonzero()[:, 1])


def test_sparse_decoding_of_the_torch_fallback_matches_embedding_bag(monkeypatch):
    from saekit.kernels.sparse import sparse_decode

    _, W, rows, idx, w = _case(torch.float64)
    for numba in (True, False):
        if not numba:
            monkeypatch.setattr(sparse_cpu, "nb", None)
        values, atoms = w.clone().requires_grad_(), W.clone().requires_grad_()
        out = sparse_decode(values, idx, atoms)
        (out * rows).sum().backward()
        ref_values, ref_atoms = w.clone().requires_grad_(), W.clone().requires_grad_()
        (F.embedding_bag(idx, ref_atoms, per_sample_weights=ref_values, mode="sum") * rows).sum().backward()
        torch.testing.assert_close(values.grad, ref_values.grad)
        torch.testing.assert_close(atoms.grad, ref_atoms.grad)


def test_padding_beyond_a_rows_length_decodes_to_nothing_and_gets_no_gradient(monkeypatch):
    from saekit.kernels.sparse import sparse_decode

    _, W, rows, idx, w = _case(torch.float64)
    lengths = torch.randint(0, idx.shape[1] + 1, (idx.shape[0],), generator=torch.Generator().manual_seed(4))
    padding = torch.arange(idx.shape[1]) >= lengths[:, None]
    w = w.masked_fill(padding, 0)  # padding holds value 0
    for numba in (True, False):
        if not numba:
            monkeypatch.setattr(sparse_cpu, "nb", None)
        values, atoms = w.clone().requires_grad_(), W.clone().requires_grad_()
        (sparse_decode(values, idx, atoms, lengths=lengths) * rows).sum().backward()
        # the reference: each row's first lengths[b] codes alone, one row at a time
        ref_values, ref_atoms = w.clone().requires_grad_(), W.clone().requires_grad_()
        total = sum(
            (ref_values[b, : lengths[b]] @ ref_atoms[idx[b, : lengths[b]]] * rows[b]).sum() for b in range(len(rows))
        )
        total.backward()
        torch.testing.assert_close(values.grad, ref_values.grad)
        torch.testing.assert_close(atoms.grad, ref_atoms.grad)
        assert (values.grad[padding] == 0).all()


@pytest.mark.parametrize(
    ("kind", "settings"),
    [("relu", {"penalty": "l1", "beta": 0.01}), ("jumprelu", {"jumprelu_threshold": 0.5, "jumprelu_bandwidth": 0.2})],
)
def test_dense_kinds_decode_their_sparse_codes_sparsely_with_the_dense_gradients(kind, settings, monkeypatch):
    model = make_model(16, 256, kind, "linear", seed=1, **settings)
    with torch.no_grad():
        model.b1.fill_(-1.0 if kind == "relu" else -0.3)  # few codes in use: the sparse view applies
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    z2 = model.pre_activations(x)
    assert type(model._sparse_view(model.sparsify(z2), z2)).__name__ == "SparseCodes"
    out = model(x)
    sum(out.terms).backward()
    sparse_grads = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    monkeypatch.setattr(model, "decode_support", lambda z2: None)  # the dense decoding, as reference
    dense = model(x)
    sum(dense.terms).backward()
    torch.testing.assert_close(out.x_hat, dense.x_hat, rtol=1e-12, atol=1e-14)
    for mine, theirs in zip(sparse_grads, model.parameters()):
        torch.testing.assert_close(mine, theirs.grad, rtol=1e-12, atol=1e-14)
