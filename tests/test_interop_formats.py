"""saekit.interop's sparsify and dictionary_learning formats, out and in, and `saekit export --format` /
`saekit import` (which tells the format from the files).

The yardsticks are `sparsify_forward` and `dictionary_learning_forward`: each library's inference
arithmetic (sparsify 1.3's SparseCoder.encode/decode; dictionary_learning 0.1's AutoEncoder,
AutoEncoderNew, AutoEncoderTopK, BatchTopKSAE, JumpReluAutoEncoder and MatryoshkaBatchTopKSAE
encode/decode) written out plainly here from their files' fields and tensors; nothing in them
comes from saekit. Files are built here by hand as those libraries write them. Where the peers'
own environment exists (its Python at $SAEKIT_PEERS_PYTHON or ../peers/venv beside the
repository), tests/peer_formats.py also runs in it: the libraries load saekit's exports, and save
dictionaries of their own for saekit to import.
"""

import io
import json
import os
import subprocess
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import assert_one_line_error, make_model, run_cli

from saekit.config import TrainConfig
from saekit.errors import UserError
from saekit.files import read_json
from saekit.interop import (
    detect,
    export_dictionary_learning,
    export_sparsify,
    import_dictionary_learning,
    import_run,
    import_sparsify,
)
from saekit.run import RunFolder
from saekit.train import OptimConfig

D_IN, D_SAE, K = 6, 12, 3
SPARSIFY_FIELDS = {
    "activation",
    "expansion_factor",
    "normalize_decoder",
    "num_latents",
    "k",
    "multi_topk",
    "skip_connection",
    "transcode",
    "d_in",
}
DL_KINDS = {
    "relu": "AutoEncoder",
    "topk": "AutoEncoderTopK",
    "batchtopk": "BatchTopKSAE",
    "jumprelu": "JumpReluAutoEncoder",
    "matryoshka": "MatryoshkaBatchTopKSAE",  # prefixes auto: 12 // 4 = 3 and 12
}


# --- the libraries' arithmetic, written out


def scatter_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    values, indices = pre.topk(k, dim=1)
    return torch.zeros_like(pre).scatter(1, indices, values)


def sparsify_forward(cfg: dict, t: dict, x: torch.Tensor):
    """(codes, x_hat) of a sparsify SparseCoder: the k largest of relu((x - b_dec) W^T + b), decoded by W_dec."""
    sae_in = x if cfg.get("transcode") else x - t["b_dec"]
    pre = torch.relu(sae_in @ t["encoder.weight"].T + t["encoder.bias"])
    codes = scatter_topk(pre, cfg["k"])
    return codes, codes @ t["W_dec"] + t["b_dec"]


def dictionary_learning_forward(dict_class: str, s: dict, x: torch.Tensor):
    """(codes, x_hat) of a dictionary_learning dictionary of class dict_class with state_dict s."""
    if dict_class == "AutoEncoder":
        codes = torch.relu((x - s["bias"]) @ s["encoder.weight"].T + s["encoder.bias"])
        return codes, codes @ s["decoder.weight"].T + s["bias"]
    if dict_class == "AutoEncoderNew":
        codes = torch.relu(x @ s["encoder.weight"].T + s["encoder.bias"])
        return codes, codes @ s["decoder.weight"].T + s["decoder.bias"]
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        post_relu = torch.relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
        if dict_class == "AutoEncoderTopK":  # encode(use_threshold=False), its default
            codes = scatter_topk(post_relu, int(s["k"]))
        else:  # encode(use_threshold=True), its default
            codes = post_relu * (post_relu > s["threshold"])
        return codes, codes @ s["decoder.weight"].T + s["b_dec"]
    if dict_class == "JumpReluAutoEncoder":  # apply_b_dec_to_input is False when loaded from ae.pt
        pre_jump = x @ s["W_enc"] + s["b_enc"]
        codes = torch.relu(pre_jump * (pre_jump > s["threshold"]))
        return codes, codes @ s["W_dec"] + s["b_dec"]
    assert dict_class == "MatryoshkaBatchTopKSAE"
    post_relu = torch.relu((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"])
    codes = post_relu * (post_relu > s["threshold"])
    return codes, codes @ s["W_dec"] + s["b_dec"]


# --- dictionaries and files


def random_model(kind, dtype=torch.float64, pre_bias=True, seed=0):
    """A dictionary with non-zero biases and thresholds that some codes pass and some do not."""
    model = make_model(
        D_IN, D_SAE, kind, "linear", dtype=dtype, k=K, pre_bias=pre_bias, seed=seed, jumprelu_bandwidth=0.05
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.b1.copy_(0.3 * torch.randn(D_SAE, generator=g))
        model.b2.copy_(torch.randn(D_IN, generator=g))
        model.W2.mul_(1 + torch.rand(D_SAE, generator=g))  # decoder columns of several norms
        if kind == "jumprelu":
            model.jumprelu.log_threshold.copy_(torch.randn(D_SAE, generator=g) - 1.5)
        if kind == "batchtopk":
            model.batch_topk.threshold.fill_(0.3)
    return model.eval()


def inputs(n=60, seed=1, dtype=torch.float64, d=D_IN):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@torch.no_grad()
def codes_and_reconstruction(model, x):
    out = model.eval()(x)
    return model.dense_codes(out.codes), out.x_hat


def assert_same(got, expected, dtype=torch.float64):
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=tol, atol=tol)
    codes = expected[0]
    assert 0 < (codes > 0).sum() < codes.numel()  # some codes fire, not all: the selection is tested


def randn(g, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def sparsify_folder(folder, seed=0, dtype=torch.float32, **fields):
    """A sparse coder's folder as SparseCoder.save_to_disk writes it: cfg.json (config, d_in), sae.safetensors."""
    cfg = {
        "activation": "topk",
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": D_SAE,
        "k": K,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        **fields,
        "d_in": D_IN,
    }
    g = torch.Generator().manual_seed(seed)
    t = {
        "encoder.weight": randn(g, D_SAE, D_IN, dtype=dtype),
        "encoder.bias": 0.3 * randn(g, D_SAE, dtype=dtype),
        "W_dec": randn(g, D_SAE, D_IN, dtype=dtype),
        "b_dec": randn(g, D_IN, dtype=dtype),
    }
    return write_sparsify(folder, cfg, t)


def write_sparsify(folder, cfg, t):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    safetensors.torch.save_file(t, folder / "sae.safetensors")
    return folder, cfg, t


def read_sparsify_files(folder):
    return json.loads((folder / "cfg.json").read_text()), safetensors.torch.load_file(folder / "sae.safetensors")


def dl_state(dict_class, seed=0, dtype=torch.float32):
    """A state_dict of dict_class as its module holds it (buffers k int32, threshold float32)."""
    g = torch.Generator().manual_seed(seed)
    enc, dec = randn(g, D_SAE, D_IN, dtype=dtype), randn(g, D_IN, D_SAE, dtype=dtype)
    b_enc, b_dec = 0.3 * randn(g, D_SAE, dtype=dtype), randn(g, D_IN, dtype=dtype)
    k = torch.tensor(K, dtype=torch.int32)
    if dict_class == "AutoEncoder":
        return {"bias": b_dec, "encoder.weight": enc, "encoder.bias": b_enc, "decoder.weight": dec}
    if dict_class == "AutoEncoderNew":
        return {"encoder.weight": enc, "encoder.bias": b_enc, "decoder.weight": dec, "decoder.bias": b_dec}
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        threshold = torch.tensor(0.4 if dict_class == "BatchTopKSAE" else -1.0)
        linear = {"decoder.weight": dec, "encoder.weight": enc, "encoder.bias": b_enc, "b_dec": b_dec}
        return {"k": k, "threshold": threshold, **linear}
    thresholds = torch.tensor([0.3, 0.05, 0.0, -0.4, 1.7, 0.2, 0.9, 0.01, 0.5, 0.3, 0.1, 2.0], dtype=dtype)
    return {"W_enc": enc.T.contiguous(), "b_enc": b_enc, "W_dec": dec.T.contiguous(), "b_dec": b_dec} | (
        {"threshold": thresholds}
        if dict_class == "JumpReluAutoEncoder"
        else {"k": k, "threshold": torch.tensor(0.4), "group_sizes": torch.tensor([3, 9])}
    )


def dl_folder(folder, dict_class, state=None, **trainer):
    """A trainer's folder as trainSAE writes it: ae.pt (torch.save of the state_dict) and config.json."""
    state = dl_state(dict_class) if state is None else state
    config = {
        "trainer": {
            "trainer_class": "TopKTrainer",
            "dict_class": dict_class,
            "lr": 1e-3,
            "steps": 100,
            "seed": 0,
            "activation_dim": D_IN,
            "dict_size": D_SAE,
            **({"k": K} if "k" in state else {}),
            "device": "cpu",
            "layer": 3,
            "lm_name": "EleutherAI/pythia-70m-deduped",
            "wandb_name": "x",
            "submodule_name": None,
            **trainer,
        },
        "buffer": {"d_submodule": D_IN, "io": "out", "n_ctxs": 30000, "ctx_len": 128},
    }
    return write_dl(folder, config, state)


def write_dl(folder, config, state):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=4))
    torch.save(state, folder / "ae.pt")
    return folder, config, state


def read_dl_files(folder):
    return json.loads((folder / "config.json").read_text()), torch.load(folder / "ae.pt", weights_only=True)


# --- export: sparsify


@pytest.mark.parametrize("dtype,pre_bias", [(torch.float64, True), (torch.float64, False), (torch.float32, True)])
def test_sparsify_export_computes_what_saekit_computes(tmp_path, dtype, pre_bias):
    model = random_model("topk", dtype, pre_bias)
    folder = export_sparsify(model, tmp_path / "sae")
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae.safetensors"]
    cfg, t = read_sparsify_files(folder)
    assert set(cfg) == SPARSIFY_FIELDS
    assert (cfg["d_in"], cfg["num_latents"], cfg["k"], cfg["activation"]) == (D_IN, D_SAE, K, "topk")
    assert cfg["expansion_factor"] == D_SAE // D_IN  # read only where num_latents is 0
    assert not any(cfg[name] for name in ("multi_topk", "skip_connection", "transcode", "normalize_decoder"))
    shapes = {"encoder.weight": (D_SAE, D_IN), "encoder.bias": (D_SAE,), "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,)}
    assert {name: tuple(x.shape) for name, x in t.items()} == shapes
    assert all(x.dtype == dtype for x in t.values())
    x = inputs(dtype=dtype)
    assert_same(codes_and_reconstruction(model, x), sparsify_forward(cfg, t, x), dtype)
    if pre_bias:
        assert torch.equal(t["encoder.bias"], model.b1.detach())  # as it is, not folded


def test_sparsify_export_says_whether_the_decoder_has_unit_norm(tmp_path):
    model = random_model("topk")
    model.normalize_decoder_()
    cfg, _ = read_sparsify_files(export_sparsify(model, tmp_path / "sae"))
    assert cfg["normalize_decoder"] is True


def test_sparsify_export_names_the_folder_after_the_hook(tmp_path):
    model = random_model("topk")
    folder = export_sparsify(model, tmp_path / "ckpt", hook_name="layers.6.mlp")
    assert folder == tmp_path / "ckpt" / "layers.6.mlp"
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae.safetensors"]
    for bad in ("a/b", "..", ""):
        with pytest.raises(UserError, match="cannot name a folder"):
            export_sparsify(model, tmp_path / "ckpt", hook_name=bad)
    with pytest.raises(UserError, match="no place for model_name"):
        export_sparsify(model, tmp_path / "other", model_name="gpt2")


@pytest.mark.parametrize(
    "kind,output",
    [("batchtopk", "linear"), ("relu", "linear"), ("jumprelu", "linear"), ("sigmoid", "sigmoid"), ("topk", "sigmoid")],
)
def test_sparsify_refuses_what_it_has_no_equivalent_for(tmp_path, kind, output):
    model = make_model(D_IN, D_SAE, kind, output, k=K)
    with pytest.raises(UserError, match="no sparsify equivalent.*only topk"):
        export_sparsify(model, tmp_path / "sae")
    assert not (tmp_path / "sae").exists()


# --- export: dictionary_learning


@pytest.mark.parametrize("kind", DL_KINDS)
@pytest.mark.parametrize("dtype,pre_bias", [(torch.float64, True), (torch.float64, False), (torch.float32, True)])
def test_dictionary_learning_export_computes_what_saekit_computes(tmp_path, kind, dtype, pre_bias):
    model = random_model(kind, dtype, pre_bias, seed=2)
    folder = export_dictionary_learning(model, tmp_path / "trainer_0", model_name="gpt2", hook_name="h.3")
    assert sorted(p.name for p in folder.iterdir()) == ["ae.pt", "config.json"]
    config, state = read_dl_files(folder)
    trainer = config["trainer"]
    dict_class = DL_KINDS[kind]
    assert trainer["dict_class"] == dict_class
    assert (trainer["activation_dim"], trainer["dict_size"]) == (D_IN, D_SAE)
    assert (trainer["lm_name"], trainer["submodule_name"]) == ("gpt2", "h.3")
    assert trainer.get("k") == (K if kind in ("topk", "batchtopk", "matryoshka") else None)  # load_dictionary reads it
    expected = {
        "relu": {
            "bias": (D_IN,),
            "encoder.weight": (D_SAE, D_IN),
            "encoder.bias": (D_SAE,),
            "decoder.weight": (D_IN, D_SAE),
        },
        "topk": {
            "k": (),
            "threshold": (),
            "encoder.weight": (D_SAE, D_IN),
            "encoder.bias": (D_SAE,),
            "decoder.weight": (D_IN, D_SAE),
            "b_dec": (D_IN,),
        },
        "jumprelu": {
            "W_enc": (D_IN, D_SAE),
            "b_enc": (D_SAE,),
            "W_dec": (D_SAE, D_IN),
            "b_dec": (D_IN,),
            "threshold": (D_SAE,),
        },
    }
    expected["batchtopk"] = expected["topk"]
    expected["matryoshka"] = {**expected["jumprelu"], "threshold": (), "k": (), "group_sizes": (2,)}
    assert {name: tuple(x.shape) for name, x in state.items()} == expected[kind]
    if "k" in state:
        assert state["k"].dtype == torch.int32 and int(state["k"]) == K
    x = inputs(dtype=dtype)
    assert_same(codes_and_reconstruction(model, x), dictionary_learning_forward(dict_class, state, x), dtype)


def test_dictionary_learning_export_thresholds(tmp_path):
    _, state = read_dl_files(export_dictionary_learning(random_model("topk"), tmp_path / "topk"))
    assert float(state["threshold"]) == -1.0  # "not estimated": its TopK then encodes with k only
    _, state = read_dl_files(export_dictionary_learning(random_model("batchtopk"), tmp_path / "batchtopk"))
    assert float(state["threshold"]) == 0.3
    jumprelu = random_model("jumprelu")
    _, state = read_dl_files(export_dictionary_learning(jumprelu, tmp_path / "jumprelu"))
    assert torch.equal(state["threshold"], jumprelu.jumprelu.log_threshold.detach().exp())


@pytest.mark.parametrize("output", ["sigmoid", "linear"])
def test_dictionary_learning_refuses_sigmoid_dictionaries(tmp_path, output):
    with pytest.raises(UserError, match="no dictionary_learning equivalent"):
        export_dictionary_learning(make_model(D_IN, D_SAE, "sigmoid", output), tmp_path / "ae")
    with pytest.raises(UserError, match="no dictionary_learning equivalent"):
        export_dictionary_learning(make_model(D_IN, D_SAE, "relu", "sigmoid"), tmp_path / "ae")


@pytest.mark.parametrize("export,files", [(export_sparsify, "cfg.json"), (export_dictionary_learning, "ae.pt")])
def test_export_does_not_overwrite_unless_asked_nor_ever_a_run_folder(tmp_path, export, files):
    model = random_model("topk")
    export(model, tmp_path / "out")
    with pytest.raises(UserError, match=f"{files}.* already exists"):
        export(model, tmp_path / "out")
    export(model, tmp_path / "out", overwrite=True)
    RunFolder(tmp_path / "run").save_model(model)
    before = read_json(tmp_path / "run" / "cfg.json")
    with pytest.raises(UserError, match="saekit run folder"):
        export(model, tmp_path / "run", overwrite=True)
    assert read_json(tmp_path / "run" / "cfg.json") == before and not (tmp_path / "run" / "ae.pt").exists()


# --- import: sparsify


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_import_sparsify_computes_what_sparsify_computes(tmp_path, dtype):
    folder, cfg, t = sparsify_folder(tmp_path / "layers.3", dtype=dtype)
    model = import_sparsify(folder)
    assert (model.kind, model.n_inputs, model.n_hidden, model.cfg.k, model.cfg.pre_bias) == (
        "topk",
        D_IN,
        D_SAE,
        K,
        True,
    )
    assert model.W1.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    x = inputs(dtype=model.W1.dtype)
    assert_same(
        codes_and_reconstruction(model, x), sparsify_forward(cfg, {n: v.to(x.dtype) for n, v in t.items()}, x), x.dtype
    )
    assert torch.equal(model.W1, t["encoder.weight"].to(x.dtype)) and model.W2.t().is_contiguous()


def test_import_sparsify_with_expansion_factor_old_fields_and_multi_topk(tmp_path):
    """num_latents 0 (d_in * expansion_factor latents); an older cfg.json without activation or transcode, but
    with signed false; Multi-TopK, a training loss only: the coder encodes with its k."""
    folder, cfg, t = sparsify_folder(tmp_path / "sae", num_latents=0, expansion_factor=2, multi_topk=True)
    del cfg["activation"], cfg["transcode"]
    write_sparsify(folder, cfg | {"signed": False}, t)
    model = import_sparsify(folder)
    assert (model.n_hidden, model.cfg.k) == (2 * D_IN, K)
    x = inputs(dtype=torch.float32)
    assert_same(codes_and_reconstruction(model, x), sparsify_forward(cfg, t, x), torch.float32)


def change_cfg(**fields):
    return lambda cfg, t: cfg.update(fields)


@pytest.mark.parametrize(
    "change,file,message",
    [
        (change_cfg(skip_connection=True), "cfg.json", "skip_connection without transcode"),
        (change_cfg(transcode=True, skip_connection=True), "sae.safetensors", r"needs exactly \['W_dec', 'W_skip'"),
        (change_cfg(signed=True), "cfg.json", "signed is True"),
        (change_cfg(activation="groupmax"), "cfg.json", "activation 'groupmax' has no saekit equivalent"),
        (change_cfg(batch_topk=True), "cfg.json", r"fields saekit does not know \(batch_topk\)"),
        (change_cfg(k=0), "cfg.json", "k must be a whole number >= 1"),
        (change_cfg(k=13), "cfg.json", "--k must lie between 1 and --n-hidden = 12"),
        (change_cfg(d_in="6"), "cfg.json", "d_in must be a whole number"),
        (change_cfg(num_latents=0, expansion_factor=0), "cfg.json", "expansion_factor must be a whole number"),
        (
            change_cfg(num_latents=10),
            "sae.safetensors",
            r"encoder.weight has shape \(12, 6\), but d_in and num_latents",
        ),
        (lambda cfg, t: t.update(W_dec=t["W_dec"].T.contiguous()), "sae.safetensors", r"W_dec has shape \(6, 12\)"),
        (lambda cfg, t: t.pop("encoder.bias"), "sae.safetensors", "but this SAE needs exactly"),
        (lambda cfg, t: t.update(W_skip=torch.zeros(D_IN, D_IN)), "sae.safetensors", "W_skip"),
        (lambda cfg, t: t["b_dec"].__setitem__(0, torch.inf), "sae.safetensors", "b_dec must hold finite"),
    ],
)
def test_import_sparsify_bad_folders_raise_one_clear_user_error(tmp_path, change, file, message):
    folder, cfg, t = sparsify_folder(tmp_path / "sae")
    change(cfg, t)
    write_sparsify(folder, cfg, t)
    with pytest.raises(UserError, match=message) as e:
        import_sparsify(folder)
    assert str(folder / file) in str(e.value) and "\n" not in str(e.value)


def test_import_sparsify_missing_or_corrupt_files(tmp_path):
    folder, _, _ = sparsify_folder(tmp_path / "sae")
    (folder / "sae.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="sae.safetensors is corrupt"):
        import_sparsify(folder)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(UserError, match="cfg.json is corrupt"):
        import_sparsify(folder)
    (folder / "cfg.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="cfg.json must hold a JSON object"):
        import_sparsify(folder)
    (folder / "sae.safetensors").unlink()
    with pytest.raises(UserError, match="sae.safetensors is missing; a sparsify sparse coder's folder holds"):
        import_sparsify(folder)


# --- import: dictionary_learning


@pytest.mark.parametrize(
    "dict_class,kind,pre_bias",
    [
        ("AutoEncoder", "relu", True),
        ("AutoEncoderNew", "relu", False),
        ("AutoEncoderTopK", "topk", True),
        ("BatchTopKSAE", "batchtopk", True),
        ("JumpReluAutoEncoder", "jumprelu", False),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_import_dictionary_learning_computes_what_it_computes(tmp_path, dict_class, kind, pre_bias, dtype):
    state = dl_state(dict_class, seed=3, dtype=dtype)
    folder, _, _ = dl_folder(tmp_path / "trainer_0", dict_class, state, bandwidth=0.002)
    model = import_dictionary_learning(folder)
    assert (model.kind, model.n_inputs, model.n_hidden, model.cfg.pre_bias) == (kind, D_IN, D_SAE, pre_bias)
    assert model.W1.dtype == dtype and model.cfg.output == "linear"
    if kind in ("topk", "batchtopk"):
        assert model.cfg.k == K
    if kind == "jumprelu":
        assert model.cfg.jumprelu_bandwidth == 0.002  # the JumpReluTrainer's
    x = inputs(dtype=dtype)
    state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in state.items()}
    assert_same(codes_and_reconstruction(model, x), dictionary_learning_forward(dict_class, state, x), dtype)


def test_import_batchtopk_with_unestimated_threshold_keeps_every_positive_code(tmp_path):
    state = dl_state("BatchTopKSAE") | {"threshold": torch.tensor(-1.0)}
    folder, _, _ = dl_folder(tmp_path / "trainer_0", "BatchTopKSAE", state)
    model = import_dictionary_learning(folder)
    x = inputs(dtype=torch.float32)
    assert_same(
        codes_and_reconstruction(model, x), dictionary_learning_forward("BatchTopKSAE", state, x), torch.float32
    )
    assert torch.equal(codes_and_reconstruction(model, x)[0], torch.relu(model.pre_activations(x)).detach())


def change_state(**entries):
    return lambda config, state: state.update(entries)


def change_trainer(**entries):
    return lambda config, state: config["trainer"].update(entries)


@pytest.mark.parametrize(
    "dict_class,change,file,message",
    [
        (
            "AutoEncoder",
            change_trainer(dict_class="GatedAutoEncoder"),
            "config.json",
            "GatedAutoEncoder has no saekit equivalent; saekit reads AutoEncoder, AutoEncoderTopK",
        ),
        ("AutoEncoder", lambda config, state: config.pop("trainer"), "config.json", "trainer.dict_class"),
        ("AutoEncoder", change_trainer(activation_dim=7), "config.json", "activation_dim = 7, but"),
        ("AutoEncoderTopK", change_trainer(dict_size=11), "config.json", "dict_size = 11, but"),
        ("AutoEncoderTopK", change_trainer(k=4), "ae.pt", "has k = 3, but its config.json says k = 4"),
        ("AutoEncoderTopK", change_state(k=torch.tensor(3.0)), "ae.pt", "k must be a whole number"),
        (
            "AutoEncoderTopK",
            lambda config, state: (state.update(k=torch.tensor(20)), config["trainer"].update(k=20)),
            "ae.pt",
            "--k must lie between",
        ),
        ("BatchTopKSAE", change_state(threshold=torch.zeros(D_SAE)), "ae.pt", r"threshold must be .* of shape \(\)"),
        ("JumpReluAutoEncoder", change_state(threshold=torch.full((D_SAE,), torch.nan)), "ae.pt", "finite"),
        ("AutoEncoder", change_state(bias=torch.zeros(D_IN + 1)), "ae.pt", r"bias has shape \(7,\)"),
        ("AutoEncoder", change_state(scale=torch.ones(1)), "ae.pt", "but this SAE needs exactly"),
        ("AutoEncoder", lambda config, state: state.pop("decoder.weight"), "ae.pt", "but this SAE needs"),
        ("AutoEncoder", lambda config, state: state.pop("encoder.weight"), "ae.pt", "holds no 2-d encoder.weight"),
        ("JumpReluAutoEncoder", change_state(W_dec=torch.zeros(D_IN, D_SAE)), "ae.pt", r"W_dec has shape \(6, 12\)"),
    ],
)
def test_import_dictionary_learning_bad_folders_raise_one_clear_user_error(tmp_path, dict_class, change, file, message):
    folder, config, state = dl_folder(tmp_path / "trainer_0", dict_class)
    change(config, state)
    write_dl(folder, config, state)
    with pytest.raises(UserError, match=message) as e:
        import_dictionary_learning(folder)
    assert str(folder / file) in str(e.value) and "\n" not in str(e.value)


def test_import_dictionary_learning_missing_or_corrupt_files(tmp_path):
    folder, _, _ = dl_folder(tmp_path / "trainer_0", "AutoEncoder")
    for data in (b"garbage", b"", b"PK\x03\x04garbage"):
        (folder / "ae.pt").write_bytes(data)
        with pytest.raises(UserError, match="ae.pt is corrupt or not a state_dict"):
            import_dictionary_learning(folder)
    torch.save([torch.zeros(2)], folder / "ae.pt")
    with pytest.raises(UserError, match="ae.pt must hold a state_dict"):
        import_dictionary_learning(folder)
    buffer = io.BytesIO()
    torch.save({"encoder.weight": UserError("code")}, buffer)  # a pickled object: never unpickled
    (folder / "ae.pt").write_bytes(buffer.getvalue())
    with pytest.raises(UserError, match="ae.pt is corrupt or not a state_dict"):
        import_dictionary_learning(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json is corrupt"):
        import_dictionary_learning(folder)
    (folder / "config.json").unlink()
    with pytest.raises(UserError, match="config.json is missing; a dictionary_learning trainer's folder holds"):
        import_dictionary_learning(folder)


def test_matryoshka_batchtopk_of_dictionary_learning(tmp_path):
    """Read as saekit's matryoshka kind, its prefixes the cumulative sums of the group sizes."""
    folder, _, state = dl_folder(tmp_path / "trainer_0", "MatryoshkaBatchTopKSAE")
    model = import_dictionary_learning(folder)
    assert model.cfg.prefixes() == state["group_sizes"].cumsum(0).tolist()
    x = inputs(dtype=torch.float32)
    assert_same(
        codes_and_reconstruction(model, x),
        dictionary_learning_forward("MatryoshkaBatchTopKSAE", state, x),
        torch.float32,
    )


# --- both ways


@pytest.mark.parametrize(
    "export,load,kind",
    [(export_sparsify, import_sparsify, "topk")]
    + [(export_dictionary_learning, import_dictionary_learning, k) for k in DL_KINDS],
)
@pytest.mark.parametrize("pre_bias", [True, False])
def test_round_trip_computes_the_same_codes(tmp_path, export, load, kind, pre_bias):
    model = random_model(kind, pre_bias=pre_bias, seed=4)
    back = load(export(model, tmp_path / "out"))
    assert (back.kind, back.n_inputs, back.n_hidden, back.W1.dtype) == (kind, D_IN, D_SAE, torch.float64)
    assert getattr(back.cfg, "k", None) == getattr(model.cfg, "k", None)
    x = inputs()
    assert_same(codes_and_reconstruction(back, x), codes_and_reconstruction(model, x))
    assert torch.equal(back.W1, model.W1) and torch.equal(back.W2, model.W2) and torch.equal(back.b2, model.b2)


# --- the command line, and telling the format from the files


def saved_run(path, model):
    run = RunFolder.create(path, "run")
    run.save_model(model)
    run.save_config(TrainConfig(model=model.cfg, optim=OptimConfig(optimizer="adam")), "custom")
    return path


@pytest.mark.parametrize(
    "fmt,kind,says,files",
    [
        ("sparsify", "topk", "a sparsify sparse coder (activation 'topk')", ["cfg.json", "sae.safetensors"]),
        ("dictionary-learning", "batchtopk", "a dictionary_learning BatchTopKSAE", ["ae.pt", "config.json"]),
        ("saelens", "jumprelu", "a SAELens 'jumprelu' SAE", ["cfg.json", "sae_weights.safetensors"]),
    ],
)
def test_export_and_import_commands_in_each_format(tmp_path, capsys, fmt, kind, says, files):
    model = random_model(kind)
    run = saved_run(tmp_path / "run", model)
    assert run_cli(["export", str(run), "--out", str(tmp_path / "out"), "--format", fmt]) == 0
    assert says in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == files
    assert detect(tmp_path / "out").name == fmt
    assert run_cli(["import", str(tmp_path / "out"), "--out", str(tmp_path / "back")]) == 0
    assert f"from the {detect(tmp_path / 'out').title} folder" in capsys.readouterr().out
    back = RunFolder.open(tmp_path / "back")
    x = inputs()
    assert_same(codes_and_reconstruction(back.load_model(), x), codes_and_reconstruction(model, x))
    record = back.record()
    assert record["imported_format"] == fmt and record["imported_from"] == str((tmp_path / "out").resolve())
    settings = "config.json" if fmt == "dictionary-learning" else "cfg.json"
    assert record[f"{fmt.replace('-', '_')}_cfg"] == json.loads((tmp_path / "out" / settings).read_text())


def test_export_command_hook_and_model_names(tmp_path):
    run = saved_run(tmp_path / "run", random_model("topk"))
    out = tmp_path / "ckpt"
    assert run_cli(["export", str(run), "--out", str(out), "--format", "sparsify", "--hook-name", "layers.2"]) == 0
    assert (out / "layers.2" / "sae.safetensors").is_file()
    args = ["--format", "dictionary-learning", "--hook-name", "layers.2", "--model-name", "m"]
    assert run_cli(["export", str(run), "--out", str(tmp_path / "dl"), *args]) == 0
    trainer = json.loads((tmp_path / "dl" / "config.json").read_text())["trainer"]
    assert (trainer["lm_name"], trainer["submodule_name"]) == ("m", "layers.2")


def test_import_folder_of_several_dictionaries_names_them(tmp_path, capsys):
    for hook in ("layers.0", "layers.1"):
        sparsify_folder(tmp_path / "ckpt" / hook)
    code = run_cli(["import", str(tmp_path / "ckpt")])
    assert_one_line_error(
        code,
        capsys.readouterr().err,
        "holds no dictionary itself, but its folders",
        "layers.0, layers.1",
        f"saekit import {tmp_path / 'ckpt' / 'layers.0'}",
    )
    assert run_cli(["import", str(tmp_path / "ckpt" / "layers.1"), "--out", str(tmp_path / "run")]) == 0


@pytest.mark.parametrize(
    "setup,words",
    [
        (lambda p: p.mkdir(), ["holds no dictionary that saekit reads", "sparsify (cfg.json + sae.safetensors)"]),
        (lambda p: p.write_text("x"), ["is not a folder"]),
        (lambda p: RunFolder(p).save_model(random_model("topk")), ["is a saekit run folder already"]),
        (
            lambda p: (p.mkdir(), (p / "ae.pt").write_bytes(b""), (p / "sae.safetensors").write_bytes(b"")),
            ["holds sae.safetensors and ae.pt", "--format"],
        ),
        (lambda p: (p.mkdir(), (p / "ae.pt").write_bytes(b"")), ["config.json is missing"]),
    ],
)
def test_import_command_refuses_folders_it_cannot_read_in_one_line(tmp_path, capsys, setup, words):
    setup(tmp_path / "in")
    code = run_cli(["import", str(tmp_path / "in"), "--out", str(tmp_path / "run")])
    assert_one_line_error(code, capsys.readouterr().err, *words)
    assert not (tmp_path / "run" / "config.json").exists()


def test_import_command_format_option_overrides_detection(tmp_path, capsys):
    folder, _, _ = sparsify_folder(tmp_path / "sae")
    code = run_cli(["import", str(folder), "--format", "saelens", "--out", str(tmp_path / "run")])
    assert_one_line_error(code, capsys.readouterr().err, "sae_weights.safetensors is missing")
    assert import_run(folder, tmp_path / "run", "sparsify")[0].kind == "topk"


@pytest.mark.parametrize("fmt,kind", [("sparsify", "batchtopk"), ("dictionary-learning", "sigmoid")])
def test_export_command_refuses_kinds_without_equivalent_in_one_line(tmp_path, capsys, fmt, kind):
    run = saved_run(tmp_path / "run", make_model(D_IN, D_SAE, kind, "linear", k=K))
    code = run_cli(["export", str(run), "--out", str(tmp_path / "out"), "--format", fmt])
    assert_one_line_error(code, capsys.readouterr().err, "equivalent")


# --- the libraries themselves, where their environment exists


def peers_python() -> Path:
    candidate = os.environ.get("SAEKIT_PEERS_PYTHON") or Path(__file__).resolve().parents[2] / "peers/venv/bin/python"
    if not Path(candidate).is_file():
        pytest.skip(f"the peers' Python (sparsify, dictionary_learning) is not at {candidate}")
    return Path(candidate)


@pytest.mark.slow
def test_the_libraries_load_saekits_exports_and_saekit_loads_theirs(tmp_path):
    python = peers_python()
    x = inputs(n=200, seed=7, dtype=torch.float32)
    (tmp_path / "saekit").mkdir()
    safetensors.torch.save_file({"x": x}, tmp_path / "inputs.safetensors")
    models = {"sparsify-topk": random_model("topk", torch.float32, seed=8)}
    models["sparsify-topk-no-pre-bias"] = random_model("topk", torch.float32, pre_bias=False, seed=9)
    for kind in DL_KINDS:
        models[f"dictionary-learning-{kind}"] = random_model(kind, torch.float32, pre_bias=kind != "relu", seed=10)
    for name, model in models.items():
        export = export_sparsify if name.startswith("sparsify") else export_dictionary_learning
        export(model, tmp_path / "saekit" / name)
    done = subprocess.run(
        [str(python), str(Path(__file__).with_name("peer_formats.py")), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": "", "SPARSIFY_DISABLE_TRITON": "1"},  # no GPU: its eager decoder
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # (a) each library's own loader computes saekit's codes
    for name, model in models.items():
        theirs = safetensors.torch.load_file(tmp_path / "codes" / f"saekit-{name}.safetensors")
        ours = codes_and_reconstruction(model, x)
        assert_same(ours, (theirs["codes"], theirs["x_hat"]), torch.float32)
        if "codes_loader" in theirs:  # load_dictionary: decoder columns rescaled to unit norm, codes with them
            norms = model.W2.detach().norm(dim=0)
            assert_same((ours[0] * norms, ours[1]), (theirs["codes_loader"], theirs["x_hat_loader"]), torch.float32)
    # (b) saekit computes the codes of each library's own dictionaries
    peers = sorted((tmp_path / "peers").glob("*-*"))
    assert len(peers) == 8, peers
    for folder in peers:
        theirs = safetensors.torch.load_file(tmp_path / "codes" / f"peers-{folder.name}.safetensors")
        model = import_run(folder, tmp_path / "runs" / folder.name)[0]
        assert_same(codes_and_reconstruction(model, x), (theirs["codes"], theirs["x_hat"]), torch.float32)
