"""SAELens interop: write a saekit dictionary as a SAELens SAE folder, and read one back.

    FOLDER/cfg.json                 d_in, d_sae, architecture, apply_b_dec_to_input, dtype, metadata, ...
    FOLDER/sae_weights.safetensors  W_enc (d_in, d_sae), b_enc (d_sae), W_dec (d_sae, d_in), b_dec (d_in),
                                    and threshold (d_sae) for "jumprelu"

That is the folder SAELens 6 writes with `SAE.save_model` and reads with `SAE.load_from_disk`
(checked against SAELens 6.54). SAELens computes

    hidden_pre = (x - b_dec if apply_b_dec_to_input else x) W_enc + b_enc,   x_hat = acts W_dec + b_dec

which is saekit's model with W_enc = W1^T, b_enc = b1, W_dec = W2^T, b_dec = b2 and
apply_b_dec_to_input = pre_bias. The activations map as

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
import sys
import time
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from . import __version__, runs
from .config import TrainConfig
from .errors import UserError
from .files import atomic_write
from .model import SparseAutoencoder

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
# SAELens reads configs without this version as pre-6.0 ones and renames their fields; ours follow 6.0.
FORMAT_VERSION = "6.0.0"
ARCHITECTURES = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
IMPORTABLE = ("standard", "topk", "jumprelu")


def saelens_config(model: SparseAutoencoder, **info) -> dict:
    """The cfg.json of `model` as a SAELens 6 SAE; `info` (model_name, hook_name, ...) goes into its metadata."""
    if model.activation not in ARCHITECTURES or model.output != "linear":
        raise UserError(f"this dictionary ({model.activation} codes, {model.output} output) has no SAELens "
                        f"equivalent: SAELens decodes linearly and has no sigmoid codes; only relu, topk, "
                        f"batchtopk and jumprelu dictionaries with --output linear can be exported.")
    metadata = {"sae_lens_version": FORMAT_VERSION, "sae_lens_training_version": None, **info,
                "saekit_version": __version__, "saekit_architecture": model.architecture()}
    cfg = {"d_in": model.n_inputs, "d_sae": model.n_hidden, "dtype": str(model.W1.dtype).removeprefix("torch."),
           "device": "cpu", "apply_b_dec_to_input": model.pre_bias, "normalize_activations": "none",
           "reshape_activations": "none", "metadata": metadata, "architecture": ARCHITECTURES[model.activation]}
    if model.activation == "topk":
        cfg.update(k=model.k, rescale_acts_by_decoder_norm=False)
    return cfg


@torch.no_grad()
def saelens_tensors(model: SparseAutoencoder) -> dict[str, torch.Tensor]:
    """The weights of `model` under SAELens's names and shapes (see the module docstring)."""
    tensors = {"W_enc": model.W1.t(), "b_enc": model.b1, "W_dec": model.W2.t(), "b_dec": model.b2}
    if model.activation == "jumprelu":
        tensors["threshold"] = model.jumprelu.log_threshold.exp()
    if model.activation == "batchtopk":
        tensors["threshold"] = model.batch_topk.threshold.to(model.W1.dtype).expand(model.n_hidden)
    return {name: t.detach().cpu().contiguous() for name, t in tensors.items()}


def export_saelens(model: SparseAutoencoder, folder, overwrite: bool = False, **info) -> Path:
    """Write `model` into `folder` as a SAELens SAE (cfg.json, sae_weights.safetensors); returns the folder.

    `info` goes into cfg.json's metadata: model_name, hook_name, context_size, ... as SAELens names them.
    """
    folder = Path(folder)
    if (folder / "weights.safetensors").exists():
        raise UserError(f"{folder} is a saekit run folder, and its cfg.json would be overwritten; "
                        f"export into another folder.")
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
            raise UserError(f"{folder / name} is missing; a SAELens SAE folder holds {CFG_NAME} and {WEIGHTS_NAME} "
                            f"(a SAELens training checkpoint or a saekit run folder is not one).")
    cfg = runs.read_json(folder / CFG_NAME)
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


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _activation(cfg: dict, where) -> tuple[str, int | None]:
    """(saekit activation, k or None) of a SAELens config, old or new."""
    architecture = cfg.get("architecture", "standard")
    activation_fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    if (architecture, activation_fn) == ("standard", "topk") or architecture == "topk":
        return "topk", _positive_int(cfg.get("k", _dict(cfg.get("activation_fn_kwargs")).get("k")), "k", where)
    if (architecture, activation_fn) == ("standard", "relu"):
        return "relu", None
    if architecture == "jumprelu":
        return "jumprelu", None
    if architecture == "standard":
        raise UserError(f"{where}: activation_fn {activation_fn!r} has no saekit equivalent; saekit reads relu and topk.")
    if architecture == "batchtopk":
        raise UserError(f"{where} holds a BatchTopK training checkpoint; save it with save_inference_model "
                        f"(it becomes a 'jumprelu' SAE) and import that.")
    raise UserError(f"{where}: unknown SAELens architecture {architecture!r}; saekit reads {', '.join(IMPORTABLE)}.")


def _check_tensors(tensors: dict, d_in: int, d_sae: int, jumprelu: bool, where) -> None:
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if jumprelu:
        shapes["threshold"] = (d_sae,)
    if sorted(tensors) != sorted(shapes):
        raise UserError(f"{where} holds tensors {sorted(tensors)}, but this SAE needs exactly {sorted(shapes)}.")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise UserError(f"{where}: {name} has shape {tuple(tensors[name].shape)}, but d_in = {d_in} and "
                            f"d_sae = {d_sae} make it {shape}.")
        if not tensors[name].is_floating_point() or not torch.isfinite(tensors[name]).all():
            raise UserError(f"{where}: {name} must hold finite floating-point numbers.")


def _log_threshold(theta: torch.Tensor) -> torch.Tensor:
    """log theta (-inf for theta <= 0), moved by up to two ulps so that exp of it is theta exactly
    wherever some float allows: saekit keeps log theta, SAELens theta, and a pre-activation equal to
    the threshold must fire (or not) in both."""
    log = theta.clamp_min(0).log()
    candidates = [log]
    for direction in (-torch.inf, torch.inf):
        step = log
        for _ in range(2):
            step = torch.nextafter(step, torch.full_like(step, direction))
            candidates.append(step)
    candidates = torch.stack(candidates)
    best = (candidates.exp() - theta.clamp_min(0)).abs().argmin(0)  # the first of ties: log itself
    return candidates.gather(0, best[None])[0]


def import_saelens(folder) -> SparseAutoencoder:
    """The saekit dictionary of a SAELens SAE folder: "standard" (relu), "topk" or "jumprelu", linear
    output, in float64 if stored so, else float32 (saekit's two dtypes; half precision widens exactly)."""
    where = f"SAELens folder {folder}"
    cfg, tensors = read_saelens(folder)
    d_in, d_sae = _positive_int(cfg.get("d_in"), "d_in", where), _positive_int(cfg.get("d_sae"), "d_sae", where)
    activation, k = _activation(cfg, where)
    if cfg.get("normalize_activations") not in (None, False, "none"):
        raise UserError(f"{where}: normalize_activations {cfg['normalize_activations']!r} rescales inputs in a way "
                        f"saekit does not; fold the normalisation into the weights with SAELens first.")
    scale = tensors.pop("scaling_factor", None)  # old SAELens wrote ones here; anything else is a finetuned scale
    if scale is not None and not bool((scale == 1).all()):
        raise UserError(f"{where} has a finetuning scaling_factor that is not all ones; saekit cannot read it.")
    _check_tensors(tensors, d_in, d_sae, activation == "jumprelu", where)
    dtype = torch.float64 if tensors["W_enc"].dtype == torch.float64 else torch.float32
    t = {name: x.to(dtype) for name, x in tensors.items()}
    if activation == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        # SAELens selects on hidden_pre * ||W_dec row|| and decodes codes / ||W_dec row||: fold both in.
        norms = t["W_dec"].norm(dim=1)
        t["W_enc"], t["b_enc"], t["W_dec"] = t["W_enc"] * norms, t["b_enc"] * norms, t["W_dec"] / norms[:, None]
    saekit = _dict(_dict(cfg.get("metadata")).get("saekit_architecture"))  # written by export_saelens
    one_threshold = activation == "jumprelu" and bool((t["threshold"] == t["threshold"][0]).all())
    if one_threshold and saekit.get("activation") == "batchtopk":
        activation, k = "batchtopk", _positive_int(saekit.get("k"), "metadata.saekit_architecture.k", where)
    options = {"k": k} if k else {}
    if activation == "jumprelu" and "jumprelu_bandwidth" in saekit:
        options["jumprelu_bandwidth"] = float(saekit["jumprelu_bandwidth"])
    model = SparseAutoencoder(d_in, d_sae, activation, "linear", dtype, seed=None,
                              pre_bias=bool(cfg.get("apply_b_dec_to_input", True)), **options)
    with torch.no_grad():
        model.W1.copy_(t["W_enc"].t())
        model.b1.copy_(t["b_enc"])
        model.W2.copy_(t["W_dec"].t())
        model.b2.copy_(t["b_dec"])
        if activation == "jumprelu":
            model.jumprelu.log_threshold.copy_(_log_threshold(t["threshold"]))
        if activation == "batchtopk":
            model.batch_topk.threshold.copy_(t["threshold"][0])
    return model


def add_export_arguments(parser) -> None:
    """The `saekit export-saelens` options on an argparse (sub)parser; run_export reads them."""
    parser.add_argument("run", metavar="RUN", help="a saekit run folder (its weights.safetensors)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for cfg.json and sae_weights.safetensors")
    parser.add_argument("--model-name", help="metadata.model_name: the model the activations came from")
    parser.add_argument("--hook-name", help="metadata.hook_name: where they came from, e.g. blocks.3.hook_resid_post")
    parser.add_argument("--overwrite", action="store_true", help="replace a SAELens SAE already in --out")


def run_export(args) -> int:
    """Run `saekit export-saelens` from parsed arguments; UserError is left to the caller (exit 2)."""
    model = runs.load_model(args.run)
    info = {key: value for key, value in (("model_name", args.model_name), ("hook_name", args.hook_name)) if value}
    folder = export_saelens(model, args.out, overwrite=args.overwrite, **info)
    print(f"wrote {model} as a SAELens {ARCHITECTURES[model.activation]!r} SAE to {folder}")
    return 0


def add_import_arguments(parser) -> None:
    """The `saekit import-saelens` options on an argparse (sub)parser; run_import reads them."""
    parser.add_argument("folder", metavar="FOLDER", help="a SAELens SAE folder (cfg.json, sae_weights.safetensors)")
    parser.add_argument("--out", metavar="DIR", help="run folder to write (default: runs/saelens-<time>)")


def _import_record(model: SparseAutoencoder, folder) -> dict:
    """A minimal config.json: the settings that describe the model (valid for TrainConfig) and where it came from."""
    arch = model.architecture()
    settings = {"n_hidden": model.n_hidden, "activation": model.activation, "output": "linear",
                "pre_bias": model.pre_bias, "dtype": str(model.W1.dtype).removeprefix("torch."),
                "optimizer": "adam", "penalty": "none"}  # any valid choice: the dictionary was trained elsewhere
    settings.update({key: arch[key] for key in ("k", "jumprelu_bandwidth") if key in arch})
    TrainConfig(**settings)  # a run folder's config must load
    return {"config": settings, "imported_from": str(Path(folder).resolve()),
            "saelens_cfg": runs.read_json(Path(folder) / CFG_NAME), "versions": runs.versions(),
            "command": sys.argv, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def run_import(args) -> int:
    """Run `saekit import-saelens` from parsed arguments; UserError is left to the caller (exit 2)."""
    model = import_saelens(args.folder)
    run_dir = runs.new_run_dir(args.out, "saelens")
    runs.save_model(run_dir, model)
    runs.write_json(run_dir / "config.json", _import_record(model, args.folder))  # last: the run is complete
    print(f"imported {model} from {args.folder} into {run_dir}")
    return 0
