"""Transcoders and skip-transcoders: a dictionary that reads x (n_inputs) and reconstructs y (n_outputs).

Checked against computations written here: the forward pass by hand from the weights, the gradients
by central differences, a linear map learned by the skip connection against least squares, the
files of SAELens's and sparsify's transcoder formats by their own forward passes (and, where the
peers' environment exists, by SAELens and sparsify themselves).
"""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import assert_one_line_error, make_model, run_cli

from saekit.data.vectors import PairedSource, open_vectors
from saekit.errors import UserError
from saekit.interop import export_run, import_run
from saekit.kinds import from_architecture
from saekit.run import RunFolder
from saekit.train import OptimConfig, fit

D_IN, D_OUT, N_HIDDEN, K = 6, 4, 10, 3
KINDS = ["topk", "batchtopk", "matryoshka", "jumprelu", "relu", "sigmoid"]


def random_transcoder(kind: str, skip: bool, seed: int = 0, dtype=torch.float64):
    """A transcoder D_IN -> D_OUT with every parameter random (W_skip too)."""
    output = "sigmoid" if kind == "sigmoid" else "linear"
    settings = dict(k=K, matryoshka_prefixes="4", skip=skip)
    model = make_model(D_IN, N_HIDDEN, kind, output, dtype=dtype, seed=seed, n_outputs=D_OUT, **settings)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 or p is model.b1 or p is model.b2:
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def by_hand(model, x):
    """(codes, y_hat) from the weights, in float64: each kind's activation written out here."""
    W1, b1, W2, b2 = (p.detach().double() for p in (model.W1, model.b1, model.W2, model.b2))
    z = x @ W1.T + b1  # a transcoder never subtracts b2 (it lives in y's space)
    kind = model.kind
    if kind == "topk":
        top = z.topk(K, dim=1)
        h = torch.zeros_like(z).scatter(1, top.indices, top.values.relu())
    elif kind in ("batchtopk", "matryoshka"):  # evaluation mode: the inference threshold
        h = z * (z > model.batch_topk.threshold.double().clamp_min(0))
    elif kind == "jumprelu":
        h = z * (z > model.jumprelu.log_threshold.detach().double().exp())
    elif kind == "relu":
        h = z.relu()
    else:
        h = torch.sigmoid(z)
    y_hat = h @ W2.T + b2
    if model.W_skip is not None:
        y_hat = y_hat + x @ model.W_skip.detach().double().T
    return h, torch.sigmoid(y_hat) if model.cfg.output == "sigmoid" else y_hat


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_forward_is_the_hand_computation(kind, skip):
    model = random_transcoder(kind, skip).eval()
    if hasattr(model, "batch_topk"):
        model.batch_topk.threshold.fill_(0.2)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(9, D_IN, generator=g, dtype=torch.float64), torch.randn(9, D_OUT, generator=g)
    out = model(x, y.double())
    h, y_hat = by_hand(model, x)
    torch.testing.assert_close(model.dense_codes(out.codes), h)
    torch.testing.assert_close(out.x_hat, y_hat)
    torch.testing.assert_close(out.terms.reconstruction, 0.5 * (y_hat - y.double()).pow(2).sum(1).mean())
    assert model.widths == (D_IN, D_OUT) and model.W2.shape == (D_OUT, N_HIDDEN)


@pytest.mark.parametrize("kind", ["topk", "relu", "jumprelu", "matryoshka"])
def test_gradients_match_central_differences(kind):
    model = random_transcoder(kind, skip=True, seed=4).train()
    g = torch.Generator().manual_seed(5)
    x, y = (torch.randn(7, d, generator=g, dtype=torch.float64) for d in (D_IN, D_OUT))
    dead = torch.zeros(N_HIDDEN, dtype=torch.bool)
    model.compute_gradients(x, y, dead=dead)

    def loss() -> float:
        with torch.no_grad():
            return model(x, y, dead=dead).terms.total

    eps = 1e-6
    for name in ("W1", "b1", "W2", "b2", "W_skip"):
        p = getattr(model, name)
        for flat in torch.randperm(p.numel(), generator=g)[:4].tolist():
            i = tuple(int(j) for j in torch.unravel_index(torch.tensor(flat), p.shape))
            with torch.no_grad():
                p[i] += eps
                up = loss()
                p[i] -= 2 * eps
                down = loss()
                p[i] += eps
            assert p.grad[i].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-7), (name, i)


def test_the_skip_connection_learns_a_linear_map_as_least_squares_does():
    """y = x A^T + noise: the skip-transcoder comes within 10% of least squares' FVU (the best any linear map
    does); without the skip, a dictionary with 2 codes per row cannot express a full-rank map."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 16, generator=g)
    A = torch.randn(12, 16, generator=g) / 4
    y = x @ A.T + 0.05 * torch.randn(4096, 12, generator=g)
    with_ones = torch.cat([x, torch.ones(4096, 1)], 1)
    residual = with_ones @ torch.linalg.lstsq(with_ones, y).solution - y
    fvu_least_squares = float(residual.pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    optim = OptimConfig(optimizer="adam", lr=1e-2, steps=600, batch_size=256, normalize_decoder=True, dead_after=10**9)
    fvu = {}
    for skip in (True, False):
        model = make_model(16, 32, "topk", "linear", dtype=torch.float32, n_outputs=12, k=2, skip=skip, tied_init=True)
        fit(model, x, optim, target=y, progress=False)
        with torch.no_grad():
            fvu[skip] = float((model(x, y).x_hat - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert fvu[True] < 1.1 * fvu_least_squares and fvu[False] > 0.2


def test_fit_needs_targets_for_a_transcoder_and_refuses_them_for_an_autoencoder():
    x = torch.randn(64, D_IN)
    optim = OptimConfig(optimizer="adam", steps=1, batch_size=8)
    with pytest.raises(UserError, match="trains on x and its target"):
        fit(make_model(D_IN, 4, "relu", "linear", dtype=torch.float32, n_outputs=D_OUT), x, optim, progress=False)
    with pytest.raises(UserError, match="trains on x and its target"):
        fit(make_model(D_IN, 4, "relu", "linear", dtype=torch.float32), x, optim, target=x, progress=False)
    with pytest.raises(UserError, match="--skip makes a skip-transcoder"):
        make_model(D_IN, 4, "relu", "linear", skip=True)


def test_architecture_round_trip_and_a_scale_folds_into_the_weights():
    model = random_transcoder("relu", skip=True)
    again = from_architecture(model.architecture())
    again.load_state_dict(model.state_dict())
    x = torch.randn(5, D_IN, dtype=torch.float64)

    def output(m, x):
        return m.decode(m.encode(x), x)

    torch.testing.assert_close(output(again, x), output(model, x))
    # Trained on (s x, s y), it takes raw x and gives raw y.
    torch.testing.assert_close(output(model.folded(0.5), x), output(model, 0.5 * x) / 0.5)
    with pytest.raises(UserError, match="reconstructs a target, not its input"):
        model(x)


def test_paired_source_reads_pairs_row_for_row_and_refuses_unequal_lengths(tmp_path):
    x, y = torch.randn(10, 3), torch.randn(10, 2, dtype=torch.float64)
    paired = PairedSource(open_vectors(x), open_vectors(y))
    block = paired.read(2, 6)
    assert block.dtype == torch.float64 and paired.widths == (3, 2)
    torch.testing.assert_close(paired.split(block)[0], x[2:6].double())
    torch.testing.assert_close(paired.split(block)[1], y[2:6])
    with pytest.raises(UserError, match="differ in length"):
        PairedSource(open_vectors(x), open_vectors(y[:9]))


# --- the command line: train, eval, export and import a transcoder on paired shards


@pytest.fixture
def paired_shards(tmp_path):
    """A folder of two shards holding "activations" (x) and "targets" (y = a sparse map of x plus x's part)."""
    g = torch.Generator().manual_seed(0)
    codes = torch.rand(3000, 40, generator=g) * (torch.rand(3000, 40, generator=g) < 0.08)
    x = codes @ torch.randn(40, D_IN * 4, generator=g)
    y = codes @ torch.randn(40, D_OUT * 4, generator=g) + 0.3 * x[:, : D_OUT * 4]
    folder = tmp_path / "pairs"
    folder.mkdir()
    for i, rows in enumerate((slice(0, 1800), slice(1800, 3000))):
        tensors = {"activations": x[rows].contiguous(), "targets": y[rows].contiguous()}
        safetensors.torch.save_file(tensors, folder / f"part_{i}.safetensors")
    return folder, x, y


def _train(tmp_path, data, *flags, preset="topk"):
    out = tmp_path / "run"
    argv = ["train", "--preset", preset, "--data", str(data), "--n-hidden", "64"]
    assert run_cli([*argv, "--steps", "60", "--batch-size", "128", "--out", str(out), *flags, "--no-progress"]) == 0
    return out


def test_cli_trains_evaluates_exports_and_imports_a_skip_transcoder(paired_shards, tmp_path, capsys):
    data, x, y = paired_shards
    run = _train(tmp_path, data, "--target-key", "targets", "--skip", preset="jumprelu")
    model = RunFolder(run).load_model()
    assert model.widths == (D_IN * 4, D_OUT * 4) and model.W_skip is not None
    metrics = json.loads((run / "metrics.json").read_text())
    with torch.no_grad():
        xm = x.to(model.W1.dtype)
        y_hat = model.decode(model.encode(xm), xm).double()
    fvu = float((y_hat - y.double()).pow(2).sum() / (y.double() - y.double().mean(0)).pow(2).sum())
    assert metrics["fvu"] == pytest.approx(fvu, rel=1e-4) and metrics["fvu"] < 0.9
    # eval on the same pairs: the same numbers
    assert run_cli(["eval", str(run), "--data", str(data), "--no-progress"]) == 0
    assert json.loads((run / "eval.json").read_text())["fvu"] == pytest.approx(fvu, rel=1e-4)
    # SAELens's jumprelu_skip_transcoder, computed here from the file as SAELens does
    out = tmp_path / "saelens"
    export_run(run, out, "saelens")
    cfg = json.loads((out / "cfg.json").read_text())
    t = safetensors.torch.load_file(out / "sae_weights.safetensors")
    assert (cfg["architecture"], cfg["d_in"], cfg["d_out"], cfg["apply_b_dec_to_input"]) == (
        "jumprelu_skip_transcoder",
        D_IN * 4,
        D_OUT * 4,
        False,
    )
    xs = x[:50].to(t["W_enc"].dtype)
    pre = xs @ t["W_enc"] + t["b_enc"]
    theirs = (pre.relu() * (pre > t["threshold"])) @ t["W_dec"] + t["b_dec"] + xs @ t["W_skip"].T
    torch.testing.assert_close(theirs.double(), y_hat[:50], rtol=1e-5, atol=1e-5)
    back = import_run(out, tmp_path / "back")[0]
    with torch.no_grad():
        torch.testing.assert_close(back.decode(back.encode(xs), xs).double(), y_hat[:50], rtol=1e-5, atol=1e-5)
    assert back.widths == model.widths and back.kind == "jumprelu"


def test_topk_transcoders_go_to_sparsify_and_come_back(paired_shards, tmp_path, capsys):
    data, x, _ = paired_shards
    same = tmp_path / "same"
    same.mkdir()
    for path in data.iterdir():  # inputs and targets of one width, as sparsify's transcoders have them
        t = safetensors.torch.load_file(path)
        safetensors.torch.save_file(
            {"activations": t["activations"], "targets": t["activations"] * 2}, same / path.name
        )
    run = _train(tmp_path, same, "--target-key", "targets", "--skip", "--k", "4")
    model = RunFolder(run).load_model()
    out = tmp_path / "sparsify"
    export_run(run, out, "sparsify")
    cfg = json.loads((out / "cfg.json").read_text())
    t = safetensors.torch.load_file(out / "sae.safetensors")
    assert cfg["transcode"] is True and cfg["skip_connection"] is True
    xs = x[:50].to(t["W_dec"].dtype)
    top = (xs @ t["encoder.weight"].T + t["encoder.bias"]).relu().topk(4, dim=1)  # no b_dec subtracted
    theirs = torch.zeros(50, 64, dtype=xs.dtype).scatter(1, top.indices, top.values) @ t["W_dec"] + t["b_dec"]
    theirs = theirs + xs @ t["W_skip"].T
    with torch.no_grad():
        xm = xs.to(model.W1.dtype)
        ours = model.decode(model.encode(xm), xm)
        torch.testing.assert_close(theirs.to(ours.dtype), ours, rtol=1e-5, atol=1e-5)
        back = import_run(out, tmp_path / "back")[0]
        torch.testing.assert_close(back.decode(back.encode(xs), xs).to(ours.dtype), ours)
    # SAELens has no TopK transcoder, dictionary_learning no transcoder: one line each
    for fmt in ("saelens", "dictionary-learning"):
        code = run_cli(["export", str(run), "--out", str(tmp_path / fmt), "--format", fmt])
        assert_one_line_error(code, capsys.readouterr().err, "transcoder")


def test_bad_transcoder_settings_are_one_line_errors(paired_shards, tmp_path, capsys):
    data, x, _ = paired_shards
    base = ["train", "--preset", "topk", "--data", str(data), "--steps", "1", "--out", str(tmp_path / "r")]
    short = tmp_path / "short.npy"
    np.save(short, x[:100].numpy())
    cases = [
        (["--skip"], "--skip makes a skip-transcoder"),
        (["--target-key", "nothing"], "no tensor 'nothing'"),
        (["--target-data", str(short)], "differ in length"),
        (["--target-key", "targets", "--corruption", "mask"], "--corruption makes a denoising"),
    ]
    for flags, words in cases:
        assert_one_line_error(run_cli([*base, *flags]), capsys.readouterr().err, words)
        assert not (tmp_path / "r").exists()
    named = ["train", "--preset", "ufldl-patches", "--target-key", "targets", "--out", str(tmp_path / "m")]
    assert_one_line_error(run_cli(named), capsys.readouterr().err, "need --data a path")


# --- SAELens and sparsify themselves, where their environment exists

PEER_SCRIPT = """
import sys, torch, safetensors.torch
from pathlib import Path
work = Path(sys.argv[1])
x = safetensors.torch.load_file(work / "x.safetensors")["x"]
out = {}
from sae_lens import SAE
for name in ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"):
    sae = SAE.load_from_disk(str(work / name), device="cpu")
    with torch.no_grad():
        out[name] = sae(x.to(sae.dtype)).float()
from sparsify import SparseCoder
sae = SparseCoder.load_from_disk(work / "sparsify")
with torch.no_grad():
    out["sparsify"] = sae(x, x).sae_out.float()
safetensors.torch.save_file(out, work / "theirs.safetensors")
"""


@pytest.mark.slow
def test_saelens_and_sparsify_compute_saekits_transcoders(tmp_path):
    python = os.environ.get("SAEKIT_PEERS_PYTHON") or Path(__file__).resolve().parents[2] / "peers/venv/bin/python"
    if not Path(python).is_file():
        pytest.skip(f"the peers' Python (sae-lens, sparsify) is not at {python}")
    from saekit.interop import export_saelens, export_sparsify

    x = torch.randn(30, D_IN)
    safetensors.torch.save_file({"x": x}, tmp_path / "x.safetensors")
    models = {}
    for kind, skip, name in [
        ("relu", False, "transcoder"),
        ("relu", True, "skip_transcoder"),
        ("jumprelu", False, "jumprelu_transcoder"),
        ("batchtopk", True, "jumprelu_skip_transcoder"),
    ]:
        models[name] = random_transcoder(kind, skip, dtype=torch.float32).eval()
        export_saelens(models[name], tmp_path / name)
    sparsify = make_model(D_IN, N_HIDDEN, "topk", "linear", dtype=torch.float32, n_outputs=D_IN, k=K, skip=True)
    with torch.no_grad():
        for p in sparsify.parameters():
            p.add_(0.3 * torch.randn(p.shape))
    models["sparsify"] = sparsify
    export_sparsify(sparsify, tmp_path / "sparsify")
    env = {**os.environ, "PYTHONPATH": "", "SPARSIFY_DISABLE_TRITON": "1"}
    done = subprocess.run([str(python), "-c", PEER_SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = safetensors.torch.load_file(tmp_path / "theirs.safetensors")
    for name, model in models.items():
        with torch.no_grad():
            torch.testing.assert_close(theirs[name], model.decode(model.encode(x), x), rtol=1e-5, atol=1e-5, msg=name)


def test_a_run_checkpointed_before_transcoders_existed_resumes(tmp_path, monkeypatch):
    """Checkpoints of saekit 0.3 lack the settings skip, target_key and target_data: at their defaults they match."""
    import saekit.run.train as run_train
    from saekit.config import build_config

    cfg = build_config("topk", overrides={"data": "synthetic", "n_examples": 512, "steps": 4, "batch_size": 64})
    new = ("skip", "target_key", "target_data")
    real = run_train._fixed_settings
    monkeypatch.setattr(run_train, "_fixed_settings", lambda c: {k: v for k, v in real(c).items() if k not in new})
    run_train.train_run(cfg, tmp_path / "run", progress=False)
    monkeypatch.undo()
    result = run_train.resume_run(tmp_path / "run", {"steps": 6}, progress=False)
    assert result.history[-1]["step"] == 6
    with pytest.raises(UserError, match="differs from the checkpoint"):  # a real difference is still refused
        monkeypatch.setattr(run_train, "_fixed_settings", lambda c: {**real(c), "skip": True})
        run_train.resume_run(tmp_path / "run", {"steps": 8}, progress=False)


def test_a_transcoder_starts_with_a_zero_decoder_whose_columns_stay_free():
    tied = make_model(D_IN, N_HIDDEN, "topk", "linear", n_outputs=D_OUT, k=K, tied_init=True)
    assert torch.count_nonzero(tied.W2) == 0 and torch.count_nonzero(tied.W1) == D_IN * N_HIDDEN
    untied = make_model(D_IN, N_HIDDEN, "sigmoid", "linear", n_outputs=D_OUT)  # UFLDL's start: random W2
    assert torch.count_nonzero(untied.W2) == D_OUT * N_HIDDEN
    from saekit.config import build_config

    assert build_config("topk").optim.normalize_decoder is True
    assert build_config("topk", overrides={"data": "x.npy", "target_key": "t"}).optim.normalize_decoder is False
    explicit = {"data": "x.npy", "target_key": "t", "normalize_decoder": True}
    assert build_config("topk", overrides=explicit).optim.normalize_decoder is True
