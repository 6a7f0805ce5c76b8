"""saekit.config: every setting documented, presets < file < overrides, and validation messages."""

import dataclasses
import json

import pytest

from saekit.config import PRESET_HELP, PRESETS, TrainConfig, build_config, dashed, field_docs
from saekit.errors import UserError

FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


def test_every_setting_has_help_text():
    docs = field_docs(TrainConfig)
    assert sorted(docs) == sorted(FIELDS)
    for name in FIELDS:
        assert len(docs[name]) > 10, name


def test_defaults_are_the_ufldl_exercise():
    cfg = TrainConfig()
    assert (cfg.n_hidden, cfg.patch_size, cfg.n_examples) == (25, 8, 10000)
    assert (cfg.weight_decay, cfg.rho, cfg.beta) == (1e-4, 0.01, 3.0)
    assert (cfg.optimizer, cfg.max_iter, cfg.activation, cfg.output, cfg.penalty) == ("lbfgs", 400, "sigmoid", "sigmoid", "kl")


def test_presets_are_valid_and_documented():
    assert "ufldl-patches" in PRESETS and PRESETS["ufldl-patches"] == {}
    assert set(PRESET_HELP) == set(PRESETS)
    for name, changes in PRESETS.items():
        cfg = build_config(name)
        for key, value in changes.items():
            assert getattr(cfg, key) == value


def test_precedence_preset_then_file_then_overrides(tmp_path):
    preset = PRESETS["ufldl-patches-adam"]
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"epochs": 3, "lr": 0.5, "rho": 0.2}))
    cfg = build_config("ufldl-patches-adam", str(path), {"lr": 0.25})
    assert cfg.optimizer == "adam" and cfg.batch_size == preset["batch_size"]  # preset only
    assert cfg.epochs == 3 and cfg.rho == 0.2  # file beats preset and defaults
    assert cfg.lr == 0.25  # override beats file and preset
    assert cfg.n_hidden == 25  # untouched default


def test_a_run_folders_config_json_is_a_config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"config": TrainConfig(n_hidden=11).to_dict(), "preset": "ufldl-patches"}))
    assert build_config("ufldl-patches", str(path)) == TrainConfig(n_hidden=11)


def test_to_dict_round_trip():
    cfg = TrainConfig(n_hidden=3, optimizer="sgd", images_mat="/x.mat")
    assert TrainConfig(**cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "settings, words",
    [
        (dict(rho=1.5), "--rho must lie strictly between 0 and 1"),
        (dict(rho=0.0), "--rho must lie strictly between 0 and 1"),
        (dict(beta=-1.0), "--beta must be >= 0"),
        (dict(beta=float("nan")), "--beta must be >= 0"),
        (dict(weight_decay=-1.0), "--weight-decay must be >= 0"),
        (dict(n_hidden=0), "--n-hidden must be a whole number >= 1"),
        (dict(n_examples=2.5), "--n-examples must be int"),
        (dict(lr=0.0), "--lr must be > 0"),
        (dict(rho_momentum=1.0), "--rho-momentum must lie in [0, 1)"),
        (dict(optimizer="lbfgs2"), "--optimizer must be one of lbfgs, adam, sgd"),
        (dict(dtype="float16"), "--dtype must be one of float64, float32"),
        (dict(activation="relu"), "--penalty kl needs --activation sigmoid"),
    ],
)
def test_validation_messages_name_the_setting(settings, words):
    with pytest.raises(UserError) as error:
        TrainConfig(**settings)
    assert words in str(error.value)
    assert "\n" not in str(error.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(UserError) as error:
        TrainConfig(rho=2.0, beta=-1.0, n_hidden=0)
    message = str(error.value)
    assert "--rho" in message and "--beta" in message and "--n-hidden" in message


def test_relu_with_l1_is_valid():
    assert TrainConfig(activation="relu", penalty="l1", output="linear").activation == "relu"


def test_dashed():
    assert dashed("rho_momentum") == "rho-momentum"


def test_config_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_config("ufldl-patches", str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"rho": 0.1,')
    with pytest.raises(UserError, match="not valid JSON"):
        build_config("ufldl-patches", str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(UserError, match="JSON object"):
        build_config("ufldl-patches", str(bad))
    bad.write_text('{"rhoo": 0.1}')
    with pytest.raises(UserError, match="unknown settings \\['rhoo'\\]"):
        build_config("ufldl-patches", str(bad))
    with pytest.raises(UserError, match="unknown preset"):
        build_config("no-such-preset")


@pytest.mark.parametrize("settings", [{"rho": "0.1"}, {"beta": None}, {"lr": "fast"}])
def test_wrongly_typed_values_in_a_config_file_are_user_errors(tmp_path, settings):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(settings))
    with pytest.raises(UserError):
        build_config("ufldl-patches", str(path))
