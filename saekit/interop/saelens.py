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
    sigmoid     none: refused, as is a sigmoid output (SAELens decodes linearly)

SAELens's JumpReLU is relu(hidden_pre) * (hidden_pre > threshold), so a threshold below 0 acts
as 0: that is what saekit's batchtopk does with its threshold, which is exported as it is, and
what an imported negative threshold becomes. saekit's architecture is kept in
metadata.saekit_architecture (SAELens keeps unknown metadata), so a batchtopk dictionary comes
back as batchtopk with its k, and a jumprelu one with its bandwidth.

Reading also accepts older SAELens folders: "activation_fn_str" for "activation_fn",
architecture "standard" with activation "topk" and activation_fn_kwargs {"k": ...}, a boolean
normalize_activations, and an all-ones "scaling_factor"; and TopK SAEs with
rescale_acts_by_decoder_norm (SAELens's training default), whose decoder norms are folded into
W1, b1 and W2: the same codes and reconstructions, up to rounding.
"""

import json
from pathlib import Path
from typing import Literal

import safetensors
import safetensors.torch
import torch

from .. import __version__
from ..config import RunConfig, TrainConfig
from ..errors import UserError
from ..files import atomic_write, read_json
from ..kinds import KINDS, SparseAutoencoder, build, config
from ..run import RunFolder
from ..train import OptimConfig

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
# SAELens reads configs without this version as pre-6.0 ones and renames their fields; ours follow 6.0.
FORMAT_VERSION = "6.0.0"
COMMON_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")


def saelens_config(model: SparseAutoencoder, **info) -> dict:
    """The cfg.json of `model` as a SAELens 6 SAE; `info` (model_name, hook_name, ...) goes into its metadata."""
    if model.saelens_architecture is None or model.cfg.output != "linear":
        exportable = ", ".join(name for name, cls in KINDS.items() if cls.saelens_architecture)
        raise UserError(
            f"this dictionary ({model.kind} codes, {model.cfg.output} output) has no SAELens "
            f"equivalent: SAELens decodes linearly and has no sigmoid codes; only {exportable} "
            f"dictionaries with --output linear can be exported."
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
        "d_sae": model.n_hidden,
        "dtype": str(model.W1.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": model.cfg.pre_bias,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
        "architecture": model.saelens_architecture,
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
        **model.saelens_tensors(),
    }
    return {name: t.detach().cpu().contiguous() for name, t in tensors.items()}


def export_saelens(model: SparseAutoencoder, folder, overwrite: bool = False, **info) -> Path:
    """Write `model` into `folder` as a SAELens SAE (cfg.json, sae_weights.safetensors); returns the folder.

    `info` goes into cfg.json's metadata: model_name, hook_name, context_size, ... as SAELens names them.
    """
    folder = Path(folder)
    if (folder / "weights.safetensors").exists():
        raise UserError(
            f"{folder} is a saekit run folder, and its cfg.json would be overwritten; export into another folder."
        )
    if (folder / CFG_NAME).exists() and not overwrite:
        raise UserError(f"{folder / CFG_NAME} already exists; choose another folder, or overwrite it.")
    cfg = saelens_config(model, **info)
    try:
        cfg_bytes = (json.dumps(cfg, indent=2) + "\n").encode()
    except TypeError as e:
        raise UserError(f"the metadata given for cfg.json cannot be written as JSON ({e}).") from None
    atomic_write(folder / WEIGHTS_NAME, safetensors.torch.save(saelens_tensors(model)))
    atomic_write(folder / CFG_NAME, cfg_bytes)  # last: a folder with cfg.json is complete
    return folder


def read_saelens(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    """(cfg.json as a dict, the tensors of sae_weights.safetensors) of a SAELens SAE folder."""
    folder = Path(folder)
    for name in (CFG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise UserError(
                f"{folder / name} is missing; a SAELens SAE folder holds {CFG_NAME} and {WEIGHTS_NAME} "
                f"(a SAELens training checkpoint or a saekit run folder is not one)."
            )
    cfg = read_json(folder / CFG_NAME)
    if not isinstance(cfg, dict):
        raise UserError(f"{folder / CFG_NAME} must hold a JSON object of settings.")
    try:
        tensors = safetensors.torch.load_file(folder / WEIGHTS_NAME)
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{folder / WEIGHTS_NAME} is corrupt or not a safetensors file ({e}).") from None
    return cfg, tensors


def _positive_int(value, name: str, where) -> int:
    if type(value) is not int or value < 1:
        raise UserError(f"{where}: {name} must be a whole number >= 1 (got {value!r}).")
    return value


def _reading_kind(cfg: dict, tensors: dict, where: str) -> tuple[type[SparseAutoencoder], dict]:
    """The first registered kind that reads this SAELens cfg.json, and its settings."""
    for cls in KINDS.values():
        settings = cls.from_saelens(cfg, tensors, where)
        if settings is not None:
            return cls, settings
    architecture = cfg.get("architecture", "standard")
    if architecture == "batchtopk":
        raise UserError(
            f"{where} holds a BatchTopK training checkpoint; save it with save_inference_model "
            f"(it becomes a 'jumprelu' SAE) and import that."
        )
    readable = sorted({cls.saelens_architecture for cls in KINDS.values() if cls.saelens_architecture})
    activation_fn = cfg.get("activation_fn", cfg.get("activation_fn_str"))
    with_activation = f" with activation_fn {activation_fn!r}" if activation_fn is not None else ""
    raise UserError(
        f"{where}: SAELens architecture {architecture!r}{with_activation} has no saekit equivalent; saekit "
        f"reads {', '.join(readable)} (standard with relu or topk)."
    )


def _check_tensors(tensors: dict, shapes: dict, where) -> None:
    """Each tensor of shapes present, of its shape, finite and floating point."""
    for name, shape in shapes.items():
        if name not in tensors:
            raise UserError(f"{where} holds tensors {sorted(tensors)}, but this SAE needs {sorted(shapes)}.")
        if tuple(tensors[name].shape) != shape:
            raise UserError(
                f"{where}: {name} has shape {tuple(tensors[name].shape)}, but d_in and d_sae make it {shape}."
            )
        if not tensors[name].is_floating_point() or not torch.isfinite(tensors[name]).all():
            raise UserError(f"{where}: {name} must hold finite floating-point numbers.")


def import_saelens(folder) -> SparseAutoencoder:
    """The saekit dictionary of a SAELens SAE folder, linear output, in float64 if stored so, else
    float32 (saekit's two dtypes; half precision widens exactly)."""
    where = f"SAELens folder {folder}"
    cfg, tensors = read_saelens(folder)
    d_in, d_sae = _positive_int(cfg.get("d_in"), "d_in", where), _positive_int(cfg.get("d_sae"), "d_sae", where)
    if cfg.get("normalize_activations") not in (None, False, "none"):
        raise UserError(
            f"{where}: normalize_activations {cfg['normalize_activations']!r} rescales inputs in a way "
            f"saekit does not; fold the normalisation into the weights with SAELens first."
        )
    scale = tensors.pop("scaling_factor", None)  # old SAELens wrote ones here; anything else is a finetuned scale
    if scale is not None and not bool((scale == 1).all()):
        raise UserError(f"{where} has a finetuning scaling_factor that is not all ones; saekit cannot read it.")
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    _check_tensors(tensors, {**shapes, **{name: (d_sae,) for name in tensors if name not in shapes}}, where)
    dtype = torch.float64 if tensors["W_enc"].dtype == torch.float64 else torch.float32
    t = {name: x.to(dtype) for name, x in tensors.items()}
    cls, settings = _reading_kind(cfg, t, where)
    model = build(
        config(
            cls.Config.kind,
            n_hidden=d_sae,
            output="linear",
            pre_bias=bool(cfg.get("apply_b_dec_to_input", True)),
            **settings,
        ),
        d_in,
        dtype=dtype,
        seed=None,
    )
    expected = sorted({*COMMON_TENSORS, *model.saelens_tensors()})
    if sorted(tensors) != expected:
        raise UserError(f"{where} holds tensors {sorted(tensors)}, but this SAE needs exactly {expected}.")
    with torch.no_grad():
        model.W1.copy_(t["W_enc"].t())
        model.b1.copy_(t["b_enc"])
        model.W2.copy_(t["W_dec"].t())
        model.b2.copy_(t["b_dec"])
    model.load_saelens_tensors(t)
    return model


def export_run(run_dir, out, overwrite: bool = False, **info) -> tuple[SparseAutoencoder, Path]:
    """Write a run's dictionary into `out` as a SAELens SAE; returns (the model, the folder)."""
    model = RunFolder.open(run_dir).load_model()
    return model, export_saelens(model, out, overwrite=overwrite, **info)


def import_run(folder, out=None) -> tuple[SparseAutoencoder, RunFolder]:
    """Make a saekit run folder (default runs/saelens-<time>) of a SAELens SAE folder; returns (model, run folder).

    Its config.json records the dictionary's settings (the training was done elsewhere), the
    SAELens cfg.json it came from and the folder's path.
    """
    model = import_saelens(folder)
    dtype: Literal["float64", "float32"] = "float64" if model.W1.dtype == torch.float64 else "float32"
    cfg = TrainConfig(model=model.cfg, optim=OptimConfig(optimizer="adam"), run=RunConfig(dtype=dtype))
    run = RunFolder.create(out, "saelens", resumable=False)
    run.save_model(model)
    run.save_config(
        cfg, "imported", imported_from=str(Path(folder).resolve()), saelens_cfg=read_json(Path(folder) / CFG_NAME)
    )  # last: the run is complete
    return model, run
