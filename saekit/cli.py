"""The `saekit` command line: thin; it parses, validates and calls the library.

    saekit train                 UFLDL's exercise on natural-image patches, into runs/<preset>-<time>/
    saekit train --preset NAME   another preset (`saekit presets` lists them); any setting can follow
    saekit train --resume RUN    continue an interrupted run
    saekit gradcheck             the exercise's gradient check
    saekit presets               the presets and what they change
    saekit eval RUN --data PATH  metrics of a trained dictionary on other data
    saekit harvest ...           a transformer layer's activations over text files, as shards
    saekit export RUN --out DIR  the dictionary in SAELens's format; `saekit import DIR` reads one

A mistake the user can fix prints one line `saekit: error: ...` and exits with status 2.
"""

import argparse
import dataclasses
import functools
import sys
import types
from pathlib import Path

import numpy as np
import torch

from . import distributed, runs, stages, ufldl
from .config import CLASSIFIER_FIELDS, PRESET_HELP, PRESETS, TrainConfig, build_config, dashed, field_docs
from .data import corrupt as corrupt_rows
from .data import load_training_data
from .data.synthetic import recovery_score
from .data.vectors import open_vectors
from .errors import UserError
from .harvest import add_harvest_arguments, run_harvest
from .interop import add_export_arguments, add_import_arguments, run_export, run_import
from .metrics import evaluate, evaluate_stream
from .model import SPARSE_ACTIVATIONS, SparseAutoencoder
from .reports import save_density_png, write_pictures
from .training import Minibatch, fit

GRADCHECK_TOLERANCE = 1e-9
INITIAL_WEIGHTS = "initial.safetensors"  # the weights before training, for the before/after pictures
EVAL_ROWS = 100_000  # rows of the training data the final metrics are computed on
CLASSIFICATION_REPORTED = ("accuracy", "accuracy_before_fine_tuning", "accuracy_raw_pixels")
REPORTED = ("cost", "reconstruction", "weight_decay", "sparsity", "rho_hat_mean", "mse", "fvu", "l0", "dead_fraction",
            "recovery", *CLASSIFICATION_REPORTED)


def _field_type(annotation):
    """The argparse type of a TrainConfig field: int, float or str (optional ones too)."""
    if isinstance(annotation, types.UnionType):
        annotation = next(a for a in annotation.__args__ if a is not type(None))
    return annotation


ALIASES = {"activation": ["--arch"], "n_hidden": ["--width"]}  # the names modern dictionaries go by


def add_config_arguments(parser: argparse.ArgumentParser, title: str = "settings (override the preset)",
                         only: tuple[str, ...] | None = None) -> None:
    """One --option per TrainConfig field (or per field in `only`), its help the field's docstring and its default."""
    docs = field_docs(TrainConfig)
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(TrainConfig):
        if only is not None and f.name not in only:
            continue
        names = [f"--{dashed(f.name)}", *ALIASES.get(f.name, [])]
        help_text = docs.get(f.name, "") + (f" (default: {f.default})" if only is None else "")
        if f.type is bool:
            group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(*names, dest=f.name, type=_field_type(f.type), default=None,
                               metavar=f.name.upper(), help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saekit", description="Sparse autoencoders: train, check, and look at what they learn.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a sparse autoencoder and write a run folder",
                           description="Train a sparse autoencoder. With no options: UFLDL's exercise on 8x8 "
                           "natural-image patches (64-25-64, 400 L-BFGS iterations).")
    train.add_argument("--preset", default="ufldl-patches", help=f"named settings to start from: {', '.join(PRESETS)}")
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

    cl = sub.add_parser("classify", help="train and test a classifier on a trained run's codes",
                        description="Drop the decoder, put a softmax on the hidden units of RUN's autoencoder (and "
                        "its stacked layers), train it on the run's MNIST / Fashion-MNIST training images and test it "
                        "on the test set; writes RUN/classification.json, RUN/classifier.safetensors and "
                        "RUN/confusion.png.")
    cl.add_argument("run", metavar="RUN", help="a run folder trained on mnist or fashion-mnist")
    cl.add_argument("--protocol", default="softmax", choices=["softmax", "fine-tune", "self-taught"],
                    help="softmax on frozen codes; fine-tune the encoders too; or UFLDL's self-taught split")
    cl.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    add_config_arguments(cl, "classifier settings (default: the run's config.json)", CLASSIFIER_FIELDS)

    ev = sub.add_parser("eval", help="metrics of a trained dictionary on a data set",
                        description="Print and save (RUN/eval.json, RUN/eval_density.png) the MSE, FVU, L0, dead "
                        "fraction, feature density and decoder norms of RUN's dictionary on vectors from --data.")
    ev.add_argument("run", metavar="RUN", help="a run folder")
    ev.add_argument("--data", required=True, metavar="PATH", help=".npy or .safetensors file, or a folder of shards")
    ev.add_argument("--data-key", metavar="KEY", help="tensor name in .safetensors files")
    ev.add_argument("--max-rows", type=int, default=None, help="use only the first rows (default: all)")

    harvest = sub.add_parser("harvest", help="save a transformer layer's activations over text files as shards",
                             description="Run a Hugging Face transformers model (offline) over text files and save "
                             "one layer's activations as .safetensors shards that `saekit train --data` streams.")
    add_harvest_arguments(harvest)

    export = sub.add_parser("export", help="write a run's dictionary in SAELens's format",
                            description="Write RUN's dictionary as a SAELens folder (cfg.json + sae_weights.safetensors).")
    add_export_arguments(export)
    imp = sub.add_parser("import", help="make a saekit run folder from a SAELens dictionary",
                         description="Read a SAELens folder (cfg.json + sae_weights.safetensors) into a saekit run folder.")
    add_import_arguments(imp)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = ["saekit", *(sys.argv[1:] if argv is None else argv)]
    try:
        commands = {"train": cmd_train, "gradcheck": cmd_gradcheck, "presets": cmd_presets, "eval": cmd_eval,
                    "classify": cmd_classify,
                    "harvest": run_harvest, "export": run_export, "import": run_import}
        return commands[args.command](args)
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


def _check_data(x: torch.Tensor, cfg: TrainConfig) -> None:
    if not torch.isfinite(x).all():
        raise UserError("the training data contain NaN or infinite values; clean the data first.")
    if cfg.output == "sigmoid" and (x.min() < 0 or x.max() > 1):
        raise UserError(f"sigmoid outputs reconstruct values in [0, 1], but the data span [{float(x.min()):.3g}, "
                        f"{float(x.max()):.3g}]; rescale the data or use --output linear.")


def _config(args) -> tuple[TrainConfig, Path | None]:
    """The run's settings, and the folder of the run it resumes (None for a new run)."""
    if not args.resume:
        return build_config(args.preset, args.config, _overrides(args)), None
    run_dir = Path(args.resume)
    overrides = _overrides(args)
    allowed = {"max_iter", "epochs", "steps", "batch_size"}  # batch_size: another process count, same global batch
    if set(overrides) - allowed:
        raise UserError(f"--resume continues a run with its own settings; only {sorted(allowed)} may change.")
    return dataclasses.replace(runs.load_config(run_dir), **overrides), run_dir


def _new_model(cfg: TrainConfig, n_inputs: int, dtype) -> SparseAutoencoder:
    return SparseAutoencoder(n_inputs, cfg.n_hidden, cfg.activation, cfg.output, dtype=dtype, device=cfg.device,
                             seed=cfg.seed, k=cfg.k, pre_bias=cfg.pre_bias, tied_init=cfg.tied_init,
                             jumprelu_threshold=cfg.jumprelu_threshold, jumprelu_bandwidth=cfg.jumprelu_bandwidth)


def _announce(run_dir, cfg, data, model, done: int, total: int, unit: str) -> None:
    if distributed.is_main():
        print(f"run folder: {run_dir}\ndata: {data.description}\nmodel: {model.extra_repr()}, penalty {cfg.penalty}"
              f" (beta={cfg.beta}{f', rho={cfg.rho}' if cfg.penalty == 'kl' else ''}), weight decay {cfg.weight_decay}\n"
              f"training: {cfg.optimizer}, {total - done} of {total} {unit} to go"
              + (f", {distributed.world_size()} processes" if distributed.is_distributed() else ""), flush=True)


def _train(args) -> int:
    cfg, run_dir = _config(args)
    resumed = run_dir is not None
    if cfg.tensorboard:
        _summary_writer_class()  # before the run folder is made, so a missing package leaves nothing behind
    data = load_training_data(cfg)  # likewise for bad data
    if data.x is not None:
        _check_data(data.x, cfg)
    if distributed.is_main():
        run_dir = run_dir or runs.new_run_dir(args.out, args.preset)
        runs.save_config(run_dir, cfg, args.preset if not resumed else runs.read_json(run_dir / "config.json")["preset"],
                         args.argv)
    train = _train_full_batch if cfg.optimizer == "lbfgs" else _train_minibatch
    return train(args, run_dir, cfg, resumed, data)


def cmd_train(args) -> int:
    # Under torchrun, join the other processes first: only the first one writes the run folder.
    distributed.init_from_environment(args.device or "cpu")
    try:
        code = _train(args)
    except BaseException:
        distributed.shutdown(None)
        raise
    distributed.shutdown(code)
    return code


def _train_full_batch(args, run_dir, cfg, resumed, data) -> int:
    if distributed.is_distributed():
        raise UserError("L-BFGS trains on the full batch in one process; use --optimizer adam under torchrun.")
    history = runs.load_history(run_dir) if resumed else []
    model = runs.load_model(run_dir, cfg.device) if resumed else _new_model(cfg, data.x.shape[1], data.x.dtype)
    if not resumed:
        runs.save_model(run_dir, model, INITIAL_WEIGHTS)
    _announce(run_dir, cfg, data, model, len(history), cfg.max_iter, "iterations")
    interrupted = False
    if len(history) < cfg.max_iter:
        new_rows, interrupted = fit(model, data.x, dataclasses.replace(cfg, max_iter=cfg.max_iter - len(history)),
                                    progress=not args.no_progress)
        history += [dict(row, step=row["step"] + len(history)) for row in new_rows]
    runs.save_model(run_dir, model)
    runs.save_history(run_dir, history)
    runs.write_json(run_dir / "state.json", {"steps_done": len(history), "steps_total": cfg.max_iter, "finished": not interrupted})
    return _report(run_dir, cfg, data, model, history, interrupted, evaluate(model, data.x, cfg), not args.no_progress)


def _train_minibatch(args, run_dir, cfg, resumed, data) -> int:
    state = runs.load_trainer_state(run_dir) if resumed else None
    name = "checkpoint/model.safetensors"
    model = runs.load_model(run_dir, cfg.device, name) if resumed else _new_model(cfg, data.source.d, getattr(torch, cfg.dtype))
    if not resumed and distributed.is_main():
        runs.save_model(run_dir, model, INITIAL_WEIGHTS)
    history = runs.load_history(run_dir) if resumed else []
    trainer = Minibatch(model, data.source, cfg, state, history)

    def checkpoint():
        if distributed.is_main():
            runs.save_model(run_dir, model, name)
            runs.save_trainer_state(run_dir, trainer.state_dict())
            runs.save_history(run_dir, history)
            runs.write_json(run_dir / "state.json", {"steps_done": trainer.step, "steps_total": trainer.total_steps,
                                                     "finished": trainer.step >= trainer.total_steps})

    _announce(run_dir, cfg, data, model, trainer.step, trainer.total_steps, "steps")
    on_row = _tensorboard(run_dir) if cfg.tensorboard and distributed.is_main() else None
    _, interrupted = trainer.run(progress=not args.no_progress, checkpoint=checkpoint, on_row=on_row)
    checkpoint()
    if not distributed.is_main():
        return 0
    final = model.fold_input_scale(trainer.scale)
    runs.save_model(run_dir, final)
    metrics, density = evaluate_stream(final, data.source, max_rows=EVAL_ROWS)
    if data.true_atoms is not None:
        metrics["recovery"] = recovery_score(data.true_atoms, final.W2.t())
    if data.x is not None and model.activation not in SPARSE_ACTIVATIONS:  # the exact cost over all the data
        metrics.update({f"cost_{k}" if k in metrics else k: v for k, v in evaluate(final, data.x, cfg).items()
                        if k in ("cost", "reconstruction", "sparsity", "weight_decay", "rho_hat_mean")})
    save_density_png(density, run_dir / "density.png")
    return _report(run_dir, cfg, data, final, history, interrupted, metrics, not args.no_progress)


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def _tensorboard(run_dir: Path):
    """A history-row callback that also logs to TensorBoard, in RUN/tensorboard."""
    writer = _summary_writer_class()(str(run_dir / "tensorboard"))

    def log(row: dict) -> None:
        for key, value in row.items():
            if key != "step":
                writer.add_scalar(key, value, row["step"])
        writer.flush()

    return log


def _report(run_dir, cfg, data, model, history, interrupted, metrics, progress=True) -> int:
    if not interrupted and (cfg.stack or cfg.classify != "none"):
        layers = stages.train_stack(run_dir, cfg, model, data.x, progress)
        if cfg.classify != "none":
            result = stages.classify(run_dir, cfg, layers, data.x, data.labels, progress)
            metrics.update({k: result[k] for k in CLASSIFICATION_REPORTED if k in result})
    runs.write_json(run_dir / "metrics.json", metrics)
    initial = runs.load_model(run_dir, cfg.device, INITIAL_WEIGHTS)
    x = data.x if data.x is not None else data.source.read(0, min(data.source.n, 100)).to(model.W1.dtype)
    corrupt = None
    if cfg.corruption != "none":
        corrupt = functools.partial(corrupt_rows, kind=cfg.corruption, level=cfg.corruption_level,
                                    generator=torch.Generator().manual_seed(cfg.seed))
    pictures = write_pictures(run_dir, model, x, history, data.image_shape, initial, corrupt)
    summary = ", ".join(f"{k} {metrics[k]:.6g}" for k in REPORTED if k in metrics)
    print(summary)
    print("wrote " + ", ".join(str(p) for p in [run_dir / "metrics.json", run_dir / "weights.safetensors", *pictures]))
    if interrupted:
        print(f"interrupted; continue with: saekit train --resume {run_dir}", file=sys.stderr)
        return 130
    return 0


def cmd_classify(args) -> int:
    run_dir = Path(args.run)
    settings = {name: getattr(args, name) for name in CLASSIFIER_FIELDS if getattr(args, name) is not None}
    cfg = dataclasses.replace(runs.load_config(run_dir), classify=args.protocol, stack=None, **settings)
    layers = [runs.load_model(run_dir, cfg.device)]
    i = 2
    while (run_dir / f"layer{i}.safetensors").is_file():
        layers.append(runs.load_model(run_dir, cfg.device, f"layer{i}.safetensors"))
        i += 1
    data = load_training_data(cfg)
    result = stages.classify(run_dir, cfg, layers, data.x, data.labels, not args.no_progress)
    print(", ".join(f"{k} {result[k]:.4f}" for k in CLASSIFICATION_REPORTED if k in result))
    print(f"wrote {run_dir / 'classification.json'}, {run_dir / 'classifier.safetensors'}, {run_dir / 'confusion.png'}")
    return 0


def cmd_eval(args) -> int:
    run_dir = Path(args.run)
    model = runs.load_model(run_dir)
    source = open_vectors(args.data, args.data_key)
    if source.d != model.n_inputs:
        raise UserError(f"{args.data} holds vectors of {source.d}, but the dictionary in {run_dir} takes {model.n_inputs}.")
    metrics, density = evaluate_stream(model, source, max_rows=args.max_rows)
    metrics["data"] = str(args.data)
    runs.write_json(run_dir / "eval.json", metrics)
    save_density_png(density, run_dir / "eval_density.png")
    for key, value in metrics.items():
        print(f"{key:>18}: {value:.6g}" if isinstance(value, float) else f"{key:>18}: {value}")
    print(f"wrote {run_dir / 'eval.json'}, {run_dir / 'eval_density.png'}")
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
