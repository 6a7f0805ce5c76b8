"""saekit.config, saekit.settings and saekit.presets: a run's settings in parts (data, model,
optim, run, classify), every setting documented, presets < file < overrides, validation
messages, and saekit 0.1's flat config.json files."""

import dataclasses
import json

import pytest

from saekit import kinds
from saekit.classify import ClassifyConfig
from saekit.config import PARTS, RunConfig, TrainConfig, build_config
from saekit.data import DataConfig
from saekit.errors import UserError
from saekit.presets import PRESETS
from saekit.run import RunFolder
from saekit.settings import dashed, field_docs
from saekit.train import OptimConfig

KIND_CONFIGS = {name: cls.Config for name, cls in kinds.KINDS.items()}
SETTINGS_CLASSES = [*PARTS.values(), *KIND_CONFIGS.values()]


def names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("cls", SETTINGS_CLASSES, ids=lambda cls: cls.__name__)
def test_every_setting_has_help_text(cls):
    docs = field_docs(cls)
    assert sorted(docs) == sorted(names(cls))
    for name in names(cls):
        assert len(docs[name]) > 10, name


def test_the_parts_are_the_ones_documented():
    assert dict(PARTS) == {"data": DataConfig, "optim": OptimConfig, "run": RunConfig, "classify": ClassifyConfig}
    assert [f.name for f in dataclasses.fields(TrainConfig)] == ["data", "model", "optim", "run", "classify"]


def test_every_flat_setting_belongs_to_exactly_one_part():
    owners: dict[str, set[str]] = {}
    for part, cls in PARTS.items():
        for name in names(cls):
            owners.setdefault(name, set()).add(part)
    for cls in KIND_CONFIGS.values():  # every kind's settings make up the model part
        for name in ["kind", *names(cls)]:
            owners.setdefault(name, set()).add("model")
    assert {name: parts for name, parts in owners.items() if len(parts) != 1} == {}
    # Hence flat() loses nothing for any kind: its names are the parts' names, each once.
    for kind in kinds.KINDS:
        cfg = TrainConfig(model=kinds.config(kind, n_hidden=64), optim=OptimConfig(optimizer="adam"))
        counts = sum(len(part.to_dict()) for part in cfg.parts().values())
        assert len(cfg.flat()) == counts and cfg.flat()["kind"] == kind
        assert TrainConfig.from_flat(cfg.flat()) == cfg


def test_defaults_are_the_ufldl_exercise():
    cfg = TrainConfig()
    assert (cfg.model.n_hidden, cfg.data.patch_size, cfg.data.n_examples) == (25, 8, 10000)
    assert (cfg.model.weight_decay, cfg.model.rho, cfg.model.beta) == (1e-4, 0.01, 3.0)
    assert (cfg.optim.optimizer, cfg.optim.max_iter, cfg.model.kind, cfg.model.output, cfg.model.penalty) == (
        "lbfgs",
        400,
        "sigmoid",
        "sigmoid",
        "kl",
    )
    assert TrainConfig.from_flat({}) == cfg


def test_presets_are_valid_and_documented():
    assert "ufldl-patches" in PRESETS and PRESETS["ufldl-patches"].settings == {}
    for name, preset in PRESETS.items():
        assert len(preset.help) > 10, name
        flat = build_config(name).flat()
        for key, value in preset.settings.items():
            assert flat[key] == value, (name, key)


def test_precedence_preset_then_file_then_overrides(tmp_path):
    preset = PRESETS["ufldl-patches-adam"].settings
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"epochs": 3, "lr": 0.5, "rho": 0.2}))
    cfg = build_config("ufldl-patches-adam", str(path), {"lr": 0.25})
    assert cfg.optim.optimizer == "adam" and cfg.optim.batch_size == preset["batch_size"]  # preset only
    assert cfg.optim.epochs == 3 and cfg.model.rho == 0.2  # file beats preset and defaults
    assert cfg.optim.lr == 0.25  # override beats file and preset
    assert cfg.model.n_hidden == 25  # untouched default


def test_a_config_file_may_give_the_settings_in_parts(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(
        json.dumps(
            {"data": {"n_examples": 123}, "model": {"kind": "relu", "beta": 0.5}, "optim": {"optimizer": "adam"}}
        )
    )
    cfg = build_config("ufldl-patches", str(path))
    assert cfg == TrainConfig(
        data=DataConfig(n_examples=123), model=kinds.config("relu", beta=0.5), optim=OptimConfig(optimizer="adam")
    )


def test_a_run_folders_config_json_is_a_config_file(tmp_path):
    cfg = TrainConfig(model=kinds.config("sigmoid", n_hidden=11))
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"config": cfg.to_dict(), "preset": "ufldl-patches"}))
    assert build_config("ufldl-patches", str(path)) == cfg
    # As a run folder writes it.
    folder = RunFolder.create(tmp_path / "run", "x")
    folder.save_config(cfg, "ufldl-patches")
    assert build_config("ufldl-patches", str(folder.file("config.json"))) == cfg


def test_to_dict_round_trip():
    cfg = TrainConfig.from_flat({"n_hidden": 3, "optimizer": "sgd", "images_mat": "/x.mat"})
    assert (cfg.model.n_hidden, cfg.optim.optimizer, cfg.data.images_mat) == (3, "sgd", "/x.mat")
    nested = cfg.to_dict()
    assert set(nested) == {"data", "model", "optim", "run", "classify"} and nested["model"]["kind"] == "sigmoid"
    assert TrainConfig.from_dict(json.loads(json.dumps(nested))) == cfg
    assert TrainConfig.from_flat(cfg.flat()) == cfg


# --- saekit 0.1's flat config.json

# A topk run's config.json "config" as saekit 0.1 wrote it: every setting of its one flat
# TrainConfig, used or not, the kind called "activation". Written out by hand from 0.1's fields.
TOPK_0_1 = {
    "data": "synthetic",
    "data_key": None,
    "images_mat": None,
    "data_dir": None,
    "n_examples": 100000,
    "digits": None,
    "synthetic_inputs": 64,
    "synthetic_atoms": 256,
    "synthetic_k": 8,
    "patch_size": 8,
    "corruption": "none",
    "corruption_level": 0.3,
    "n_hidden": 512,
    "activation": "topk",
    "k": 8,
    "pre_bias": True,
    "decoder_bias_init": "geometric-median",
    "tied_init": True,
    "normalize_decoder": True,
    "jumprelu_threshold": 0.001,
    "jumprelu_bandwidth": 0.001,
    "output": "linear",
    "weight_decay": 0.0,
    "rho": 0.01,
    "beta": 3.0,
    "penalty": "none",
    "aux_k": 64,
    "aux_coefficient": 0.03125,
    "dead_after": 1000000,
    "optimizer": "adam",
    "max_iter": 400,
    "lbfgs_memory": 100,
    "epochs": 10,
    "batch_size": 4096,
    "lr": 0.001,
    "rho_momentum": 0.9,
    "steps": 0,
    "shuffle_buffer": 65536,
    "scale_inputs": True,
    "autocast": "none",
    "log_every": 10,
    "checkpoint_every": 500,
    "tensorboard": False,
    "stack": None,
    "classify": "none",
    "softmax_weight_decay": 0.0001,
    "softmax_max_iter": 100,
    "finetune_weight_decay": 0.0001,
    "finetune_decay_encoders": True,
    "finetune_max_iter": 400,
    "dtype": "float32",
    "device": "cuda",
    "seed": 7,
}
TOPK_NOW = TrainConfig(
    data=DataConfig(data="synthetic", n_examples=100000, synthetic_inputs=64, synthetic_atoms=256, synthetic_k=8),
    model=kinds.config(
        "topk",
        n_hidden=512,
        output="linear",
        pre_bias=True,
        tied_init=True,
        weight_decay=0.0,
        penalty="none",
        k=8,
        aux_k=64,
        aux_coefficient=0.03125,
    ),
    optim=OptimConfig(
        optimizer="adam",
        epochs=10,
        batch_size=4096,
        lr=0.001,
        scale_inputs=True,
        normalize_decoder=True,
        decoder_bias_init="geometric-median",
        dead_after=1000000,
        log_every=10,
    ),
    run=RunConfig(dtype="float32", device="cuda", seed=7),  # a GPU run's folder loads on any machine
)
# A sigmoid (UFLDL) run of 0.1: its k, aux_k, jumprelu settings were written too, and are not its.
SIGMOID_0_1 = {
    **TOPK_0_1,
    "activation": "sigmoid",
    "n_hidden": 25,
    "k": 32,
    "aux_k": 0,
    "pre_bias": False,
    "tied_init": False,
    "output": "sigmoid",
    "weight_decay": 0.0001,
    "rho": 0.05,
    "beta": 3.0,
    "penalty": "kl",
    "rho_momentum": 0.8,
    "optimizer": "lbfgs",
    "max_iter": 400,
    "device": "cpu",
    "data": "natural-patches",
    "n_examples": 10000,
    "scale_inputs": False,
    "normalize_decoder": False,
    "decoder_bias_init": "zeros",
    "dtype": "float64",
    "seed": 0,
}


def test_the_old_flat_config_lists_every_setting_of_0_1():
    """The hand-written 0.1 record has each 0.1 setting, the new settings of the kinds included."""
    every_new = {name for cls in (*PARTS.values(), *KIND_CONFIGS.values()) for name in names(cls)}
    assert len(TOPK_0_1) == 53 and set(TOPK_0_1) - every_new == {"activation"}


def test_an_old_flat_topk_config_json_loads_to_the_same_settings(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(
        json.dumps(
            {
                "config": TOPK_0_1,
                "preset": "topk",
                "versions": {"saekit": "0.1.0"},
                "command": ["saekit", "train", "--preset", "topk"],
            }
        )
    )
    assert RunFolder.open(run).load_config() == TOPK_NOW
    assert build_config("ufldl-patches", str(run / "config.json")) == TOPK_NOW  # as --config
    assert TrainConfig.from_dict(TOPK_0_1) == TOPK_NOW
    assert TrainConfig.from_dict(TOPK_NOW.to_dict()) == TOPK_NOW


def test_an_old_flat_sigmoid_config_json_drops_the_settings_of_other_kinds(tmp_path):
    cfg = TrainConfig.from_dict(SIGMOID_0_1)
    assert cfg.model == kinds.config("sigmoid", n_hidden=25, rho=0.05, rho_momentum=0.8)
    assert cfg.optim == OptimConfig(epochs=10, batch_size=4096, dead_after=1000000, log_every=10)
    assert cfg.run == RunConfig() and cfg.data == DataConfig()
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"config": SIGMOID_0_1, "preset": "ufldl-patches"}))
    assert build_config("ufldl-patches", str(path)) == cfg
    assert build_config("ufldl-patches", str(path), {"n_hidden": 9}).model.n_hidden == 9  # overrides still win


def test_an_old_flat_config_with_an_unknown_kind_is_a_user_error():
    with pytest.raises(UserError, match="--kind must be one of"):
        TrainConfig.from_dict({**TOPK_0_1, "activation": "tanh"})


# --- kinds and their settings


@pytest.mark.parametrize("explicit", ["overrides", "file", "flat"])
def test_a_setting_the_kind_lacks_given_explicitly_is_one_error_naming_it(tmp_path, explicit):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"k": 8}))
    with pytest.raises(UserError) as error:
        if explicit == "overrides":
            build_config("ufldl-patches", overrides={"k": 8})
        elif explicit == "file":
            build_config("ufldl-patches", str(path))
        else:
            TrainConfig.from_flat({"kind": "sigmoid", "k": 8})
    message = str(error.value)
    assert "--k is a setting of topk and batchtopk and matryoshka, not of --kind sigmoid" in message
    assert "\n" not in message and message.count("--k ") == 1


def test_a_setting_of_one_kind_given_to_another_names_the_kinds_that_have_it():
    with pytest.raises(UserError, match="--rho is a setting of sigmoid, not of --kind relu"):
        build_config("ufldl-patches", overrides={"kind": "relu", "output": "linear", "rho": 0.1})
    with pytest.raises(UserError, match="--jumprelu-threshold is a setting of jumprelu, not of --kind topk"):
        build_config("topk", overrides={"jumprelu_threshold": 0.1})


def test_a_presets_setting_the_chosen_kind_lacks_is_dropped():
    cfg = build_config("topk", overrides={"kind": "relu"})
    preset = PRESETS["topk"].settings
    assert cfg.model == kinds.config(
        "relu", n_hidden=preset["n_hidden"], output="linear", pre_bias=True, tied_init=True, weight_decay=0.0
    )  # no k, no AuxK; relu's own defaults
    assert not hasattr(cfg.model, "k") and not {"k", "aux_k", "aux_coefficient"} & cfg.flat().keys()
    # The preset's data, optimisation and run settings are kept.
    flat = cfg.flat()
    for key, value in preset.items():
        if key not in ("kind", "k", "aux_k", "aux_coefficient"):
            assert flat[key] == value, key
    sigmoid = build_config("batchtopk", overrides={"kind": "sigmoid", "n_hidden": 64})
    assert sigmoid.model.kind == "sigmoid" and sigmoid.model.n_hidden == 64 and sigmoid.optim.optimizer == "adam"


def test_the_kinds_have_their_own_defaults():
    relu, topk, jump = (
        TrainConfig.from_flat({"kind": kind, "n_hidden": 64, "optimizer": "adam"}).model
        for kind in ("relu", "topk", "jumprelu")
    )
    assert (relu.output, relu.weight_decay, relu.penalty, relu.beta) == ("linear", 0.0, "l1-decoder", 0.05)
    assert (topk.penalty, topk.k, topk.aux_k) == ("none", 32, 0)
    assert (jump.penalty, jump.beta) == ("l0", 0.01)


# --- validation


@pytest.mark.parametrize(
    "settings, words",
    [
        (dict(rho=1.5), "--rho must lie strictly between 0 and 1"),
        (dict(rho=0.0), "--rho must lie strictly between 0 and 1"),
        (dict(beta=-1.0), "--beta must be a number >= 0"),
        (dict(beta=float("nan")), "--beta must be a number >= 0"),
        (dict(weight_decay=-1.0), "--weight-decay must be a number >= 0"),
        (dict(n_hidden=0), "--n-hidden must be a whole number >= 1"),
        (dict(n_examples=2.5), "--n-examples must be int"),
        (dict(lr=0.0), "--lr must be a finite number > 0"),
        (dict(lr_decay_fraction=0.0), "--lr-decay-fraction must lie in (0, 1]"),
        (dict(lr_decay_fraction=1.5), "--lr-decay-fraction must lie in (0, 1]"),
        (dict(lr_hold_steps=-1), "--lr-hold-steps must be a whole number >= 0"),
        (dict(adam_beta1=1.0), "--adam-beta1 must lie in [0, 1)"),
        (dict(adam_beta2=-0.5), "--adam-beta2 must lie in [0, 1)"),
        (dict(adam_beta2=float("nan")), "--adam-beta2 must lie in [0, 1)"),
        (dict(rho_momentum=1.0), "--rho-momentum must lie in [0, 1)"),
        (dict(optimizer="lbfgs2"), "--optimizer must be one of lbfgs, adam, sgd"),
        (dict(dtype="float16"), "--dtype must be one of float64, float32"),
        (dict(seed=-1), "--seed must lie in 0 ... 2^64-1"),
        (dict(device="gpu"), "--device 'gpu' is not a torch device"),
        (dict(softmax_max_iter=0), "--softmax-max-iter must be a whole number >= 1"),
        (dict(kind="relu", penalty="kl"), "--penalty must be one of l1, l1-decoder, contractive, none"),
        (dict(kind="topk", n_hidden=64, k=65, optimizer="adam"), "--k must lie between 1 and --n-hidden = 64 (got 65)"),
        (dict(kind="topk", n_hidden=64, k=8), "--kind topk trains with minibatches: use --optimizer adam"),
        (dict(kind="kl"), "unknown kind 'kl'"),
        (dict(classify="softmax"), "--classify needs labelled data"),
        (dict(scale_inputs=True), "--scale-inputs needs --output linear"),
    ],
)
def test_validation_messages_name_the_setting(settings, words):
    with pytest.raises(UserError) as error:
        TrainConfig.from_flat(settings)
    assert words in str(error.value)
    assert "\n" not in str(error.value)


def test_validation_reads_nothing_of_the_machine():
    """A CUDA run's settings are valid on a machine without CUDA (training there is refused later)."""
    assert TrainConfig.from_flat({"device": "cuda:1"}).run.device == "cuda:1"


def test_all_problems_of_a_part_are_reported_at_once():
    with pytest.raises(UserError) as error:
        TrainConfig.from_flat(dict(rho=2.0, beta=-1.0, n_hidden=0))
    message = str(error.value)
    assert "--rho" in message and "--beta" in message and "--n-hidden" in message


def test_all_problems_of_all_parts_are_reported_at_once():
    with pytest.raises(UserError) as error:
        TrainConfig.from_flat(dict(n_examples=0, rho=2.0, lr=0.0, seed=-1, softmax_max_iter=0))
    message = str(error.value)
    for name in ("--n-examples", "--rho", "--lr", "--seed", "--softmax-max-iter"):
        assert name in message, name
    assert "\n" not in message


def test_relu_with_l1_is_valid():
    cfg = TrainConfig.from_flat({"kind": "relu", "penalty": "l1", "output": "linear"})
    assert (cfg.model.kind, cfg.model.penalty) == ("relu", "l1")


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
    with pytest.raises(UserError, match="there is no setting 'rhoo'"):
        build_config("ufldl-patches", str(bad))
    bad.write_text('{"data": {"n_examples": 5}, "model": {}, "optimm": {"lr": 1}}')
    with pytest.raises(UserError, match="'optimm' is none of them"):
        build_config("ufldl-patches", str(bad))
    with pytest.raises(UserError, match="unknown preset"):
        build_config("no-such-preset")


@pytest.mark.parametrize(
    "settings",
    [
        {"rho": "0.1"},
        {"beta": None},
        {"lr": "fast"},
        {"n_hidden": True},
        {"kind": 3},
        {"model": {"kind": "relu", "beta": "big"}, "data": {}},
    ],
)
def test_wrongly_typed_values_in_a_config_file_are_user_errors(tmp_path, settings):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(settings))
    with pytest.raises(UserError):
        build_config("ufldl-patches", str(path))
