"""The `saekit` command line: thin; it parses, validates and calls the library.

    saekit train                 UFLDL's exercise on natural-image patches, into runs/<preset>-<time>/
    saekit train --preset NAME   another preset (`saekit presets` lists them); any setting can follow
    saekit train --resume RUN    continue an interrupted run
    saekit gradcheck             the exercise's gradient check
    saekit presets               the presets and what they change

A mistake the user can fix prints one line `saekit: error: ...` and exits with status 2.
"""

import argparse
import dataclasses
import sys
import types
from pathlib import Path

import numpy as np
import torch

from . import runs, ufldl
from .config import PRESET_HELP, PRESETS, TrainConfig, build_config, dashed, field_docs
from .data import load_training_data
from .errors import UserError
from .metrics import evaluate
from .model import SparseAutoencoder
from .reports import write_pictures
from .training import fit

GRADCHECK_TOLERANCE = 1e-9
INITIAL_WEIGHTS = "initial.safetensors"  # the weights before training, for the before/after pictures


def _field_type(annotation):
    """The argparse type of a TrainConfig field: int, float or str (optional ones too)."""
    if isinstance(annotation, types.UnionType):
        annotation = next(a for a in annotation.__args__ if a is not type(None))
    return annotation


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One --option per TrainConfig field, its help the field's docstring and its default."""
    docs = field_docs(TrainConfig)
    group = parser.add_argument_group("settings (override the preset)")
    for f in dataclasses.fields(TrainConfig):
        help_text = f"{docs.get(f.name, '')} (default: {f.default})"
        if f.type is bool:
            group.add_argument(f"--{dashed(f.name)}", dest=f.name, action=argparse.BooleanOptionalAction,
                               default=None, help=help_text)
        else:
            group.add_argument(f"--{dashed(f.name)}", dest=f.name, type=_field_type(f.type), default=None,
                               metavar=f.name.upper(), help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saekit", description="Sparse autoencoders: train, check, and look at what they learn.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a sparse autoencoder and write a run folder",
                           description="Train a sparse autoencoder. With no options: UFLDL's exercise on 8x8 "
                           "natural-image patches (64-25-64, 400 L-BFGS iterations).")
    train.add_argument("--preset", default="ufldl-patches", choices=sorted(PRESETS), help="named settings to start from")
    train.add_argument("--config", metavar="FILE", help="JSON file of settings (a run's config.json works), applied after the preset")
    train.add_argument("--out", metavar="DIR", help="run folder to write (default: runs/<preset>-<time>)")
    train.add_argument("--resume", metavar="RUN", help="continue the interrupted run in this folder")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_config_arguments(train)

    check = sub.add_parser("gradcheck", help="check the analytic gradient against finite differences",
                           description="UFLDL's gradient checks: checkNumericalGradient on a quadratic, then the "
                           "sparse autoencoder's cost on a few natural-image patches. Fails (status 1) when "
                           f"norm(num - grad) / norm(num + grad) > {GRADCHECK_TOLERANCE:g}.")
    check.add_argument("--n-examples", type=int, default=10, help="patches in the check (default: 10)")
    check.add_argument("--n-hidden", type=int, default=5, help="hidden units (default: 5)")
    check.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")

    sub.add_parser("presets", help="list the presets and what they change")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"train": cmd_train, "gradcheck": cmd_gradcheck, "presets": cmd_presets}[args.command](args)
    except UserError as e:
        print(f"saekit: error: {e}", file=sys.stderr)
        return 2


def cmd_presets(args) -> int:
    for name in PRESETS:
        changes = ", ".join(f"{k}={v}" for k, v in PRESETS[name].items()) or "the defaults"
        print(f"{name}\n    {PRESET_HELP[name]}\n    settings: {changes}")
    return 0


def _overrides(args) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None}


def _check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU here; use --device cpu.")


def _check_data(x: torch.Tensor, cfg: TrainConfig) -> None:
    if not torch.isfinite(x).all():
        raise UserError("the training data contain NaN or infinite values; clean the data first.")
    if cfg.output == "sigmoid" and (x.min() < 0 or x.max() > 1):
        raise UserError(f"sigmoid outputs reconstruct values in [0, 1], but the data span [{float(x.min()):.3g}, "
                        f"{float(x.max()):.3g}]; rescale the data or use --output linear.")


def _start_or_resume(args):
    """(run folder, config, model or None, history so far)."""
    if args.resume:
        run_dir = Path(args.resume)
        cfg = runs.load_config(run_dir)
        overrides = _overrides(args)
        allowed = {"max_iter", "epochs"}
        if set(overrides) - allowed:
            raise UserError(f"--resume continues a run with its own settings; only {sorted(allowed)} may change.")
        cfg = dataclasses.replace(cfg, **overrides)
        return run_dir, cfg, runs.load_model(run_dir, cfg.device), runs.load_history(run_dir)
    cfg = build_config(args.preset, args.config, _overrides(args))
    run_dir = runs.new_run_dir(args.out, args.preset)
    runs.save_config(run_dir, cfg, args.preset)
    return run_dir, cfg, None, []


def cmd_train(args) -> int:
    run_dir, cfg, model, history = _start_or_resume(args)
    _check_device(cfg.device)
    data = load_training_data(cfg)
    _check_data(data.x, cfg)
    if model is None:
        model = SparseAutoencoder(data.x.shape[1], cfg.n_hidden, cfg.activation, cfg.output,
                                  dtype=data.x.dtype, device=cfg.device, seed=cfg.seed)
        runs.save_model(run_dir, model, INITIAL_WEIGHTS)
    initial = runs.load_model(run_dir, cfg.device, INITIAL_WEIGHTS)
    total = cfg.max_iter if cfg.optimizer == "lbfgs" else cfg.epochs
    remaining = total - len(history)
    print(f"run folder: {run_dir}\ndata: {data.description}\nmodel: {model.extra_repr()}, penalty {cfg.penalty} "
          f"(rho={cfg.rho}, beta={cfg.beta}), weight decay {cfg.weight_decay}\n"
          f"training: {cfg.optimizer}, {remaining} of {total} {'iterations' if cfg.optimizer == 'lbfgs' else 'epochs'} to go",
          flush=True)
    interrupted = False
    if remaining > 0:
        train_cfg = dataclasses.replace(cfg, max_iter=remaining, epochs=remaining)
        new_rows, interrupted = fit(model, data.x, train_cfg, progress=not args.no_progress)
        for row in new_rows:
            row["step"] += len(history)
        history += new_rows
    runs.save_model(run_dir, model)
    runs.save_history(run_dir, history)
    metrics = evaluate(model, data.x, cfg)
    runs.write_json(run_dir / "metrics.json", metrics)
    runs.write_json(run_dir / "state.json", {"steps_done": len(history), "steps_total": total, "finished": not interrupted})
    pictures = write_pictures(run_dir, model, data.x, history, data.image_shape, initial)
    print(f"cost {metrics['cost']:.6g} = reconstruction {metrics['reconstruction']:.6g} + weight decay "
          f"{metrics['weight_decay']:.6g} + sparsity {metrics['sparsity']:.6g}; mean rho_hat {metrics['rho_hat_mean']:.4g}")
    print("wrote " + ", ".join(str(p) for p in [run_dir / "metrics.json", run_dir / "weights.safetensors", *pictures]))
    if interrupted:
        print(f"interrupted after {len(history)} of {total}; continue with: saekit train --resume {run_dir}", file=sys.stderr)
        return 130
    return 0


def cmd_gradcheck(args) -> int:
    if args.n_examples < 1 or args.n_hidden < 1:
        raise UserError("--n-examples and --n-hidden must be at least 1.")
    quadratic = ufldl.check_numerical_gradient()
    print(f"checkNumericalGradient (x1^2 + 3 x1 x2): relative difference {quadratic:.3g}")
    data = ufldl.sample_images(args.n_examples, seed=args.seed)
    visible = data.shape[0]
    theta = ufldl.initialize_parameters(args.n_hidden, visible, np.random.default_rng(args.seed))
    cost = lambda t: ufldl.sparse_autoencoder_cost(t, visible, args.n_hidden, 1e-4, 0.01, 3.0, data)
    _, grad = cost(theta)
    numerical = ufldl.compute_numerical_gradient(lambda t: cost(t)[0], theta)
    difference = ufldl.relative_difference(numerical, grad)
    print(f"sparse autoencoder ({visible}-{args.n_hidden}-{visible}, {args.n_examples} patches, {theta.size} parameters): "
          f"relative difference {difference:.3g}")
    ok = max(quadratic, difference) < GRADCHECK_TOLERANCE
    print("PASS" if ok else f"FAIL: above {GRADCHECK_TOLERANCE:g}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
