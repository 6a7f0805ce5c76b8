"""The matryoshka kind (saekit.kinds.matryoshka): its nested objective by hand on a tiny case, its
forward and k-sparse backward against a dense autograd reference written here with masks (as
tests/test_activations.py does for TopK and BatchTopK), its settings, and its SAELens export as
SAELens itself loads it (in the peers' virtual environment, where sae_lens is installed)."""

import json
import subprocess
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import assert_one_line_error, make_model, run_cli, with_random_biases

from saekit.errors import UserError
from saekit.interop.saelens import export_saelens, import_saelens
from saekit.kinds import build, config

D, N_HIDDEN, BATCH, K = 10, 24, 9, 3
PREFIXES = [4, 10, 24]  # the widths the tests give as "4,10"
AUX_COEFFICIENT = 0.25
PEERS_PYTHON = Path("/work/peers/venv/bin/python")


def _model(pre_bias=True, seed=0, aux_k=0, prefixes="4,10", **settings):
    model = make_model(
        D,
        N_HIDDEN,
        "matryoshka",
        "linear",
        seed=seed,
        k=K,
        pre_bias=pre_bias,
        aux_k=aux_k,
        aux_coefficient=AUX_COEFFICIENT,
        matryoshka_prefixes=prefixes,
        **settings,
    )
    return with_random_biases(model, seed)


def _x(seed=1, m=BATCH):
    return torch.randn(m, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _params(model):
    return [p.detach().clone().requires_grad_() for p in (model.W1, model.b1, model.W2, model.b2)]


def _batch_topk_mask(z2, k):
    """(batch, n_hidden) bool: the k * batch largest entries of the whole batch, where positive."""
    flat = torch.zeros(z2.numel(), dtype=torch.bool)
    flat[z2.reshape(-1).topk(k * z2.shape[0]).indices] = True
    return flat.view_as(z2) & (z2 > 0)


def _prefix_errors(h, W2, b2, y, widths):
    """0.5 mean_i ||h[:, :m] W2[:, :m]^T + b2 - y||^2 for each width m, written with dense slices."""
    return [0.5 * (h[:, :m] @ W2[:, :m].T + b2 - y).pow(2).sum() / y.shape[0] for m in widths]


# --- the nested objective by hand -----------------------------------------------------------------


def _hand_built(mode):
    """x = (1, 2); units 0..3 see z2 = (1, 2, 3, 0) and have atoms (1, 0), (0, 1), (1, 1), (5, 5)."""
    model = build(config("matryoshka", n_hidden=4, k=3, matryoshka_prefixes="1,2"), 2, seed=0)
    with torch.no_grad():
        model.W1.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]))
        model.W2.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [5.0, 5.0]]).T)
        model.b1.zero_()
        model.b2.zero_()
        model.batch_topk.threshold.fill_(0.5)
    return model.train(mode == "train")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_nested_objective_by_hand(mode):
    # Codes (1, 2, 3, 0) in both modes: the batch's 3 largest, or those above the threshold 0.5.
    # Prefix 1: x_hat = (1, 0), error (0, -2): 2.  Prefix 2: x_hat = (1, 2): 0.
    # The whole dictionary: x_hat = (1, 2) + 3 (1, 1) = (4, 5), error (3, 3): 9.
    out = _hand_built(mode)(torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    assert out.terms.numbers() == [9.0, 0.0, 2.0, 0.0]
    assert out.x_hat.tolist() == [[4.0, 5.0]]
    assert _hand_built(mode).dense_codes(out.codes).tolist() == [[1.0, 2.0, 3.0, 0.0]]


def test_prefix_widths():
    def widths(prefixes, n_hidden=512):
        return config("matryoshka", n_hidden=n_hidden, k=2, matryoshka_prefixes=prefixes).prefixes()

    assert widths("auto") == [32, 128, 512]
    assert widths("auto", n_hidden=8) == [2, 8]  # 8 // 16 = 0 is left out
    assert widths("32,128") == widths("32,128,512") == [32, 128, 512]
    assert widths("512") == [512]
    for bad in ("128,32", "0,4", "a", "32,1024", "32,", "32,32"):
        with pytest.raises(UserError, match="--matryoshka-prefixes"):
            widths(bad)


def test_one_prefix_is_batchtopk():
    """With the whole width as its only prefix, the loss, codes and gradients are BatchTopK's."""
    x, dead = _x(), torch.arange(N_HIDDEN) % 4 == 0
    got = make_model(D, N_HIDDEN, "matryoshka", "linear", k=K, aux_k=5, matryoshka_prefixes=str(N_HIDDEN))
    want = make_model(D, N_HIDDEN, "batchtopk", "linear", k=K, aux_k=5)
    outs = []
    for model in (got, want):
        out = model(x, dead=dead)
        sum(out.terms).backward()
        outs.append(out)
    assert outs[0].terms.numbers() == pytest.approx(outs[1].terms.numbers(), rel=1e-12)
    assert torch.equal(outs[0].codes.values, outs[1].codes.values)
    for a, b in zip(got.parameters(), want.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


# --- forward and backward against a dense reference ----------------------------------------------


@pytest.mark.parametrize("pre_bias", [False, True])
@pytest.mark.parametrize("aux_k", [0, 5])
def test_training_forward_and_backward_equal_dense_autograd(pre_bias, aux_k):
    """Training mode: the batch's selection, every prefix's reconstruction of a target, AuxK on the
    whole dictionary's residual, and their gradients through the k-sparse backward equal the same
    loss written with dense masks and slices and differentiated by autograd."""
    model, x = _model(pre_bias, aux_k=aux_k), _x()
    y = torch.randn(BATCH, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    dead = torch.arange(N_HIDDEN) % 3 == 0  # 8 dead units, in every prefix
    out = model(x, y, dead=dead)
    sum(out.terms).backward()

    W1, b1, W2, b2 = params = _params(model)
    z2 = ((x - b2) if pre_bias else x) @ W1.T + b1
    h = z2 * _batch_topk_mask(z2.detach(), K)
    *inner, whole = _prefix_errors(h, W2, b2, y, PREFIXES)
    auxiliary = sum(inner)
    if aux_k:
        top_dead = z2.detach().masked_fill(~dead, -torch.inf).topk(aux_k, dim=1).indices
        aux_mask = torch.zeros_like(z2, dtype=torch.bool).scatter(1, top_dead, True)
        e = (y - (h @ W2.T + b2)).detach()
        variance = (e - e.mean(0)).pow(2).sum()
        auxiliary = auxiliary + AUX_COEFFICIENT * ((z2.relu() * aux_mask) @ W2.T - e).pow(2).sum() / variance
    (whole + auxiliary).backward()

    reconstruction, sparsity, got_auxiliary, decay = out.terms.numbers()
    assert reconstruction == pytest.approx(whole.item(), rel=1e-12)
    assert got_auxiliary == pytest.approx(auxiliary.item(), rel=1e-12)
    assert (h[:, : PREFIXES[0]] > 0).any() and len({e.item() for e in (*inner, whole)}) == 3  # three real terms
    assert sparsity == 0.0 and decay == 0.0
    torch.testing.assert_close(out.x_hat, (h @ W2.T + b2).detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.dense_codes(out.codes), h.detach(), rtol=0, atol=1e-12)
    for name, mine, theirs in zip(("W1", "b1", "W2", "b2"), (model.W1, model.b1, model.W2, model.b2), params):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_every_prefix_learns_from_its_own_error():
    """A unit of the first prefix learns from all three reconstructions, one outside the second prefix from
    the whole one only: against the same dictionary with one prefix, only the former's gradient differs."""
    x = _x()
    nested, flat = _model(prefixes="4,10"), _model(prefixes=str(N_HIDDEN))
    for model in (nested, flat):
        sum(model(x).terms).backward()
    h = nested.dense_codes(nested(x).codes)
    assert (h[:, :4] > 0).any() and (h[:, 10:] > 0).any()
    first, last = slice(0, 4), slice(10, N_HIDDEN)
    assert not torch.allclose(nested.W2.grad[:, first], flat.W2.grad[:, first])
    torch.testing.assert_close(nested.W2.grad[:, last], flat.W2.grad[:, last], rtol=1e-12, atol=1e-14)


def test_evaluation_mode_thresholds_and_reports_the_nested_loss():
    model, x = _model(), _x()
    with torch.no_grad():
        model.batch_topk.threshold.fill_(0.2)
        out = model.eval()(x)
        W1, b1, W2, b2 = _params(model)
        z2 = (x - b2) @ W1.T + b1
        h = z2 * (z2 > 0.2)
        *inner, whole = _prefix_errors(h, W2, b2, x, PREFIXES)
    torch.testing.assert_close(out.codes, h, rtol=0, atol=1e-12)
    assert out.terms.reconstruction.item() == pytest.approx(whole.item(), rel=1e-12)
    assert out.terms.auxiliary.item() == pytest.approx(sum(inner).item(), rel=1e-12)


def test_training_moves_the_inference_threshold():
    model = _model()
    assert float(model.batch_topk.threshold) == -1.0
    model.train()(_x())
    assert float(model.batch_topk.threshold) > 0


# --- SAELens ----------------------------------------------------------------------------------------


def test_saelens_export_is_a_jumprelu_with_the_inference_threshold_and_comes_back(tmp_path):
    model = _model(prefixes="4,10")
    with torch.no_grad():
        model.batch_topk.threshold.fill_(0.15)
    folder = export_saelens(model.eval(), tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    tensors = safetensors.torch.load_file(folder / "sae_weights.safetensors")
    assert cfg["architecture"] == "jumprelu" and cfg["apply_b_dec_to_input"] is True
    assert torch.equal(tensors["threshold"], torch.full((N_HIDDEN,), 0.15, dtype=torch.float64))
    back = import_saelens(folder)
    assert back.kind == "matryoshka" and back.cfg.prefixes() == PREFIXES and back.cfg.k == K
    x = _x(seed=4, m=40)
    with torch.no_grad():
        assert torch.equal(back.eval()(x).codes, model(x).codes)


SAELENS_SCRIPT = """
import sys, torch, safetensors.torch
try:
    from sae_lens import SAE
except ImportError:
    sys.exit(3)
x = safetensors.torch.load_file(sys.argv[1])["x"]
for folder in sys.argv[2:]:
    sae = SAE.load_from_disk(folder, device="cpu")
    with torch.no_grad():
        codes = sae.encode(x)
        safetensors.torch.save_file({"codes": codes, "x_hat": sae.decode(codes)}, folder + "/theirs.safetensors")
"""


@pytest.mark.slow
def test_saelens_itself_loads_the_exports_and_computes_the_same_codes(tmp_path):
    """SAELens (in the peers' virtual environment, one run for all three: importing it takes a while)
    loads the TopK, BatchTopK and Matryoshka exports and computes saekit's codes and reconstructions."""
    if not PEERS_PYTHON.exists():
        pytest.skip(f"{PEERS_PYTHON} does not exist")
    x = _x(seed=5, m=60)
    safetensors.torch.save_file({"x": x}, tmp_path / "x.safetensors")
    models = {}
    for kind in ("topk", "batchtopk", "matryoshka"):
        model = make_model(D, N_HIDDEN, kind, "linear", k=K, pre_bias=True, seed=2)
        with torch.no_grad():
            model.b1.copy_(0.1 * torch.randn(N_HIDDEN, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
            if kind != "topk":
                model.batch_topk.threshold.fill_(0.2)
        models[kind] = model.eval()
        export_saelens(model, tmp_path / kind)
    folders = [str(tmp_path / kind) for kind in models]
    done = subprocess.run([PEERS_PYTHON, "-c", SAELENS_SCRIPT, tmp_path / "x.safetensors", *folders], timeout=900)
    if done.returncode == 3:
        pytest.skip(f"sae_lens is not installed in {PEERS_PYTHON}")
    assert done.returncode == 0
    for kind, model in models.items():
        theirs = safetensors.torch.load_file(tmp_path / kind / "theirs.safetensors")
        with torch.no_grad():
            out = model(x)
        codes = model.dense_codes(out.codes)
        assert 0 < (codes > 0).sum() < codes.numel()
        torch.testing.assert_close(theirs["codes"], codes, rtol=1e-12, atol=1e-12, msg=kind)
        torch.testing.assert_close(theirs["x_hat"], out.x_hat, rtol=1e-12, atol=1e-12, msg=kind)


# --- the preset -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_preset_trains_on_hierarchy_data_and_reports_the_scores(tmp_path):
    args = ["--preset", "matryoshka", "--n-examples", "2000", "--steps", "4", "--batch-size", "500"]
    hierarchy = ["--synthetic-parents", "4", "--synthetic-children", "3", "--no-progress"]
    assert run_cli(["train", *args, *hierarchy, "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("recovery", "mcc", "precision", "recall", "f1", "absorption", "fvu", "l0"):
        assert key in metrics, key
    record = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert record["model"]["kind"] == "matryoshka" and record["model"]["matryoshka_prefixes"] == "32,128"
    assert record["data"]["synthetic_parents"] == 4


def test_bad_prefixes_on_the_command_line_are_one_clear_error(tmp_path, capsys):
    code = run_cli(["train", "--preset", "matryoshka", "--matryoshka-prefixes", "128,64", "--out", str(tmp_path / "r")])
    assert_one_line_error(code, capsys.readouterr().err, "--matryoshka-prefixes")
    with pytest.raises(UserError):
        config("topk", matryoshka_prefixes="4")
