"""The sparse kinds of saekit.kinds (topk, batchtopk, jumprelu) and saekit.kernels.sparse.sparse_encode:
TopK / BatchTopK codes and their k-sparse backward (the TopK forward's AuxK loss and sparse_encode's
AuxK codes included) against a dense autograd reference written here with dense masks; BatchTopK's
budget, widening loop and threshold (saekit.kinds.batchtopk.BatchSelection); JumpReLU's forward and
straight-through gradients by hand (saekit.kinds.jumprelu.Threshold)."""

import pytest
import torch
from conftest import make_model, with_random_biases

from saekit.kernels import sparse_cpu
from saekit.kernels.sparse import sparse_encode
from saekit.kinds.batchtopk import BatchSelection
from saekit.kinds.jumprelu import Threshold

D, N_HIDDEN, BATCH, K = 16, 64, 12, 4
AUX_COEFFICIENT = 0.25


def _model(activation, pre_bias, seed=0, aux_k=0):
    """A float64 model with non-zero biases, so that pre_bias matters."""
    model = make_model(
        D,
        N_HIDDEN,
        activation,
        "linear",
        seed=seed,
        k=K,
        pre_bias=pre_bias,
        aux_k=aux_k,
        aux_coefficient=AUX_COEFFICIENT,
    )
    return with_random_biases(model, seed)


def _x(seed=1, m=BATCH):
    return torch.randn(m, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _dense(values, indices, n_hidden=N_HIDDEN):
    """Scatter (batch, k) codes into (batch, n_hidden), differentiable in values; written here, not saekit's."""
    return values.new_zeros(values.shape[0], n_hidden).scatter_add(1, indices, values)


def _reference_z2(params, x, pre_bias):
    W1, b1, _, b2 = params
    return ((x - b2) if pre_bias else x) @ W1.T + b1


def _topk_mask(z2, k):
    """(batch, n_hidden) bool: each row's k largest entries."""
    return torch.zeros_like(z2, dtype=torch.bool).scatter(1, z2.topk(k, dim=1).indices, True)


def _batch_topk_mask(z2, k):
    """(batch, n_hidden) bool: the k * batch largest entries of the whole batch."""
    flat = torch.zeros(z2.numel(), dtype=torch.bool)
    flat[z2.reshape(-1).topk(k * z2.shape[0]).indices] = True
    return flat.view_as(z2)


def _params(model):
    return [p.detach().clone().requires_grad_() for p in (model.W1, model.b1, model.W2, model.b2)]


def _loss_weights(seed=5):
    """Fixed random weights c (batch, D) and target y: L = sum(c * x_hat) + 0.5 ||x_hat - y||^2 tests every
    direction."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, D, generator=g, dtype=torch.float64), torch.randn(
        BATCH, D, generator=g, dtype=torch.float64
    )


# --- TopK / BatchTopK codes against a dense reference -------------------------------------------


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
@pytest.mark.parametrize("pre_bias", [False, True])
def test_codes_equal_a_dense_reference(activation, pre_bias):
    model, x = _model(activation, pre_bias), _x()
    with torch.no_grad():
        out = model(x)
        z2 = _reference_z2(_params(model), x, pre_bias)
    mask = _topk_mask(z2, K) if activation == "topk" else _batch_topk_mask(z2, K)
    expected = (z2.relu() * mask).detach()
    assert torch.allclose(_dense(out.codes.values, out.codes.indices), expected, rtol=0, atol=1e-12)
    # Every listed index with a non-zero value is a selected unit, listed once per row.
    for row in range(BATCH):
        listed = out.codes.indices[row][out.codes.values[row] > 0]
        assert len(set(listed.tolist())) == len(listed)
        assert set(listed.tolist()) == set((expected[row] > 0).nonzero().flatten().tolist())
    assert torch.allclose(out.x_hat, expected @ model.W2.detach().T + model.b2.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
@pytest.mark.parametrize("pre_bias", [False, True])
@pytest.mark.parametrize("aux_k", [0, 6])
def test_k_sparse_backward_equals_dense_autograd(activation, pre_bias, aux_k):
    """The forward's loss terms (reconstruction against a target, and the AuxK loss when a dead mask
    is given and aux_k > 0) and their gradients through the k-sparse backward equal the same loss
    written here with dense masks and differentiated by dense autograd."""
    model, x = _model(activation, pre_bias, aux_k=aux_k), _x()
    c, y = _loss_weights()
    dead = torch.zeros(N_HIDDEN, dtype=torch.bool)
    dead[::3] = True  # 22 dead units: more than aux_k, and some of them also in the TopK selection
    out = model(x, y, dead=dead)
    loss = (c * out.x_hat).sum() + sum(out.terms)
    loss.backward()

    params = _params(model)
    W1, b1, W2, b2 = params
    z2 = _reference_z2(params, x, pre_bias)
    mask = _topk_mask(z2.detach(), K) if activation == "topk" else _batch_topk_mask(z2.detach(), K)
    x_hat = (z2.relu() * mask) @ W2.T + b2
    reconstruction = 0.5 * (x_hat - y).pow(2).sum() / BATCH
    reference = (c * x_hat).sum() + reconstruction
    auxiliary = torch.zeros((), dtype=torch.float64)
    if aux_k:
        # AuxK (Gao et al.): the aux_k largest dead pre-activations rebuild e = y - x_hat, over e's variance.
        aux_mask = _topk_mask(z2.detach().masked_fill(~dead, -torch.inf), aux_k)
        e = (y - x_hat).detach()
        variance = (e - e.mean(0)).pow(2).sum()
        auxiliary = AUX_COEFFICIENT * ((z2.relu() * aux_mask) @ W2.T - e).pow(2).sum() / variance
        reference = reference + auxiliary
    reference.backward()
    got_reconstruction, got_sparsity, got_auxiliary, got_decay = out.terms.numbers()
    assert got_reconstruction == pytest.approx(float(reconstruction.detach()), rel=1e-12)
    assert got_auxiliary == pytest.approx(float(auxiliary.detach()), rel=1e-12, abs=1e-300)
    assert got_sparsity == 0.0 and got_decay == 0.0
    for name, mine, theirs in zip(("W1", "b1", "W2", "b2"), (model.W1, model.b1, model.W2, model.b2), params):
        assert torch.allclose(mine.grad, theirs.grad, rtol=1e-10, atol=1e-11), name
    if aux_k:  # the dead units' encoder rows and decoder columns learn from the AuxK loss
        assert float(auxiliary.detach()) > 0
        assert model.W1.grad[dead].abs().sum(1).gt(0).sum() >= aux_k
        assert model.W2.grad[:, dead].abs().sum(0).gt(0).sum() >= aux_k


def test_auxk_codes_are_the_largest_dead_pre_activations_and_need_dead_units():
    model, x = _model("topk", True), _x()
    dead = torch.zeros(N_HIDDEN, dtype=torch.bool)
    dead[[3, 9, 40]] = True  # fewer dead units than aux_k: all of them, through a ReLU

    def encode(dead, aux_k):
        return sparse_encode(x, model.W1, model.b1, model.subtracted_b2, K, None, dead, aux_k)

    with torch.no_grad():
        codes, aux = encode(dead, 8)
        z2 = _reference_z2(_params(model), x, True)
        expected = z2.relu() * _topk_mask(z2, K)
        assert torch.allclose(_dense(codes.values, codes.indices), expected, rtol=0, atol=1e-12)
        assert aux.values.shape == (BATCH, 3)
        assert torch.allclose(_dense(aux.values, aux.indices), z2.relu() * dead, rtol=0, atol=1e-12)
        assert encode(torch.zeros(N_HIDDEN, dtype=torch.bool), 8)[1] is None
        assert encode(dead, 0)[1] is None
        assert encode(None, 8)[1] is None
        # Through the kind: no AuxK loss without dead units, without aux_k, or without a dead mask.
        with_aux = _model("topk", True, aux_k=8)
        assert float(with_aux(x, dead=torch.zeros(N_HIDDEN, dtype=torch.bool)).terms.auxiliary) == 0.0
        assert float(with_aux(x).terms.auxiliary) == 0.0
        assert float(model(x, dead=dead).terms.auxiliary) == 0.0
        assert float(with_aux(x, dead=dead).terms.auxiliary) > 0.0


# --- BatchTopK ---------------------------------------------------------------------------------


def _distinct_scores(batch, n_hidden, seed=0):
    """(batch, n_hidden) distinct values, half positive: a random permutation of a grid."""
    perm = torch.randperm(batch * n_hidden, generator=torch.Generator().manual_seed(seed))
    return (perm.to(torch.float64) - batch * n_hidden / 2).view(batch, n_hidden) / 7


def _kept(values, indices):
    """(batch, 64) bool: the codes BatchTopK kept (its training output, scattered)."""
    return _dense(values, indices, 64) != 0


def _check_ragged(codes, kept):
    """Row b's kept codes are its first lengths[b] entries; the rest is padding (value 0, index 0)."""
    assert torch.equal(codes.lengths, kept.sum(1))
    assert codes.values.shape[1] == int(kept.sum(1).max())  # padded to the widest row only
    beyond = torch.arange(codes.values.shape[1]) >= codes.lengths[:, None]
    assert (codes.values[beyond] == 0).all() and (codes.indices[beyond] == 0).all()
    assert (codes.values[~beyond] > 0).all()


def test_batch_topk_keeps_exactly_k_times_batch_largest_codes():
    z2 = _distinct_scores(10, 64)
    codes = BatchSelection(3).train()(z2)
    kept = _kept(codes.values, codes.indices)
    assert int(kept.sum()) == 3 * 10
    assert z2[kept].min() > z2[~kept].max()  # every kept value >= every dropped one
    assert torch.equal(_dense(codes.values, codes.indices), z2 * kept)
    _check_ragged(codes, kept)


def test_batch_topk_keeps_a_row_that_holds_most_of_the_budget():
    k, batch = 2, 8  # budget 16
    z2 = -_distinct_scores(batch, 64).abs() - 1  # all negative...
    z2[0, :12] = torch.arange(12, dtype=torch.float64) + 100  # ...but row 0 holds 12 of the top 16
    z2[1:5, 0] = torch.tensor([50.0, 51, 52, 53])  # and 4 rows hold one each
    codes = BatchSelection(k).train()(z2)
    kept = _kept(codes.values, codes.indices)
    assert kept.sum(1).tolist() == [12, 1, 1, 1, 1, 0, 0, 0]
    assert kept[0, :12].all() and torch.equal(_dense(codes.values, codes.indices), z2 * kept)
    _check_ragged(codes, kept)


@pytest.mark.parametrize("numba", [True, False])
def test_batch_topk_is_exact_where_its_sample_of_the_batch_misleads_it(numba, monkeypatch):
    """The candidates' bound is read from a sample of every 4th entry here: make the sampled entries the
    largest, so that the first bound admits too few entries; the selection must still be the exact top."""
    if not numba:
        monkeypatch.setattr(sparse_cpu, "nb", None)
    batch, n_hidden, k = 512, 2048, 4  # 2^20 entries: the sample takes every 4th
    z2 = _distinct_scores(batch, n_hidden, seed=5)
    flat = z2.view(-1)
    flat[::4] += float(flat.abs().max()) * 3  # the sampled entries dwarf the rest
    flat[1::4][:100] += float(flat.abs().max()) * 3  # and 100 unsampled ones belong to the top
    codes = BatchSelection(k).train()(z2)
    kept = _dense(codes.values, codes.indices, n_hidden) != 0
    expected = torch.zeros(batch * n_hidden, dtype=torch.bool)
    expected[flat.topk(k * batch).indices] = True
    assert torch.equal(kept.view(-1), expected)
    _check_ragged(codes, kept)


def test_batch_topk_widening_through_the_model_matches_dense_autograd():
    """The same skewed batch through the fused encoder: codes and gradients still match a dense reference."""
    model = make_model(D, N_HIDDEN, "batchtopk", "linear", seed=3, k=1)
    x = _x(seed=2, m=8) * 0.01
    x[0] = model.W1.detach()[:10].sum(0) * 3  # row 0 strongly drives units 0..9: more than 4k of the top 8
    out = model(x)
    rows = (out.codes.values > 0).sum(1)
    assert int(rows.sum()) == 8 and int(rows[0]) > 4
    out.x_hat.pow(2).sum().backward()
    W1, b1, W2, b2 = params = _params(model)
    z2 = _reference_z2(params, x, False)
    x_hat = (z2.relu() * _batch_topk_mask(z2.detach(), 1)) @ W2.T + b2
    x_hat.pow(2).sum().backward()
    assert torch.allclose(model.W1.grad, W1.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(model.W2.grad, W2.grad, rtol=1e-10, atol=1e-12)


def test_batch_topk_drops_non_positive_codes_even_within_budget():
    z2 = torch.tensor([[3.0, -1.0, -2.0, -3.0], [-0.5, 0.0, -4.0, 2.0]], dtype=torch.float64)
    codes = BatchSelection(2).train()(z2)  # budget 4, but only 2 positive values
    assert torch.equal(_dense(codes.values, codes.indices, 4), z2.relu())


def test_batch_topk_threshold_is_a_running_mean_of_the_smallest_kept_value_and_used_in_eval():
    module = BatchSelection(2, momentum=0.9).train()
    assert float(module.threshold) == -1.0
    first, second = _distinct_scores(5, 64, seed=1), _distinct_scores(5, 64, seed=2) + 0.5
    module(first)
    t1 = float(first.reshape(-1).sort(descending=True).values[2 * 5 - 1])
    assert float(module.threshold) == pytest.approx(t1, rel=1e-6)
    module(second)
    t2 = float(second.reshape(-1).sort(descending=True).values[2 * 5 - 1])
    assert float(module.threshold) == pytest.approx(0.9 * t1 + 0.1 * t2, rel=1e-6)
    module.eval()
    z2 = _distinct_scores(4, 64, seed=3)
    theta = float(module.threshold)
    expected = torch.where(z2 > theta, z2, torch.zeros_like(z2))
    assert torch.equal(module(z2), expected)


def test_batch_topk_model_in_eval_mode_is_a_threshold_relu():
    model, x = _model("batchtopk", True), _x()
    with torch.no_grad():
        model.batch_topk.threshold.fill_(0.05)
        model.eval()
        out = model(x)
        z2 = _reference_z2(_params(model), x, True)
    expected = z2 * (z2 > 0.05)
    assert torch.allclose(out.codes, expected, rtol=0, atol=1e-12)
    assert torch.allclose(out.x_hat, expected @ model.W2.detach().T + model.b2.detach(), rtol=0, atol=1e-12)


# --- JumpReLU ----------------------------------------------------------------------------------


def _jumprelu_case():
    """theta = (0.5, 1.0, 2.0), bandwidth 0.2: pre-activations inside and outside each unit's window."""
    module = Threshold(3, initial_threshold=1.0, bandwidth=0.2, dtype=torch.float64)
    with torch.no_grad():
        module.log_threshold.copy_(torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64).log())
    z = torch.tensor(
        [
            [0.45, 0.95, 2.5],  # unit 0 window (0.4, 0.6): in; unit 1 (0.9, 1.1): in; unit 2 (1.9, 2.1): out
            [0.70, 1.05, 1.95],  # out, in, in
            [0.55, 0.50, 2.05],  # in, out, in
            [-1.0, 1.20, 0.00],
        ],  # out, out, out
        dtype=torch.float64,
        requires_grad=True,
    )
    grad = torch.tensor([[1.0, -2.0, 3.0], [0.5, 4.0, -1.5], [2.0, 1.0, 0.25], [7.0, 7.0, 7.0]], dtype=torch.float64)
    return module, z, grad


def test_jumprelu_forward_is_z_times_step():
    module, z, _ = _jumprelu_case()
    theta = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    expected = torch.tensor(
        [[0.0, 0.0, 2.5], [0.7, 1.05, 0.0], [0.55, 0.0, 2.05], [0.0, 1.2, 0.0]], dtype=torch.float64
    )
    assert torch.equal(module(z), expected)
    assert torch.equal(module(z), z * (z > theta))


def test_jumprelu_straight_through_gradients_by_hand():
    module, z, grad = _jumprelu_case()
    (module(z) * grad).sum().backward()
    theta, eps = [0.5, 1.0, 2.0], 0.2
    inside = [[1, 1, 0], [0, 1, 1], [1, 0, 1], [0, 0, 0]]
    # d/d log_theta_j = sum_b -(theta_j / eps) K((z_bj - theta_j) / eps) g_bj * theta_j  (chain rule through exp)
    expected = [
        sum(-(theta[j] / eps) * inside[b][j] * float(grad[b, j]) * theta[j] for b in range(4)) for j in range(3)
    ]
    assert module.log_threshold.grad.tolist() == pytest.approx(expected, rel=1e-12)
    assert expected[0] == pytest.approx(-(0.5 / 0.2) * (1.0 + 2.0) * 0.5)  # the formula spelled out once
    assert torch.equal(z.grad, grad * (z > torch.tensor(theta, dtype=torch.float64)))


def test_jumprelu_l0_estimator_by_hand():
    module, z, _ = _jumprelu_case()
    l0 = module.l0(z)
    assert float(l0.detach()) == pytest.approx((1 + 2 + 2 + 1) / 4)  # active units per row, as in the forward test
    l0.backward()
    theta, eps = [0.5, 1.0, 2.0], 0.2
    inside_counts = [2, 2, 2]  # rows inside each unit's window
    expected = [-(1 / eps) * inside_counts[j] / 4 * theta[j] for j in range(3)]
    assert module.log_threshold.grad.tolist() == pytest.approx(expected, rel=1e-12)
    assert z.grad is None  # the count passes no gradient to the pre-activations


def test_jumprelu_model_forward_with_pre_bias():
    model, x = _model("jumprelu", True), _x()
    with torch.no_grad():
        model.jumprelu.log_threshold.copy_(torch.linspace(-3, 0, N_HIDDEN, dtype=torch.float64))
        out = model(x)
        z2 = _reference_z2(_params(model), x, True)
    expected = z2 * (z2 > model.jumprelu.log_threshold.exp())
    assert torch.allclose(out.codes, expected, rtol=0, atol=1e-12)
    assert torch.allclose(model.pre_activations(x).detach(), z2, rtol=0, atol=1e-12)


# --- known bugs --------------------------------------------------------------------------------


def test_batch_topk_training_on_a_batch_with_no_positive_pre_activation():
    model = make_model(D, N_HIDDEN, "batchtopk", "linear", seed=0, k=K)  # b1 = b2 = 0: z2 = 0 for x = 0
    out = model(torch.zeros(BATCH, D, dtype=torch.float64))
    assert torch.equal(out.x_hat, model.b2.detach().expand(BATCH, D))
    out.x_hat.sum().backward()
    assert torch.equal(model.W1.grad, torch.zeros_like(model.W1))


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_k_sparse_encoder_passes_the_gradient_to_the_input(activation):
    model, x = _model(activation, True), _x().requires_grad_()
    c, _ = _loss_weights()
    (c * model(x).x_hat).sum().backward()
    W1, b1, W2, b2 = params = _params(model)
    x_ref = x.detach().clone().requires_grad_()
    z2 = _reference_z2(params, x_ref, True)
    mask = _topk_mask(z2.detach(), K) if activation == "topk" else _batch_topk_mask(z2.detach(), K)
    (c * ((z2.relu() * mask) @ W2.T + b2)).sum().backward()
    assert x.grad is not None and torch.allclose(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)


def test_batchtopk_inference_threshold_keeps_about_k_codes_after_a_short_run():
    """The threshold's running mean follows the falling batch thresholds closely enough that the
    held-out L0 at inference is near k after 60 steps (a mean over ~100 steps left it near k / 2)."""
    from saekit.data.synthetic import SyntheticDictionary
    from saekit.train import OptimConfig, fit

    truth = SyntheticDictionary(32, 128, 6, seed=0)
    x, held_out = truth.sample(60 * 256, seed=1).x.float(), truth.sample(2048, seed=2).x.float()
    model = make_model(32, 128, "batchtopk", "linear", dtype=torch.float32, k=8, pre_bias=True, tied_init=True)
    fit(model, x, OptimConfig(optimizer="adam", lr=4e-3, steps=60, batch_size=256), progress=False)
    model.eval()
    with torch.no_grad():
        l0 = float((model.features(held_out) > 0).sum(1).float().mean())
    assert 6.5 < l0 < 9.5


def test_bfloat16_codes_are_those_of_the_bfloat16_product_and_outlive_the_next_call():
    """Under autocast the encoder's product runs in bfloat16 into buffers kept from call to call: the codes
    are the top k of that product (computed here by torch alone), and a second call leaves the first's intact."""
    torch.manual_seed(0)
    x, W1, bias = torch.randn(BATCH, D), torch.randn(N_HIDDEN, D), torch.randn(N_HIDDEN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first, _ = sparse_encode(x, W1, bias, None, K)
        kept = _dense(first.values, first.indices).clone()
        sparse_encode(torch.randn(BATCH, D), W1, bias, None, K)
    z2 = torch.addmm(bias.bfloat16(), x.bfloat16(), W1.t().bfloat16()).float()
    assert torch.equal(kept, z2.relu() * _topk_mask(z2, K))
    assert torch.equal(_dense(first.values, first.indices), kept)
