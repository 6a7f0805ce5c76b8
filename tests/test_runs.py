"""saekit.runs: atomic writes, the weights file, the config and history of a run folder."""

import json

import pytest
import safetensors
import safetensors.torch
import torch

from saekit import runs
from saekit.config import TrainConfig
from saekit.errors import UserError
from saekit.model import SparseAutoencoder


def test_atomic_write_replaces_content_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "file.bin"
    runs.atomic_write(path, b"first")
    runs.atomic_write(path, b"second")
    assert path.read_bytes() == b"second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.bin"]


def test_atomic_write_that_fails_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "file.bin"
    runs.atomic_write(path, b"old")
    with pytest.raises(TypeError):
        runs.atomic_write(path, "not bytes")  # fails inside the write
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_write_and_read_json(tmp_path):
    runs.write_json(tmp_path / "a.json", {"x": 1.5, "y": [1, 2]})
    assert runs.read_json(tmp_path / "a.json") == {"x": 1.5, "y": [1, 2]}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        runs.read_json(tmp_path / "bad.json")
    with pytest.raises(UserError, match="missing"):
        runs.read_json(tmp_path / "none.json")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_save_and_load_model_round_trip(tmp_path, dtype):
    model = SparseAutoencoder(7, 3, activation="relu", output="linear", dtype=dtype, seed=4)
    with torch.no_grad():
        model.b1.copy_(torch.tensor([0.5, -1.0, 2.0]))
        model.b2.normal_(generator=torch.Generator().manual_seed(0))
    runs.save_model(tmp_path, model)
    loaded = runs.load_model(tmp_path)
    assert (loaded.n_inputs, loaded.n_hidden, loaded.activation, loaded.output) == (7, 3, "relu", "linear")
    for name in ("W1", "b1", "W2", "b2"):
        a, b = getattr(model, name), getattr(loaded, name)
        assert b.dtype == dtype and b.shape == a.shape
        assert torch.equal(a, b)
    assert loaded.W2.t().is_contiguous()  # the layout survives loading
    # The file is plain safetensors, readable without saekit.
    tensors = safetensors.torch.load_file(str(tmp_path / "weights.safetensors"))
    assert torch.equal(tensors["W2"], model.W2.detach())


def test_corrupt_weights_file_is_a_user_error(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"\x00garbage" * 20)
    with pytest.raises(UserError, match="corrupt"):
        runs.load_model(tmp_path)


def test_weights_without_saekit_metadata_is_a_user_error(tmp_path):
    safetensors.torch.save_file({"W1": torch.zeros(2, 2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(UserError, match="not a saekit weights file"):
        runs.load_model(tmp_path)


def test_weights_with_wrong_shapes_give_a_one_line_user_error(tmp_path):
    runs.save_model(tmp_path, SparseAutoencoder(3, 2))
    path = str(tmp_path / "weights.safetensors")
    with safetensors.safe_open(path, framework="pt") as f:  # keep saekit's own metadata, break one shape
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["W1"] = torch.zeros(2, 2)
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    with pytest.raises(UserError) as error:
        runs.load_model(tmp_path)
    assert "\n" not in str(error.value)


def test_missing_weights_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="missing"):
        runs.load_model(tmp_path)


def test_config_round_trip_and_missing_config(tmp_path):
    cfg = TrainConfig(n_hidden=7, rho=0.05, optimizer="adam")
    runs.save_config(tmp_path, cfg, "ufldl-patches")
    record = json.loads((tmp_path / "config.json").read_text())
    assert record["preset"] == "ufldl-patches"
    assert {"saekit", "torch", "numpy", "scipy", "python"} <= set(record["versions"])
    assert runs.load_config(tmp_path) == cfg
    with pytest.raises(UserError):
        runs.load_config(tmp_path / "nowhere")


def test_new_run_dir_refuses_a_folder_holding_a_run(tmp_path):
    run = runs.new_run_dir(str(tmp_path / "run"), "x")
    assert run.is_dir()
    runs.save_config(run, TrainConfig(), "ufldl-patches")
    with pytest.raises(UserError, match="--resume"):
        runs.new_run_dir(str(run), "x")


def test_history_round_trip(tmp_path):
    rows = [{"step": i, "cost": 1.0 / (i + 3), "sparsity": 0.1 * i, "seconds": 0.001 * i} for i in range(1, 6)]
    runs.save_history(tmp_path, rows)
    loaded = runs.load_history(tmp_path)
    assert loaded == rows  # exact: floats are written in full precision
    assert all(isinstance(row["step"], int) for row in loaded)


def test_empty_or_missing_history(tmp_path):
    assert runs.load_history(tmp_path) == []
    runs.save_history(tmp_path, [])
    assert runs.load_history(tmp_path) == []
