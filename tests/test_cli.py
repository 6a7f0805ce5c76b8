"""The `saekit` command line (saekit.cli), called in-process (and once as a real process): the run
folder it writes (saekit.run), checkpoints, Ctrl-C and resuming, the gradient check, and one-line
errors for bad input."""

import json
import os
import shutil
import signal
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
from saekit.run import train as run_train
from saekit.settings import dashed, field_docs
from saekit.viz import report
from saekit.viz.pictures import side_by_side

TINY = ["--n-examples", "500", "--max-iter", "10", "--n-hidden", "9", "--no-progress"]
PICTURES = [
    "density.png",
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
    "l0",
    "dead_fraction",
    "density_median",
    "decoder_norm_mean",
    "decoder_norm_min",
    "decoder_norm_max",
    "filter_localization",
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
    a2 = torch.sigmoid(x @ W1.T + b1)
    assert metrics["l0"] == pytest.approx(float((a2 > 0).sum(1).double().mean()), rel=1e-12)
    assert metrics["density_median"] == pytest.approx(float(a2.mean(0).median()), rel=1e-10)  # sigmoid: its rho_hat
    assert metrics["decoder_norm_max"] == pytest.approx(float(W2.norm(dim=0).max()), rel=1e-12)
    # The saved weights are the last point the history recorded.
    assert _history(trained)[-1]["cost"] == pytest.approx(metrics["cost"], rel=1e-12)


def _checkpoints(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoint").iterdir())


def test_train_checkpoints_every_n_iterations_and_keeps_the_newest(tmp_path):
    for keep, expected in [(2, [9, 10]), (10, [3, 6, 9, 10])]:
        run_dir = tmp_path / f"keep{keep}"
        args = ["--checkpoint-every", "3", "--keep-checkpoints", str(keep)]
        assert run(["train", *TINY, *args, "--out", str(run_dir)]) == 0
        assert _checkpoints(run_dir) == [f"step-{step:09d}" for step in expected]  # every 3, and the end
        for step in expected:  # each checkpoint holds the history up to its step
            with open(run_dir / "checkpoint" / f"step-{step:09d}" / "history.csv") as f:
                assert len(f.read().splitlines()) == 1 + step


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
    record = json.loads((run_dir / "config.json").read_text())
    assert record["config"]["optim"]["max_iter"] == 10  # the change is applied, and recorded
    assert [entry["changes"] for entry in record["resumed"]] == [{"max_iter": 10}]
    assert _checkpoints(run_dir) == ["step-000000005", "step-000000010"]


def test_resume_accepts_a_setting_equal_to_the_runs_own(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run(["train", *TINY, "--max-iter", "3", "--out", str(run_dir)]) == 0
    before = json.loads((run_dir / "config.json").read_text())
    capsys.readouterr()
    code = run(["train", "--resume", str(run_dir), "--n-hidden", "9", "--rho", "0.01", "--max-iter", "3"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((run_dir / "config.json").read_text()) == before  # nothing changed, nothing recorded
    assert json.loads((run_dir / "state.json").read_text())["finished"] is True


def test_resume_without_a_checkpoint_trains_from_the_start(trained, tmp_path, capsys):
    """A run killed before its first checkpoint (config.json, some history rows, no checkpoint):
    --resume trains from the seed, to the weights of the run trained at once."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_bytes((trained / "config.json").read_bytes())
    (run_dir / "history.csv").write_text("step,cost\n1,0.9\n2,0.")
    capsys.readouterr()
    assert run(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "has no checkpoint yet: training from the start" in captured.err
    assert "10 of 10 iterations to go" in captured.out
    for name in ("weights.safetensors", "initial.safetensors"):
        a, b = (safetensors.torch.load_file(str(d / name)) for d in (run_dir, trained))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    history, expected = (
        [{k: v for k, v in row.items() if k != "seconds"} for row in _history(d)] for d in (run_dir, trained)
    )
    assert history == expected
    assert json.loads((run_dir / "state.json").read_text()) == {"steps_done": 10, "steps_total": 10, "finished": True}


def _signal_at(monkeypatch, call, signum=signal.SIGINT):
    """Send the signal during the call-th evaluation of the classic cost, as Ctrl-C at the terminal would."""
    real, calls = classic.cost_and_grad, {"n": 0}

    def signalling(*args, **kw):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signum)
        return real(*args, **kw)

    monkeypatch.setattr(classic, "cost_and_grad", signalling)
    return calls


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_saves_the_run_and_resume_finishes_it(tmp_path, capsys, monkeypatch, signum):
    run_dir = tmp_path / "run"
    _signal_at(monkeypatch, 7, signum)
    assert run(["train", *TINY, "--out", str(run_dir)]) == 130
    err = capsys.readouterr().err
    assert f"interrupted at a checkpoint; continue with: saekit train --resume {run_dir}" in err
    state = json.loads((run_dir / "state.json").read_text())
    done = len(_history(run_dir))
    assert state == {"steps_done": done, "steps_total": 10, "finished": False} and 1 <= done < 10
    assert _checkpoints(run_dir) == [f"step-{done:09d}"]  # written when it stopped
    for name in ("weights.safetensors", "metrics.json", "density.png", "features.png"):
        assert not (run_dir / name).exists(), name  # the results come at the end only

    monkeypatch.undo()
    assert run(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    assert f"{10 - done} of 10 iterations to go" in capsys.readouterr().out
    assert [row["step"] for row in _history(run_dir)] == list(range(1, 11))
    assert json.loads((run_dir / "state.json").read_text())["finished"] is True
    assert (run_dir / "weights.safetensors").is_file() and (run_dir / "metrics.json").is_file()


def test_resume_cuts_the_history_back_to_the_checkpoint(tmp_path, capsys):
    """Rows after the checkpoint (a kill came after them, before the next checkpoint) are dropped, and
    the iterations after the checkpoint are run again: one row per step, no step twice."""
    run_dir = tmp_path / "run"
    assert run(["train", *TINY, "--max-iter", "6", "--checkpoint-every", "4", "--out", str(run_dir)]) == 0
    shutil.rmtree(run_dir / "checkpoint" / "step-000000006")  # as if killed after row 6, before its checkpoint
    with open(run_dir / "history.csv", "a") as f:
        f.write("7,0.1")
    capsys.readouterr()
    assert run(["train", "--resume", str(run_dir), "--max-iter", "8", "--no-progress"]) == 0
    assert "4 of 8 iterations to go" in capsys.readouterr().out
    history = _history(run_dir)
    assert [row["step"] for row in history] == list(range(1, 9))
    costs = [row["cost"] for row in history]
    assert all(b <= a for a, b in zip(costs, costs[1:]))
    assert _checkpoints(run_dir) == ["step-000000004", "step-000000008"]


def test_ctrl_c_while_writing_the_results_leaves_a_run_that_resume_finishes(tmp_path, capsys, monkeypatch):
    """state.json says finished only once every result is written; Ctrl-C before that is exit 130,
    and --resume writes them from the last checkpoint, without training again."""
    run_dir = tmp_path / "run"
    real = report.write_pictures

    def interrupted_pictures(*args, **kw):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kw)

    monkeypatch.setattr(run_train, "write_pictures", interrupted_pictures)
    assert run(["train", *TINY, "--out", str(run_dir)]) == 130
    assert f"--resume {run_dir}" in capsys.readouterr().err
    assert json.loads((run_dir / "state.json").read_text()) == {"steps_done": 10, "steps_total": 10, "finished": False}
    assert _checkpoints(run_dir) == ["step-000000010"]
    weights = safetensors.torch.load_file(str(run_dir / "weights.safetensors"))

    monkeypatch.undo()
    assert run(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    assert "0 of 10 iterations to go" in capsys.readouterr().out
    again = safetensors.torch.load_file(str(run_dir / "weights.safetensors"))
    assert again.keys() == weights.keys() and all(torch.equal(again[k], weights[k]) for k in weights)
    assert [row["step"] for row in _history(run_dir)] == list(range(1, 11))
    assert json.loads((run_dir / "state.json").read_text()) == {"steps_done": 10, "steps_total": 10, "finished": True}
    for name in PICTURES:
        assert (run_dir / name).is_file(), name


@pytest.mark.parametrize("what", ["keyboard-interrupt", "error"])
def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path, capsys, monkeypatch, what):
    run_dir = tmp_path / "run"
    real, calls = classic.cost_and_grad, {"n": 0}

    def failing(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt if what == "keyboard-interrupt" else RuntimeError("a bug")
        return real(*args, **kw)

    monkeypatch.setattr(classic, "cost_and_grad", failing)
    if what == "keyboard-interrupt":  # Ctrl-C where no handler turns it into a stop
        assert run(["train", *TINY, "--out", str(run_dir)]) == 130
        assert "keeps nothing" in capsys.readouterr().err
    else:
        with pytest.raises(RuntimeError, match="a bug"):
            run(["train", *TINY, "--out", str(run_dir)])
    assert not run_dir.exists()
    given = tmp_path / "given"  # a folder that was there before keeps what else it holds
    given.mkdir()
    (given / "notes.txt").write_text("mine")
    calls["n"] = 0
    if what == "keyboard-interrupt":
        assert run(["train", *TINY, "--out", str(given)]) == 130
    else:
        with pytest.raises(RuntimeError):
            run(["train", *TINY, "--out", str(given)])
    assert [p.name for p in given.iterdir()] == ["notes.txt"]


def test_a_diverging_run_is_one_line_and_leaves_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["--optimizer", "sgd", "--kind", "relu", "--output", "linear", "--penalty", "none", "--lr", "10000"]
    code = run(["train", *TINY, *args, "--steps", "20", "--batch-size", "50", "--out", str(run_dir)])
    assert_one_line_error(code, capsys.readouterr().err, "diverged", "--lr")
    assert not run_dir.exists()


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
    assert _checkpoints(run_dir) == ["step-000000002", "step-000000004"]
    assert "kind" in torch.load(run_dir / "checkpoint" / "step-000000004" / "trainer.pt", weights_only=True)
    # 0.1 kept one checkpoint, its files directly in checkpoint/ (and the running rho_hat under "rho_hat").
    shutil.rmtree(run_dir / "checkpoint")
    (run_dir / "checkpoint").mkdir()
    torch.save({"step": 2, "rho_hat": torch.full((9,), 0.01), "optimizer": {}}, run_dir / "checkpoint" / "trainer.pt")
    (run_dir / "state.json").write_text(json.dumps({"steps_done": 2, "steps_total": 4, "finished": False}))
    capsys.readouterr()
    code = run(["train", "--resume", str(run_dir), "--steps", "6", "--no-progress"])
    assert_one_line_error(code, capsys.readouterr().err, str(run_dir / "checkpoint"), "saekit 0.1")


def test_resume_refuses_a_config_json_edited_since_the_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run(["train", *TINY, "--max-iter", "3", "--out", str(run_dir)]) == 0
    record = json.loads((run_dir / "config.json").read_text())
    record["config"]["model"]["rho"] = 0.05
    (run_dir / "config.json").write_text(json.dumps(record))
    capsys.readouterr()
    code = run(["train", "--resume", str(run_dir), "--max-iter", "5", "--no-progress"])
    assert_one_line_error(code, capsys.readouterr().err, "config.json differs", "rho (0.01 there, 0.05 now)")


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
