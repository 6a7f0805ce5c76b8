"""saekit.run.folder.RunFolder and saekit.files: atomic writes and units, the weights file, the
config, the appended history, and the checkpoints of a run folder (kept newest first, a damaged one
skipped for the one before, settings compared, leftovers of killed writes removed)."""

import hashlib
import json

import pytest
import safetensors
import safetensors.torch
import torch
from conftest import make_model

from saekit.config import TrainConfig
from saekit.errors import UserError
from saekit.files import DamagedUnit, atomic_write, read_json, read_unit, write_json, write_unit
from saekit.run import RunFolder, load_model
from saekit.run.folder import Checkpoint


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
        "skip": False,
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


def test_appended_history_reads_back_and_a_partial_last_line_is_ignored(tmp_path):
    folder = RunFolder(tmp_path)
    rows = [{"step": i, "cost": 1.0 / (i + 3), "l0": 0.5 * i} for i in range(1, 4)]
    for row in rows:
        folder.append_history(row)
    assert folder.load_history() == rows
    lines = (tmp_path / "history.csv").read_text().splitlines()
    assert lines[0] == "step,cost,l0" and len(lines) == 4  # the header once, then one line a row
    with open(tmp_path / "history.csv", "a") as f:  # a kill in the middle of the next row's write
        f.write("4,0.14")
    assert folder.load_history() == rows


def test_write_unit_writes_files_and_a_manifest_of_their_checksums(tmp_path):
    files = {"a.bin": b"first file", "b.txt": b"second"}
    unit = write_unit(tmp_path / "unit", files, {"step": 3})
    assert sorted(p.name for p in unit.iterdir()) == ["a.bin", "b.txt", "manifest.json"]
    manifest = json.loads((unit / "manifest.json").read_text())
    assert manifest["step"] == 3
    assert manifest["files"] == {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    assert read_unit(unit) == (manifest, files)
    write_unit(unit, {"a.bin": b"replaced"}, {"step": 4})  # a unit already there is replaced whole
    assert read_unit(unit)[1] == {"a.bin": b"replaced"} and not (unit / "b.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["unit"]  # no temporary folder left


def test_write_unit_that_fails_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        write_unit(tmp_path / "unit", {"a.bin": b"fine", "b.bin": "not bytes"}, {"step": 1})
    assert list(tmp_path.iterdir()) == []


def test_read_unit_names_what_does_not_match(tmp_path):
    unit = write_unit(tmp_path / "unit", {"a.bin": b"content", "b.bin": b"more"}, {})
    (unit / "b.bin").write_bytes(b"mored")
    with pytest.raises(DamagedUnit, match=r"b\.bin does not match its checksum"):
        read_unit(unit)
    (unit / "b.bin").unlink()
    with pytest.raises(DamagedUnit, match=r"b\.bin"):
        read_unit(unit)
    (unit / "manifest.json").unlink()
    with pytest.raises(DamagedUnit, match="manifest.json"):
        read_unit(unit)
    assert issubclass(DamagedUnit, UserError)


SETTINGS = {"kind": "topk", "k": 2, "lr": 0.01}


def _save(folder, step, model=None, settings=SETTINGS, keep=2, history=None):
    model = model or make_model(6, 4, "topk", "linear", dtype=torch.float32, seed=step, k=2)
    state = {"step": step, "kind": {"seen": torch.arange(4) + step}, "optimizer": {"lr": 0.5}}
    history = [{"step": i, "cost": 1.0 / i} for i in range(1, step + 1)] if history is None else history
    return folder.save_checkpoint(model, state, history, settings, keep), model


def test_checkpoint_round_trip(tmp_path):
    folder = RunFolder(tmp_path)
    assert not folder.has_checkpoint()
    model = make_model(6, 4, "topk", "linear", dtype=torch.float32, seed=3, k=2)
    history = [{"step": 10, "cost": 0.25, "l0": 2.0}]
    unit, _ = _save(folder, 12, model, history=history)
    assert folder.has_checkpoint()
    assert unit == tmp_path / "checkpoint" / "step-000000012"
    assert sorted(p.name for p in unit.iterdir()) == ["history.csv", "manifest.json", "model.safetensors", "trainer.pt"]
    manifest = json.loads((unit / "manifest.json").read_text())
    assert manifest["step"] == 12 and manifest["settings"] == SETTINGS
    for name in ("history.csv", "model.safetensors", "trainer.pt"):
        assert manifest["files"][name] == hashlib.sha256((unit / name).read_bytes()).hexdigest(), name
    checkpoint = folder.load_checkpoint(SETTINGS)
    assert isinstance(checkpoint, Checkpoint)
    assert checkpoint.step == 12 and checkpoint.skipped == [] and checkpoint.settings == SETTINGS
    loaded = checkpoint.model
    assert loaded.cfg == model.cfg and loaded.W1.dtype == torch.float32
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    got_state = checkpoint.trainer_state
    assert got_state["step"] == 12 and got_state["optimizer"] == {"lr": 0.5}
    assert torch.equal(got_state["kind"]["seen"], torch.arange(4) + 12)
    assert checkpoint.history == history
    assert not list(tmp_path.rglob("*.tmp"))


def test_no_checkpoint_yet_is_none(tmp_path):
    assert RunFolder(tmp_path).load_checkpoint(SETTINGS) is None
    (tmp_path / "checkpoint").mkdir()
    assert RunFolder(tmp_path).load_checkpoint(SETTINGS) is None


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_only_the_newest_keep_checkpoints_are_kept(tmp_path, keep):
    folder = RunFolder(tmp_path)
    for step in (5, 10, 15, 20, 25):
        _save(folder, step, keep=keep)
    names = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert names == [f"step-{step:09d}" for step in (5, 10, 15, 20, 25)[-keep:]]
    assert folder.load_checkpoint(SETTINGS).step == 25


def test_newest_checkpoint_is_the_highest_step_and_saving_a_step_again_replaces_it(tmp_path):
    folder = RunFolder(tmp_path)
    _save(folder, 9)
    _save(folder, 100)  # step-000000100 sorts after step-000000009: the zero-padding matters
    assert folder.load_checkpoint(SETTINGS).step == 100
    _, model = _save(folder, 100, make_model(6, 4, "topk", "linear", dtype=torch.float32, seed=77, k=2))
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["step-000000009", "step-000000100"]
    assert torch.equal(folder.load_checkpoint(SETTINGS).model.W1, model.W1)


def _damage(unit, how):
    if how == "garbage":
        (unit / "trainer.pt").write_bytes(b"not a torch file at all")
    elif how == "truncated":
        (unit / "model.safetensors").write_bytes((unit / "model.safetensors").read_bytes()[:100])
    elif how == "missing":
        (unit / "trainer.pt").unlink()
    elif how == "no-manifest":
        (unit / "manifest.json").unlink()
    elif how == "history":
        (unit / "history.csv").write_text("step,cost\n1,0.5\n")
    else:  # a file that matches its checksum but cannot be loaded (as one another version wrote might)
        name = "trainer.pt" if how == "unloadable-trainer" else "model.safetensors"
        data = b"not a pickle at all" if how == "unloadable-trainer" else (unit / name).read_bytes()[:100]
        (unit / name).write_bytes(data)
        manifest = json.loads((unit / "manifest.json").read_text())
        manifest["files"][name] = hashlib.sha256(data).hexdigest()
        (unit / "manifest.json").write_text(json.dumps(manifest))
    return {
        "garbage": "trainer.pt",
        "truncated": "model.safetensors",
        "missing": "trainer.pt",
        "no-manifest": "manifest.json",
        "history": "history.csv",
        "unloadable-trainer": "trainer.pt",
        "unloadable-model": "model.safetensors",
    }[how]


DAMAGES = ["garbage", "truncated", "missing", "no-manifest", "history", "unloadable-trainer", "unloadable-model"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, how):
    folder = RunFolder(tmp_path)
    _, older = _save(folder, 4)
    newest, _ = _save(folder, 8)
    named = _damage(newest, how)
    checkpoint = folder.load_checkpoint(SETTINGS)
    assert checkpoint.step == 4 and checkpoint.trainer_state["step"] == 4
    assert torch.equal(checkpoint.model.W1, older.W1)
    assert [row["step"] for row in checkpoint.history] == [1, 2, 3, 4]
    (why,) = checkpoint.skipped
    assert str(newest) in why and named in why and "\n" not in why


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_only_checkpoint_is_a_one_line_refusal_naming_the_file(tmp_path, how):
    folder = RunFolder(tmp_path)
    unit, _ = _save(folder, 8, keep=1)
    named = _damage(unit, how)
    with pytest.raises(UserError) as error:
        folder.load_checkpoint(SETTINGS)
    message = str(error.value)
    assert str(unit) in message and named in message, message
    assert "\n" not in message


def test_every_checkpoint_damaged_is_a_refusal_naming_the_newest(tmp_path):
    folder = RunFolder(tmp_path)
    older, _ = _save(folder, 4)
    newest, _ = _save(folder, 8)
    _damage(older, "garbage")
    _damage(newest, "truncated")
    with pytest.raises(UserError, match=r"step-000000008/model\.safetensors"):
        folder.load_checkpoint(SETTINGS)


def test_checkpoint_steps_that_disagree_are_damage(tmp_path):
    """A unit renamed to another step (by hand) does not pass for that step."""
    folder = RunFolder(tmp_path)
    _save(folder, 4)
    unit, _ = _save(folder, 8)
    unit.rename(tmp_path / "checkpoint" / "step-000000009")
    checkpoint = folder.load_checkpoint(SETTINGS)
    assert checkpoint.step == 4 and "mixes steps" in checkpoint.skipped[0]


def test_settings_that_differ_from_the_checkpoint_are_refused(tmp_path):
    folder = RunFolder(tmp_path)
    _save(folder, 4)
    with pytest.raises(UserError) as error:
        folder.load_checkpoint({**SETTINGS, "k": 3, "seed": 1})
    message = str(error.value)
    assert "config.json differs" in message and "step-000000004" in message and "\n" not in message
    assert "k (2 there, 3 now)" in message and "seed (None there, 1 now)" in message
    assert "lr" not in message and "kind" not in message  # only the differences are listed
    assert folder.load_checkpoint(dict(SETTINGS)).step == 4


def test_load_checkpoint_removes_what_killed_writes_left(tmp_path):
    folder = RunFolder(tmp_path)
    _save(folder, 4)
    leftovers = [
        tmp_path / "checkpoint" / ".step-000000008.0123abcd.tmp",
        tmp_path / ".history.csv.0123abcd.tmp",
        tmp_path / ".weights.safetensors.4567.tmp",
    ]
    leftovers[0].mkdir()
    (leftovers[0] / "model.safetensors").write_bytes(b"half")
    for path in leftovers[1:]:
        path.write_bytes(b"half")
    assert folder.load_checkpoint(SETTINGS).step == 4
    assert not any(path.exists() for path in leftovers)
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["step-000000004"]


def test_a_checkpoint_of_saekit_0_1_is_a_one_line_refusal(tmp_path):
    """0.1 wrote checkpoint/trainer.pt and checkpoint/model.safetensors directly in checkpoint/."""
    (tmp_path / "checkpoint").mkdir()
    torch.save({"step": 5, "rho_hat": torch.full((4,), 0.01), "optimizer": {}}, tmp_path / "checkpoint" / "trainer.pt")
    RunFolder(tmp_path / "checkpoint").save_model(make_model(6, 4), "model.safetensors")
    with pytest.raises(UserError) as error:
        RunFolder(tmp_path).load_checkpoint(SETTINGS)
    message = str(error.value)
    assert "saekit 0.1" in message and str(tmp_path / "checkpoint") in message and "\n" not in message


def test_discard_removes_what_a_run_wrote_before_its_first_checkpoint(tmp_path):
    made = RunFolder.create(tmp_path / "new", "x")
    given = RunFolder.create(tmp_path / "given", "x")
    (tmp_path / "given" / "notes.txt").write_text("the user's own file")  # in a folder the user gave
    for folder in (made, given):
        folder.save_config(TrainConfig(), "ufldl-patches")
        folder.save_model(make_model(6, 4), "initial.safetensors")
        folder.append_history({"step": 1, "cost": 0.5})
        folder.write_state(1, 10)
        (folder.path / ".weights.safetensors.0123.tmp").write_bytes(b"half")
        folder.discard()
    assert not (tmp_path / "new").exists()  # made by this process: removed
    assert [p.name for p in (tmp_path / "given").iterdir()] == ["notes.txt"]


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
