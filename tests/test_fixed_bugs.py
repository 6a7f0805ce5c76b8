"""The five bugs the redesign into kinds fixed (issue: "One kind, one file"), each checked against an
independent computation written here. Every test fails on saekit 0.1."""

import json

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import assert_one_line_error, find_mnist_dir, reference_terms, run_cli

from saekit.data.synthetic import SyntheticDictionary
from saekit.estimator import SparseAutoencoderEstimator

MODERN = ["--n-examples", "2000", "--steps", "6", "--batch-size", "256", "--no-progress"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _weights(run_dir, name="weights.safetensors") -> dict:
    return safetensors.torch.load_file(str(run_dir / name))


def _synthetic_rows(n: int) -> torch.Tensor:
    """The presets' synthetic data (64-d, 8 of 256 atoms, seed 0), drawn as the data module documents."""
    return SyntheticDictionary(64, 256, 8, seed=0).sample(n).x


# 1. `--preset jumprelu` and `--preset relu-l1` wrote a sparsity of 0 into metrics.json.


@pytest.mark.parametrize("preset", ["jumprelu", "relu-l1"])
def test_metrics_report_the_penalty_of_every_kind(preset, tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli(["train", "--preset", preset, *MODERN, "--out", str(run_dir)]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    w = {k: v.double() for k, v in _weights(run_dir).items()}
    x = _synthetic_rows(2000).double()
    z2 = (x - w["b2"]) @ w["W1"].T + w["b1"]  # pre_bias: the encoder sees x - b2
    if preset == "jumprelu":
        expected = 0.01 * (z2 > w["jumprelu.log_threshold"].exp()).double().sum(1).mean()  # beta * mean L0
    else:
        expected = 0.05 * (z2.relu() * w["W2"].norm(dim=0)).sum(1).mean()  # beta * decoder-weighted L1
    assert metrics["sparsity"] > 0
    assert metrics["sparsity"] == pytest.approx(float(expected), rel=1e-4)
    assert metrics["cost"] == pytest.approx(metrics["reconstruction"] + metrics["sparsity"], rel=1e-6)


# 2. `--pre-bias` with L-BFGS followed the gradient of a cost that encodes x, not x - b2.


def test_lbfgs_with_pre_bias_minimises_the_models_own_cost(tmp_path):
    run_dir = tmp_path / "run"
    assert (
        run_cli(
            ["train", "--pre-bias", "--n-examples", "300", "--max-iter", "15", "--no-progress", "--out", str(run_dir)]
        )
        == 0
    )
    from saekit.data.images import natural_image_patches

    x = torch.from_numpy(natural_image_patches(300, 8, seed=0))

    def true_cost(w):  # UFLDL's J of the model that subtracts b2 before encoding: b1 - W1 b2 as the encoder bias
        return float(sum(reference_terms(w["W1"], w["b1"] - w["W1"] @ w["b2"], w["W2"], w["b2"], x, 1e-4, 0.01, 3.0)))

    final, initial = _weights(run_dir), _weights(run_dir, "initial.safetensors")
    history = (run_dir / "history.csv").read_text().splitlines()
    last_cost = float(dict(zip(history[0].split(","), history[-1].split(",")))["cost"])
    assert last_cost == pytest.approx(true_cost(final), rel=1e-9)  # the history is the model's own cost
    assert json.loads((run_dir / "metrics.json").read_text())["cost"] == pytest.approx(true_cost(final), rel=1e-9)
    assert true_cost(final) < 0.5 * true_cost(initial)


def test_the_full_batch_gradient_with_pre_bias_is_the_gradient_of_the_true_cost():
    from conftest import make_model

    from saekit.train import autoencoder_objective

    g = torch.Generator().manual_seed(0)
    x = 0.1 + 0.8 * torch.rand(20, 6, generator=g, dtype=torch.float64)
    model = make_model(6, 4, pre_bias=True, seed=1)
    with torch.no_grad():
        model.b2.copy_(0.2 * torch.randn(6, generator=g, dtype=torch.float64))
    evaluated = autoencoder_objective(model, x)()
    W1, b1, W2, b2 = (p.detach().clone().requires_grad_() for p in (model.W1, model.b1, model.W2, model.b2))
    J = sum(reference_terms(W1, b1 - W1 @ b2, W2, b2, x, 1e-4, 0.01, 3.0))
    J.backward()
    assert evaluated.cost == pytest.approx(float(J.detach()), rel=1e-12)
    for mine, theirs in zip(evaluated.grads, (W1, b1, W2, b2)):
        assert torch.allclose(mine, theirs.grad, rtol=1e-10, atol=1e-13)


# 3. Stacked layers were built without the run's kind settings (k), and fit() dropped the input scale.


def test_stacked_topk_layers_keep_the_runs_k(tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli(["train", "--preset", "topk", "--k", "4", "--stack", "16", *MODERN, "--out", str(run_dir)]) == 0
    with safetensors.safe_open(str(run_dir / "layer2.safetensors"), framework="pt") as f:
        arch = json.loads(f.metadata()["architecture"])
    assert (arch["kind"], arch["k"], arch["n_hidden"], arch["n_inputs"]) == ("topk", 4, 16, 512)


def test_fit_with_scaled_inputs_gives_a_model_for_raw_inputs():
    from conftest import make_model

    from saekit.train import OptimConfig, fit

    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(8, 16, generator=g, dtype=torch.float64)
    x = 100 * (torch.rand(2000, 8, generator=g, dtype=torch.float64) @ atoms)  # large raw inputs
    model = make_model(16, 32, "relu", "linear", penalty="none")
    fit(model, x, OptimConfig(optimizer="adam", lr=1e-2, batch_size=100, epochs=10, scale_inputs=True), progress=False)
    with torch.no_grad():
        x_hat = torch.relu(x @ model.W1.T + model.b1) @ model.W2.T + model.b2  # the saved weights, on raw x
    fvu = float((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu < 0.1


# 4. The estimator took no k, and transform() of a TopK estimator ended in a traceback.


def test_estimator_with_topk_transforms_to_k_sparse_codes():
    X = np.random.default_rng(0).standard_normal((300, 10)).astype(np.float32)
    sae = SparseAutoencoderEstimator(
        kind="topk",
        n_hidden=32,
        k=4,
        output="linear",
        penalty="none",
        optimizer="adam",
        epochs=2,
        batch_size=50,
        dtype="float32",
    ).fit(X)
    H = sae.transform(X)
    model = sae.model_
    assert H.shape == (300, 32) and ((H > 0).sum(1) <= 4).all()
    with torch.no_grad():
        z2 = torch.from_numpy(X) @ model.W1.T + model.b1
        top = z2.topk(4, dim=1)
        expected = torch.zeros_like(z2).scatter(1, top.indices, top.values.relu())
        decoded = expected @ model.W2.T + model.b2
    np.testing.assert_allclose(H, expected.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sae.inverse_transform(H), decoded.numpy(), rtol=1e-5, atol=1e-5)


# 5. Validating a config checked for CUDA, so a run trained on a GPU could not be read on a CPU-only machine.


def test_a_cuda_run_folder_is_read_and_classified_on_a_cpu_only_machine(tmp_path, capsys):
    data_dir = str(find_mnist_dir())
    run_dir = tmp_path / "run"
    assert (
        run_cli(
            [
                "train",
                "--preset",
                "ufldl-mnist",
                "--n-examples",
                "200",
                "--n-hidden",
                "8",
                "--max-iter",
                "3",
                "--data-dir",
                data_dir,
                "--no-progress",
                "--out",
                str(run_dir),
            ]
        )
        == 0
    )
    record = json.loads((run_dir / "config.json").read_text())
    record["config"]["run"]["device"] = "cuda"  # as written by a run on a GPU machine
    (run_dir / "config.json").write_text(json.dumps(record))
    from saekit.run import RunFolder

    assert RunFolder(run_dir).load_config().run.device == "cuda"
    assert run_cli(["classify", str(run_dir), "--softmax-max-iter", "3", "--no-progress"]) == 0
    result = json.loads((run_dir / "classification.json").read_text())
    assert np.sum(result["softmax"]["confusion_matrix"]) == 10000  # the whole test set was classified
    if not torch.cuda.is_available():
        capsys.readouterr()
        code = run_cli(
            [
                "train",
                "--device",
                "cuda",
                "--n-examples",
                "100",
                "--max-iter",
                "1",
                "--no-progress",
                "--out",
                str(tmp_path / "gpu"),
            ]
        )
        assert_one_line_error(code, capsys.readouterr().err, "--device cuda", "no CUDA GPU")
        assert not (tmp_path / "gpu").exists()
