"""Sweeps: several dictionaries trained on the same batches in one pass. Each member is the run it
would have been alone, bit for bit; the sweep resumes as a whole; mistakes are one line."""

import json

import pytest
import safetensors.torch
import torch
from conftest import assert_one_line_error, run_cli

from saekit.run.sweep import parse_sweep

BASE = [
    "--preset",
    "topk",
    "--n-examples",
    "1200",
    "--synthetic-inputs",
    "16",
    "--synthetic-atoms",
    "32",
    "--synthetic-k",
    "3",
    "--n-hidden",
    "48",
    "--steps",
    "8",
    "--batch-size",
    "100",
    "--checkpoint-every",
    "3",
    "--log-every",
    "2",
    "--no-progress",
]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _weights(folder):
    return safetensors.torch.load_file(str(folder / "weights.safetensors"))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    assert run_cli(["train", *BASE, "--sweep", "k=2,4", "--sweep", "lr=0.001,0.003", "--out", str(out)]) == 0
    return out


def test_each_member_is_the_run_it_would_have_been_alone(sweep, tmp_path):
    for k, lr in ((2, 0.001), (4, 0.003)):
        alone = tmp_path / f"alone-{k}-{lr}"
        assert run_cli(["train", *BASE, "--k", str(k), "--lr", str(lr), "--out", str(alone)]) == 0
        assert _same(_weights(sweep / f"k={k},lr={lr}"), _weights(alone))


def test_the_sweep_folder_holds_every_member_a_summary_and_the_frontier(sweep):
    record = json.loads((sweep / "sweep.json").read_text())
    names = [m["folder"] for m in record["members"]]
    assert names == ["k=2,lr=0.001", "k=2,lr=0.003", "k=4,lr=0.001", "k=4,lr=0.003"]
    summary = json.loads((sweep / "summary.json").read_text())
    for row in summary:
        metrics = json.loads((sweep / row["member"] / "metrics.json").read_text())
        assert row["fvu"] == metrics["fvu"] and row["l0"] == metrics["l0"]
        config = json.loads((sweep / row["member"] / "config.json").read_text())["config"]
        assert (config["model"]["k"], config["optim"]["lr"]) == (row["k"], row["lr"])
    assert {row["l0"] for row in summary} == {2.0, 4.0}  # TopK's L0 is its k
    assert (sweep / "frontier.png").stat().st_size > 10_000
    assert json.loads((sweep / "state.json").read_text())["finished"]


def test_a_sweep_resumes_from_the_step_every_member_has(sweep, tmp_path):
    out = tmp_path / "again"
    assert run_cli(["train", *BASE, "--sweep", "k=2,4", "--sweep", "lr=0.001,0.003", "--out", str(out)]) == 0
    # As if killed while the members' checkpoints of step 8 were written: one member has it, the rest step 6.
    for member in ("k=2,lr=0.003", "k=4,lr=0.001", "k=4,lr=0.003"):
        import shutil

        shutil.rmtree(out / member / "checkpoint" / "step-000000008")
    assert run_cli(["train", "--resume", str(out), "--no-progress"]) == 0
    for member in ("k=2,lr=0.001", "k=4,lr=0.003"):
        assert _same(_weights(out / member), _weights(sweep / member))


def test_sweep_mistakes_are_one_line(capsys):
    for args, words in [
        (["--sweep", "batch_size=100,200"], ["--sweep batch-size", "share their data"]),
        (["--sweep", "k=2,four"], ["'four' is not a int"]),
        (["--sweep", "k"], ["is not NAME=V1,V2"]),
        (["--sweep", "k=2,4", "--optimizer", "lbfgs", "--kind", "topk"], ["trains with minibatches"]),
    ]:
        code = run_cli(["train", *BASE, *args, "--out", "bad"])
        assert_one_line_error(code, capsys.readouterr().err, *words)


def test_parse_sweep_types_each_value_by_its_setting():
    assert parse_sweep(["k=16,32", "lr=1e-3", "kind=topk,batchtopk", "normalize-decoder=true,false"]) == {
        "k": [16, 32],
        "lr": [0.001],
        "kind": ["topk", "batchtopk"],
        "normalize_decoder": [True, False],
    }
