"""SAELens interop: write a saekit dictionary as a SAELens SAE folder, and read one back.

    FOLDER/cfg.json                 d_in, d_sae, architecture, apply_b_dec_to_input, dtype, metadata, ...
    FOLDER/sae_weights.safetensors  W_enc (d_in, d_sae), b_enc (d_sae), W_dec (d_sae, d_in), b_dec (d_in),
                                    and threshold (d_sae) for "jumprelu"

That is the folder SAELens 6 writes with `SAE.save_model` and reads with `SAE.load_from_disk`
(checked against SAELens 6.54). SAELens computes

    hidden_pre = (x - b_dec if apply_b_dec_to_input else x) W_enc + b_enc,   x_hat = acts W_dec + b_dec

which is saekit's model with W_enc = W1^T, b_enc = b1, W_dec = W2^T, b_dec = b2 and
apply_b_dec_to_input = pre_bias. Each kind says how it maps (its `saelens_*` members); they map as

    saekit      SAELens
    relu        "standard" (ReLU)
    topk        "topk", k, rescale_acts_by_decoder_norm false
    jumprelu    "jumprelu", threshold = exp(log_threshold)
    batchtopk   "jumprelu", every threshold = the inference threshold (how SAELens itself saves BatchTopK)
    matryoshka  the same (how SAELens saves Matryoshka BatchTopK); TopK keeps "topk", which has no threshold
    sigmoid     none: refused, as is a sigmoid output (SAELens decodes linearly)

Transcoders (saekit models built with n_outputs) are SAELens's transcoders, which add d_out and
never subtract b_dec from the input: a relu transcoder is "transcoder", a jumprelu, batchtopk or
matryoshka one "jumprelu_transcoder"; with a skip connection "skip_transcoder" and
"jumprelu_skip_transcoder", whose W_skip (d_out, d_in) adds x W_skip^T to the output. SAELens has
no TopK transcoder, so a topk one is refused (sparsify's format has it).

SAELens's JumpReLU is relu(hidden_pre) * (hidden_pre > threshold), so a threshold below 0 acts
as 0: that is what saekit's batchtopk does with its threshold, which is exported as it is, and
what an imported negative threshold becomes. saekit's architecture is kept in
metadata.saekit_architecture (SAELens keeps unknown metadata), so a batchtopk dictionary comes
back as batchtopk with its k, a matryoshka one with its k and prefixes, and a jumprelu one with
its bandwidth.

Reading also accepts older SAELens folders: "activation_fn_str" for "activation_fn",
architecture "standard" with activation "topk" and activation_fn_kwargs {"k": ...}, a boolean
normalize_activations, and an all-ones "scaling_factor"; and TopK SAEs with
rescale_acts_by_decoder_norm (SAELens's training default), whose decoder norms are folded into
W1, b1 and W2: the same codes and reconstructions, up to rounding.
"""

from pathlib import Path

import torch

from .. import __version__
from ..errors import UserError
from ..kinds import KINDS, SparseAutoencoder
from .common import (
    Transcoding,
    check_names,
    check_tensors,
    cpu_tensors,
    float_dtype,
    imported_model,
    positive_int,
    read_settings_and_tensors,
    reading_kind,
    write_settings_and_tensors,
)

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
# SAELens reads configs without this version as pre-6.0 ones and renames their fields; ours follow 6.0.
FORMAT_VERSION = "6.0.0"
COMMON_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")
# SAELens's transcoder architectures, by the architecture of the same codes in an SAE and whether they skip.
TRANSCODERS = {
    ("standard", False): "transcoder",
    ("standard", True): "skip_transcoder",
    ("jumprelu", False): "jumprelu_transcoder",
    ("jumprelu", True): "jumprelu_skip_transcoder",
}


def saelens_config(model: SparseAutoencoder, **info) -> dict:
    """The cfg.json of `model` as a SAELens 6 SAE; `info` (model_name, hook_name, ...) goes into its metadata."""
    if model.saelens_architecture is None or model.cfg.output != "linear":
        exportable = ", ".join(name for name, cls in KINDS.items() if cls.saelens_architecture)
        raise UserError(
            f"this dictionary ({model.kind} codes, {model.cfg.output} output) has no SAELens "
            f"equivalent: SAELens decodes linearly and has no sigmoid codes; only {exportable} "
            f"dictionaries with --output linear can be exported."
        )
    architecture: str | None = model.saelens_architecture
    if model.transcoder:
        architecture = TRANSCODERS.get((str(architecture), model.W_skip is not None))
        if architecture is None:
            elsewhere = (
                "export this one with --format sparsify"
                if model.n_outputs == model.n_inputs
                else "sparsify's transcoders keep one width, so train it as a relu or jumprelu transcoder to export it"
            )
            raise UserError(
                f"SAELens has no transcoder of {model.kind} codes, only of relu and jumprelu codes (and of batchtopk "
                f"and matryoshka ones through their threshold); {elsewhere}."
            )
    metadata = {
        "sae_lens_version": FORMAT_VERSION,
        "sae_lens_training_version": None,
        **info,
        "saekit_version": __version__,
        "saekit_architecture": model.architecture(),
    }
    return {
        "d_in": model.n_inputs,
        **({"d_out": model.n_outputs} if model.transcoder else {}),
        "d_sae": model.n_hidden,
        "dtype": str(model.W1.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": model.subtracts_b2,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
        "architecture": architecture,
        **model.saelens_fields(),
    }


@torch.no_grad()
def saelens_tensors(model: SparseAutoencoder) -> dict[str, torch.Tensor]:
    """The weights of `model` under SAELens's names and shapes (see the module docstring)."""
    tensors = {
        "W_enc": model.W1.t(),
        "b_enc": model.b1,
        "W_dec": model.W2.t(),
        "b_dec": model.b2,
        **({"W_skip": model.W_skip} if model.W_skip is not None else {}),
        **model.saelens_tensors(),
    }
    return cpu_tensors(tensors)


def export_saelens(model: SparseAutoencoder, folder, overwrite: bool = False, **info) -> Path:
    """Write `model` into `folder` as a SAELens SAE (cfg.json, sae_weights.safetensors); returns the folder.

    `info` goes into cfg.json's metadata: model_name, hook_name, context_size, ... as SAELens names them.
    """
    cfg = saelens_config(model, **info)
    return write_settings_and_tensors(Path(folder), (CFG_NAME, WEIGHTS_NAME), cfg, saelens_tensors(model), overwrite)


def read_saelens(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    """(cfg.json as a dict, the tensors of sae_weights.safetensors) of a SAELens SAE folder."""
    what = (
        f"a SAELens SAE folder holds {CFG_NAME} and {WEIGHTS_NAME} "
        f"(a SAELens training checkpoint or a saekit run folder is not one)"
    )
    return read_settings_and_tensors(Path(folder), (CFG_NAME, WEIGHTS_NAME), what)


def _reading_kind(cfg: dict, tensors: dict, where: str) -> tuple[type[SparseAutoencoder], dict]:
    """The first registered kind that reads this SAELens cfg.json, and its settings."""
    found = reading_kind(lambda cls: cls.from_saelens(cfg, tensors, where))
    if found is not None:
        return found
    architecture = cfg.get("architecture", "standard")
    if architecture in ("batchtopk", "matryoshka_batchtopk"):
        raise UserError(
            f"{where} holds a (Matryoshka) BatchTopK training checkpoint; save it with save_inference_model "
            f"(it becomes a 'jumprelu' SAE) and import that."
        )
    readable = sorted({cls.saelens_architecture for cls in KINDS.values() if cls.saelens_architecture})
    activation_fn = cfg.get("activation_fn", cfg.get("activation_fn_str"))
    with_activation = f" with activation_fn {activation_fn!r}" if activation_fn is not None else ""
    raise UserError(
        f"{where}: SAELens architecture {architecture!r}{with_activation} has no saekit equivalent; saekit "
        f"reads {', '.join(readable)} (standard with relu or topk)."
    )


def import_saelens(folder) -> SparseAutoencoder:
    """The saekit dictionary of a SAELens SAE folder, linear output, in float64 if stored so, else
    float32 (saekit's two dtypes; half precision widens exactly)."""
    where = f"SAELens folder {folder}"
    cfg, tensors = read_saelens(folder)
    d_in, d_sae = positive_int(cfg.get("d_in"), "d_in", where), positive_int(cfg.get("d_sae"), "d_sae", where)
    transcoding = {name: key for key, name in TRANSCODERS.items()}.get(str(cfg.get("architecture")))
    d_out = d_in if transcoding is None else positive_int(cfg.get("d_out"), "d_out", where)
    skip = transcoding is not None and transcoding[1]
    if transcoding is not None:  # the kinds read the architecture of the same codes in an SAE
        cfg = {**cfg, "architecture": transcoding[0], "apply_b_dec_to_input": False}
    if cfg.get("normalize_activations") not in (None, False, "none"):
        raise UserError(
            f"{where}: normalize_activations {cfg['normalize_activations']!r} rescales inputs in a way "
            f"saekit does not; fold the normalisation into the weights with SAELens first."
        )
    scale = tensors.pop("scaling_factor", None)  # old SAELens wrote ones here; anything else is a finetuned scale
    if scale is not None and not bool((scale == 1).all()):
        raise UserError(f"{where} has a finetuning scaling_factor that is not all ones; saekit cannot read it.")
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    if skip:
        shapes["W_skip"] = (d_out, d_in)
    others = {name: (d_sae,) for name in tensors if name not in shapes}
    check_tensors(
        tensors, {**shapes, **others}, where, "d_in and d_sae" if transcoding is None else "d_in, d_out and d_sae"
    )
    dtype = float_dtype(tensors["W_enc"])
    t = {name: x.to(dtype) for name, x in tensors.items()}
    cls, settings = _reading_kind(cfg, t, where)
    weights = (t["W_enc"].t(), t["b_enc"], t["W_dec"].t(), t["b_dec"])  # after the kind adjusted them
    transcoder = None if transcoding is None else Transcoding(d_out, t.get("W_skip"))
    model = imported_model(cls, settings, weights, bool(cfg.get("apply_b_dec_to_input", True)), where, transcoder)
    check_names(tensors, {*COMMON_TENSORS, *shapes, *model.saelens_tensors()}, where)
    model.load_saelens_tensors(t)
    return model
