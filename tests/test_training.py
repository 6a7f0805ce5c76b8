"""saekit.train and saekit.eval: the optimizers lower J (measured by our own J), both ways of computing
J (the sigmoid kind's closed form and autograd of the kinds' forward passes) agree, the L-BFGS objective
matches our own cost, Ctrl-C or SIGTERM stops at the end of an iteration or step (a raw KeyboardInterrupt
propagates, the last accepted point restored), divergence is refused, and a seed fixes the result."""

import contextlib
import os
import signal
import warnings

import numpy as np
import pytest
import torch
from conftest import make_model, reference_cost

from saekit.data import Corruption, DataConfig, load_training_data
from saekit.data.vectors import open_vectors
from saekit.errors import Diverged, UserError
from saekit.eval import evaluate
from saekit.train import Minibatch, OptimConfig, autoencoder_objective, fit, train_lbfgs
from saekit.train.control import StepBoundaryStop, stop_is_final
from saekit.train.minibatch import Adam as TrainerAdam  # the optimizer the trainer builds

N_HIDDEN = 9


@pytest.fixture(scope="module")
def x(patches):
    return torch.from_numpy(patches[:200].copy())


def _J(model, x, target=None):
    """Our own J at the model's current parameters (classic sigmoid/KL cost, with the model's lambda, rho, beta)."""
    cfg = model.cfg
    assert (cfg.kind, cfg.output, cfg.penalty, cfg.pre_bias) == ("sigmoid", "sigmoid", "kl", False)
    W1, b1, W2, b2 = (p.detach().to(x.dtype) for p in (model.W1, model.b1, model.W2, model.b2))
    return float(reference_cost(W1, b1, W2, b2, x, cfg.weight_decay, cfg.rho, cfg.beta, target=target))


def _check_rows(history, n):
    assert [row["step"] for row in history] == list(range(1, n + 1))
    for row in history:
        assert row["cost"] == pytest.approx(row["reconstruction"] + row["weight_decay"] + row["sparsity"], rel=1e-12)
        assert 0 < row["rho_hat_mean"] < 1


# --- L-BFGS ----------------------------------------------------------------------------------


def test_lbfgs_lowers_the_cost_with_one_history_row_per_iteration(x):
    model = make_model(64, N_HIDDEN, seed=0)
    start = _J(model, x)
    history, interrupted = fit(model, x, OptimConfig(max_iter=10), progress=False)
    assert not interrupted
    _check_rows(history, 10)
    costs = [row["cost"] for row in history]
    assert all(b <= a for a, b in zip(costs, costs[1:]))  # L-BFGS's line search only accepts descent
    end = _J(model, x)
    assert end < 0.5 * start
    assert costs[-1] == pytest.approx(end, rel=1e-10)  # the model holds the last accepted point


def test_lbfgs_in_float32(x):
    model = make_model(64, N_HIDDEN, dtype=torch.float32, seed=0)
    start = _J(model, x.double())
    history, _ = fit(model, x.float(), OptimConfig(max_iter=5), progress=False)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert len(history) == 5
    assert _J(model, x.double()) < start


@pytest.mark.parametrize("denoising", [False, True])
def test_closed_form_and_autograd_agree_on_the_classic_case(x, denoising):
    """The sigmoid kind's closed form (compute_gradients in evaluation mode, what L-BFGS minimises)
    against autograd of the sum of the terms its forward pass returns, and against our own J."""
    model = make_model(64, N_HIDDEN, seed=1, weight_decay=1e-3, rho=0.05, beta=3.0, penalty="kl")
    with torch.no_grad():
        model.b1.uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
    target = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)).clamp(0, 1)
    target = target if denoising else None
    model.eval()  # rho_hat exact over x, as for full-batch training
    closed = model.compute_gradients(x, target)
    assert closed.x_hat is None  # the closed form's mark: it reuses its buffers and returns no x_hat
    closed_terms, closed_rho_hat = closed.terms.numbers(), closed.codes.mean(0).clone()
    closed_grads = [p.grad.clone() for p in model.parameters()]
    with warnings.catch_warnings():  # see test_autograd_training_emits_no_warning
        warnings.simplefilter("ignore")
        auto = model(x, target)
    auto_grads = torch.autograd.grad(sum(auto.terms), list(model.parameters()))
    for name, c, a in zip(auto.terms._fields, closed_terms, auto.terms.numbers()):
        assert c == pytest.approx(a, rel=1e-12), name
    assert closed.terms.total == pytest.approx(auto.terms.total, rel=1e-12)
    assert closed.terms.total == pytest.approx(_J(model, x, target), rel=1e-12)
    torch.testing.assert_close(closed_rho_hat, auto.codes.mean(0), rtol=1e-12, atol=0)
    for c, a in zip(closed_grads, auto_grads):
        assert c.shape == a.shape
        torch.testing.assert_close(c, a, rtol=1e-9, atol=1e-14)
    # L-BFGS's objective is that closed form: the same cost and gradients.
    evaluated = autoencoder_objective(model, x, target)()
    assert evaluated.cost == pytest.approx(closed.terms.total, rel=1e-14)
    for g, c in zip(evaluated.grads, closed_grads):
        torch.testing.assert_close(g, c, rtol=0, atol=0)


def _own_terms(W1, b1, W2, b2, x, activation, output, penalty, lambda_, rho, beta):
    f = {"sigmoid": torch.sigmoid, "relu": lambda z: z.clamp(min=0)}[activation]
    g = {"sigmoid": torch.sigmoid, "linear": lambda z: z}[output]
    h = f(x @ W1.T + b1)
    x_hat = g(h @ W2.T + b2)
    m = x.shape[0]
    rec = 0.5 * ((x_hat - x) ** 2).sum() / m
    decay = lambda_ / 2 * ((W1**2).sum() + (W2**2).sum())
    if penalty == "kl":
        q = h.mean(0)
        sparsity = beta * (rho * torch.log(rho / q) + (1 - rho) * torch.log((1 - rho) / (1 - q))).sum()
    elif penalty == "l1":
        sparsity = beta * h.abs().sum() / m
    elif penalty == "contractive":  # sum_j f'(z_ij)^2 ||W1[j]||^2, averaged over examples
        z = x @ W1.T + b1
        slope = torch.sigmoid(z) * (1 - torch.sigmoid(z)) if activation == "sigmoid" else (z > 0).to(z.dtype)
        sparsity = beta * (slope**2 * (W1**2).sum(1)).sum() / m
    else:
        sparsity = torch.zeros((), dtype=x.dtype)
    return rec, decay, sparsity


@pytest.mark.parametrize(
    "activation, output, penalty",
    [
        ("relu", "linear", "l1"),
        ("relu", "sigmoid", "l1"),
        ("sigmoid", "linear", "kl"),
        ("sigmoid", "sigmoid", "none"),
        ("sigmoid", "sigmoid", "l1"),
        ("sigmoid", "sigmoid", "contractive"),
        ("relu", "linear", "contractive"),
    ],
)
def test_autograd_objective_matches_our_own_cost(x, activation, output, penalty):
    """L-BFGS's objective for every kind, output and penalty (the penalties are in the kinds' forward
    passes; the sigmoid kind's none and l1 go by its closed form) against our own terms and their gradient."""
    model = make_model(64, N_HIDDEN, activation, output, seed=2, penalty=penalty, weight_decay=1e-3, beta=3.0, rho=0.01)
    with torch.no_grad():
        model.b1.fill_(0.1)
    cfg = model.cfg
    assert (cfg.penalty, cfg.weight_decay, cfg.beta) == (penalty, 1e-3, 3.0)
    ev = autoencoder_objective(model, x)()
    grads = ev.grads
    leaves = [p.detach().clone().requires_grad_() for p in (model.W1, model.b1, model.W2, model.b2)]
    rec, decay, sparsity = _own_terms(
        *leaves, x, activation, output, penalty, cfg.weight_decay, getattr(cfg, "rho", None), cfg.beta
    )
    assert ev.row["reconstruction"] == pytest.approx(rec.item(), rel=1e-12)
    assert ev.row["weight_decay"] == pytest.approx(decay.item(), rel=1e-12)
    assert ev.row["sparsity"] == pytest.approx(sparsity.item(), rel=1e-12, abs=1e-300)
    assert ev.cost == pytest.approx((rec + decay + sparsity).item(), rel=1e-12)
    expected = torch.autograd.grad(rec + decay + sparsity, leaves)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


class _Signalling:
    """An objective that sends itself Ctrl-C (or another signal) on its n-th evaluation, as a user
    at the terminal would; `raw` raises KeyboardInterrupt there instead (what Ctrl-C does where no
    handler catches it). It records how many evaluations each accepted iteration ended after."""

    def __init__(self, objective, n, signals=(signal.SIGINT,), raw=False):
        self.objective, self.n, self.signals, self.raw = objective, n, signals, raw
        self.calls, self.calls_at_iteration = 0, []

    def __call__(self):
        self.calls += 1
        if self.calls == self.n:
            if self.raw:
                raise KeyboardInterrupt
            for signum in self.signals:
                os.kill(os.getpid(), signum)
        return self.objective()

    def on_iteration(self, row):
        self.calls_at_iteration.append(self.calls)


@pytest.mark.parametrize(
    "signals", [(signal.SIGINT,), (signal.SIGTERM,), (signal.SIGINT, signal.SIGINT, signal.SIGTERM)]
)
def test_ctrl_c_stops_at_the_end_of_the_iteration_at_its_accepted_point(x, signals):
    """Ctrl-C or SIGTERM in the middle of a line search: the iteration finishes, then L-BFGS stops
    there, and the model holds that accepted point. Further signals change nothing."""
    model = make_model(64, N_HIDDEN, seed=0)
    start = _J(model, x)
    objective = _Signalling(autoencoder_objective(model, x), n=9, signals=signals)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    history, interrupted = train_lbfgs(
        model.parameters(), objective, max_iter=50, progress=False, on_iteration=objective.on_iteration
    )
    assert interrupted
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the handlers are put back
    ends = objective.calls_at_iteration
    assert len(history) == len(ends) >= 2
    # The last iteration is the one the signal came in: it ended after evaluation 9, the one before it did not.
    assert ends[-2] < 9 <= ends[-1] == objective.calls
    _check_rows(history, len(history))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # Not a trial point of the line search: the last point the history recorded.
    assert _J(model, x) == pytest.approx(history[-1]["cost"], rel=1e-10)
    assert history[-1]["cost"] < start


def test_ctrl_c_during_the_first_iteration_stops_after_it(x):
    model = make_model(64, N_HIDDEN, seed=0)
    objective = _Signalling(autoencoder_objective(model, x), n=1)
    history, interrupted = train_lbfgs(model.parameters(), objective, max_iter=50, progress=False)
    assert interrupted and len(history) == 1
    assert _J(model, x) == pytest.approx(history[0]["cost"], rel=1e-10)


def test_a_raw_keyboard_interrupt_propagates_with_the_last_accepted_parameters(x):
    """Where no handler turns Ctrl-C into a stop (KeyboardInterrupt raised as such), it propagates,
    and the parameters are put back to the last accepted point first, never left at a trial point."""
    model = make_model(64, N_HIDDEN, seed=0)
    initial = [p.detach().clone() for p in model.parameters()]
    objective = _Signalling(autoencoder_objective(model, x), n=2, raw=True)
    with pytest.raises(KeyboardInterrupt):
        train_lbfgs(model.parameters(), objective, max_iter=50, progress=False)
    for p, q in zip(model.parameters(), initial):  # before the first iteration: the initial point
        assert torch.equal(p.detach(), q)

    rows = []
    objective = _Signalling(autoencoder_objective(model, x), n=9, raw=True)
    with pytest.raises(KeyboardInterrupt):
        train_lbfgs(model.parameters(), objective, max_iter=50, progress=False, on_iteration=rows.append)
    assert len(rows) >= 1 and objective.calls == 9
    assert _J(model, x) == pytest.approx(rows[-1]["cost"], rel=1e-10)


def test_lbfgs_raises_diverged_on_a_cost_that_is_not_finite(x):
    model = make_model(64, N_HIDDEN, seed=0)
    initial = [p.detach().clone() for p in model.parameters()]
    objective = autoencoder_objective(model, x)

    def nan_at_the_start():
        evaluated = objective()
        return evaluated._replace(cost=float("nan"))

    with pytest.raises(Diverged, match="nan"):
        train_lbfgs(model.parameters(), nan_at_the_start, max_iter=5, progress=False)
    assert issubclass(Diverged, UserError)
    for p, q in zip(model.parameters(), initial):
        assert torch.equal(p.detach(), q)


def test_training_data_follows_the_config():
    data = load_training_data(DataConfig(n_examples=30, patch_size=6), dtype=torch.float32, seed=2)
    assert data.x.shape == (30, 36) and data.x.dtype == torch.float32
    assert data.image_shape == (6, 6) and data.labels is None
    assert float(data.x.min()) >= 0.1 and float(data.x.max()) <= 0.9
    again = load_training_data(DataConfig(n_examples=30, patch_size=6), dtype=torch.float32, seed=2)
    assert torch.equal(data.x, again.x)


def test_corrupt():
    x = torch.full((200, 50), 0.5, dtype=torch.float64)
    masked = Corruption("mask", 0.3)(x, torch.Generator().manual_seed(0))
    zeroed = float((masked == 0).double().mean())
    assert 0.27 < zeroed < 0.33 and torch.all((masked == 0) | (masked == x))
    noisy = Corruption("gaussian", 0.2)(x, torch.Generator().manual_seed(0))
    assert float((noisy - x).std()) == pytest.approx(0.2, rel=0.03) and abs(float((noisy - x).mean())) < 0.01
    # "none" is no corruption at all: the settings give none to apply.
    assert DataConfig(corruption="none", corruption_level=0.3).corruption_fn() is None
    assert DataConfig(corruption="mask", corruption_level=0.3).corruption_fn() == Corruption("mask", 0.3)


def test_lbfgs_denoising_reconstructs_the_clean_input_from_a_corrupted_copy(x):
    model = make_model(64, N_HIDDEN, seed=0)
    history, _ = fit(model, x, OptimConfig(max_iter=3), corruption=Corruption("mask", 0.3), seed=5, progress=False)
    g = torch.Generator().manual_seed(5)
    corrupted = x * (torch.rand(x.shape, generator=g, dtype=x.dtype) >= 0.3)  # our own mask, from the same seed
    assert not torch.equal(corrupted, x)
    assert torch.equal(corrupted, Corruption("mask", 0.3)(x, torch.Generator().manual_seed(5)))
    # J of the corrupted input against the clean target, and not J of the clean input:
    assert history[-1]["cost"] == pytest.approx(_J(model, corrupted, target=x), rel=1e-10)
    assert history[-1]["cost"] != pytest.approx(_J(model, x), rel=1e-6)


# --- minibatch -------------------------------------------------------------------------------


def _minibatch_cfg(optimizer="adam", lr=1e-2, **kw):
    """200 examples in batches of 50: 4 steps an epoch, a history row each epoch."""
    return OptimConfig(optimizer=optimizer, lr=lr, epochs=5, batch_size=50, log_every=4, **kw)


@pytest.mark.parametrize("optimizer, lr", [("adam", 1e-2), ("sgd", 1.0)])
def test_minibatch_training_lowers_the_cost(x, optimizer, lr):
    cfg = _minibatch_cfg(optimizer, lr)
    model = make_model(64, N_HIDDEN, seed=0)
    start = _J(model, x)
    history, interrupted = fit(model, x, cfg, progress=False)
    assert not interrupted
    assert [row["step"] for row in history] == [4, 8, 12, 16, 20]
    for row in history:
        terms = row["reconstruction"] + row["sparsity"] + row["weight_decay"] + row.get("aux", 0.0)
        assert row["cost"] == pytest.approx(terms, rel=1e-12)
        assert 0 < row["rho_hat_mean"] < 1
    assert _J(model, x) < 0.8 * start


@pytest.mark.parametrize("signals", [(signal.SIGINT,), (signal.SIGTERM, signal.SIGINT)])
def test_minibatch_ctrl_c_stops_at_the_end_of_the_step(x, monkeypatch, signals):
    """Ctrl-C (or SIGTERM, and any further signal) in the middle of step 6: that step is applied
    whole, then training stops. The weights are exactly those of a run of 6 steps."""
    real_step, calls = TrainerAdam.step, {"n": 0}

    def signalling_step(self, *args, **kw):  # the signal comes before the sixth step's update
        calls["n"] += 1
        if calls["n"] == 6:
            for signum in signals:
                os.kill(os.getpid(), signum)
        return real_step(self, *args, **kw)

    monkeypatch.setattr(TrainerAdam, "step", signalling_step)
    model = make_model(64, N_HIDDEN, seed=0)
    history, interrupted = fit(model, x, _minibatch_cfg(), progress=False)
    assert interrupted and calls["n"] == 6
    assert [row["step"] for row in history] == [4]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    monkeypatch.undo()
    six_steps = make_model(64, N_HIDDEN, seed=0)
    _, interrupted = fit(six_steps, x, _minibatch_cfg(steps=6), progress=False)
    assert not interrupted
    for p, q in zip(model.parameters(), six_steps.parameters()):
        assert torch.equal(p, q)


def test_minibatch_raw_keyboard_interrupt_propagates(x, monkeypatch):
    def interrupting_step(self, *args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(TrainerAdam, "step", interrupting_step)
    with pytest.raises(KeyboardInterrupt):
        fit(make_model(64, N_HIDDEN, seed=0), x, _minibatch_cfg(), progress=False)


def test_minibatch_divergence_raises_before_the_step_is_applied(x):
    """SGD with a huge learning rate on a linear-output ReLU autoencoder: the loss explodes, Diverged
    (a UserError) names the step and --lr, and the weights stay those after the last good step."""
    model = make_model(64, N_HIDDEN, "relu", "linear", seed=0, penalty="none")
    cfg = OptimConfig(optimizer="sgd", lr=1e4, steps=20, batch_size=50, log_every=1, checkpoint_every=1)
    trainer = Minibatch(model, open_vectors(x), cfg)
    snapshots = []

    def checkpoint():
        snapshots.append([p.detach().clone() for p in model.parameters()])

    with pytest.raises(Diverged, match="--lr") as error:
        trainer.run(progress=False, checkpoint=checkpoint)
    assert isinstance(error.value, UserError) and "\n" not in str(error.value)
    assert 1 <= len(snapshots) == trainer.step < 20
    assert f"step {trainer.step + 1}" in str(error.value)
    for p, q in zip(model.parameters(), snapshots[-1]):
        assert torch.equal(p.detach(), q)


def test_autograd_training_emits_no_warning(x):
    model = make_model(64, N_HIDDEN, "relu", "linear", seed=0, penalty="l1", beta=3.0, weight_decay=1e-4)
    torch.set_warn_always(True)  # torch shows this warning once per process; make every one visible
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fit(model, x, OptimConfig(max_iter=2), progress=False)
    finally:
        torch.set_warn_always(False)


@pytest.mark.parametrize(
    "settings", [dict(max_iter=5), dict(optimizer="adam", epochs=2, batch_size=64, lr=1e-2, log_every=1)]
)
def test_same_seed_gives_identical_weights(x, settings):
    optim = OptimConfig(**settings)
    weights = []
    for _ in range(2):
        model = make_model(64, N_HIDDEN, seed=3)
        fit(model, x, optim, seed=3, progress=False)
        weights.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*weights):
        assert torch.equal(a, b)
    other = make_model(64, N_HIDDEN, seed=4)
    fit(other, x, optim, seed=4, progress=False)
    assert not torch.equal(other.W1, weights[0][0])


# --- metrics ---------------------------------------------------------------------------------


def test_evaluate_against_our_own_numbers(x):
    model = make_model(64, N_HIDDEN, seed=0)
    with torch.no_grad():
        model.b1.uniform_(-1, 1, generator=torch.Generator().manual_seed(2))
    metrics = evaluate(model, x)
    W1, b1, W2, b2 = (p.detach().numpy() for p in (model.W1, model.b1, model.W2, model.b2))
    X = x.numpy()
    a2 = 1 / (1 + np.exp(-(X @ W1.T + b1)))
    X_hat = 1 / (1 + np.exp(-(a2 @ W2.T + b2)))
    rho_hat = a2.mean(0)
    assert metrics["n_examples"] == 200
    assert metrics["cost"] == pytest.approx(_J(model, x), rel=1e-12)
    assert metrics["rho_hat_mean"] == pytest.approx(rho_hat.mean(), rel=1e-12)
    assert metrics["rho_hat_min"] == pytest.approx(rho_hat.min(), rel=1e-12)
    assert metrics["rho_hat_max"] == pytest.approx(rho_hat.max(), rel=1e-12)
    assert metrics["rho_hat_std"] == pytest.approx(rho_hat.std(ddof=1), rel=1e-10)
    assert metrics["mse"] == pytest.approx(((X_hat - X) ** 2).mean(), rel=1e-12)
    assert metrics["fvu"] == pytest.approx(((X_hat - X) ** 2).sum() / ((X - X.mean(0)) ** 2).sum(), rel=1e-12)


@pytest.mark.parametrize("final", [False, True])
@pytest.mark.parametrize("stopped", [False, True])
def test_a_stop_the_process_ends_with_leaves_the_signals_ignored_after_its_block(final, stopped):
    """The command line ends its process after a heeded stop: a second Ctrl-C right after the block must not
    raise KeyboardInterrupt while it reports the saved run. Elsewhere the handlers come back as they were."""
    before = signal.getsignal(signal.SIGINT)  # conftest restores the handlers after the test
    with stop_is_final() if final else contextlib.nullcontext():
        with StepBoundaryStop() as stop:
            if stopped:
                os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested is stopped
        after = signal.getsignal(signal.SIGINT)
    assert after is (signal.SIG_IGN if final and stopped else before)
