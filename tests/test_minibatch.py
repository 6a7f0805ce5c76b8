"""saekit.train.Minibatch on modern dictionaries: one step against a dense autograd reference
(the kinds' penalties and AuxK, running rho_hat), dictionary recovery on synthetic data, decoder
normalisation, initialisations, the input scale, dead-unit counters, exact resume (in-process through
saekit.run.RunFolder's checkpoints, and through the CLI: after Ctrl-C or SIGTERM, from the checkpoint
before a damaged one, with the history cut back, from the seed when there is no checkpoint), refused
resumes, saekit.eval.evaluate_stream, `saekit eval`."""

import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import scipy.optimize
import torch
from conftest import assert_one_line_error, make_model, run_cli

from saekit.config import PART_OF, TrainConfig, kind_fields
from saekit.data.synthetic import SyntheticDictionary, recovery_score
from saekit.data.vectors import open_vectors
from saekit.errors import UserError
from saekit.eval import evaluate_stream
from saekit.run import RunFolder, load_model
from saekit.run.train import _fixed_settings
from saekit.train import Minibatch
from saekit.train.minibatch import Adam as TrainerAdam  # the optimizer the trainer builds

D, N_HIDDEN = 16, 64


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: a second thread only adds overhead (4x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DEFAULTS = dict(
    optimizer="adam",
    lr=1e-2,
    output="linear",
    penalty="none",
    weight_decay=0.0,
    batch_size=25,
    steps=5,
    log_every=1,
    n_hidden=N_HIDDEN,
    k=4,
)


def _cfg(kind="sigmoid", **kw):
    """The run's settings, flat: DEFAULTS (those the kind has), then kw (which must all be the kind's or a part's)."""
    own = kind_fields(kind)
    defaults = {name: value for name, value in DEFAULTS.items() if name in PART_OF or name in own}
    return TrainConfig.from_flat({**defaults, "kind": kind, **kw})


def _model(cfg, d=D):
    m = cfg.model
    settings = {name: value for name, value in m.to_dict().items() if name not in ("kind", "n_hidden", "output")}
    return make_model(d, m.n_hidden, m.kind, m.output, dtype=cfg.run.torch_dtype, seed=cfg.run.seed, **settings)


def _data(n=100, d=D, seed=0, offset=0.3):
    return offset + torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _unit_interval(n=100, d=D, seed=0):
    return 0.1 + 0.8 * torch.rand(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _trainer(x, cfg, state=None, model=None, history=None):
    return Minibatch(
        _model(cfg, x.shape[1]) if model is None else model,
        open_vectors(x),
        cfg.optim,
        seed=cfg.run.seed,
        corruption=cfg.data.corruption_fn(),
        state=state,
        history=history,
    )


def _tensors(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# --- one step against a dense autograd reference ------------------------------------------------


def _topk_mask(z2, k):
    return torch.zeros_like(z2, dtype=torch.bool).scatter(1, z2.topk(k, dim=1).indices, True)


def _reference(params, x, cfg, dead=None):
    """The loss terms of one full batch, written out densely: (loss to differentiate, terms, error, h)."""
    W1, b1, W2, b2 = params
    s = cfg.flat()  # the run's settings; a kind without a penalty has none
    penalty = s.get("penalty", "none")
    z2 = ((x - b2) if s["pre_bias"] else x) @ W1.T + b1
    if s["kind"] == "sigmoid":
        h = torch.sigmoid(z2)
    elif s["kind"] == "relu":
        h = z2.relu()
    elif s["kind"] == "topk":
        h = z2.relu() * _topk_mask(z2.detach(), s["k"])
    else:  # batchtopk: the k * batch largest of the batch
        flat = torch.zeros(z2.numel(), dtype=torch.bool)
        flat[z2.detach().reshape(-1).topk(s["k"] * z2.shape[0]).indices] = True
        h = z2.relu() * flat.view_as(z2)
    x_hat = h @ W2.T + b2
    x_hat = torch.sigmoid(x_hat) if s["output"] == "sigmoid" else x_hat
    error = x_hat - x
    reconstruction = 0.5 * error.pow(2).sum(1).mean()
    if penalty == "l1":
        sparsity = s["beta"] * h.abs().sum(1).mean()
    elif penalty == "l1-decoder":
        sparsity = s["beta"] * (h.abs() * W2.norm(dim=0)).sum(1).mean()
    elif penalty == "kl":
        rho, rho_hat = s["rho"], h.mean(0)
        sparsity = s["beta"] * (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()
    else:
        sparsity = torch.zeros((), dtype=x.dtype)
    aux = torch.zeros((), dtype=x.dtype)
    if dead is not None:
        e = (x - x_hat).detach()
        e_hat = (z2.relu() * _topk_mask(z2.detach().masked_fill(~dead, -torch.inf), s["aux_k"])) @ W2.T
        aux = s["aux_coefficient"] * (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    decay = 0.5 * s["weight_decay"] * (W1.pow(2).sum() + W2.pow(2).sum())
    terms = {"reconstruction": reconstruction, "sparsity": sparsity, "aux": aux, "weight_decay": decay}
    return sum(terms.values()), {k: float(v.detach()) for k, v in terms.items()}, error.detach(), h.detach()


STEP_CASES = {
    "relu-l1": dict(kind="relu", penalty="l1", beta=0.05, weight_decay=1e-3),
    "relu-l1-decoder": dict(kind="relu", penalty="l1-decoder", beta=0.05, pre_bias=True),
    # TopK has no penalty on its codes any more (its penalty is "none" only): weight decay instead.
    "topk-decay": dict(kind="topk", pre_bias=True, weight_decay=1e-3),
    "topk-auxk": dict(kind="topk", aux_k=5, aux_coefficient=0.5, pre_bias=True, dead_after=1000),
    "sigmoid-kl": dict(kind="sigmoid", output="sigmoid", penalty="kl", beta=3.0, rho=0.1, weight_decay=1e-3),
    "batchtopk-normalized": dict(kind="batchtopk", normalize_decoder=True, weight_decay=1e-3),
}


def _unit_columns(W):
    return W / W.norm(dim=0, keepdim=True)


@pytest.mark.parametrize("case", STEP_CASES)
def test_one_sgd_step_follows_dense_autograd_of_the_loss(case):
    """With the whole data in one batch (its order does not change a mean), step 1 of SGD moves the
    parameters by -lr times the gradient of our own dense loss, and history's row 1 reports its terms.
    For the KL penalty, the running rho_hat of step 1 is the batch's own mean, so this is the exact KL."""
    x = _unit_interval(60)
    cfg = _cfg(optimizer="sgd", lr=0.5, batch_size=60, steps=1, **STEP_CASES[case])
    trainer = _trainer(x, cfg)
    aux_k = cfg.flat().get("aux_k", 0)
    dead = None
    if aux_k:
        dead = torch.zeros(N_HIDDEN, dtype=torch.bool)
        dead[::4] = True
        trainer.since_fired[dead] = cfg.optim.dead_after  # these 16 units have not fired for dead_after examples
    params = [
        p.detach().clone().requires_grad_()
        for p in (trainer.model.W1, trainer.model.b1, trainer.model.W2, trainer.model.b2)
    ]
    lr = cfg.optim.lr
    if cfg.optim.normalize_decoder:  # training starts from unit decoder columns
        params[2] = _unit_columns(params[2].detach()).requires_grad_()
    loss, terms, error, h = _reference(params, x, cfg, dead)
    grads = torch.autograd.grad(loss, params)
    expected = [p.detach() - lr * g for p, g in zip(params, grads)]
    if cfg.optim.normalize_decoder:  # a step along the unit sphere: the gradient's part along each column is removed
        W, G = params[2].detach(), grads[2]
        expected[2] = _unit_columns(W - lr * (G - (G * W).sum(0) * W))
        assert (expected[2] - _unit_columns(W - lr * G)).abs().max() > 1e-6  # which makes a difference
    trainer.run(progress=False)
    for name, p, e in zip(
        ("W1", "b1", "W2", "b2"), (trainer.model.W1, trainer.model.b1, trainer.model.W2, trainer.model.b2), expected
    ):
        assert torch.allclose(p.detach(), e, rtol=0, atol=1e-12), name
    (row,) = trainer.history
    for name, value in terms.items():
        assert row[name] == pytest.approx(value, rel=1e-10, abs=1e-14), name
    assert row["cost"] == pytest.approx(sum(terms.values()), rel=1e-10)
    assert row["fvu"] == pytest.approx(float(error.pow(2).sum() / (x - x.mean(0)).pow(2).sum()), rel=1e-10)
    assert row["mse"] == pytest.approx(float(error.pow(2).mean()), rel=1e-10)
    assert row["l0"] == pytest.approx(float((h > 0).sum(1).double().mean()), rel=1e-12)
    if cfg.flat().get("penalty") in ("l1", "l1-decoder", "kl"):
        assert terms["sparsity"] > 1e-3  # the penalty is really there
    if cfg.model.weight_decay:
        assert terms["weight_decay"] > 1e-6  # so is the weight decay
    if dead is not None:  # AuxK: dead units' decoder columns learn from the residual
        assert terms["aux"] > 1e-3
        assert (grads[2][:, dead].abs().sum(0) > 0).sum() >= aux_k


def test_l1_decoder_penalty_by_hand():
    """beta * mean_i sum_j |h_ij| ||W2[:, j]||, written with loops on a tiny model, is history's sparsity."""
    x = _data(6, d=3, seed=4)
    cfg = _cfg(kind="relu", penalty="l1-decoder", beta=0.7, n_hidden=4, batch_size=6, steps=1)
    trainer = _trainer(x, cfg)
    W1, b1, W2 = (p.detach().tolist() for p in (trainer.model.W1, trainer.model.b1, trainer.model.W2))
    total = 0.0
    for row in x.tolist():
        for j in range(4):
            h = max(0.0, sum(W1[j][i] * row[i] for i in range(3)) + b1[j])
            total += h * sum(W2[i][j] ** 2 for i in range(3)) ** 0.5
    trainer.run(progress=False)
    assert trainer.history[0]["sparsity"] == pytest.approx(0.7 * total / 6, rel=1e-12)


def test_kl_running_rho_hat_is_an_exponential_moving_average_of_batch_means():
    x = _unit_interval(40)
    cfg = _cfg(
        kind="sigmoid",
        output="sigmoid",
        penalty="kl",
        beta=3.0,
        rho=0.05,
        rho_momentum=0.7,
        batch_size=40,
        steps=6,
        checkpoint_every=1,
    )
    trainer = _trainer(x, cfg)
    snapshots = [_tensors(trainer.model)]  # the parameters each step starts from
    trainer.run(progress=False, checkpoint=lambda: snapshots.append(_tensors(trainer.model)))
    rho_hat = None
    for step, row in enumerate(trainer.history):
        p = snapshots[step]
        batch_mean = torch.sigmoid(x @ p["W1"].T + p["b1"]).mean(0)
        rho_hat = batch_mean if rho_hat is None else 0.7 * rho_hat + 0.3 * batch_mean
        kl = 0.05 * torch.log(0.05 / rho_hat) + 0.95 * torch.log(0.95 / (1 - rho_hat))
        assert row["sparsity"] == pytest.approx(3.0 * float(kl.sum()), rel=1e-10)
        assert row["rho_hat_mean"] == pytest.approx(float(rho_hat.mean()), rel=1e-12)
    assert torch.allclose(trainer.model.running.rho_hat, rho_hat, rtol=1e-12, atol=0)
    assert trainer.history[-1]["sparsity"] < trainer.history[0]["sparsity"]


def test_jumprelu_l0_penalty_lowers_l0():
    """Against the same run without the penalty: the thresholds rise and fewer units fire."""
    x = SyntheticDictionary(D, 32, 2, seed=0).sample(512, seed=1).x.double()
    l0, thresholds = {}, {}
    for beta in (0.0, 0.05):
        cfg = _cfg(
            kind="jumprelu",
            penalty="l0",
            beta=beta,
            lr=3e-2,
            batch_size=128,
            steps=40,
            pre_bias=True,
            jumprelu_threshold=0.05,
            jumprelu_bandwidth=0.1,
            log_every=10,
        )
        trainer = _trainer(x, cfg)
        trainer.run(progress=False)
        l0[beta] = [row["l0"] for row in trainer.history]
        thresholds[beta] = float(trainer.model.jumprelu.log_threshold.detach().exp().median())
        for row in trainer.history:  # the penalty is beta times the number of active units
            assert row["sparsity"] == pytest.approx(beta * row["l0"], rel=1e-12, abs=0)
    assert l0[0.05][-1] < 0.6 * l0[0.05][0] and l0[0.05][-1] < 0.7 * l0[0.0][-1], l0
    assert thresholds[0.05] > 2 * 0.05 > 2 * thresholds[0.0]


# --- what training learns ----------------------------------------------------------------------


@pytest.mark.slow  # 150 steps: 1 to 3 s
def test_topk_recovers_a_synthetic_dictionary():
    truth = SyntheticDictionary(32, 128, 4, noise_std=0.0, seed=0)
    x = truth.sample(4096, seed=1).x
    cfg = _cfg(
        kind="topk",
        k=4,
        n_hidden=256,
        lr=2e-2,
        batch_size=256,
        steps=150,
        dtype="float32",
        normalize_decoder=True,
        tied_init=True,
        log_every=50,
    )
    trainer = _trainer(x, cfg)
    before = recovery_score(truth.atoms, trainer.model.W2.detach().t())
    trainer.run(progress=False)
    assert before < 0.5
    assert recovery_score(truth.atoms, trainer.model.W2.detach().t()) >= 0.9


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "relu"])
def test_normalize_decoder_keeps_unit_columns(kind):
    x = _data(100)
    own = dict(penalty="l1", beta=0.01) if kind == "relu" else dict(aux_k=4)
    for normalize in (True, False):
        cfg = _cfg(kind=kind, normalize_decoder=normalize, dead_after=50, lr=5e-2, steps=6, **own)
        trainer = _trainer(x, cfg)
        trainer.run(progress=False)
        norms = trainer.model.W2.detach().norm(dim=0)
        if normalize:
            assert torch.allclose(norms, torch.ones_like(norms), rtol=0, atol=1e-12)
        else:  # without it the columns drift: the check above can fail
            assert (norms - 1).abs().max() > 1e-3


def test_tied_init_starts_the_decoder_as_the_row_normalised_encoder():
    plain = make_model(D, N_HIDDEN, "topk", "linear", seed=7, k=4)
    tied = make_model(D, N_HIDDEN, "topk", "linear", seed=7, k=4, tied_init=True)
    assert tied.cfg.tied_init and not plain.cfg.tied_init
    rows = plain.W1.detach() / plain.W1.detach().norm(dim=1, keepdim=True)
    assert torch.allclose(tied.W2.detach().t(), rows, rtol=0, atol=1e-15)
    assert torch.equal(tied.W1.detach(), tied.W2.detach().t())
    assert torch.allclose(tied.W2.detach().norm(dim=0), torch.ones(N_HIDDEN, dtype=torch.float64), atol=1e-15)


def _geometric_median(x):
    """argmin_y sum_i ||x_i - y||, by SciPy's BFGS from the coordinate-wise median."""
    a = x.numpy()

    def f(y):
        return np.linalg.norm(a - y, axis=1).sum()

    def grad(y):
        return -((a - y) / np.linalg.norm(a - y, axis=1, keepdims=True)).sum(0)

    return torch.from_numpy(scipy.optimize.minimize(f, np.median(a, 0), jac=grad, method="BFGS", tol=1e-14).x)


@pytest.mark.parametrize("init", ["mean", "geometric-median"])
@pytest.mark.parametrize("scale_inputs", [False, True])
def test_decoder_bias_init(init, scale_inputs):
    x = _data(300, d=8, seed=2, offset=2.0)
    x[:20] += 40.0  # outliers pull the mean far from the median
    cfg = _cfg(kind="topk", decoder_bias_init=init, scale_inputs=scale_inputs, pre_bias=True)
    trainer = _trainer(x, cfg)
    scale = float(x.pow(2).sum(1).mean()) ** -0.5 if scale_inputs else 1.0
    assert trainer.scale == pytest.approx(scale, rel=1e-12)
    expected = x.mean(0) if init == "mean" else _geometric_median(x)
    assert torch.allclose(trainer.model.b2.detach(), expected * scale, rtol=0, atol=1e-7 * scale)
    assert (x.mean(0) - _geometric_median(x)).norm() > 1.0  # the two initialisations differ here


@pytest.mark.parametrize("kind, pre_bias", [("topk", True), ("topk", False), ("batchtopk", True), ("jumprelu", True)])
def test_folded_input_scale_gives_the_training_models_output_in_raw_units(kind, pre_bias):
    x = 25.0 * _data(100)
    own = dict(penalty="l0", beta=1e-3, jumprelu_bandwidth=0.05) if kind == "jumprelu" else {}
    cfg = _cfg(kind=kind, scale_inputs=True, pre_bias=pre_bias, decoder_bias_init="mean", **own)
    trainer = _trainer(x, cfg)
    trainer.run(progress=False)
    scale = trainer.scale
    assert scale == pytest.approx(float(x.pow(2).sum(1).mean()) ** -0.5, rel=1e-12) and scale < 0.1
    folded = trainer.model.folded(scale)
    model = trainer.model.eval()
    with torch.no_grad():
        trained, raw = model(scale * x), folded.eval()(x)
        trained_h, raw_h = model.dense_codes(trained.codes), folded.dense_codes(raw.codes)
    assert torch.allclose(raw.x_hat, trained.x_hat / scale, rtol=1e-12, atol=1e-12 * float(x.abs().max()))
    assert torch.allclose(raw_h, trained_h, rtol=1e-12, atol=1e-13)
    assert float(trained_h.count_nonzero()) > 0
    assert not torch.equal(folded.W1, model.W1)  # folding changed the weights, not the model in training


# --- dead units --------------------------------------------------------------------------------


def test_a_unit_that_never_fires_is_dead_after_dead_after_examples():
    x = _data(100)
    cfg = _cfg(kind="topk", batch_size=25, dead_after=75, pre_bias=True)
    model = _model(cfg)
    with torch.no_grad():  # unit 5 can never be among the 4 largest: it gets no gradient and stays silent
        model.W1[5] = 0.0
        model.b1[5] = -1e3
    trainer = _trainer(x, cfg, model=model)
    for steps, examples in [(1, 25), (2, 50), (3, 75), (5, 125)]:
        trainer.total_steps = steps
        trainer.run(progress=False)
        assert int(trainer.since_fired[5]) == examples
        assert bool(trainer.dead()[5]) == (examples >= 75)
    assert trainer.history[-1]["dead_fraction"] == pytest.approx(float(trainer.dead().double().mean()))
    assert trainer.history[-1]["dead_fraction"] >= 1 / N_HIDDEN


def test_dead_units_that_fire_again_are_revived():
    """After a unit is dead, firing once resets its counter: the counts follow what fired, step by step."""
    x = _data(50)
    cfg = _cfg(kind="relu", penalty="none", batch_size=50, dead_after=100, steps=1)
    model = _model(cfg)
    with torch.no_grad():
        model.b1[:10] = -100.0  # ten units cannot fire
    trainer = _trainer(x, cfg, model=model)
    trainer.since_fired.fill_(1000)
    snapshot = _tensors(model)
    trainer.run(progress=False)
    fired = ((x @ snapshot["W1"].T + snapshot["b1"]) > 0).any(0)
    assert torch.equal(trainer.since_fired, torch.where(fired, 0, 1050))
    assert int(fired.sum()) == N_HIDDEN - 10


# --- resume ------------------------------------------------------------------------------------


RESUME_CASES = {
    # (BatchTopK no longer takes a penalty on its codes: its penalty is "none" only.)
    "batchtopk": dict(
        kind="batchtopk",
        k=3,
        n_hidden=48,
        aux_k=6,
        dead_after=60,
        normalize_decoder=True,
        pre_bias=True,
        scale_inputs=True,
        decoder_bias_init="mean",
        corruption="gaussian",
        corruption_level=0.1,
        weight_decay=1e-4,
    ),
    "sigmoid-kl": dict(
        kind="sigmoid", output="sigmoid", penalty="kl", beta=0.5, rho=0.1, corruption="mask", weight_decay=1e-4
    ),
    "jumprelu-l0": dict(
        kind="jumprelu", penalty="l0", beta=1e-3, pre_bias=True, jumprelu_bandwidth=0.05, optimizer="sgd", lr=0.05
    ),
}


def test_trainer_state_round_trips_through_a_file(tmp_path):
    x = _unit_interval(120)
    cfg = _cfg(steps=3, **RESUME_CASES["sigmoid-kl"])
    trainer = _trainer(x, cfg)
    trainer.run(progress=False)
    folder = RunFolder(tmp_path)
    settings = _fixed_settings(cfg)
    folder.save_checkpoint(trainer.model, trainer.state_dict(), trainer.history, settings, cfg.optim.keep_checkpoints)
    checkpoint = folder.load_checkpoint(settings)
    assert checkpoint.step == 3 and checkpoint.settings == settings
    model, state = checkpoint.model, checkpoint.trainer_state
    _assert_same_tensors(_tensors(model), _tensors(trainer.model))
    assert checkpoint.history == trainer.history
    restored = _trainer(x, cfg, state=state, model=model)
    a, b = trainer.state_dict(), restored.state_dict()
    for key in ("step", "scale", "stream", "first_loss"):
        assert a[key] == b[key], key
    assert a["step"] == 3 and a["stream"]["epoch"] * 4 + a["stream"]["step"] == 3  # 120 rows: 4 batches an epoch
    assert torch.equal(a["since_fired"], b["since_fired"])
    assert a["kind"]["rho_hat"] is not None and torch.equal(a["kind"]["rho_hat"], b["kind"]["rho_hat"])
    moments_a, moments_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert moments_a.keys() == moments_b.keys() and len(moments_a) == 4
    for i in moments_a:
        for key in moments_a[i]:
            assert torch.equal(moments_a[i][key], moments_b[i][key]), (i, key)


def _drop_timing(rows):
    return [{k: v for k, v in row.items() if k not in ("seconds", "examples_per_s")} for row in rows]


def test_a_ctrl_c_the_process_ignores_stays_ignored_during_training():
    """A shell's background job starts with SIGINT ignored: training must not start heeding it (SIGTERM
    still stops the run at a step boundary)."""
    x, cfg = _data(110, offset=1.0), _cfg(steps=15, checkpoint_every=7, **RESUME_CASES["batchtopk"])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # conftest restores the handlers after the test
    trainer = _trainer(x, cfg)
    _, interrupted = trainer.run(progress=False, checkpoint=lambda: os.kill(os.getpid(), signal.SIGINT))
    assert not interrupted and trainer.step == 15
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    trainer = _trainer(x, cfg)
    _, interrupted = trainer.run(progress=False, checkpoint=lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert interrupted and trainer.step == 7


@pytest.mark.parametrize("case", RESUME_CASES)
def test_interrupted_and_resumed_equals_uninterrupted(case, tmp_path):
    x = _unit_interval(110) if case == "sigmoid-kl" else _data(110, offset=1.0)  # 4 steps an epoch, 10 rows dropped
    cfg = _cfg(steps=15, checkpoint_every=7, **RESUME_CASES[case])
    settings = _fixed_settings(cfg)

    straight = _trainer(x, cfg)
    straight.run(progress=False)

    first = _trainer(x, cfg)
    # Ctrl-C arrives during the checkpoint after step 7: the loop stops at that step boundary.
    _, interrupted = first.run(progress=False, checkpoint=lambda: os.kill(os.getpid(), signal.SIGINT))
    assert interrupted and first.step == 7
    RunFolder(tmp_path).save_checkpoint(first.model, first.state_dict(), first.history, settings, 2)
    del first  # nothing in memory carries over

    checkpoint = RunFolder(tmp_path).load_checkpoint(settings)
    second = _trainer(x, cfg, state=checkpoint.trainer_state, model=checkpoint.model, history=checkpoint.history)
    _, interrupted = second.run(progress=False)
    assert not interrupted and second.step == 15
    _assert_same_tensors(_tensors(second.model), _tensors(straight.model))
    assert torch.equal(second.since_fired, straight.since_fired)
    assert _drop_timing(second.history) == _drop_timing(straight.history)


# --- the command line --------------------------------------------------------------------------


CLI_TRAIN = [
    "train",
    "--data",
    "synthetic",
    "--synthetic-inputs",
    "16",
    "--synthetic-atoms",
    "32",
    "--synthetic-k",
    "3",
    "--n-examples",
    "400",
    "--kind",
    "batchtopk",
    "--k",
    "3",
    "--n-hidden",
    "48",
    "--output",
    "linear",
    "--penalty",
    "none",
    "--optimizer",
    "adam",
    "--lr",
    "0.01",
    "--batch-size",
    "50",
    "--log-every",
    "3",
    "--checkpoint-every",
    "4",
    "--aux-k",
    "8",
    "--dead-after",
    "100",
    "--normalize-decoder",
    "--scale-inputs",
    "--pre-bias",
    "--decoder-bias-init",
    "mean",
    "--no-progress",
]


def _unit(run_dir, step):
    return run_dir / "checkpoint" / f"step-{step:09d}"


def _checkpoints(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoint").iterdir())


def _weights(run_dir, name="weights.safetensors"):
    return safetensors.torch.load_file(run_dir / name)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """A 6-step run resumed to 12 steps, and a 12-step run (checkpoints every 4 steps, the newest 2 kept)."""
    root = tmp_path_factory.mktemp("minibatch-cli")
    assert run_cli([*CLI_TRAIN, "--steps", "6", "--out", str(root / "resumed")]) == 0
    assert json.loads((root / "resumed" / "state.json").read_text())["steps_done"] == 6
    assert _checkpoints(root / "resumed") == ["step-000000004", "step-000000006"]  # every 4 steps, and the end
    assert run_cli(["train", "--resume", str(root / "resumed"), "--steps", "12", "--no-progress"]) == 0
    assert run_cli([*CLI_TRAIN, "--steps", "12", "--out", str(root / "straight")]) == 0
    return root


LOG_EVERY = 3  # CLI_TRAIN's --log-every


def _assert_same_run(run_dir, straight, resumed_at=None):
    """The weights, the last checkpoint, state.json and history.csv are those of the uninterrupted run.

    A run resumed from a step between two history rows (resumed_at) writes its next row over the
    steps since the resume only (the trainer's state holds no partial window): that row is compared
    by its step and dead units alone (see test_history_after_a_resume_between_rows_equals_uninterrupted).
    """
    for name in ("weights.safetensors", "checkpoint/step-000000012/model.safetensors"):
        _assert_same_tensors(_weights(run_dir, name), _weights(straight, name))
    assert json.loads((run_dir / "state.json").read_text()) == {"steps_done": 12, "steps_total": 12, "finished": True}
    history, expected = (_drop_timing(RunFolder(d).load_history()) for d in (run_dir, straight))
    assert [row["step"] for row in history] == [3, 6, 9, 12]
    if resumed_at is not None and resumed_at % LOG_EVERY:
        straddling = (resumed_at // LOG_EVERY) * LOG_EVERY + LOG_EVERY
        for rows in (history, expected):
            (row,) = [row for row in rows if row["step"] == straddling]
            row.update({k: None for k in row if k not in ("step", "dead_fraction")})
    assert history == expected


def test_cli_resume_with_more_steps_equals_an_uninterrupted_run(cli_runs):
    _assert_same_run(cli_runs / "resumed", cli_runs / "straight")
    for name in ("resumed", "straight"):
        assert _checkpoints(cli_runs / name) == ["step-000000008", "step-000000012"], name
    record = json.loads((cli_runs / "resumed" / "config.json").read_text())
    assert record["config"]["optim"]["steps"] == 12
    assert [entry["changes"] for entry in record["resumed"]] == [{"steps": 12}]
    assert "resumed" not in json.loads((cli_runs / "straight" / "config.json").read_text())


def test_cli_final_weights_are_the_checkpoint_folded_by_the_input_scale(cli_runs):
    """weights.safetensors takes raw inputs: W1 * s, W2 / s, b2 / s of the checkpoint, s = E||x||^2 ^ -1/2."""
    run_dir = cli_runs / "straight"
    final = _weights(run_dir)
    trained = _weights(_unit(run_dir, 12), "model.safetensors")
    folder = RunFolder.open(run_dir)
    checkpoint = folder.load_checkpoint(_fixed_settings(folder.load_config()))
    assert checkpoint.step == 12
    state = checkpoint.trainer_state
    x = SyntheticDictionary(16, 32, 3, seed=0).sample(400).x.double()
    s = float(x.pow(2).sum(1).mean()) ** -0.5
    assert state["scale"] == pytest.approx(s, rel=1e-12)
    s = state["scale"]
    assert torch.equal(final["W1"], trained["W1"] * s) and torch.equal(final["b1"], trained["b1"])
    assert torch.equal(final["W2"], trained["W2"] / s) and torch.equal(final["b2"], trained["b2"] / s)


def _copy_run(cli_runs, tmp_path, name="resumed"):
    target = tmp_path / "run"
    shutil.copytree(cli_runs / name, target)
    return target


def _interrupt_cli_run(run_dir, monkeypatch, how, step):
    """The 12-step run of CLI_TRAIN, sent the signal how (twice) during the given step; returns the exit status."""
    real_step, calls = TrainerAdam.step, {"n": 0}

    def signalling_step(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), how)
            os.kill(os.getpid(), how)  # a second signal changes nothing
        return real_step(self, *args, **kw)

    monkeypatch.setattr(TrainerAdam, "step", signalling_step)
    code = run_cli([*CLI_TRAIN, "--steps", "12", "--out", str(run_dir)])
    monkeypatch.undo()
    assert calls["n"] == step  # no step after the one the signals came in
    return code


@pytest.mark.parametrize("how, step", [(signal.SIGINT, 5), (signal.SIGTERM, 6)])
def test_cli_ctrl_c_stops_at_a_checkpoint_and_resume_equals_an_uninterrupted_run(
    cli_runs, tmp_path, capsys, monkeypatch, how, step
):
    run_dir = tmp_path / "run"
    capsys.readouterr()
    assert _interrupt_cli_run(run_dir, monkeypatch, how, step) == 130
    err = capsys.readouterr().err
    assert f"interrupted at a checkpoint; continue with: saekit train --resume {run_dir}" in err
    state = json.loads((run_dir / "state.json").read_text())
    assert state == {"steps_done": step, "steps_total": 12, "finished": False}
    assert _checkpoints(run_dir) == ["step-000000004", f"step-{step:09d}"]  # the regular one, and the stop's
    assert [row["step"] for row in RunFolder(run_dir).load_history()] == list(range(3, step + 1, 3))
    for name in ("weights.safetensors", "metrics.json", "density.png"):  # the results come at the end only
        assert not (run_dir / name).exists(), name

    assert run_cli(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    _assert_same_run(run_dir, cli_runs / "straight", resumed_at=step)


def test_history_after_a_resume_between_rows_equals_uninterrupted(cli_runs, tmp_path, monkeypatch):
    """Ctrl-C at step 5, between the rows of steps 3 and 6: after --resume, the row of step 6 should
    still sum steps 4 to 6, as the uninterrupted run's does, and not step 6 alone."""
    run_dir = tmp_path / "run"
    assert _interrupt_cli_run(run_dir, monkeypatch, signal.SIGINT, 5) == 130
    assert run_cli(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    _assert_same_run(run_dir, cli_runs / "straight")


def _damage(unit, damage):
    """Damage one file of a checkpoint; returns the file's name."""
    trainer, model = unit / "trainer.pt", unit / "model.safetensors"
    if damage == "trainer-garbage":
        trainer.write_bytes(b"not a torch file at all")
    elif damage == "trainer-truncated":
        trainer.write_bytes(trainer.read_bytes()[:200])
    elif damage == "trainer-missing":
        trainer.unlink()
    else:
        model.write_bytes(model.read_bytes()[:100])
    return "model.safetensors" if damage.startswith("model") else "trainer.pt"


DAMAGES = ["trainer-garbage", "trainer-truncated", "trainer-missing", "model-truncated"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_newest_checkpoint_falls_back_to_the_one_before(cli_runs, tmp_path, capsys, damage):
    """Of the two checkpoints kept (steps 8 and 12), the newest is damaged: resuming says so, goes on
    from step 8, and trains steps 9 to 12 again to the uninterrupted run's weights and history."""
    run_dir = _copy_run(cli_runs, tmp_path)
    named = _damage(_unit(run_dir, 12), damage)
    capsys.readouterr()
    assert run_cli(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if "resuming from the checkpoint of step 8" in line]
    assert len(warning) == 1 and str(_unit(run_dir, 12)) in warning[0] and named in warning[0], err
    _assert_same_run(run_dir, cli_runs / "straight", resumed_at=8)


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_only_checkpoint_is_a_one_line_error(cli_runs, tmp_path, capsys, damage):
    run_dir = _copy_run(cli_runs, tmp_path)
    shutil.rmtree(_unit(run_dir, 8))  # as with --keep-checkpoints 1
    named = _damage(_unit(run_dir, 12), damage)
    capsys.readouterr()
    code = run_cli(["train", "--resume", str(run_dir), "--no-progress"])
    assert_one_line_error(code, capsys.readouterr().err, str(_unit(run_dir, 12)), named)
    assert _checkpoints(run_dir) == ["step-000000012"]  # a refused resume removes nothing
    assert (run_dir / "weights.safetensors").is_file()


def test_a_refused_resume_records_no_change_of_settings(cli_runs, tmp_path, capsys):
    """--resume --steps 14 refused (the only checkpoint is damaged): config.json must not say the run
    was resumed with 14 steps, or a later plain --resume would train to 14."""
    run_dir = _copy_run(cli_runs, tmp_path)
    shutil.rmtree(_unit(run_dir, 8))
    _damage(_unit(run_dir, 12), "trainer-garbage")
    before = (run_dir / "config.json").read_text()
    capsys.readouterr()
    code = run_cli(["train", "--resume", str(run_dir), "--steps", "14", "--no-progress"])
    assert_one_line_error(code, capsys.readouterr().err, "trainer.pt")
    assert (run_dir / "config.json").read_text() == before


def test_resume_cuts_the_history_back_to_the_checkpoint(cli_runs, tmp_path):
    """A kill after history rows were written but before the next checkpoint: the rows after the
    checkpoint (and a row cut short) go, and the steps after it are trained again."""
    run_dir = _copy_run(cli_runs, tmp_path, "straight")
    shutil.rmtree(_unit(run_dir, 12))  # killed after step 12's row, before its checkpoint
    with open(run_dir / "history.csv", "a") as f:
        f.write("13,0.12")  # and in the middle of a later row
    (run_dir / "weights.safetensors").unlink()
    (run_dir / "state.json").write_text(json.dumps({"steps_done": 8, "steps_total": 12, "finished": False}))
    assert [row["step"] for row in RunFolder(run_dir).load_history()] == [3, 6, 9, 12]
    assert run_cli(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    _assert_same_run(run_dir, cli_runs / "straight", resumed_at=8)  # [3, 6, 9, 12]: no row twice
    assert not (run_dir / "history.csv").read_text().endswith("0.12")


def test_resume_without_a_checkpoint_starts_from_the_seed(cli_runs, tmp_path, capsys):
    """A run killed before its first checkpoint keeps config.json (and perhaps some history rows):
    --resume trains it from the start, to the uninterrupted run's weights."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(cli_runs / "straight" / "config.json", run_dir / "config.json")
    (run_dir / "history.csv").write_text("step,cost\n3,0.5\n6,0.4")
    capsys.readouterr()
    assert run_cli(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    assert "has no checkpoint yet: training from the start" in capsys.readouterr().err
    initial = "initial.safetensors"
    _assert_same_tensors(_weights(run_dir, initial), _weights(cli_runs / "straight", initial))
    _assert_same_run(run_dir, cli_runs / "straight")


@pytest.mark.parametrize("part, name, value", [("model", "k", 4), ("optim", "lr", 0.02), ("run", "seed", 1)])
def test_resume_refuses_a_config_json_edited_since_the_checkpoint(cli_runs, tmp_path, capsys, part, name, value):
    run_dir = _copy_run(cli_runs, tmp_path)
    record = json.loads((run_dir / "config.json").read_text())
    record["config"][part][name] = value
    (run_dir / "config.json").write_text(json.dumps(record))
    capsys.readouterr()
    code = run_cli(["train", "--resume", str(run_dir), "--no-progress"])
    assert_one_line_error(code, capsys.readouterr().err, "config.json differs", f"{name} (", str(_unit(run_dir, 12)))
    _assert_same_tensors(_weights(run_dir), _weights(cli_runs / "resumed"))  # nothing was changed


def test_resume_accepts_the_runs_own_settings_and_refuses_others(cli_runs, tmp_path, capsys):
    run_dir = _copy_run(cli_runs, tmp_path)
    before = json.loads((run_dir / "config.json").read_text())
    capsys.readouterr()
    code = run_cli(["train", "--resume", str(run_dir), "--lr", "0.01", "--k", "3", "--steps", "12", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    after = json.loads((run_dir / "config.json").read_text())
    assert after["config"] == before["config"] and after["resumed"] == before["resumed"]  # no change to record
    code = run_cli(["train", "--resume", str(run_dir), "--lr", "0.02", "--k", "3", "--steps", "14", "--no-progress"])
    assert_one_line_error(code, capsys.readouterr().err, "lr (0.01 in the run, 0.02 given)")
    assert "k (" not in capsys.readouterr().err
    assert json.loads((run_dir / "config.json").read_text()) == after  # the allowed --steps was not applied either


def _rewrite_architecture(path, **changes):
    tensors = safetensors.torch.load_file(path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    arch = json.loads(metadata["architecture"])
    arch.update(changes)
    safetensors.torch.save_file(tensors, path, metadata={**metadata, "architecture": json.dumps(arch)})


@pytest.mark.parametrize(
    "changes", [dict(n_hidden=47), dict(n_inputs=17), dict(kind="topk", k=500), dict(kind="gelu"), dict(colour="blue")]
)
def test_weights_with_a_wrong_architecture_are_a_user_error(cli_runs, tmp_path, capsys, changes):
    run_dir = _copy_run(cli_runs, tmp_path)
    _rewrite_architecture(run_dir / "weights.safetensors", **changes)
    with pytest.raises(UserError):
        load_model(run_dir)
    np.save(tmp_path / "x.npy", np.zeros((5, 16)))
    capsys.readouterr()
    code = run_cli(["eval", str(run_dir), "--data", str(tmp_path / "x.npy")])
    assert_one_line_error(code, capsys.readouterr().err, "weights.safetensors")


def test_cli_eval_prints_and_writes_metrics_computed_from_the_weights(cli_runs, tmp_path, capsys):
    run_dir = _copy_run(cli_runs, tmp_path)
    x = _data(37, seed=9)
    np.save(tmp_path / "x.npy", x.numpy())
    capsys.readouterr()
    assert run_cli(["eval", str(run_dir), "--data", str(tmp_path / "x.npy")]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((run_dir / "eval.json").read_text())
    assert (run_dir / "eval_density.png").stat().st_size > 0
    assert "fvu" in out and "eval.json" in out
    # Our own inference: BatchTopK is a ReLU above its threshold in inference.
    t = safetensors.torch.load_file(run_dir / "weights.safetensors")
    z2 = (x - t["b2"]) @ t["W1"].T + t["b1"]
    h = z2 * (z2 > t["batch_topk.threshold"].clamp_min(0).double())
    error = h @ t["W2"].T + t["b2"] - x
    density = (h > 0).double().mean(0)
    assert metrics["n_examples"] == 37
    assert metrics["mse"] == pytest.approx(float(error.pow(2).mean()), rel=1e-9)
    assert metrics["fvu"] == pytest.approx(float(error.pow(2).sum() / (x - x.mean(0)).pow(2).sum()), rel=1e-9)
    assert metrics["l0"] == pytest.approx(float((h > 0).sum(1).double().mean()), rel=1e-12)
    assert metrics["dead_fraction"] == pytest.approx(float((density == 0).double().mean()))
    assert metrics["density_median"] == pytest.approx(float(density.median()))
    assert metrics["decoder_norm_max"] == pytest.approx(float(t["W2"].norm(dim=0).max()), rel=1e-12)
    assert f"{metrics['fvu']:.6g}" in out


def test_cli_eval_of_vectors_of_the_wrong_width(cli_runs, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((5, 17)))
    capsys.readouterr()
    code = run_cli(["eval", str(cli_runs / "straight"), "--data", str(tmp_path / "x.npy")])
    assert_one_line_error(code, capsys.readouterr().err, "17", "16")


# --- evaluate_stream ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "jumprelu", "relu", "sigmoid"])
def test_evaluate_stream_against_a_direct_computation(kind):
    x = _data(30, seed=3)
    model = make_model(D, 20, kind, "linear", seed=1, k=3, pre_bias=True)
    with torch.no_grad():
        model.b2.copy_(0.2 * x[0])
        model.b1.fill_(-0.1)
        model.b1[:4] = -50.0  # four units never fire
        model.W2.mul_(torch.linspace(0.5, 2.0, 20, dtype=torch.float64))  # unequal decoder norms
        if kind == "batchtopk":
            model.batch_topk.threshold.fill_(0.25)
        if kind == "jumprelu":
            model.jumprelu.log_threshold.fill_(np.log(0.15))
    metrics, density = evaluate_stream(model, open_vectors(x), batch_size=7)

    W1, b1, W2, b2 = (p.detach() for p in (model.W1, model.b1, model.W2, model.b2))
    z2 = (x - b2) @ W1.T + b1
    h = {
        "topk": z2.relu() * _topk_mask(z2, 3),
        "batchtopk": z2 * (z2 > 0.25),
        "jumprelu": z2 * (z2 > 0.15),
        "relu": z2.relu(),
        "sigmoid": torch.sigmoid(z2),
    }[kind]
    error = h @ W2.T + b2 - x
    fired = h if kind == "sigmoid" else (h > 0).double()  # a sigmoid unit's density is its mean activation
    assert metrics["n_examples"] == 30
    assert metrics["mse"] == pytest.approx(float(error.pow(2).mean()), rel=1e-10)
    assert metrics["fvu"] == pytest.approx(float(error.pow(2).sum() / (x - x.mean(0)).pow(2).sum()), rel=1e-10)
    assert metrics["l0"] == pytest.approx(float((h > 0).sum(1).double().mean()), rel=1e-12)
    assert torch.allclose(density, fired.mean(0), rtol=1e-12, atol=1e-15)
    assert metrics["dead_fraction"] == pytest.approx(float((fired.mean(0) == 0).double().mean()))
    if kind != "sigmoid":
        assert metrics["dead_fraction"] >= 4 / 20
    norms = W2.norm(dim=0)
    assert (metrics["decoder_norm_min"], metrics["decoder_norm_mean"], metrics["decoder_norm_max"]) == pytest.approx(
        (float(norms.min()), float(norms.mean()), float(norms.max())), rel=1e-12
    )
    partial, _ = evaluate_stream(model, open_vectors(x), batch_size=4, max_rows=10)
    assert partial["n_examples"] == 10
    assert partial["mse"] == pytest.approx(float(error[:10].pow(2).mean()), rel=1e-10)


def test_tensorboard_logs_every_history_row(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from saekit.cli import main

    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--preset",
                "topk",
                "--n-examples",
                "2000",
                "--batch-size",
                "500",
                "--steps",
                "4",
                "--log-every",
                "2",
                "--tensorboard",
                "--out",
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    history = [line.split(",") for line in (run / "history.csv").read_text().splitlines()]
    header, rows = history[0], history[1:]
    fvu = [event.value for event in events.Scalars("fvu")]
    assert [event.step for event in events.Scalars("fvu")] == [2, 4]
    assert fvu == pytest.approx([float(row[header.index("fvu")]) for row in rows], rel=1e-6)


@pytest.mark.parametrize(
    ("decay", "expected"),
    [
        ("none", [1 / 3, 2 / 3, 1, 1, 1, 1, 1]),
        ("linear", [1 / 3, 2 / 3, 1, 1, 3 / 4, 2 / 4, 1 / 4]),
        ("cosine", [1 / 3, 2 / 3, 1, 1, (1 + math.cos(math.pi / 4)) / 2, 1 / 2, (1 + math.cos(3 * math.pi / 4)) / 2]),
        # warm-up 3, then 8 steps: --lr for 4, the decay over the last 4 (fraction 0.5)
        ("linear-half", [1 / 3, 2 / 3, 1, 1, 1, 1, 1, 1, 3 / 4, 2 / 4, 1 / 4]),
        # the same from fraction 0.25 (a decay over 2 steps) with --lr held for at most 4 steps
        ("linear-hold", [1 / 3, 2 / 3, 1, 1, 1, 1, 1, 1, 3 / 4, 2 / 4, 1 / 4]),
        # fraction 0.5 holds --lr for 4 steps, fewer than the 6 allowed: the fraction decides
        ("linear-long-hold", [1 / 3, 2 / 3, 1, 1, 1, 1, 1, 1, 3 / 4, 2 / 4, 1 / 4]),
    ],
)
def test_the_learning_rate_warms_up_then_decays_as_set(decay, expected):
    decay, _, variant = decay.partition("-")
    fraction, hold = {"half": (0.5, 0), "hold": (0.25, 4), "long-hold": (0.5, 6)}.get(variant, (1.0, 0))
    schedule = dict(steps=len(expected), warmup_steps=3, lr_decay=decay, lr_decay_fraction=fraction, lr_hold_steps=hold)
    trainer = _trainer(_data(), _cfg(kind="relu", penalty="none", lr=0.5, **schedule))
    seen = []
    for _ in range(len(expected)):
        seen.append(trainer.lr_factor())
        trainer.step += 1
    assert seen == pytest.approx(expected)
    trainer = _trainer(_data(), _cfg(kind="relu", penalty="none", lr=0.5, **schedule))
    trainer.run(progress=False)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * seen[-1])  # the last step's rate


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_bfloat16_products_train_within_two_percent_of_float32(kind):
    """The encoder's product in bfloat16 (float32 weights and optimizer state) reaches the FVU of a
    float32 run after the same steps, within 2%; measured here on held-out rows of a known dictionary."""
    from saekit.data.synthetic import SyntheticDictionary

    truth = SyntheticDictionary(64, 256, 6, noise_std=0.05, seed=0)
    x, heldout = truth.sample(6000, seed=1).x, truth.sample(2000, seed=2).x
    fvus = {}
    for autocast in ("none", "bf16"):
        settings = dict(
            kind=kind,
            k=6,
            n_hidden=256,
            lr=3e-3,
            batch_size=200,
            steps=150,
            dtype="float32",
            autocast=autocast,
            pre_bias=True,
            tied_init=True,
            normalize_decoder=True,
        )
        cfg = _cfg(**settings)
        trainer = _trainer(x, cfg)
        trainer.run(progress=False)
        with torch.no_grad():
            x_hat = trainer.model(heldout).x_hat
        fvus[autocast] = float((x_hat - heldout).pow(2).sum() / (heldout - heldout.mean(0)).pow(2).sum())
    assert fvus["none"] < 0.75  # it learned something
    assert abs(fvus["bf16"] - fvus["none"]) <= 0.02 * fvus["none"], fvus


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_on_a_transposed_parameter_equals_torchs_adam_on_its_contiguous_copy(amsgrad):
    """saekit's Adam hands W2 (the transpose of a contiguous tensor) to torch's fused update as its contiguous
    transpose; the update is element-wise, so three steps must give the bits of torch's Adam on a copy."""
    g = torch.Generator().manual_seed(0)
    atoms, bias = torch.randn(40, 6, generator=g), torch.randn(6, generator=g)
    grads = [torch.randn(40, 6, generator=g) for _ in range(3)]
    ours = [torch.nn.Parameter(atoms.clone().t()), torch.nn.Parameter(bias.clone())]
    theirs = [torch.nn.Parameter(atoms.t().contiguous()), torch.nn.Parameter(bias.clone())]
    assert not ours[0].is_contiguous()
    settings = dict(lr=0.1, betas=(0.8, 0.99), amsgrad=amsgrad, fused=True)
    optimizers = TrainerAdam(ours, **settings), torch.optim.Adam(theirs, **settings)
    for grad in grads:
        ours[0].grad, theirs[0].grad = grad.t(), grad.t().contiguous()
        ours[1].grad, theirs[1].grad = grad[0].clone(), grad[0].clone()
        for optimizer in optimizers:
            optimizer.step()
    assert torch.equal(ours[0].detach(), theirs[0].detach()) and torch.equal(ours[1].detach(), theirs[1].detach())
    state = optimizers[0].state[ours[0]]
    assert state["exp_avg"].stride() == ours[0].stride()  # the moments keep the parameter's layout, as saved
    assert torch.equal(state["exp_avg_sq"], optimizers[1].state[theirs[0]]["exp_avg_sq"])


def test_the_encoder_bias_stays_in_full_precision_under_autocast():
    """b1 - W1 b2 is a vector: under autocast it is still computed in the parameters' float32 (not from a
    bfloat16 copy of W1), to float32's precision of the float64 computation."""
    model = make_model(64, 512, "topk", "linear", dtype=torch.float32, k=8, pre_bias=True)
    with torch.no_grad():
        model.b2.copy_(torch.randn(64, generator=torch.Generator().manual_seed(0)))
        model.b1.uniform_(-1, 1)
    expected = model.b1.double() - model.W1.double() @ model.b2.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bias = model.encoder_bias()
    assert bias.dtype == torch.float32
    torch.testing.assert_close(bias.double(), expected, rtol=1e-6, atol=1e-6)


# --- the memory a step frees is kept for the next ------------------------------------------------

FRESH_BLOCK_FAULTS = """
import resource, sys, torch
from saekit.train.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults_of_a_large_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(2**24)  # 64 MiB, each page written, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for _ in range(3):  # aligned blocks fit the freed ones once these have merged: a step's worth of warm-up
    faults_of_a_large_block()
print(faults_of_a_large_block())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory changes glibc's malloc only")
def test_kept_memory_spares_the_page_faults_of_a_large_block_allocated_again():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", FRESH_BLOCK_FAULTS, mode], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return int(out.stdout)

    pages = 2**26 // resource.getpagesize()
    default, kept = faults("default"), faults("keep")
    if default < pages // 2:
        pytest.skip(f"the system maps this block in large pages ({default} page faults): nothing to spare")
    assert kept < pages // 100, (default, kept)


def test_training_on_the_cpu_keeps_freed_memory(monkeypatch):
    calls = []
    monkeypatch.setattr("saekit.train.minibatch.keep_freed_memory", lambda: calls.append(1))
    cfg = _cfg("topk")
    _trainer(_data(), cfg).run(progress=False)
    assert calls == [1]
