"""saekit.run.folder.RunFolder and saekit.files: atomic writes, the weights file, the config,
history and checkpoint of a run folder."""

import json

import pytest
import safetensors
import safetensors.torch
import torch
from conftest import make_model

from saekit.config import TrainConfig
from saekit.errors import UserError
from saekit.files import atomic_write, read_json, write_json
from saekit.run import RunFolder, load_model


def test_atomic_write_replaces_content_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "file.bin"
    atomic_write(path, b"first")
    atomic_write(path, b"second")
    assert path.read_bytes() == b"second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.bin"]


def test_atomic_write_that_fails_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "file.bin"
    atomic_write(path, b"old")
    with pytest.raises(TypeError):
        atomic_write(path, "not bytes")  # fails inside the write
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_write_and_read_json(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1.5, "y": [1, 2]})
    assert read_json(tmp_path / "a.json") == {"x": 1.5, "y": [1, 2]}
    folder = RunFolder(tmp_path)
    folder.write_json("b.json", [3, 4])
    assert folder.read_json("b.json") == [3, 4] == json.loads((tmp_path / "b.json").read_text())
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        read_json(tmp_path / "bad.json")
    with pytest.raises(UserError, match="missing"):
        read_json(tmp_path / "none.json")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_save_and_load_model_round_trip(tmp_path, dtype):
    model = make_model(7, 3, "relu", "linear", dtype=dtype, seed=4)
    with torch.no_grad():
        model.b1.copy_(torch.tensor([0.5, -1.0, 2.0]))
        model.b2.normal_(generator=torch.Generator().manual_seed(0))
    RunFolder(tmp_path).save_model(model)
    loaded = RunFolder(tmp_path).load_model()
    assert (loaded.n_inputs, loaded.n_hidden, loaded.kind, loaded.cfg.output) == (7, 3, "relu", "linear")
    assert loaded.cfg == model.cfg
    for name in ("W1", "b1", "W2", "b2"):
        a, b = getattr(model, name), getattr(loaded, name)
        assert b.dtype == dtype and b.shape == a.shape
        assert torch.equal(a, b)
    assert loaded.W2.t().is_contiguous()  # the layout survives loading
    # The file is plain safetensors, readable without saekit.
    tensors = safetensors.torch.load_file(str(tmp_path / "weights.safetensors"))
    assert torch.equal(tensors["W2"], model.W2.detach())
    # The metadata and cfg.json hold the architecture: n_inputs, the kind and all its settings.
    with safetensors.safe_open(str(tmp_path / "weights.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    expected = {
        "n_inputs": 7,
        "kind": "relu",
        "n_hidden": 3,
        "output": "linear",
        "pre_bias": False,
        "tied_init": False,
        "weight_decay": 0.0,
        "penalty": "l1-decoder",
        "beta": 0.05,
    }
    assert metadata["format"] == "saekit-2"
    assert json.loads(metadata["architecture"]) == expected
    assert json.loads((tmp_path / "cfg.json").read_text()) == expected
    assert torch.equal(load_model(tmp_path).W1, model.W1)  # the module-level helper


def test_every_kind_round_trips_with_its_settings(tmp_path):
    for kind, settings in [
        ("sigmoid", dict(penalty="l1", beta=0.2)),
        ("topk", dict(k=3, aux_k=2)),
        ("batchtopk", dict(k=2)),
        ("jumprelu", dict(jumprelu_threshold=0.2, beta=0.1)),
    ]:
        model = make_model(6, 5, kind, "linear", seed=1, pre_bias=True, **settings)
        folder = RunFolder(tmp_path / kind)
        folder.save_model(model)
        loaded = folder.load_model()
        assert type(loaded) is type(model) and loaded.cfg == model.cfg, kind
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), (kind, name)


def test_weights_of_saekit_0_1_still_load(tmp_path):
    """0.1 named the kind "activation" and saved only the settings that shaped the model."""
    model = make_model(5, 4, "topk", "linear", seed=2, k=2, pre_bias=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    arch = {"n_inputs": 5, "n_hidden": 4, "activation": "topk", "output": "linear", "pre_bias": True, "k": 2}
    safetensors.torch.save_file(
        tensors,
        str(tmp_path / "weights.safetensors"),
        metadata={"architecture": json.dumps(arch), "format": "saekit-1"},
    )
    loaded = RunFolder(tmp_path).load_model()
    assert (loaded.kind, loaded.cfg.k, loaded.cfg.pre_bias, loaded.cfg.output) == ("topk", 2, True, "linear")
    assert torch.equal(loaded.W1, model.W1) and torch.equal(loaded.b2, model.b2)


def test_corrupt_weights_file_is_a_user_error(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"\x00garbage" * 20)
    with pytest.raises(UserError, match="corrupt"):
        RunFolder(tmp_path).load_model()


def test_weights_without_saekit_metadata_is_a_user_error(tmp_path):
    safetensors.torch.save_file({"W1": torch.zeros(2, 2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(UserError, match="not a saekit weights file"):
        RunFolder(tmp_path).load_model()


def test_weights_with_wrong_shapes_give_a_one_line_user_error(tmp_path):
    RunFolder(tmp_path).save_model(make_model(3, 2))
    path = str(tmp_path / "weights.safetensors")
    with safetensors.safe_open(path, framework="pt") as f:  # keep saekit's own metadata, break one shape
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    tensors["W1"] = torch.zeros(2, 2)
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    with pytest.raises(UserError) as error:
        RunFolder(tmp_path).load_model()
    assert "\n" not in str(error.value)


def test_missing_weights_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="missing"):
        RunFolder(tmp_path).load_model()


def test_config_round_trip_and_missing_config(tmp_path):
    cfg = TrainConfig.from_flat({"n_hidden": 7, "rho": 0.05, "optimizer": "adam"})
    RunFolder(tmp_path).save_config(cfg, "ufldl-patches", ["saekit", "train"])
    record = json.loads((tmp_path / "config.json").read_text())
    assert record["preset"] == "ufldl-patches" and record["command"] == ["saekit", "train"]
    assert {"saekit", "torch", "numpy", "scipy", "python"} <= set(record["versions"])
    assert record["config"] == cfg.to_dict() and record["config"]["model"]["rho"] == 0.05
    assert RunFolder.open(tmp_path).load_config() == cfg
    with pytest.raises(UserError, match="not a saekit run folder"):
        RunFolder.open(tmp_path / "nowhere")
    with pytest.raises(UserError, match="missing"):
        RunFolder(tmp_path / "nowhere").load_config()


def test_a_config_json_without_settings_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"preset": "ufldl-patches"}))
    with pytest.raises(UserError, match="holds no settings"):
        RunFolder.open(tmp_path).load_config()


def test_create_refuses_a_folder_holding_a_run(tmp_path):
    run = RunFolder.create(str(tmp_path / "run"), "x")
    assert run.path.is_dir() and run.path == tmp_path / "run"
    run.save_config(TrainConfig(), "ufldl-patches")
    with pytest.raises(UserError, match="--resume"):
        RunFolder.create(str(run.path), "x")


def test_create_without_out_names_the_folder_after_the_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = RunFolder.create(None, "topk")
    assert str(run.path.parent) == "runs" and run.path.name.startswith("topk-")
    assert (tmp_path / run.path).is_dir()


def test_history_round_trip(tmp_path):
    rows = [{"step": i, "cost": 1.0 / (i + 3), "sparsity": 0.1 * i, "seconds": 0.001 * i} for i in range(1, 6)]
    RunFolder(tmp_path).save_history(rows)
    loaded = RunFolder(tmp_path).load_history()
    assert loaded == rows  # exact: floats are written in full precision
    assert all(isinstance(row["step"], int) for row in loaded)


def test_empty_or_missing_history(tmp_path):
    assert RunFolder(tmp_path).load_history() == []
    RunFolder(tmp_path).save_history([])
    assert RunFolder(tmp_path).load_history() == []


def test_checkpoint_round_trip(tmp_path):
    model = make_model(6, 4, "topk", "linear", dtype=torch.float32, seed=3, k=2)
    state = {"step": 12, "kind": {"seen": torch.arange(4)}, "optimizer": {"lr": 0.5}}
    history = [{"step": 10, "cost": 0.25}]
    folder = RunFolder(tmp_path)
    folder.save_checkpoint(model, state, history)
    loaded, got_state, got_history = folder.load_checkpoint()
    assert loaded.cfg == model.cfg and loaded.W1.dtype == torch.float32
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert got_state["step"] == 12 and got_state["optimizer"] == {"lr": 0.5}
    assert torch.equal(got_state["kind"]["seen"], torch.arange(4))
    assert got_history == history
    assert not list(tmp_path.rglob("*.tmp"))


def test_missing_corrupt_or_0_1_checkpoints_are_one_line_user_errors(tmp_path):
    folder = RunFolder(tmp_path)
    with pytest.raises(UserError, match="before its first checkpoint"):
        folder.load_checkpoint()
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "trainer.pt").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="corrupt"):
        folder.load_checkpoint()
    # saekit 0.1 kept the running rho_hat as "rho_hat", not the kind's state as "kind".
    torch.save({"step": 5, "rho_hat": torch.full((4,), 0.01), "optimizer": {}}, tmp_path / "checkpoint" / "trainer.pt")
    with pytest.raises(UserError) as error:
        folder.load_checkpoint()
    assert "earlier saekit" in str(error.value) and "\n" not in str(error.value)


def test_layers_are_saved_and_loaded_in_order(tmp_path):
    first, second, third = make_model(8, 5, seed=1), make_model(5, 3, seed=2), make_model(3, 2, seed=3)
    folder = RunFolder(tmp_path)
    folder.save_model(first)
    paths = folder.save_layers([second, third])
    assert [p.name for p in paths] == ["layer2.safetensors", "layer3.safetensors"]
    layers = folder.load_layers()
    assert [(sae.n_inputs, sae.n_hidden) for sae in layers] == [(8, 5), (5, 3), (3, 2)]
    for got, expected in zip(layers, (first, second, third)):
        assert torch.equal(got.W1, expected.W1)
