"""saekit.kinds (the SparseAutoencoder base and its kinds) and saekit.kinds.penalties, against hand
computations and closed forms."""

import math

import pytest
import torch
from conftest import make_model

from saekit.errors import UserError
from saekit.kinds import build, config
from saekit.kinds.penalties import L1Penalty, RunningRhoHat, contractive, kl_derivative, kl_divergence, weight_decay

# --- model -----------------------------------------------------------------------------------


@pytest.mark.parametrize("activation, output", [("sigmoid", "sigmoid"), ("relu", "linear"), ("relu", "sigmoid")])
def test_forward_equals_a_manual_computation(activation, output):
    model = make_model(5, 3, activation, output, seed=1)
    with torch.no_grad():
        model.b1.copy_(torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))
        model.b2.copy_(torch.linspace(-0.5, 0.5, 5, dtype=torch.float64))
    x = torch.rand(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.3
    W1, b1, W2, b2 = (p.detach().numpy() for p in (model.W1, model.b1, model.W2, model.b2))
    f = {"sigmoid": lambda z: 1 / (1 + math.exp(-z)), "relu": lambda z: max(z, 0.0)}[activation]
    g = {"sigmoid": lambda z: 1 / (1 + math.exp(-z)), "linear": lambda z: z}[output]
    with torch.no_grad():
        out = model(x)
        pre_activations = model.pre_activations(x)
    for i in range(4):
        for j in range(3):
            z2 = sum(float(x[i, k]) * W1[j, k] for k in range(5)) + b1[j]
            assert float(pre_activations[i, j]) == pytest.approx(z2, rel=1e-12, abs=1e-15)
            assert float(out.codes[i, j]) == pytest.approx(f(z2), rel=1e-12, abs=1e-15)
        for k in range(5):
            a3 = sum(float(out.codes[i, j]) * W2[k, j] for j in range(3)) + b2[k]
            assert float(out.x_hat[i, k]) == pytest.approx(g(a3), rel=1e-12, abs=1e-15)


def test_W2_is_stored_as_the_transpose_of_a_contiguous_atom_matrix():
    model = make_model(6, 4)
    assert model.W1.shape == (4, 6) and model.W2.shape == (6, 4)
    assert not model.W2.is_contiguous() and model.W2.t().is_contiguous()
    assert model.W2.stride() == (1, 6)
    # Its flat storage, in memory order, is MATLAB's W2(:) (column-major).
    W2 = model.W2.detach()
    flat = W2.t().reshape(-1).tolist()
    column_major = [float(W2[i, j]) for j in range(4) for i in range(6)]
    assert flat == column_major


def test_reset_parameters_range_determinism_and_zero_biases():
    n_in, n_hidden = 30, 20
    r = math.sqrt(6.0 / (n_in + n_hidden + 1))
    model = make_model(n_in, n_hidden, seed=5)
    for W in (model.W1.detach(), model.W2.detach()):
        assert W.abs().max() <= r and W.abs().max() > 0.9 * r
        assert abs(float(W.mean())) < 0.1 * r
    assert not torch.equal(model.W1, model.W2.t())  # independent draws
    same = make_model(n_in, n_hidden, seed=5)
    other = make_model(n_in, n_hidden, seed=6)
    assert torch.equal(model.W1, same.W1) and torch.equal(model.W2, same.W2)
    assert not torch.equal(model.W1, other.W1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.reset_parameters(5)
    assert torch.equal(model.W1, same.W1) and torch.equal(model.W2, same.W2)
    assert torch.count_nonzero(model.b1) == 0 and torch.count_nonzero(model.b2) == 0
    assert model.W2.t().is_contiguous()  # reset keeps the layout


def test_float32_model():
    model = make_model(4, 3, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model(torch.rand(2, 4)).x_hat.dtype == torch.float32


@pytest.mark.parametrize(
    "args, words",
    [
        ((0, 3), "n_inputs"),
        ((4, 0), "n-hidden"),
        ((4, -1), "n-hidden"),
        ((4, 3, "tanh"), "unknown kind 'tanh'"),
        ((4, 3, "sigmoid", "relu"), "output"),
    ],
)
def test_bad_sizes_or_names_raise_user_error(args, words):
    n_inputs, n_hidden, kind, output = (*args, "sigmoid", "sigmoid")[:4]
    with pytest.raises(UserError, match=words):
        build(config(kind, n_hidden=n_hidden, output=output), n_inputs)


# --- penalties -------------------------------------------------------------------------------


def test_kl_divergence_matches_the_closed_form():
    rho = 0.05
    rho_hat = torch.tensor([0.01, 0.05, 0.3, 0.9], dtype=torch.float64)
    expected = [rho * math.log(rho / q) + (1 - rho) * math.log((1 - rho) / (1 - q)) for q in rho_hat.tolist()]
    assert kl_divergence(rho, rho_hat).tolist() == pytest.approx(expected, rel=1e-13)
    assert float(kl_divergence(rho, rho_hat)[1]) == pytest.approx(0.0, abs=1e-15)  # zero at the target


def test_kl_derivative_matches_autograd_of_kl_divergence():
    rho = 0.1
    rho_hat = torch.tensor([0.02, 0.1, 0.5, 0.97], dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(kl_divergence(rho, rho_hat).sum(), rho_hat)
    torch.testing.assert_close(kl_derivative(rho, rho_hat.detach()), expected, rtol=1e-13, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kl_terms_stay_finite_at_zero_and_one(dtype):
    rho_hat = torch.tensor([0.0, 1.0], dtype=dtype)
    assert torch.isfinite(kl_divergence(0.01, rho_hat)).all()
    assert torch.isfinite(kl_derivative(0.01, rho_hat)).all()
    d = kl_derivative(0.01, rho_hat)
    assert d[0] < 0 < d[1]  # still pushes towards rho from both sides


def test_weight_decay_closed_form():
    W1, W2 = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0], [0.5]])
    assert float(weight_decay(0.1, W1, W2)) == pytest.approx(0.05 * (1 + 4 + 9 + 0.25))


def test_running_rho_hat_surrogate_gradient():
    rho, beta, momentum = 0.05, 3.0, 0.8
    running = RunningRhoHat(3, momentum)
    g = torch.Generator().manual_seed(0)
    h1 = torch.rand(6, 3, generator=g, dtype=torch.float64)
    h2 = torch.rand(4, 3, generator=g, dtype=torch.float64).requires_grad_()
    running.penalty(h1, rho, beta)  # first batch: the estimate starts at its mean
    torch.testing.assert_close(running.rho_hat, h1.mean(0), rtol=0, atol=0)

    surrogate, reported = running.penalty(h2, rho, beta)
    expected_rho_hat = momentum * h1.mean(0) + (1 - momentum) * h2.detach().mean(0)
    torch.testing.assert_close(running.rho_hat, expected_rho_hat, rtol=1e-14, atol=0)
    # d surrogate / d h_ij = beta * KL'(rho_hat_run_j) * d mean_batch(h_j) / d h_ij = beta * KL'_j / batch.
    q = expected_rho_hat
    kl_slope = -rho / q + (1 - rho) / (1 - q)
    (grad,) = torch.autograd.grad(surrogate, h2)
    torch.testing.assert_close(grad, (beta * kl_slope / 4).expand(4, 3), rtol=1e-12, atol=0)
    kl = rho * torch.log(rho / q) + (1 - rho) * torch.log((1 - rho) / (1 - q))
    assert float(reported) == pytest.approx(beta * float(kl.sum()), rel=1e-12)


def test_running_rho_hat_state_round_trip():
    running = RunningRhoHat(2)
    running.penalty(torch.tensor([[0.2, 0.4]]), 0.1, 1.0)
    restored = RunningRhoHat(2)
    restored.load_state_dict(running.state_dict())
    assert torch.equal(restored.rho_hat, running.rho_hat)


@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
def test_contractive_penalty_is_the_mean_squared_frobenius_norm_of_the_jacobian(activation):
    beta = 0.7
    model = make_model(5, 4, activation, "linear", seed=3, penalty="contractive", beta=beta)
    with torch.no_grad():
        model.b1.copy_(torch.tensor([0.3, -0.2, 0.0, 0.5], dtype=torch.float64))
    x = torch.rand(6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 0.5

    def encoder(xi):
        return model.encode(xi[None])[0]  # (n_in,) -> (n_hidden,) codes

    norms = [torch.autograd.functional.jacobian(encoder, xi).pow(2).sum() for xi in x]
    expected = torch.stack(norms).mean()
    with torch.no_grad():
        out = model(x)
        h = out.codes
        slope = h * (1 - h) if activation == "sigmoid" else (h > 0).to(h.dtype)  # the activation's derivative
        got = contractive(slope, model.W1)
    assert float(got) == pytest.approx(float(expected), rel=1e-12)
    # The kind's penalty --penalty contractive is beta times that.
    assert float(out.terms.sparsity) == pytest.approx(beta * float(expected), rel=1e-12)


def test_l1_penalty_layer_has_the_gradient_of_weight_times_sum_abs_h():
    h = torch.tensor([[0.5, -2.0, 0.0], [1.5, 0.25, -0.1]], dtype=torch.float64, requires_grad=True)
    upstream = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]], dtype=torch.float64)
    out = L1Penalty.apply(h, 0.1)
    assert torch.equal(out, h.detach())  # identity going forward
    (got,) = torch.autograd.grad((out * upstream).sum(), h)
    (expected,) = torch.autograd.grad((h * upstream).sum() + 0.1 * h.abs().sum(), h)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-15)
