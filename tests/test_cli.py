"""The `saekit` command line (saekit.cli), called in-process (and once as a real process): the run
folder it writes (saekit.run), resuming, the gradient check, and one-line errors for bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import assert_one_line_error, make_model, reference_cost, run_cli
from PIL import Image

from saekit import kinds
from saekit.config import PARTS, TrainConfig
from saekit.data.images import natural_image_patches
from saekit.kernels import classic
from saekit.settings import dashed, field_docs
from saekit.viz.pictures import side_by_side

TINY = ["--n-examples", "500", "--max-iter", "10", "--n-hidden", "9", "--no-progress"]
PICTURES = [
    "features.png",
    "inputs.png",
    "reconstructions.png",
    "cost.png",
    "decoder.png",
    "features_before.png",
    "features_updates.png",
    "decoder_before.png",
    "decoder_updates.png",
    "reconstructions_before.png",
]
METRICS = {
    "n_examples",
    "cost",
    "reconstruction",
    "weight_decay",
    "sparsity",
    "rho_hat_mean",
    "rho_hat_min",
    "rho_hat_max",
    "rho_hat_std",
    "mse",
    "fvu",
}


run = run_cli


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a stray default runs/ folder lands in tmp, not the repo


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    assert run(["train", *TINY, "--out", str(run_dir)]) == 0
    return run_dir


def test_a_denoising_run_draws_corrupted_denoised_and_clean(tmp_path, trained):
    assert not (trained / "denoised.png").exists()
    run_dir = tmp_path / "denoising"
    assert run(["train", *TINY, "--corruption", "mask", "--corruption-level", "0.5", "--out", str(run_dir)]) == 0
    img = np.asarray(Image.open(run_dir / "denoised.png"))
    groups = side_by_side(*[np.zeros((50, 64))] * 3, image_shape=(8, 8))  # 50 triples of 8x8 tiles
    k = img.shape[0] // groups.shape[0]
    assert img.shape[:2] == (k * groups.shape[0], k * groups.shape[1])


def _history(run_dir):
    with open(run_dir / "history.csv") as f:
        header, *rows = [line.strip().split(",") for line in f if line.strip()]
    return [dict(zip(header, map(float, row))) for row in rows]


# --- train -----------------------------------------------------------------------------------


def test_train_writes_the_run_folder(trained):
    record = json.loads((trained / "config.json").read_text())
    assert record["preset"] == "ufldl-patches"
    assert {"saekit", "python", "torch", "numpy", "scipy", "safetensors"} <= set(record["versions"])
    expected = TrainConfig.from_flat({"n_examples": 500, "max_iter": 10, "n_hidden": 9})
    assert record["config"] == expected.to_dict()
    assert record["command"] == ["saekit", "train", *TINY, "--out", str(trained)]
    tensors = safetensors.torch.load_file(str(trained / "weights.safetensors"))
    assert tensors["W1"].shape == (9, 64) and tensors["W2"].shape == (64, 9) and tensors["W1"].dtype == torch.float64
    initial = safetensors.torch.load_file(str(trained / "initial.safetensors"))
    untrained = make_model(64, 9, seed=0)  # the run's seed
    assert torch.equal(initial["W1"], untrained.W1.detach()) and torch.equal(initial["W2"], untrained.W2.detach())
    assert not torch.equal(tensors["W1"], initial["W1"])
    assert json.loads((trained / "state.json").read_text()) == {"steps_done": 10, "steps_total": 10, "finished": True}
    history = _history(trained)
    assert [row["step"] for row in history] == list(range(1, 11))
    for name in PICTURES:
        with Image.open(trained / name) as png:
            assert png.format == "PNG" and min(png.size) >= 100, name
    with Image.open(trained / "features.png") as png:
        assert min(png.size) >= 512  # 3x3 tiles of 8x8, blown up to be seen
    assert not [p.name for p in trained.iterdir() if p.name.endswith(".tmp")]


def test_metrics_json_matches_our_own_computation(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert set(metrics) == METRICS
    tensors = safetensors.torch.load_file(str(trained / "weights.safetensors"))
    x = torch.from_numpy(natural_image_patches(500, 8, seed=0))  # the run's data: seed 0
    W1, b1, W2, b2 = (tensors[k] for k in ("W1", "b1", "W2", "b2"))
    assert metrics["n_examples"] == 500
    assert metrics["cost"] == pytest.approx(float(reference_cost(W1, b1, W2, b2, x, 1e-4, 0.01, 3.0)), rel=1e-10)
    x_hat = torch.sigmoid(torch.sigmoid(x @ W1.T + b1) @ W2.T + b2)
    assert metrics["mse"] == pytest.approx(float(((x_hat - x) ** 2).mean()), rel=1e-10)
    assert metrics["fvu"] == pytest.approx(float(((x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()), rel=1e-10)
    # The saved weights are the last point the history recorded.
    assert _history(trained)[-1]["cost"] == pytest.approx(metrics["cost"], rel=1e-12)


def test_resume_continues_to_the_new_total(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run(["train", *TINY, "--max-iter", "5", "--out", str(run_dir)]) == 0
    assert len(_history(run_dir)) == 5
    capsys.readouterr()
    assert run(["train", "--resume", str(run_dir), "--max-iter", "10", "--no-progress"]) == 0
    assert "5 of 10 iterations to go" in capsys.readouterr().out
    history = _history(run_dir)
    assert [row["step"] for row in history] == list(range(1, 11))
    costs = [row["cost"] for row in history]
    # Each L-BFGS iteration lowers J, also across the restart: it went on from the saved weights.
    assert all(b <= a for a, b in zip(costs, costs[1:]))
    state = json.loads((run_dir / "state.json").read_text())
    assert state == {"steps_done": 10, "steps_total": 10, "finished": True}


def test_ctrl_c_saves_the_run_and_resume_finishes_it(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    real, calls = classic.cost_and_grad, {"n": 0}

    def interrupted_after_six(*args, **kw):
        calls["n"] += 1
        if calls["n"] > 6:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(classic, "cost_and_grad", interrupted_after_six)
    assert run(["train", *TINY, "--out", str(run_dir)]) == 130
    assert f"--resume {run_dir}" in capsys.readouterr().err
    state = json.loads((run_dir / "state.json").read_text())
    done = len(_history(run_dir))
    assert state["finished"] is False and state["steps_done"] == done and 1 <= done < 10
    assert (run_dir / "weights.safetensors").is_file() and (run_dir / "metrics.json").is_file()

    monkeypatch.undo()
    assert run(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    assert [row["step"] for row in _history(run_dir)] == list(range(1, 11))
    assert json.loads((run_dir / "state.json").read_text())["finished"] is True


def test_resume_refuses_other_changed_settings(trained, capsys):
    assert_one_line_error(run(["train", "--resume", str(trained), "--rho", "0.5"]), capsys.readouterr().err, "--resume")


def test_resume_refuses_a_preset_or_a_config_file(trained, capsys):
    for extra in (["--preset", "ufldl-patches"], ["--config", str(trained / "config.json")]):
        code = run(["train", "--resume", str(trained), *extra, "--no-progress"])
        assert_one_line_error(code, capsys.readouterr().err, "--resume", "--preset and --config")


def test_resume_refuses_a_checkpoint_of_saekit_0_1(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert (
        run(
            [
                "train",
                "--n-examples",
                "200",
                "--n-hidden",
                "9",
                "--optimizer",
                "adam",
                "--steps",
                "4",
                "--batch-size",
                "50",
                "--checkpoint-every",
                "2",
                "--out",
                str(run_dir),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "kind" in torch.load(run_dir / "checkpoint" / "trainer.pt", weights_only=True)
    # 0.1's trainer state kept the running rho_hat under "rho_hat" (and no "kind").
    torch.save({"step": 2, "rho_hat": torch.full((9,), 0.01), "optimizer": {}}, run_dir / "checkpoint" / "trainer.pt")
    (run_dir / "state.json").write_text(json.dumps({"steps_done": 2, "steps_total": 4, "finished": False}))
    capsys.readouterr()
    code = run(["train", "--resume", str(run_dir), "--steps", "6", "--no-progress"])
    assert_one_line_error(code, capsys.readouterr().err, "trainer.pt", "earlier saekit")


def test_resume_of_a_folder_that_is_no_run(tmp_path, capsys):
    assert_one_line_error(run(["train", "--resume", str(tmp_path / "nothing")]), capsys.readouterr().err)


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, words",
    [
        (["--rho", "1.5"], ["--rho"]),
        (["--rho", "0"], ["--rho"]),
        (["--beta", "-1"], ["--beta"]),
        (["--weight-decay", "-1"], ["--weight-decay"]),
        (["--n-hidden", "0"], ["--n-hidden"]),
        (["--images-mat", "/missing.mat"], ["/missing.mat"]),
        (["--penalty", "kl", "--activation", "relu"], ["--penalty must be one of", "(got 'kl')"]),
        (["--penalty", "kl", "--kind", "relu"], ["--penalty must be one of", "(got 'kl')"]),
        (["--rho", "0.1", "--kind", "relu", "--output", "linear"], ["--rho is a setting of sigmoid", "--kind relu"]),
        (["--k", "8"], ["--k is a setting of topk and batchtopk", "--kind sigmoid"]),
        (["--kind", "topk", "--k", "4"], ["--kind topk trains with minibatches", "--optimizer adam"]),
        (["--kind", "tanh"], ["unknown kind 'tanh'"]),
        (["--config", "corrupt.json"], ["corrupt.json", "JSON"]),
        (["--config", "missing.json"], ["missing.json"]),
        pytest.param(
            ["--device", "cuda"], ["cuda"], marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, capsys, args, words):
    (tmp_path / "corrupt.json").write_text('{"rho": 0.1,')
    code = run(["train", *TINY, *args, "--out", str(tmp_path / "run")])
    assert_one_line_error(code, capsys.readouterr().err, *words)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--n-hidden", "abc"], ["--n-hidden", "invalid int value: 'abc'", "saekit train --help"]),
        (["--rho", "high"], ["--rho", "invalid float value: 'high'"]),
        (["--no-such-option", "3"], ["unrecognized arguments: --no-such-option"]),
        (["--pre-bias", "yes"], ["unrecognized arguments: yes"]),
    ],
)
def test_argparse_mistakes_are_one_line_and_exit_status_2(tmp_path, capsys, args, words):
    code = run(["train", *TINY, *args, "--out", str(tmp_path / "run")])
    assert_one_line_error(code, capsys.readouterr().err, *words)
    assert not (tmp_path / "run").exists()


def test_a_missing_command_or_value_is_one_line(capsys):
    assert_one_line_error(run([]), capsys.readouterr().err, "command")
    assert_one_line_error(run(["train", "--n-hidden"]), capsys.readouterr().err, "--n-hidden", "expected one argument")
    assert_one_line_error(run(["eval", "run"]), capsys.readouterr().err, "--data")


def test_eval_max_rows_zero_is_one_line(trained, tmp_path, capsys):
    np.save(tmp_path / "x.npy", natural_image_patches(20, 8, seed=1))
    code = run(["eval", str(trained), "--data", str(tmp_path / "x.npy"), "--max-rows", "0"])
    assert_one_line_error(code, capsys.readouterr().err, "--max-rows")
    assert not (trained / "eval.json").exists()


def test_out_pointing_at_an_existing_run(trained, capsys):
    code = run(["train", *TINY, "--out", str(trained)])
    assert_one_line_error(code, capsys.readouterr().err, "already holds a run")


def test_unknown_preset_is_one_line(tmp_path, capsys):
    code = run(["train", "--preset", "no-such-preset", "--out", str(tmp_path / "run")])
    assert_one_line_error(code, capsys.readouterr().err, "no-such-preset")


def test_a_failed_start_does_not_block_its_run_folder(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert run(["train", *TINY, "--images-mat", "/missing.mat", "--out", run_dir]) == 2
    capsys.readouterr()
    code = run(
        ["train", "--n-examples", "100", "--max-iter", "2", "--n-hidden", "4", "--no-progress", "--out", run_dir]
    )
    assert code == 0, capsys.readouterr().err


def test_a_single_example_does_not_crash(tmp_path, capsys):
    code = run(
        [
            "train",
            "--n-examples",
            "1",
            "--max-iter",
            "2",
            "--n-hidden",
            "2",
            "--no-progress",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert code in (0, 2)


@pytest.mark.slow  # starts Python and imports torch
def test_user_error_in_a_real_process_prints_one_line(tmp_path):
    """The installed module as a process: exit status 2, one line on stderr, no traceback, no run folder."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-m", "saekit.cli", "train", "--rho", "1.5", "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert_one_line_error(result.returncode, result.stderr, "--rho")
    assert not (tmp_path / "run").exists()


# --- gradcheck, presets, help ----------------------------------------------------------------


def test_gradcheck_passes(capsys):
    assert run(["gradcheck"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == "PASS"
    differences = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "relative difference" in line]
    assert len(differences) == 2 and max(differences) < 1e-9


def test_gradcheck_bad_size(capsys):
    assert_one_line_error(run(["gradcheck", "--n-hidden", "0"]), capsys.readouterr().err, "--n-hidden")


def test_presets_lists_the_presets(capsys):
    assert run(["presets"]) == 0
    out = capsys.readouterr().out
    assert "ufldl-patches" in out and "ufldl-patches-adam" in out


def test_train_help_mentions_every_setting(capsys):
    assert run(["train", "--help"]) == 0
    out = capsys.readouterr().out
    squeezed = "".join(out.split())  # argparse wraps lines, also at hyphens
    for cls in [*PARTS.values(), *(kind.Config for kind in kinds.KINDS.values())]:
        for name, doc in field_docs(cls).items():
            assert f"--{dashed(name)}" in out, name
            assert "".join(doc.split()) in squeezed, name
    for option in ("--preset", "--config", "--out", "--resume", "--no-progress", "--kind", "--arch", "--activation"):
        assert option in out
    for kind in kinds.KINDS:
        assert kind in out


def test_kind_aliases_arch_and_activation(tmp_path):
    for alias in ("--arch", "--activation", "--kind"):
        run_dir = tmp_path / alias
        assert run(["train", *TINY, alias, "relu", "--output", "linear", "--max-iter", "2", "--out", str(run_dir)]) == 0
        record = json.loads((run_dir / "config.json").read_text())
        assert record["config"]["model"]["kind"] == "relu", alias
