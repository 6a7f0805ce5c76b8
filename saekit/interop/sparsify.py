"""sparsify interop (EleutherAI's eai-sparsify): write a saekit dictionary as a sparse coder's folder, and read one.

    FOLDER/cfg.json          d_in, num_latents (or expansion_factor: num_latents = d_in * expansion_factor),
                             activation "topk", k, normalize_decoder, multi_topk, skip_connection, transcode
    FOLDER/sae.safetensors   encoder.weight (num_latents, d_in), encoder.bias (num_latents,),
                             W_dec (num_latents, d_in), b_dec (d_in,)

That is the folder `SparseCoder.save_to_disk` writes and `SparseCoder.load_from_disk` reads
(checked against sparsify 1.3); a training run keeps one per hook point, named after it
(`SparseCoder.load_many` reads them all). sparsify computes

    codes = the k largest of relu((x - b_dec) encoder.weight^T + encoder.bias),   x_hat = codes W_dec + b_dec

which is saekit's topk kind with W1 = encoder.weight, b1 = encoder.bias, W2 = W_dec^T, b2 = b_dec
and pre_bias (a dictionary trained without it is written with b2 folded into encoder.bias). Each
kind says how it maps (`sparsify_*` members); only topk has an equivalent. Transcoders are
sparsify's `transcode: true` coders, which never subtract b_dec from the input and reconstruct
another place of the same width d_in (a transcoder between widths that differ is refused); with
`skip_connection: true`, W_skip (d_in, d_in) adds x W_skip^T to the output. What sparsify's
fields change beyond that is refused, naming the field: activation "groupmax" and old versions'
signed codes. multi_topk and normalize_decoder only change training: a Multi-TopK coder encodes
with its k as any other.
"""

from pathlib import Path

import torch

from ..errors import UserError
from ..kinds import KINDS, SparseAutoencoder
from .common import (
    Transcoding,
    check_names,
    check_tensors,
    cpu_tensors,
    encoder_bias,
    imported_model,
    positive_int,
    read_settings_and_tensors,
    reading_kind,
    write_settings_and_tensors,
)

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae.safetensors"
TENSORS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
# SparseCoderConfig's fields and defaults (sparsify 1.3), in the order it writes them; d_in follows.
DEFAULTS = {
    "activation": "topk",
    "expansion_factor": 32,
    "normalize_decoder": True,
    "num_latents": 0,
    "k": 32,
    "multi_topk": False,
    "skip_connection": False,
    "transcode": False,
}
# Fields whose value saekit has no equivalent for: (the value saekit reads, why not another).
ONLY = {
    "signed": (False, "signed codes (older sparsify), which saekit's TopK does not keep"),
}
UNIT_NORM = 1e-4  # decoder columns this close to norm 1 are written as normalize_decoder: true


def describe(model: SparseAutoencoder) -> str:
    return f"a sparsify sparse coder (activation {model.sparsify_activation!r})"


def sparsify_config(model: SparseAutoencoder) -> dict:
    """The cfg.json of `model` as a sparsify sparse coder."""
    if model.sparsify_activation is None or model.cfg.output != "linear":
        exportable = ", ".join(name for name, cls in KINDS.items() if cls.sparsify_activation)
        raise UserError(
            f"this dictionary ({model.kind} codes, {model.cfg.output} output) has no sparsify equivalent: "
            f"sparsify's sparse coders keep each example's k largest codes; only {exportable} dictionaries "
            f"with --output linear can be exported to it (--format saelens takes more kinds)."
        )
    if model.transcoder and model.n_outputs != model.n_inputs:
        raise UserError(
            f"sparsify's transcoders reconstruct vectors as wide as their input, but this one maps {model.n_inputs} "
            f"-> {model.n_outputs}; export it with --format saelens (relu and jumprelu codes)."
        )
    with torch.no_grad():
        unit_norm = bool(((model.W2.norm(dim=0) - 1).abs() <= UNIT_NORM).all())
    return {
        **DEFAULTS,
        "activation": model.sparsify_activation,
        "expansion_factor": model.n_hidden // model.n_inputs,  # sparsify reads num_latents, which is not 0
        "normalize_decoder": unit_norm,
        "num_latents": model.n_hidden,
        **model.sparsify_fields(),
        "skip_connection": model.W_skip is not None,
        "transcode": model.transcoder,
        "d_in": model.n_inputs,
    }


def sparsify_tensors(model: SparseAutoencoder) -> dict[str, torch.Tensor]:
    """The weights of `model` under sparsify's names and shapes (see the module docstring)."""
    tensors = {
        "encoder.weight": model.W1,
        "encoder.bias": encoder_bias(model, subtracts_b2=not model.transcoder),
        "W_dec": model.W2.t(),
        "b_dec": model.b2,
        **({"W_skip": model.W_skip} if model.W_skip is not None else {}),
    }
    return cpu_tensors(tensors)


def export_sparsify(
    model: SparseAutoencoder, folder, overwrite: bool = False, hook_name: str | None = None, **info
) -> Path:
    """Write `model` as a sparsify sparse coder: cfg.json and sae.safetensors in `folder`, or in
    folder/hook_name (sparsify names each coder's folder after its hook point). Returns that folder."""
    if info:
        raise UserError(
            f"sparsify's cfg.json has no place for {', '.join(sorted(info))}; "
            f"only a hook name can be given (it names the folder)."
        )
    folder = Path(folder)
    if hook_name is not None:
        if hook_name in ("", ".", "..") or Path(hook_name).name != hook_name:
            raise UserError(f"the hook name {hook_name!r} cannot name a folder; give one such as layers.6.mlp.")
        folder = folder / hook_name
    names = (CFG_NAME, WEIGHTS_NAME)
    return write_settings_and_tensors(folder, names, sparsify_config(model), sparsify_tensors(model), overwrite)


def read_sparsify(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    """(cfg.json with sparsify's defaults for missing fields, the tensors of sae.safetensors) of a sparse coder."""
    folder = Path(folder)
    what = (
        f"a sparsify sparse coder's folder holds {CFG_NAME} and {WEIGHTS_NAME} "
        f"(a training run keeps one such folder per hook point: import one of them)"
    )
    cfg, tensors = read_settings_and_tensors(folder, (CFG_NAME, WEIGHTS_NAME), what)
    where = folder / CFG_NAME
    unknown = sorted(set(cfg) - {*DEFAULTS, *ONLY, "d_in"})
    if unknown:
        raise UserError(
            f"{where} has fields saekit does not know ({', '.join(unknown)}): a newer sparsify, or a fork; "
            f"saekit reads sparsify 1.3's {', '.join(DEFAULTS)} and d_in."
        )
    for name, (value, reason) in ONLY.items():
        if cfg.get(name, value) != value:
            raise UserError(f"{where}: {name} is {cfg[name]!r}: {reason}; saekit cannot read it.")
    return {**DEFAULTS, **cfg}, tensors


def import_sparsify(folder) -> SparseAutoencoder:
    """The saekit dictionary of a sparsify sparse coder's folder (linear output, pre_bias), in float64
    if stored so, else float32."""
    folder = Path(folder)
    cfg, tensors = read_sparsify(folder)
    where = str(folder / CFG_NAME)
    d_in = positive_int(cfg.get("d_in"), "d_in", where)
    num_latents = cfg["num_latents"] or d_in * positive_int(cfg["expansion_factor"], "expansion_factor", where)
    positive_int(num_latents, "num_latents", where)
    found = reading_kind(lambda cls: cls.from_sparsify(cfg, where))
    if found is None:
        raise UserError(
            f"{where}: sparsify activation {cfg['activation']!r} has no saekit equivalent; saekit reads "
            f"{', '.join(sorted({cls.sparsify_activation for cls in KINDS.values() if cls.sparsify_activation}))}."
        )
    where_weights = str(folder / WEIGHTS_NAME)
    transcode, skip = cfg["transcode"] is True, cfg["skip_connection"] is True
    if skip and not transcode:
        raise UserError(f"{where}: skip_connection without transcode; saekit's skip connections belong to transcoders.")
    shapes = {"encoder.weight": (num_latents, d_in), "encoder.bias": (num_latents,), "W_dec": (num_latents, d_in)}
    shapes.update({"b_dec": (d_in,), **({"W_skip": (d_in, d_in)} if skip else {})})
    check_names(tensors, shapes, where_weights)
    check_tensors(tensors, shapes, where_weights, "d_in and num_latents")
    cls, settings = found
    weights = (tensors["encoder.weight"], tensors["encoder.bias"], tensors["W_dec"].t(), tensors["b_dec"])
    transcoder = Transcoding(d_in, tensors.get("W_skip")) if transcode else None
    return imported_model(cls, settings, weights, pre_bias=not transcode, where=where, transcoder=transcoder)
