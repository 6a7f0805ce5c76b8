"""saekit.kernels.sparse: k-sparse decoding, checked against Python loops over the codes and against dense decoding."""

import pytest
import torch
from conftest import make_model

from saekit.errors import UserError
from saekit.kernels.sparse import dense_codes, sparse_decode, topk_codes

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _codes(batch, k, n_hidden, d, seed=0, dtype=torch.float64, device="cpu"):
    """Random values (batch, k), indices (batch, k) with repeats allowed, atoms (n_hidden, d), bias (d,)."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(batch, k, generator=gen, dtype=dtype)
    indices = torch.randint(0, n_hidden, (batch, k), generator=gen)
    W = torch.randn(n_hidden, d, generator=gen, dtype=dtype)
    bias = torch.randn(d, generator=gen, dtype=dtype)
    return values.to(device), indices.to(device), W.to(device), bias.to(device)


def _loop_decode(values, indices, W, bias):
    """x_hat[b] = sum_j values[b, j] W[indices[b, j]] + bias, one row and one code at a time."""
    rows = []
    for b in range(values.shape[0]):
        row = bias.clone()
        for j in range(values.shape[1]):
            row = row + values[b, j] * W[indices[b, j]]
        rows.append(row)
    return torch.stack(rows)


def _loop_gradients(values, indices, W, grad_out):
    """The two k-sparse gradients by their definitions, written as loops."""
    grad_values = torch.zeros_like(values)
    grad_W = torch.zeros_like(W)
    for b in range(values.shape[0]):
        for j in range(values.shape[1]):
            i = indices[b, j]
            grad_values[b, j] = torch.dot(grad_out[b], W[i])
            grad_W[i] += values[b, j] * grad_out[b]
    return grad_values, grad_W


def _grads(fn, *inputs):
    """Gradients of (fn(*inputs) * probe).sum() with respect to every input, for a fixed random probe."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    probe = probe.to(out)  # the same numbers, rounded, whatever the dtype
    (out * probe).sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves], probe


# batch, k, n_hidden, d: general, k = 1, batch = 1, and few atoms (so indices repeat in a row).
SHAPES = [(5, 3, 11, 4), (6, 1, 9, 3), (1, 4, 10, 5), (4, 6, 3, 2)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_match_loops(shape, device):
    values, indices, W, bias = _codes(*shape, device=device)
    x_hat, (g_values, g_W, g_bias), probe = _grads(lambda v, w, b: sparse_decode(v, indices, w, b), values, W, bias)
    ref_values, ref_W = _loop_gradients(values, indices, W, probe)
    torch.testing.assert_close(x_hat, _loop_decode(values, indices, W, bias))
    torch.testing.assert_close(g_values, ref_values)
    torch.testing.assert_close(g_W, ref_W)
    torch.testing.assert_close(g_bias, probe.sum(0))


def test_repeated_indices_add_up():
    # Hand-built: row 0 uses atom 1 twice, so it decodes to (2 + 3) * W[1].
    W = torch.tensor([[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]], dtype=torch.float64)
    values = torch.tensor([[2.0, 3.0], [1.0, -1.0]], dtype=torch.float64)
    indices = torch.tensor([[1, 1], [0, 2]])
    expected = torch.tensor([[2.5, -5.0], [1.0, -2.0]], dtype=torch.float64)
    torch.testing.assert_close(sparse_decode(values, indices, W), expected)
    torch.testing.assert_close(dense_codes(values, indices, 3) @ W, expected)


@pytest.mark.parametrize("shape", SHAPES)
def test_gradcheck(shape):
    values, indices, W, bias = _codes(*shape, seed=1)
    inputs = tuple(t.requires_grad_() for t in (values, W, bias))
    assert torch.autograd.gradcheck(lambda v, w, b: sparse_decode(v, indices, w, b), inputs)


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_dense_decoding(shape):
    values, indices, W, bias = _codes(*shape, seed=2)
    n_hidden = W.shape[0]
    sparse = _grads(lambda v, w, b: sparse_decode(v, indices, w, b), values, W, bias)
    dense = _grads(lambda v, w, b: dense_codes(v, indices, n_hidden) @ w + b, values, W, bias)
    torch.testing.assert_close(sparse[0], dense[0])
    for g_sparse, g_dense in zip(sparse[1], dense[1]):
        torch.testing.assert_close(g_sparse, g_dense)


def test_dense_codes_match_loop():
    values, indices, _, _ = _codes(4, 5, 3, 1)  # 5 codes over 3 atoms: repeats in every row
    expected = torch.zeros(4, 3, dtype=torch.float64)
    for b in range(4):
        for j in range(5):
            expected[b, indices[b, j]] += values[b, j]
    torch.testing.assert_close(dense_codes(values, indices, 3), expected)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_close_to_float64(dtype, tol):
    values, indices, W, bias = _codes(64, 8, 100, 16, seed=3)
    low = [t.to(dtype) for t in (values, W, bias)]
    # The reference takes the same rounded inputs, so only the arithmetic's rounding differs.
    ref_inputs = [t.double() for t in low]
    out, grads, _ = _grads(lambda v, w, b: sparse_decode(v, indices, w, b), *low)
    ref_out, ref_grads, _ = _grads(lambda v, w, b: sparse_decode(v, indices, w, b), *ref_inputs)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    scale = ref_out.abs().max()
    assert (out.double() - ref_out).abs().max() < tol * scale
    for g, ref in zip(grads, ref_grads):
        assert (g.double() - ref).abs().max() < tol * ref.abs().max()


def test_model_decoder_columns_decode_like_dense_model():
    # W2 is (n_inputs, n_hidden), stored so that W2.t() is a contiguous atom-per-row matrix.
    model = make_model(6, 20, "relu", "linear", seed=4)
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    values, indices = topk_codes(model.pre_activations(x), k=3)
    h = dense_codes(values, indices, 20)
    torch.testing.assert_close(sparse_decode(values, indices, model.W2.t(), model.b2), model.decode(h))


def test_topk_codes_match_sorting():
    pre_acts = torch.randn(6, 12, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    pre_acts[0] = -pre_acts[0].abs() - 0.1  # a row with no positive pre-activation
    pre_acts.requires_grad_()
    values, indices = topk_codes(pre_acts, k=4)
    for b in range(6):
        ranked = sorted(range(12), key=lambda i: -pre_acts[b, i].item())[:4]
        assert sorted(indices[b].tolist()) == sorted(ranked)
        expected = sorted(max(pre_acts[b, i].item(), 0.0) for i in ranked)
        assert sorted(values[b].tolist()) == expected
    assert (values[0] == 0).all()
    values.sum().backward()
    # d(sum of ReLU'd top-k) / d pre_acts is 1 exactly at the chosen, positive entries.
    chosen = torch.zeros(6, 12, dtype=torch.bool).scatter_(1, indices, True)
    torch.testing.assert_close(pre_acts.grad, (chosen & (pre_acts > 0)).double())


@pytest.mark.parametrize(
    "call",
    [
        lambda v, i, W: sparse_decode(v[:, :2], i, W),  # shapes differ
        lambda v, i, W: sparse_decode(v[0], i[0], W),  # not 2-d
        lambda v, i, W: sparse_decode(v[:, :0], i[:, :0], W),  # k = 0
        lambda v, i, W: sparse_decode(v, i.int(), W),  # int32 indices
        lambda v, i, W: sparse_decode(v.float(), i, W),  # dtype mismatch
        lambda v, i, W: sparse_decode(v, i, W.t().contiguous().t()),  # strided atoms
        lambda v, i, W: sparse_decode(v, i, W[0]),  # atoms not 2-d
        lambda v, i, W: sparse_decode(v, i, W, torch.zeros(3, dtype=W.dtype)),  # bias length
        lambda v, i, W: dense_codes(v, i, 0),
        lambda v, i, W: topk_codes(W, 0),
        lambda v, i, W: topk_codes(W, W.shape[1] + 1),
        lambda v, i, W: topk_codes(W[0], 1),
    ],
)
def test_bad_input_raises_user_error(call):
    values, indices, W, _ = _codes(3, 4, 10, 5)
    with pytest.raises(UserError):
        call(values, indices, W)
