"""saekit.interop.saelens: SAELens folders out and in (and `saekit export` / `saekit import`).

The yardstick is `saelens_forward`, SAELens's inference arithmetic (SAELens 6: StandardSAE,
TopKSAE, JumpReLUSAE) written out plainly here from its cfg.json fields and tensors; nothing in
it comes from saekit. When sae_lens itself is installed (it is not a saekit dependency), the
exported folders are also loaded with SAE.load_from_disk.
"""

import json

import pytest
import safetensors.torch
import torch
from conftest import assert_one_line_error, make_model, run_cli

from saekit.config import TrainConfig
from saekit.errors import UserError
from saekit.files import read_json
from saekit.interop.saelens import export_saelens, import_saelens
from saekit.run import RunFolder
from saekit.train import OptimConfig

ACTIVATIONS = ("relu", "topk", "batchtopk", "matryoshka", "jumprelu")


def saelens_forward(cfg: dict, t: dict, x: torch.Tensor):
    """(codes, reconstruction) of a SAELens SAE with config `cfg` and tensors `t` for x (batch, d_in)."""
    sae_in = x - t["b_dec"] if cfg.get("apply_b_dec_to_input", True) else x
    hidden_pre = sae_in @ t["W_enc"] + t["b_enc"]
    norms = (
        t["W_dec"].norm(dim=-1) if cfg.get("rescale_acts_by_decoder_norm") else torch.ones(cfg["d_sae"], dtype=x.dtype)
    )
    hidden_pre = hidden_pre * norms
    if cfg.get("architecture") == "jumprelu":
        acts = hidden_pre.relu() * (hidden_pre > t["threshold"])
    elif cfg.get("architecture") == "topk" or cfg.get("activation_fn_str") == "topk":
        k = cfg.get("k") or cfg["activation_fn_kwargs"]["k"]
        values, indices = hidden_pre.topk(k, dim=-1)
        acts = torch.zeros_like(hidden_pre).scatter(-1, indices, values.relu())
    else:
        acts = hidden_pre.relu()
    return acts, (acts / norms) @ t["W_dec"] + t["b_dec"]


def random_model(activation, dtype=torch.float64, pre_bias=True, seed=0, n_inputs=6, n_hidden=12):
    """A dictionary with non-zero biases and thresholds that some codes pass and some do not."""
    model = make_model(
        n_inputs,
        n_hidden,
        activation,
        "linear",
        dtype=dtype,
        k=3,
        pre_bias=pre_bias,
        seed=seed,
        jumprelu_bandwidth=0.05,
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.b1.copy_(0.3 * torch.randn(n_hidden, generator=g))
        model.b2.copy_(torch.randn(n_inputs, generator=g))
        if activation == "jumprelu":
            model.jumprelu.log_threshold.copy_(torch.randn(n_hidden, generator=g) - 1.5)
        if activation in ("batchtopk", "matryoshka"):  # one inference threshold for every unit
            model.batch_topk.threshold.fill_(0.3)
    return model.eval()


def inputs(model, n=50, seed=1):
    return torch.randn(n, model.n_inputs, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(
        model.W1.dtype
    )


@torch.no_grad()
def codes_and_reconstruction(model, x):
    out = model.eval()(x)
    return model.dense_codes(out.codes), out.x_hat


def write_folder(folder, cfg: dict, tensors: dict):
    """A SAELens SAE folder as SAE.save_model writes it: cfg.json and sae_weights.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "sae_weights.safetensors")
    return folder


def read_folder(folder):
    return json.loads((folder / "cfg.json").read_text()), safetensors.torch.load_file(
        folder / "sae_weights.safetensors"
    )


# --- export


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype,pre_bias", [(torch.float64, True), (torch.float32, False)])
def test_round_trip_gives_back_the_same_dictionary(tmp_path, activation, dtype, pre_bias):
    model = random_model(activation, dtype, pre_bias)
    back = import_saelens(export_saelens(model, tmp_path / "sae"))
    assert back.architecture() == model.architecture()
    before, after = model.state_dict(), back.state_dict()
    assert sorted(before) == sorted(after)
    for name in before:
        assert after[name].dtype == before[name].dtype, name
        if name == "jumprelu.log_threshold":
            # several log thresholds share one exp: the threshold itself must come back exactly
            assert torch.equal(after[name].exp(), before[name].exp())
            torch.testing.assert_close(after[name], before[name], rtol=4 * torch.finfo(dtype).eps, atol=0)
        else:
            assert torch.equal(after[name], before[name]), name
    x = inputs(model)
    for a, b in zip(codes_and_reconstruction(back, x), codes_and_reconstruction(model, x)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_exported_folder_computes_what_saekit_computes(tmp_path, activation):
    model = random_model(activation, seed=3)
    cfg, tensors = read_folder(
        export_saelens(model, tmp_path / "sae", model_name="gpt2", hook_name="blocks.3.hook_resid_post")
    )
    assert cfg["architecture"] == {"relu": "standard", "topk": "topk"}.get(activation, "jumprelu")
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["normalize_activations"]) == (6, 12, "float64", "none")
    assert cfg["metadata"]["model_name"] == "gpt2" and cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert cfg["metadata"]["sae_lens_version"] >= "6"  # otherwise SAELens reads it as a pre-6.0 config
    assert tensors["W_enc"].shape == (6, 12) and tensors["W_dec"].shape == (12, 6)
    x = inputs(model)
    expected_codes, expected_x_hat = saelens_forward(cfg, tensors, x)
    codes, x_hat = codes_and_reconstruction(model, x)
    assert 0 < (codes > 0).sum() < codes.numel()
    assert torch.equal(codes > 0, expected_codes > 0)
    torch.testing.assert_close(codes, expected_codes, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_hat, expected_x_hat, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ["batchtopk", "matryoshka"])
def test_batchtopk_threshold_is_every_units_jumprelu_threshold(tmp_path, activation):
    model = random_model(activation)
    cfg, tensors = read_folder(export_saelens(model, tmp_path / "sae"))
    assert cfg["architecture"] == "jumprelu"
    # the threshold buffer is kept in the model's dtype (float64 here)
    assert torch.equal(tensors["threshold"], torch.full((12,), 0.3, dtype=torch.float64))


def test_unestimated_batchtopk_threshold_acts_as_relu_in_both(tmp_path):
    model = random_model("batchtopk")
    with torch.no_grad():
        model.batch_topk.threshold.fill_(-1.0)  # never trained: saekit then keeps every positive code
    cfg, tensors = read_folder(export_saelens(model, tmp_path / "sae"))
    x = inputs(model)
    codes, _ = codes_and_reconstruction(model, x)
    expected_codes, _ = saelens_forward(cfg, tensors, x)
    torch.testing.assert_close(codes, expected_codes, rtol=1e-12, atol=1e-12)
    assert torch.equal(import_saelens(tmp_path / "sae").batch_topk.threshold, torch.tensor(-1.0))


@pytest.mark.parametrize("activation,output", [("sigmoid", "linear"), ("relu", "sigmoid"), ("sigmoid", "sigmoid")])
def test_sigmoid_dictionaries_are_refused(tmp_path, activation, output):
    model = make_model(6, 4, activation, output)
    with pytest.raises(UserError, match="no SAELens equivalent"):
        export_saelens(model, tmp_path / "sae")
    assert not (tmp_path / "sae").exists()


def test_export_does_not_overwrite_unless_asked_nor_ever_a_run_folder(tmp_path):
    model = random_model("relu")
    export_saelens(model, tmp_path / "sae")
    with pytest.raises(UserError, match="already exists"):
        export_saelens(model, tmp_path / "sae")
    export_saelens(model, tmp_path / "sae", overwrite=True)
    RunFolder(tmp_path / "run").save_model(model)
    with pytest.raises(UserError, match="saekit run folder"):
        export_saelens(model, tmp_path / "run", overwrite=True)
    assert read_json(tmp_path / "run" / "cfg.json") == model.architecture()


# --- import


def known_tensors(d_in=4, d_sae=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    return {
        "W_enc": randn(d_in, d_sae),
        "b_enc": 0.2 * randn(d_sae),
        "W_dec": 2 * randn(d_sae, d_in),
        "b_dec": randn(d_in),
    }


def saelens6_cfg(architecture, apply_b_dec_to_input=True, dtype="float64", **fields):
    return {
        "d_in": 4,
        "d_sae": 5,
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12"},
        "architecture": architecture,
        **fields,
    }


def check_import(folder, cfg, tensors, activation, k=None):
    model = import_saelens(folder)
    assert (model.n_inputs, model.n_hidden, model.kind, model.cfg.output) == (4, 5, activation, "linear")
    assert model.cfg.pre_bias == cfg.get("apply_b_dec_to_input", True)
    if k is not None:
        assert model.cfg.k == k
    x = inputs(model, n=40, seed=2)
    expected_codes, expected_x_hat = saelens_forward(cfg, {n: t.to(model.W1.dtype) for n, t in tensors.items()}, x)
    codes, x_hat = codes_and_reconstruction(model, x)
    assert 0 < (codes > 0).sum() < codes.numel()
    tol = 1e-12 if model.W1.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(codes, expected_codes, rtol=tol, atol=tol)
    torch.testing.assert_close(x_hat, expected_x_hat, rtol=tol, atol=tol)
    return model


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_import_standard_sae_takes_its_tensors_as_they_are(tmp_path, apply_b_dec_to_input):
    cfg, tensors = saelens6_cfg("standard", apply_b_dec_to_input), known_tensors()
    model = check_import(write_folder(tmp_path / "sae", cfg, tensors), cfg, tensors, "relu")
    assert torch.equal(model.W1, tensors["W_enc"].T) and torch.equal(model.W2, tensors["W_dec"].T)
    assert torch.equal(model.b1, tensors["b_enc"]) and torch.equal(model.b2, tensors["b_dec"])
    assert model.W2.t().is_contiguous()  # saekit's layout: each atom one row in memory


def test_import_jumprelu_keeps_thresholds_and_reads_zero_or_negative_ones_as_relu(tmp_path):
    tensors = known_tensors() | {"threshold": torch.tensor([0.3, 0.05, 0.0, -0.4, 1.7], dtype=torch.float64)}
    cfg = saelens6_cfg("jumprelu")
    model = check_import(write_folder(tmp_path / "sae", cfg, tensors), cfg, tensors, "jumprelu")
    theta = model.jumprelu.log_threshold.detach().exp()
    # saekit keeps log theta: exp of a float need not hit every float theta, but comes within an ulp
    torch.testing.assert_close(
        theta, torch.tensor([0.3, 0.05, 0.0, 0.0, 1.7], dtype=torch.float64), rtol=2.3e-16, atol=0
    )


def test_import_topk_with_decoder_norm_rescaling_folds_the_norms(tmp_path):
    cfg, tensors = saelens6_cfg("topk", k=2, rescale_acts_by_decoder_norm=True), known_tensors(seed=4)
    model = check_import(write_folder(tmp_path / "sae", cfg, tensors), cfg, tensors, "topk", k=2)
    torch.testing.assert_close(model.W2.norm(dim=0), torch.ones(5, dtype=torch.float64), rtol=1e-12, atol=0)


def test_import_pre_6_config(tmp_path):
    """SAELens 5: activation_fn_str and its kwargs, no architecture, boolean normalize_activations, unit
    scaling_factor."""
    cfg = {
        "d_in": 4,
        "d_sae": 5,
        "dtype": "float32",
        "device": "cpu",
        "model_name": "gpt2-small",
        "hook_point": "blocks.0.hook_resid_pre",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 3},
        "apply_b_dec_to_input": False,
        "normalize_activations": False,
        "finetuning_scaling_factor": False,
    }
    tensors = known_tensors(dtype=torch.float32)
    write_folder(tmp_path / "sae", cfg, tensors | {"scaling_factor": torch.ones(5)})
    model = check_import(tmp_path / "sae", cfg, tensors, "topk", k=3)
    assert model.W1.dtype == torch.float32


def test_import_widens_half_precision_to_float32(tmp_path):
    cfg, tensors = saelens6_cfg("standard", dtype="bfloat16"), known_tensors(dtype=torch.bfloat16)
    model = import_saelens(write_folder(tmp_path / "sae", cfg, tensors))
    assert model.W1.dtype == torch.float32 and torch.equal(model.W1, tensors["W_enc"].T.float())


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda cfg, t: cfg.update(architecture="gated"), "SAELens architecture 'gated'.* has no saekit equivalent"),
        (lambda cfg, t: cfg.update(architecture="batchtopk"), "save_inference_model"),
        (lambda cfg, t: cfg.update(architecture="matryoshka_batchtopk"), "save_inference_model"),
        (lambda cfg, t: cfg.update(activation_fn="tanh-relu"), "no saekit equivalent"),
        (lambda cfg, t: cfg.update(normalize_activations="layer_norm"), "normalize_activations"),
        (lambda cfg, t: cfg.update(d_in=3), r"W_enc has shape \(4, 5\), but d_in and d_sae make it \(3, 5\)"),
        (lambda cfg, t: cfg.pop("d_sae"), "d_sae must be a whole number"),
        (lambda cfg, t: cfg.update(architecture="topk"), "k must be a whole number"),
        (lambda cfg, t: t.update(W_dec=t["W_dec"].T), r"W_dec has shape \(4, 5\)"),
        (lambda cfg, t: t.pop("b_enc"), r"holds tensors \['W_dec', 'W_enc', 'b_dec'\], but this SAE needs"),
        (lambda cfg, t: cfg.update(architecture="jumprelu"), "needs exactly"),
        (lambda cfg, t: t["b_dec"].__setitem__(0, torch.nan), "b_dec must hold finite"),
        (lambda cfg, t: t.update(scaling_factor=torch.full((5,), 2.0, dtype=torch.float64)), "scaling_factor"),
    ],
)
def test_import_bad_folders_raise_one_clear_user_error(tmp_path, change, message):
    cfg, tensors = saelens6_cfg("standard"), known_tensors()
    change(cfg, tensors)
    with pytest.raises(UserError, match=message):
        import_saelens(write_folder(tmp_path / "sae", cfg, tensors))


def test_import_missing_or_corrupt_files(tmp_path):
    with pytest.raises(UserError, match="cfg.json is missing"):
        import_saelens(tmp_path)
    RunFolder(tmp_path / "run").save_model(random_model("relu"))  # a saekit run folder is not a SAELens one
    with pytest.raises(UserError, match="sae_weights.safetensors is missing"):
        import_saelens(tmp_path / "run")
    write_folder(tmp_path / "sae", saelens6_cfg("standard"), known_tensors())
    (tmp_path / "sae" / "sae_weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="corrupt"):
        import_saelens(tmp_path / "sae")
    (tmp_path / "sae" / "cfg.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        import_saelens(tmp_path / "sae")


# --- command line


def test_export_and_import_commands_go_through_run_folders(tmp_path, capsys):
    model = random_model("jumprelu")
    run = RunFolder.create(tmp_path / "run", "run")
    run.save_model(model)
    run.save_config(TrainConfig(model=model.cfg, optim=OptimConfig(optimizer="adam")), "custom")
    assert run_cli(["export", str(tmp_path / "run"), "--out", str(tmp_path / "sae"), "--hook-name", "h"]) == 0
    assert read_folder(tmp_path / "sae")[0]["metadata"]["hook_name"] == "h"
    assert "SAELens 'jumprelu' SAE" in capsys.readouterr().out
    assert run_cli(["import", str(tmp_path / "sae"), "--out", str(tmp_path / "back")]) == 0
    back = RunFolder.open(tmp_path / "back")
    assert back.load_model().architecture() == model.architecture()
    x = inputs(model)
    assert torch.equal(codes_and_reconstruction(back.load_model(), x)[1], codes_and_reconstruction(model, x)[1])
    cfg = back.load_config().model
    assert (cfg.kind, cfg.n_hidden, cfg.pre_bias, cfg.output) == ("jumprelu", 12, True, "linear")
    assert read_json(tmp_path / "back" / "cfg.json") == model.architecture()
    capsys.readouterr()
    code = run_cli(["import", str(tmp_path / "sae"), "--out", str(tmp_path / "back")])
    assert_one_line_error(code, capsys.readouterr().err, "already holds a run")


# --- SAELens itself, where installed


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_saelens_loads_the_export_and_computes_what_saekit_computes(tmp_path, activation):
    sae_lens = pytest.importorskip("sae_lens")
    model = random_model(activation, seed=5)
    sae = sae_lens.SAE.load_from_disk(export_saelens(model, tmp_path / "sae"))
    x = inputs(model)
    codes, x_hat = codes_and_reconstruction(model, x)
    with torch.no_grad():
        acts = sae.encode(x)
        torch.testing.assert_close(acts, codes, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sae.decode(acts), x_hat, rtol=1e-12, atol=1e-12)
