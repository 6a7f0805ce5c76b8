"""dictionary_learning interop (saprmarks/dictionary_learning): write a saekit dictionary as a trainer's folder, and
read one.

    FOLDER/ae.pt         the dictionary's state_dict (torch.save), its names and layouts by class, below
    FOLDER/config.json   {"trainer": {"dict_class", "trainer_class", "activation_dim", "dict_size", "k", "lm_name",
                          "layer", "submodule_name", ...}, "buffer": {...}}

That is the folder `trainSAE` writes per trainer (save_dir/trainer_i/) and
`dictionary_learning.utils.load_dictionary` reads (checked against dictionary_learning 0.1). Its
classes compute z = (x - b_dec if it subtracts b_dec) W_enc + b_enc, and x_hat = codes W_dec + b_dec:

    class                   state_dict (d = activation_dim, n = dict_size)          subtracts b_dec  codes
    AutoEncoder             encoder.weight (n, d), encoder.bias, decoder.weight     yes     relu(z)
                            (d, n), bias (d,)
    AutoEncoderNew          the same, with decoder.bias (d,) for bias               no      relu(z)
    AutoEncoderTopK         encoder.weight, encoder.bias, decoder.weight, b_dec,    yes     k largest of relu(z)
                            k (int), threshold (a number, unused by its encode)
    BatchTopKSAE            as AutoEncoderTopK                                      yes     relu(z) where > threshold
    JumpReluAutoEncoder     W_enc (d, n), b_enc, W_dec (n, d), b_dec, threshold (n) no      z where z > threshold, >= 0
    MatryoshkaBatchTopKSAE  W_enc, b_enc, W_dec, b_dec, k, threshold, group_sizes   yes     as BatchTopKSAE

(JumpReluAutoEncoder's apply_b_dec_to_input is not saved, and is false when loaded.) So
W1 = encoder.weight = W_enc^T, b1 = the encoder bias, W2 = decoder.weight = W_dec^T, b2 = the
decoder's bias, and pre_bias = whether the class subtracts b_dec (a dictionary whose pre_bias
differs is written with b2 folded into the encoder bias). Each kind says which class it maps to
(`dictionary_learning_*` members):

    saekit      dictionary_learning
    relu        AutoEncoder (and AutoEncoderNew, read)
    topk        AutoEncoderTopK, k, threshold -1 ("not estimated")
    batchtopk   BatchTopKSAE, k, threshold = the inference threshold
    jumprelu    JumpReluAutoEncoder, threshold = exp(log_threshold); the trainer's bandwidth is read

A dictionary trained with normalize_activations is saved for raw activations (its biases and
threshold scaled back), which is what saekit reads. `AutoEncoder.from_pretrained` (and so
load_dictionary) rescales a ReLU dictionary's decoder columns to unit norm by default, and its
codes by the norms with them; saekit keeps the weights as ae.pt holds them.
"""

import io
import pickle
from pathlib import Path
from typing import NamedTuple

import torch

from .. import __version__
from ..errors import UserError
from ..kinds import KINDS, SparseAutoencoder
from .common import (
    check_names,
    check_output_folder,
    check_tensors,
    cpu_tensors,
    encoder_bias,
    imported_model,
    json_bytes,
    read_settings,
    reading_kind,
    refuse_transcoder,
    require_files,
    write_files,
)

WEIGHTS_NAME = "ae.pt"
CFG_NAME = "config.json"


class Layout(NamedTuple):
    """How a dictionary_learning class keeps saekit's W1, b1, W2, b2."""

    names: tuple[str, str, str, str]  # the state_dict's names of W1, b1, W2, b2
    linear: bool  # nn.Linear weights, W1 and W2 as they are; else W_enc = W1^T, W_dec = W2^T
    subtracts_b2: bool  # its encoder sees x - b2


LINEAR_TOPK = Layout(("encoder.weight", "encoder.bias", "decoder.weight", "b_dec"), True, True)
PARAMETERS = ("W_enc", "b_enc", "W_dec", "b_dec")
LAYOUTS = {
    "AutoEncoder": Layout(("encoder.weight", "encoder.bias", "decoder.weight", "bias"), True, True),
    "AutoEncoderNew": Layout(("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"), True, False),
    "AutoEncoderTopK": LINEAR_TOPK,
    "BatchTopKSAE": LINEAR_TOPK,
    "JumpReluAutoEncoder": Layout(PARAMETERS, False, False),
    "MatryoshkaBatchTopKSAE": Layout(PARAMETERS, False, True),
}


def describe(model: SparseAutoencoder) -> str:
    return f"a dictionary_learning {model.dictionary_learning_class}"


def dictionary_learning_state(model: SparseAutoencoder) -> dict[str, torch.Tensor]:
    """ae.pt of `model`: its weights under its dictionary_learning class's names and layouts, and the kind's buffers."""
    dict_class = model.dictionary_learning_class
    if dict_class is None or model.cfg.output != "linear":
        exportable = ", ".join(name for name, cls in KINDS.items() if cls.dictionary_learning_class)
        raise UserError(
            f"this dictionary ({model.kind} codes, {model.cfg.output} output) has no dictionary_learning "
            f"equivalent; only {exportable} dictionaries with --output linear can be exported to it."
        )
    layout = LAYOUTS[dict_class]
    with torch.no_grad():
        b1 = encoder_bias(model, layout.subtracts_b2)
        W1, W2 = (model.W1, model.W2) if layout.linear else (model.W1.t(), model.W2.t())
        weights = dict(zip(layout.names, (W1, b1, W2, model.b2)))
        return cpu_tensors(weights | model.dictionary_learning_buffers())


def dictionary_learning_config(model: SparseAutoencoder, state: dict, **info) -> dict:
    """config.json of `model`: the trainer's entries that load_dictionary and others read, and saekit's own."""
    trainer = {
        "dict_class": model.dictionary_learning_class,
        "trainer_class": "saekit",
        "activation_dim": model.n_inputs,
        "dict_size": model.n_hidden,
        **({"k": int(state["k"])} if "k" in state else {}),  # load_dictionary reads k here
        "lm_name": info.pop("model_name", None),
        "layer": None,
        "submodule_name": info.pop("hook_name", None),
        **info,
        "saekit_version": __version__,
        "saekit_architecture": model.architecture(),
    }
    return {"trainer": trainer}


def export_dictionary_learning(model: SparseAutoencoder, folder, overwrite: bool = False, **info) -> Path:
    """Write `model` into `folder` as a dictionary_learning trainer's folder (ae.pt, config.json); returns it.

    `info` goes into config.json's trainer entries: model_name as lm_name, hook_name as submodule_name.
    """
    refuse_transcoder(model, "dictionary_learning")
    folder = Path(folder)
    check_output_folder(folder, (WEIGHTS_NAME, CFG_NAME), overwrite)
    state = dictionary_learning_state(model)
    cfg = json_bytes(dictionary_learning_config(model, state, **info), folder / CFG_NAME)
    weights = io.BytesIO()
    torch.save(state, weights)
    return write_files(folder, {WEIGHTS_NAME: weights.getvalue(), CFG_NAME: cfg})  # config.json last


def read_dictionary_learning(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the trainer entries of config.json, the state_dict of ae.pt) of a dictionary_learning trainer's folder."""
    folder = Path(folder)
    require_files(
        folder,
        (WEIGHTS_NAME, CFG_NAME),
        f"a dictionary_learning trainer's folder holds {WEIGHTS_NAME} and {CFG_NAME} "
        f"(trainSAE writes one per trainer: save_dir/trainer_0, ...)",
    )
    trainer = read_settings(folder / CFG_NAME).get("trainer")
    if not isinstance(trainer, dict) or not isinstance(trainer.get("dict_class"), str):
        raise UserError(f"{folder / CFG_NAME} names no dictionary class: it needs trainer.dict_class.")
    path = folder / WEIGHTS_NAME
    try:  # weights_only: tensors and plain containers, no code runs
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is corrupt or not a state_dict saved by torch.save ({first_line}).") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise UserError(f"{path} must hold a state_dict: names and tensors.")
    return trainer, state


def _sizes(trainer: dict, state: dict, layout: Layout, where: str, config: Path) -> tuple[int, int]:
    """(d_in, d_sae) from the encoder's weight, as dictionary_learning's loaders take them, checked against config."""
    W = state.get(layout.names[0])
    if not isinstance(W, torch.Tensor) or W.ndim != 2:
        raise UserError(f"{where} holds no 2-d {layout.names[0]}, which a {trainer['dict_class']} has.")
    d_sae, d_in = W.shape if layout.linear else W.shape[::-1]
    for name, size in (("activation_dim", d_in), ("dict_size", d_sae)):
        if trainer.get(name, size) != size:
            raise UserError(f"{config} says {name} = {trainer[name]!r}, but {where} holds {layout.names[0]} of {size}.")
    return d_in, d_sae


def _check_buffers(state: dict, buffers: dict[str, torch.Tensor], where: str) -> None:
    """The kind's entries in the state: of its shapes, integer or finite floating point like its own."""
    for name, expected in buffers.items():
        t = state[name]
        if tuple(t.shape) != tuple(expected.shape) or t.is_floating_point() != expected.is_floating_point():
            kind = "floating-point" if expected.is_floating_point() else "integer"
            got = f"{t.dtype} of shape {tuple(t.shape)}"
            raise UserError(f"{where}: {name} must be {kind} of shape {tuple(expected.shape)} (got {got}).")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(f"{where}: {name} must hold finite numbers.")


def import_dictionary_learning(folder) -> SparseAutoencoder:
    """The saekit dictionary of a dictionary_learning trainer's folder, linear output, in float64 if stored so,
    else float32."""
    folder = Path(folder)
    trainer, state = read_dictionary_learning(folder)
    where, dict_class = str(folder / WEIGHTS_NAME), trainer["dict_class"]
    layout = LAYOUTS.get(dict_class)
    found = reading_kind(lambda cls: cls.from_dictionary_learning(trainer, state, where)) if layout else None
    if layout is None or found is None:
        readable = sorted({cls.dictionary_learning_class for cls in KINDS.values() if cls.dictionary_learning_class})
        raise UserError(
            f"{folder / CFG_NAME}: dictionary_learning's {dict_class} has no saekit equivalent; saekit reads "
            f"{', '.join(readable)} (and AutoEncoderNew)."
        )
    d_in, d_sae = _sizes(trainer, state, layout, where, folder / CFG_NAME)
    W_enc, b_enc, W_dec, b_dec = layout.names
    shapes: dict[str, tuple[int, ...]] = {b_enc: (d_sae,), b_dec: (d_in,)}
    shapes |= (
        {W_enc: (d_sae, d_in), W_dec: (d_in, d_sae)} if layout.linear else {W_enc: (d_in, d_sae), W_dec: (d_sae, d_in)}
    )
    check_tensors(state, shapes, where, "activation_dim and dict_size")
    W1, W2 = (state[W_enc], state[W_dec]) if layout.linear else (state[W_enc].t(), state[W_dec].t())
    cls, settings = found
    model = imported_model(cls, settings, (W1, state[b_enc], W2, state[b_dec]), layout.subtracts_b2, where)
    buffers = model.dictionary_learning_buffers()
    check_names(state, [*layout.names, *buffers], where)
    _check_buffers(state, buffers, where)
    floating = {name: state[name].to(model.W1.dtype) for name in buffers if state[name].is_floating_point()}
    model.load_dictionary_learning_buffers(state | floating)
    return model
