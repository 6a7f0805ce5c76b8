"""Data-parallel training for real: `torchrun --nproc-per-node 2` (gloo, CPU) against one process with
the same global batch. Two processes must follow the single process's path: same weights (to rounding),
same BatchTopK threshold, dead-unit counters, running rho_hat and history (read back through
saekit.run.RunFolder), also when a one-process run is resumed by two."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from saekit.cli import main
from saekit.run import RunFolder
from saekit.run.train import _fixed_settings

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120
pytestmark = pytest.mark.slow  # every test here waits for torchrun's two processes

BATCHTOPK = [
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
    "--aux-k",
    "8",
    "--dead-after",
    "100",
    "--normalize-decoder",
    "--pre-bias",
    "--scale-inputs",
    "--decoder-bias-init",
    "mean",
]  # (BatchTopK takes no penalty on its codes any more)
SIGMOID_KL = [
    "--kind",
    "sigmoid",
    "--output",
    "sigmoid",
    "--penalty",
    "kl",
    "--rho",
    "0.05",
    "--beta",
    "3",
    "--n-hidden",
    "24",
    "--rho-momentum",
    "0.8",
]
COMMON = [
    "--optimizer",
    "adam",
    "--lr",
    "0.01",
    "--steps",
    "10",
    "--dtype",
    "float64",
    "--log-every",
    "5",
    "--no-progress",
]


def _torchrun():
    found = shutil.which("torchrun")
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_two_processes(args, cwd):
    python_path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=python_path)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [
        *_torchrun(),
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "saekit.cli",
        "train",
        *args,
    ]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _train_one_process(args):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", *args]) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batchtopk_runs(tmp_path_factory):
    """BatchTopK with AuxK, decoder normalisation, input scale: 2 x 50 examples a step, and 1 x 100."""
    root = tmp_path_factory.mktemp("distributed-batchtopk")
    done = _train_two_processes([*BATCHTOPK, *COMMON, "--batch-size", "50", "--out", str(root / "two")], root)
    assert "2 processes" in done.stdout
    _train_one_process([*BATCHTOPK, *COMMON, "--batch-size", "100", "--out", str(root / "one")])
    return root


@pytest.fixture(scope="module")
def sigmoid_kl_runs(tmp_path_factory):
    """UFLDL's sigmoid/KL autoencoder with a running rho_hat, streamed from a .npy file."""
    root = tmp_path_factory.mktemp("distributed-kl")
    data = 0.1 + 0.8 * np.random.default_rng(0).random((300, 12))
    np.save(root / "x.npy", data)
    args = [*SIGMOID_KL, *COMMON, "--data", str(root / "x.npy")]
    _train_two_processes([*args, "--batch-size", "50", "--out", str(root / "two")], root)
    _train_one_process([*args, "--batch-size", "100", "--out", str(root / "one")])
    return root


LAST_CHECKPOINT = "checkpoint/step-000000010"  # --steps 10: the one checkpoint, at the end


def _trainer_state(run_dir) -> dict:
    """The trainer's state in the run's last checkpoint."""
    folder = RunFolder.open(run_dir)
    checkpoint = folder.load_checkpoint(_fixed_settings(folder.load_config()))
    assert checkpoint.step == 10 and checkpoint.skipped == []
    return checkpoint.trainer_state


def _assert_close_weights(root, name="weights.safetensors"):
    one = safetensors.torch.load_file(root / "one" / name)
    two = safetensors.torch.load_file(root / "two" / name)
    assert one.keys() == two.keys()
    for key in one:
        assert one[key].dtype == two[key].dtype and one[key].shape == two[key].shape, key
        assert float((one[key].double() - two[key].double()).abs().max()) < 1e-10, key
    return one, two


def test_two_processes_train_batchtopk_like_one(batchtopk_runs):
    one, two = _assert_close_weights(batchtopk_runs)
    _assert_close_weights(batchtopk_runs, f"{LAST_CHECKPOINT}/model.safetensors")
    for name in ("one", "two"):  # the first process alone wrote the folder: one checkpoint, no leftovers
        run_dir = batchtopk_runs / name
        assert [p.name for p in (run_dir / "checkpoint").iterdir()] == ["step-000000010"], name
        assert not list(run_dir.rglob("*.tmp")), name
        state = json.loads((run_dir / "state.json").read_text())
        assert state == {"steps_done": 10, "steps_total": 10, "finished": True}, name
        assert (run_dir / "density.png").is_file(), name
    initial = safetensors.torch.load_file(batchtopk_runs / "one" / "initial.safetensors")
    assert float((one["W1"] - initial["W1"]).abs().max()) > 1e-3  # it trained
    assert float(one["batch_topk.threshold"]) > 0  # the threshold was estimated over the global batch
    state_one, state_two = (_trainer_state(batchtopk_runs / name) for name in ("one", "two"))
    assert state_one["step"] == state_two["step"] == 10
    assert state_one["scale"] == pytest.approx(state_two["scale"], rel=1e-15)
    assert torch.equal(state_one["since_fired"], state_two["since_fired"])
    assert int(state_one["since_fired"].max()) >= 100  # some units were dead, so AuxK was at work
    metrics_one, metrics_two = (
        json.loads((batchtopk_runs / name / "metrics.json").read_text()) for name in ("one", "two")
    )
    assert metrics_one == pytest.approx(metrics_two, rel=1e-9, abs=1e-12)


def test_two_processes_train_sigmoid_kl_like_one(sigmoid_kl_runs):
    _assert_close_weights(sigmoid_kl_runs)
    state_one, state_two = (_trainer_state(sigmoid_kl_runs / name) for name in ("one", "two"))
    rho_hat_one, rho_hat_two = state_one["kind"]["rho_hat"], state_two["kind"]["rho_hat"]
    assert torch.allclose(rho_hat_one, rho_hat_two, rtol=1e-12, atol=0)
    assert 0 < float(rho_hat_one.mean()) < 1


def _history_without_timing(run_dir):
    return [
        {k: v for k, v in row.items() if k not in ("seconds", "examples_per_s")}
        for row in RunFolder(run_dir).load_history()
    ]


@pytest.mark.parametrize("which", ["batchtopk", "sigmoid-kl"])
def test_two_processes_log_the_same_costs_as_one(batchtopk_runs, sigmoid_kl_runs, which):
    root = batchtopk_runs if which == "batchtopk" else sigmoid_kl_runs
    one, two = _history_without_timing(root / "one"), _history_without_timing(root / "two")
    assert [row["step"] for row in one] == [row["step"] for row in two] == [5, 10]
    for a, b in zip(one, two):
        for key in a:
            if key != "fvu":  # fvu: see the test below
                assert a[key] == pytest.approx(b[key], rel=1e-10, abs=1e-14), key


def test_two_processes_log_the_same_fvu_as_one(batchtopk_runs):
    one, two = _history_without_timing(batchtopk_runs / "one"), _history_without_timing(batchtopk_runs / "two")
    for a, b in zip(one, two):
        assert a["fvu"] == pytest.approx(b["fvu"], rel=1e-10)


def test_a_one_process_run_resumed_by_two_processes_trains_like_one(batchtopk_runs, tmp_path):
    """--resume with the global batch split over two processes (--batch-size 50 instead of 100): from
    the one-process checkpoint, the two processes go on as one process does."""
    for name in ("alone", "split"):
        shutil.copytree(batchtopk_runs / "one", tmp_path / name)
    _train_one_process(["--resume", str(tmp_path / "alone"), "--steps", "14", "--no-progress"])
    resume = ["--resume", str(tmp_path / "split"), "--batch-size", "50", "--steps", "14", "--no-progress"]
    done = _train_two_processes(resume, tmp_path)
    assert "4 of 14 steps to go, 2 processes" in done.stdout
    for name in ("weights.safetensors", "checkpoint/step-000000014/model.safetensors"):
        alone = safetensors.torch.load_file(tmp_path / "alone" / name)
        split = safetensors.torch.load_file(tmp_path / "split" / name)
        assert alone.keys() == split.keys()
        for key in alone:
            assert float((alone[key] - split[key]).abs().max()) < 1e-10, (name, key)
    record = json.loads((tmp_path / "split" / "config.json").read_text())
    assert [entry["changes"] for entry in record["resumed"]] == [{"steps": 14, "batch_size": 50}]
    alone, split = _history_without_timing(tmp_path / "alone"), _history_without_timing(tmp_path / "split")
    assert [row["step"] for row in alone] == [row["step"] for row in split] == [5, 10, 14]
    for a, b in zip(alone, split):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12)
