"""The registry of kinds: a new kind is one class and one registration, and then the constructor, the
trainers, the command line and the run folder know it. The kind below is the worked example of
docs/architecture.md; its numbers are checked against a computation written here."""

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import assert_one_line_error, run_cli

from saekit.errors import UserError
from saekit.kinds import KINDS, ModelConfig, SparseAutoencoder, build, config, register


@dataclass
class ThresholdReLUConfig(ModelConfig):
    kind: ClassVar[str] = "threshold-relu"

    threshold: float = 0.1
    """Codes at or below this are zeroed."""
    beta: float = 0.01
    """Weight of the L1 penalty on the codes."""

    def problems(self) -> list[str]:
        return super().problems() + self.at_least(0, "threshold", "beta")


class ThresholdReLU(SparseAutoencoder):
    """h = z2 * (z2 > threshold), with penalty beta * mean_i ||h_i||_1."""

    Config = ThresholdReLUConfig

    def sparsify(self, z2):
        return z2 * (z2 > self.cfg.threshold)

    def penalty(self, h, z2):
        return self.cfg.beta * h.abs().sum(1).mean()


@pytest.fixture
def registered():
    register(ThresholdReLU)
    yield
    del KINDS["threshold-relu"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_every_builtin_kind_is_registered_under_its_own_name():
    assert list(KINDS) == ["sigmoid", "relu", "topk", "batchtopk", "matryoshka", "jumprelu"]
    for name, cls in KINDS.items():
        assert cls.Config.kind == name and issubclass(cls, SparseAutoencoder)
        assert type(build(config(name, n_hidden=8, **({"k": 2} if hasattr(cls.Config, "k") else {})), 4)) is cls


def test_an_unknown_kind_or_setting_is_one_clear_error():
    with pytest.raises(UserError, match="unknown kind 'nope'; choose one of sigmoid, relu"):
        config("nope")
    with pytest.raises(UserError, match="the relu kind has no setting k"):
        config("relu", k=3)


def test_a_registered_kind_builds_and_its_loss_terms_are_its_own(registered):
    model = build(config("threshold-relu", n_hidden=6, threshold=0.2, beta=0.5, weight_decay=1e-3), 5, seed=3)
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = model(x)
    W1, b1, W2, b2 = (p.detach() for p in (model.W1, model.b1, model.W2, model.b2))
    z2 = x @ W1.T + b1
    h = z2 * (z2 > 0.2)
    x_hat = h @ W2.T + b2
    assert torch.allclose(out.codes, h) and torch.allclose(out.x_hat, x_hat)
    expected = [
        0.5 * (x_hat - x).pow(2).sum(1).mean(),
        0.5 * h.abs().sum(1).mean(),
        0.0,
        0.5e-3 * (W1.pow(2).sum() + W2.pow(2).sum()),
    ]
    assert out.terms.numbers() == pytest.approx([float(e) for e in expected], rel=1e-12)


def test_the_command_line_trains_saves_and_reloads_a_registered_kind(registered, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert (
        run_cli(
            [
                "train",
                "--kind",
                "threshold-relu",
                "--threshold",
                "0.05",
                "--n-hidden",
                "12",
                "--n-examples",
                "300",
                "--max-iter",
                "10",
                "--no-progress",
                "--out",
                str(run_dir),
            ]
        )
        == 0
    )
    record = json.loads((run_dir / "config.json").read_text())["config"]["model"]
    assert record["kind"] == "threshold-relu" and record["threshold"] == 0.05
    from saekit.run import load_model

    model = load_model(run_dir)
    assert type(model) is ThresholdReLU and model.cfg.threshold == 0.05 and model.n_hidden == 12
    history = (run_dir / "history.csv").read_text().splitlines()
    first, last = (float(dict(zip(history[0].split(","), row.split(",")))["cost"]) for row in (history[1], history[-1]))
    assert last < first
    capsys.readouterr()
    code = run_cli(["train", "--kind", "relu", "--threshold", "0.05", "--out", str(tmp_path / "other")])
    assert_one_line_error(code, capsys.readouterr().err, "--threshold is a setting of threshold-relu")
