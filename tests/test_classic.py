"""saekit.kernels.classic.cost_and_grad, with UFLDL's KL term (saekit.kinds.penalties.kl_term), against
finite differences, autograd of our own J, and saturated units."""

import numpy as np
import pytest
import torch
from conftest import random_problem, reference_cost, reference_terms

from saekit.kernels.classic import cost_and_grad
from saekit.kinds.penalties import kl_term

LAMBDA, RHO, BETA = 1e-3, 0.1, 3.0
KL = kl_term(RHO, BETA)


def _cost(params, x, target=None):
    W1, b1, W2, b2 = params
    result, _ = cost_and_grad(W1, b1, W2, b2, x, LAMBDA, KL, target=target)
    return result


def _grads(params, x, target=None):
    return [g.clone() for g in _cost(params, x, target).grads]


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(a + b)


def test_gradient_matches_central_differences_float64():
    W1, b1, W2, b2, x = random_problem()
    params = [W1, b1, W2, b2]
    analytic = np.concatenate([g.reshape(-1).numpy() for g in _grads(params, x)])
    numerical, eps = [], 1e-5
    for p in params:
        flat = p.view(-1)
        for i in range(flat.numel()):
            old = float(flat[i])
            flat[i] = old + eps
            plus = _cost(params, x).cost
            flat[i] = old - eps
            minus = _cost(params, x).cost
            flat[i] = old
            numerical.append((plus - minus) / (2 * eps))
    assert _rel(numerical, analytic) < 1e-9


@pytest.mark.parametrize("denoising", [False, True])
def test_gradient_matches_autograd_of_our_own_cost(denoising):
    W1, b1, W2, b2, x = random_problem(m=11, n_in=5, n_hidden=3, seed=1)
    target = torch.rand_like(x) * 0.8 + 0.1 if denoising else None
    ours = _grads([W1, b1, W2, b2], x, target)
    leaves = [t.clone().requires_grad_() for t in (W1, b1, W2, b2)]
    expected = torch.autograd.grad(reference_cost(*leaves, x, LAMBDA, RHO, BETA, target=target), leaves)
    for got, want in zip(ours, expected):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_cost_terms_match_the_formula():
    W1, b1, W2, b2, x = random_problem(seed=2)
    result = _cost([W1, b1, W2, b2], x)
    reconstruction, decay, sparsity = (float(t) for t in reference_terms(W1, b1, W2, b2, x, LAMBDA, RHO, BETA))
    assert result.reconstruction == pytest.approx(reconstruction, rel=1e-12)
    assert result.weight_decay == pytest.approx(decay, rel=1e-12)
    assert result.sparsity == pytest.approx(sparsity, rel=1e-12)
    assert result.cost == pytest.approx(reconstruction + decay + sparsity, rel=1e-12)
    rho_hat = torch.sigmoid(x @ W1.T + b1).mean(0)
    torch.testing.assert_close(result.rho_hat, rho_hat, rtol=1e-12, atol=0)


def test_weight_decay_acts_on_weights_only():
    """Raising lambda adds exactly lambda * W to dJ/dW and nothing to dJ/db (biases carry no decay)."""
    W1, b1, W2, b2, x = random_problem(seed=3)
    b1, b2 = b1 + 5.0, b2 - 5.0  # large biases: any decay on them would show
    with_decay, _ = cost_and_grad(W1, b1, W2, b2, x, 10.0, KL)
    with_decay = [g.clone() for g in with_decay.grads]
    without, _ = cost_and_grad(W1, b1, W2, b2, x, 0.0, KL)
    torch.testing.assert_close(with_decay[0] - without.grads[0], 10.0 * W1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(with_decay[2] - without.grads[2], 10.0 * W2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(with_decay[1], without.grads[1], rtol=0, atol=0)
    torch.testing.assert_close(with_decay[3], without.grads[3], rtol=0, atol=0)


def test_float32_agrees_with_float64():
    problem64 = random_problem(m=20, n_in=8, n_hidden=5, seed=4)
    problem32 = [t.float() for t in problem64]
    r64, r32 = _cost(problem64[:4], problem64[4]), _cost(problem32[:4], problem32[4])
    assert r32.cost == pytest.approx(r64.cost, rel=1e-5)
    for g32, g64 in zip(r32.grads, r64.grads):
        assert g32.dtype == torch.float32
        assert _rel(g32.numpy(), g64.numpy()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [1000.0, -1000.0])
def test_saturated_units_give_finite_cost_and_gradient(dtype, bias):
    """rho_hat exactly 1 (bias +1000) or 0 (bias -1000): log(0) and 1/0 must not appear."""
    W1, b1, W2, b2, x = random_problem(dtype=dtype, seed=5)
    b1 = torch.full_like(b1, bias)
    result = _cost([W1, b1, W2, b2], x)
    assert float(result.rho_hat.min()) in (0.0, 1.0)  # really saturated
    assert np.isfinite(result.cost) and np.isfinite(result.sparsity)
    assert result.sparsity > 1.0  # far from the target: a large but finite penalty
    for g in result.grads:
        assert torch.isfinite(g).all()


def test_partly_saturated_units_keep_the_exact_gradient_of_the_others():
    """One unit pinned at rho_hat = 0 must not spoil the others' gradient (finite, and equal to autograd's)."""
    W1, b1, W2, b2, x = random_problem(seed=6)
    b1 = b1.clone()
    b1[0] = -1000.0
    grads = _grads([W1, b1, W2, b2], x)
    assert all(torch.isfinite(g).all() for g in grads)
    # Reference on the healthy units only: unit 0's activation is exactly 0, so it adds nothing to x_hat.
    keep = slice(1, None)
    leaves = [t.clone().requires_grad_() for t in (W1[keep], b1[keep], W2[:, keep], b2)]
    rec, decay, sparsity = reference_terms(*leaves, x, LAMBDA, RHO, BETA)
    expected = torch.autograd.grad(rec + decay + sparsity, leaves)
    torch.testing.assert_close(grads[0][keep], expected[0], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(grads[2][:, keep], expected[2], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(grads[3], expected[3], rtol=1e-10, atol=1e-13)


def test_workspace_reuse_gives_identical_results_and_a_shape_change_reallocates():
    W1, b1, W2, b2, x = random_problem(m=9, seed=7)
    fresh, ws = cost_and_grad(W1, b1, W2, b2, x, LAMBDA, KL)
    first = [g.clone() for g in fresh.grads]
    # Evaluate somewhere else in between, so the buffers hold other numbers.
    cost_and_grad(W1 * 2, b1, W2, b2, x * 0.5, LAMBDA, KL, workspace=ws)
    again, ws_again = cost_and_grad(W1, b1, W2, b2, x, LAMBDA, KL, workspace=ws)
    assert ws_again is ws
    assert again.cost == fresh.cost
    for a, b in zip(again.grads, first):
        assert torch.equal(a, b)

    fewer, ws_fewer = cost_and_grad(W1, b1, W2, b2, x[:4], LAMBDA, KL, workspace=ws)
    assert ws_fewer is not ws and ws_fewer.a2.shape == (4, W1.shape[0])
    assert fewer.cost == pytest.approx(float(reference_cost(W1, b1, W2, b2, x[:4], LAMBDA, RHO, BETA)), rel=1e-12)
    other = [t.float() for t in (W1, b1, W2, b2, x)]
    _, ws_float = cost_and_grad(*other, LAMBDA, KL, workspace=ws)
    assert ws_float is not ws and ws_float.a2.dtype == torch.float32


def test_non_contiguous_input_and_transposed_W2_storage():
    """The model stores W2 as a transpose and ufldl passes data.T: strided inputs must give the same numbers."""
    W1, b1, W2, b2, x = random_problem(seed=8)
    W2_strided = W2.t().contiguous().t()
    x_strided = x.t().contiguous().t()
    assert not W2_strided.is_contiguous() and not x_strided.is_contiguous()
    a = _cost([W1, b1, W2, b2], x)
    a_grads = [g.clone() for g in a.grads]
    b = _cost([W1, b1, W2_strided, b2], x_strided)
    assert b.cost == pytest.approx(a.cost, rel=1e-13)
    for g, h in zip(a_grads, b.grads):
        torch.testing.assert_close(g, h, rtol=1e-12, atol=1e-15)
