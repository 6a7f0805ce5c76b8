"""Fault injection: whatever happens to a run (a kill at any write, a full or read-only disk, a
second Ctrl-C, SIGTERM, damaged checkpoint files), resuming gives the weights of an
uninterrupted run bit for bit, or refuses in one line; never exit status 0 with other weights.

Runs are real processes of `saekit train` (tests/fault_runner.py injects the fault). The kill
points are sampled (eight per file-system function: the first two, the last, and five between);
SAEKIT_FAULTS_FULL=1 tries every one.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

pytestmark = pytest.mark.slow

RUNNER = Path(__file__).with_name("fault_runner.py")
REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "--preset",
    "topk",
    "--n-examples",
    "400",
    "--synthetic-inputs",
    "16",
    "--synthetic-atoms",
    "32",
    "--synthetic-k",
    "3",
    "--n-hidden",
    "48",
    "--k",
    "3",
    "--steps",
    "12",
    "--batch-size",
    "25",
    "--checkpoint-every",
    "3",
    "--log-every",
    "2",
    "--no-progress",
]
# Long enough for signals to land during training: checkpoints every 10 of 400 steps.
LONG = [
    "--preset",
    "topk",
    "--n-examples",
    "4000",
    "--n-hidden",
    "256",
    "--k",
    "8",
    "--steps",
    "400",
    "--batch-size",
    "128",
    "--checkpoint-every",
    "10",
    "--log-every",
    "10",
    "--no-progress",
]
FULL = os.environ.get("SAEKIT_FAULTS_FULL") == "1"


def saekit(cwd: Path, *args: str, fault=("none", "os.fsync", "0"), timeout=300) -> subprocess.CompletedProcess:
    """`saekit ARGS` as a process, with a fault injected (see tests/fault_runner.py)."""
    command = [sys.executable, str(RUNNER), *fault, "--", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def start(cwd: Path, *args: str) -> subprocess.Popen:
    command = [sys.executable, str(RUNNER), "none", "os.fsync", "0", "--", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def one_line_error(result: subprocess.CompletedProcess, *words: str) -> bool:
    lines = result.stderr.strip().splitlines()
    ok = result.returncode == 2 and len(lines) == 1 and lines[0].startswith("saekit: error:")
    return ok and "Traceback" not in result.stderr and all(w in lines[0] for w in words)


def weights(run_dir: Path) -> dict:
    return safetensors.torch.load_file(str(run_dir / "weights.safetensors"))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def leftovers(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob(".*.tmp")] if run_dir.exists() else []


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """An uninterrupted SMALL run: its weights, and how many times each file-system function was called."""
    cwd = tmp_path_factory.mktemp("reference")

    def count(function: str) -> int:
        result = saekit(cwd, "train", *SMALL, "--out", f"run-{function}", fault=("count", function, "0"))
        assert result.returncode == 0, result.stderr
        return int(result.stderr.split("FAULT-COUNT")[-1])

    functions = ("os.fsync", "os.replace", "os.rename", "os.open")
    with ThreadPoolExecutor(2) as pool:
        calls = dict(zip(functions, pool.map(count, functions)))
    return {"weights": weights(cwd / "run-os.fsync"), "calls": calls}


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("long")
    result = saekit(cwd, "train", *LONG, "--out", "run")
    assert result.returncode == 0, result.stderr
    return weights(cwd / "run")


def resume_outcome(cwd: Path, run: str, reference: dict) -> str:
    """Resume (as often as it stops) and classify the result; fail on rc 0 with other weights or a traceback."""
    result = saekit(cwd, "train", "--resume", run, "--no-progress")
    assert "Traceback" not in result.stderr, result.stderr
    if result.returncode == 2:
        assert one_line_error(result), result.stderr
        return "refused"
    assert result.returncode == 0, result.stderr
    assert same_weights(weights(cwd / run), reference), "resumed to other weights"
    assert json.loads((cwd / run / "state.json").read_text())["finished"]
    assert not leftovers(cwd / run), leftovers(cwd / run)
    return "identical"


def kill_points(total: int) -> list[int]:
    return list(range(1, total + 1)) if FULL else sorted({1, 2, total, *range(3, total, max(1, total // 5))})


@pytest.mark.parametrize("function", ["os.fsync", "os.replace", "os.rename"])
def test_a_kill_at_any_write_resumes_identically_or_refuses(function, small, tmp_path):
    def kill_and_resume(n: int) -> str | None:
        run = f"run-{n}"
        killed = saekit(tmp_path, "train", *SMALL, "--out", run, fault=("kill", function, str(n)))
        assert killed.returncode == -signal.SIGKILL
        if not (tmp_path / run / "config.json").exists():  # killed before the run existed: nothing to resume
            assert one_line_error(saekit(tmp_path, "train", "--resume", run), "not a saekit run folder")
            return None
        return resume_outcome(tmp_path, run, small["weights"])

    # Two kill points at a time, each in its own folder: the processes mostly start Python and import.
    with ThreadPoolExecutor(2) as pool:
        outcomes = [outcome for outcome in pool.map(kill_and_resume, kill_points(small["calls"][function])) if outcome]
    print(f"{function}: {len(outcomes)} kills, outcomes {sorted(set(outcomes))}")
    assert outcomes and set(outcomes) == {"identical"}  # every killed run could be resumed


def test_a_full_disk_is_one_line_leaves_nothing_half_written_and_resumes(small, tmp_path):
    for n in kill_points(small["calls"]["os.fsync"])[1::3]:
        run = f"run-{n}"
        full = saekit(tmp_path, "train", *SMALL, "--out", run, fault=("enospc", "os.fsync", str(n)))
        if full.returncode == 0:  # only a folder's flush failed, after every file was written: nothing is lost
            assert same_weights(weights(tmp_path / run), small["weights"])
            continue
        assert one_line_error(full, "no space left"), full.stderr
        assert not leftovers(tmp_path / run), leftovers(tmp_path / run)
        if (tmp_path / run / "config.json").exists():
            assert resume_outcome(tmp_path, run, small["weights"]) == "identical"


def test_a_read_only_folder_is_one_line_for_every_command_that_writes(small, tmp_path):
    erofs = ("erofs", "os.open", "1")  # the first file any command creates, and every one after
    result = saekit(tmp_path, "train", *SMALL, "--out", "run", fault=erofs)
    assert one_line_error(result, "read-only"), result.stderr
    assert saekit(tmp_path, "train", *SMALL, "--out", "run").returncode == 0
    import numpy as np

    np.save(tmp_path / "rows.npy", np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32))
    for args in (
        ["eval", "run", "--data", "rows.npy"],
        ["export", "run", "--out", "sae"],
        ["train", "--resume", "run", "--steps", "15", "--no-progress"],
    ):
        result = saekit(tmp_path, *args, fault=erofs)
        assert one_line_error(result, "read-only"), (args, result.stderr)
    assert saekit(tmp_path, "export", "run", "--out", "sae").returncode == 0
    result = saekit(tmp_path, "import", "sae", "--out", "imported", fault=erofs)
    assert one_line_error(result, "read-only"), result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_folder_without_write_permission_is_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    result = saekit(tmp_path, "train", *SMALL, "--out", str(locked / "run"))
    assert one_line_error(result, "permission denied"), result.stderr


@pytest.mark.parametrize("name", ["model.safetensors", "trainer.pt", "history.csv", "manifest.json"])
def test_flipped_bytes_in_the_newest_checkpoint_fall_back_to_the_one_before(name, small, tmp_path):
    assert saekit(tmp_path, "train", *SMALL, "--out", "run").returncode == 0
    newest = tmp_path / "run" / "checkpoint" / "step-000000012"
    data = bytearray((newest / name).read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i % len(data)] ^= 0xFF
    (newest / name).write_bytes(bytes(data))
    result = saekit(tmp_path, "train", "--resume", "run", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "step-000000012" in result.stderr and "resuming from the checkpoint of step 9" in result.stderr
    assert same_weights(weights(tmp_path / "run"), small["weights"])


def test_a_damaged_only_checkpoint_is_a_one_line_refusal(tmp_path):
    assert saekit(tmp_path, "train", *SMALL, "--keep-checkpoints", "1", "--out", "run").returncode == 0
    (unit,) = (tmp_path / "run" / "checkpoint").iterdir()
    (unit / "trainer.pt").write_bytes(b"not a checkpoint")
    result = saekit(tmp_path, "train", "--resume", "run", "--no-progress")
    assert one_line_error(result, "trainer.pt", "does not match its checksum"), result.stderr


@pytest.mark.parametrize("delay", [0.0, 0.03, 0.09])
def test_a_second_ctrl_c_at_any_moment_still_stops_at_a_whole_step(delay, long_reference, tmp_path):
    process = start(tmp_path, "train", *LONG, "--out", "run")
    _wait_for_a_checkpoint(tmp_path / "run")
    process.send_signal(signal.SIGINT)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err, err
    assert "continue with: saekit train --resume" in err
    assert resume_outcome(tmp_path, "run", long_reference) == "identical"


def test_sigterm_stops_like_ctrl_c(long_reference, tmp_path):
    process = start(tmp_path, "train", *LONG, "--out", "run")
    _wait_for_a_checkpoint(tmp_path / "run")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err, err
    assert resume_outcome(tmp_path, "run", long_reference) == "identical"


def test_kills_at_random_moments_resume_identically(long_reference, tmp_path):
    rng = random.Random(0)
    for trial in range(2):
        run = f"run-{trial}"
        process = start(tmp_path, "train", *LONG, "--out", run)
        _wait_for_a_checkpoint(tmp_path / run)
        time.sleep(rng.uniform(0.0, 1.5))
        process.kill()
        process.communicate(timeout=60)
        assert resume_outcome(tmp_path, run, long_reference) == "identical"


def test_ctrl_c_while_the_results_are_written_leaves_a_run_that_resume_finishes(small, tmp_path):
    result = saekit(
        tmp_path, "train", *SMALL, "--out", "run", fault=("sigint", "saekit.run.train:evaluate_stream", "1")
    )
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
    assert "while writing the results" in result.stderr
    assert not json.loads((tmp_path / "run" / "state.json").read_text())["finished"]
    assert resume_outcome(tmp_path, "run", small["weights"]) == "identical"
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_a_history_cut_mid_line_resumes(small, tmp_path):
    assert saekit(tmp_path, "train", *SMALL, "--out", "run").returncode == 0
    history = tmp_path / "run" / "history.csv"
    history.write_text(history.read_text()[:-7])
    assert resume_outcome(tmp_path, "run", small["weights"]) == "identical"
    rows = history.read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [2, 4, 6, 8, 10, 12]


def test_divergence_stops_the_run_in_one_line_keeping_the_last_checkpoint(tmp_path):
    args = [*SMALL, "--checkpoint-every", "1"]
    diverging = saekit(tmp_path, "train", *args, "--lr", "1e6", "--out", "run")
    assert one_line_error(diverging, "diverged at step", "--lr"), diverging.stderr
    checkpoints = sorted((tmp_path / "run" / "checkpoint").iterdir())
    assert checkpoints  # the steps before the divergence were kept, and hold finite weights
    newest = safetensors.torch.load_file(str(checkpoints[-1] / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in newest.values())
    again = saekit(tmp_path, "train", "--resume", "run", "--no-progress")
    assert one_line_error(again, "diverged at step")  # the same settings diverge again, and say so


def test_a_run_that_fails_before_training_leaves_no_folder(tmp_path):
    import numpy as np

    rows = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    rows[7, 3] = np.nan
    np.save(tmp_path / "nan.npy", rows)
    failed = saekit(
        tmp_path, "train", "--preset", "topk", "--data", "nan.npy", "--steps", "3", "--batch-size", "50", "--out", "run"
    )
    assert one_line_error(failed, "nan.npy", "row 7"), failed.stderr
    assert not (tmp_path / "run").exists()


def test_resume_refuses_settings_that_differ_and_applies_those_that_may_change(small, tmp_path):
    assert saekit(tmp_path, "train", *SMALL, "--out", "run").returncode == 0
    refused = saekit(tmp_path, "train", "--resume", "run", "--n-hidden", "64", "--k", "4")
    assert one_line_error(refused, "n_hidden (48 in the run, 64 given)", "k (3 in the run, 4 given)")
    same = saekit(tmp_path, "train", "--resume", "run", "--n-hidden", "48", "--no-progress")
    assert same.returncode == 0, same.stderr  # a setting given again with the run's own value is fine
    longer = saekit(tmp_path, "train", "--resume", "run", "--steps", "15", "--no-progress")
    assert longer.returncode == 0, longer.stderr
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["config"]["optim"]["steps"] == 15 and record["resumed"][-1]["changes"] == {"steps": 15}
    record["config"]["model"]["n_hidden"] = 64  # edited by hand since the checkpoint
    (tmp_path / "run" / "config.json").write_text(json.dumps(record))
    edited = saekit(tmp_path, "train", "--resume", "run", "--no-progress")
    assert one_line_error(edited, "config.json differs from the checkpoint", "n_hidden (48 there, 64 now)")


def test_file_system_and_input_mistakes_are_one_line(small, tmp_path):
    (tmp_path / "a-file").write_text("")
    for args, words in [
        (["train", *SMALL, "--out", "a-file/run"], ["a file stands where a folder should be"]),
        (["train", *SMALL, "--seed", "-1"], ["--seed"]),
        (["train", *SMALL, "--seed", str(2**64)], ["--seed"]),
        (["train", *SMALL, "--beta", "inf", "--kind", "relu"], ["--beta must be finite"]),
        (["train", *SMALL, "--lr", "inf"], ["--lr"]),
        (["train", *SMALL, "--jumprelu-threshold", "inf", "--kind", "jumprelu"], ["--jumprelu-threshold"]),
        (["train", "--preset", "topk", "--n-hidden", "10000000", "--k", "8"], ["GiB", "--n-hidden"]),
    ]:
        result = saekit(tmp_path, *args)
        assert one_line_error(result, *words), (args, result.stderr)


def test_eval_refuses_nan_data_and_nan_weights_and_survives_a_closed_pipe(small, tmp_path):
    import numpy as np

    assert saekit(tmp_path, "train", *SMALL, "--out", "run").returncode == 0
    rows = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    np.save(tmp_path / "rows.npy", rows)
    rows[3, 0] = np.inf
    np.save(tmp_path / "bad.npy", rows)
    assert one_line_error(saekit(tmp_path, "eval", "run", "--data", "bad.npy"), "bad.npy", "row 3")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    piped = subprocess.run(
        f"{sys.executable} -m saekit.cli eval run --data rows.npy | head -1",
        shell=True,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert piped.stdout.count("\n") == 1 and "Traceback" not in piped.stderr and piped.stderr == "", piped.stderr
    w = weights(tmp_path / "run")
    with safetensors.safe_open(str(tmp_path / "run" / "weights.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    w["W1"][0, 0] = float("nan")
    safetensors.torch.save_file(w, str(tmp_path / "run" / "weights.safetensors"), metadata=metadata)
    for args in (["eval", "run", "--data", "rows.npy"], ["export", "run", "--out", "sae"]):
        assert one_line_error(saekit(tmp_path, *args), "NaN or infinite"), args


def _wait_for_a_checkpoint(run_dir: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "checkpoint").is_dir() and any((run_dir / "checkpoint").glob("step-*")):
            return
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint appeared in {run_dir}")
