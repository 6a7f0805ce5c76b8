"""The `saekit` command line: argument parsing, then one library call per command.

    saekit train                 UFLDL's exercise on natural-image patches, into runs/<preset>-<time>/
    saekit train --preset NAME   another preset (`saekit presets` lists them); any setting can follow
    saekit train --resume RUN    continue an interrupted run
    saekit gradcheck             the exercise's gradient check
    saekit presets               the presets and what they change
    saekit classify RUN          a classifier on a trained run's codes
    saekit eval RUN --data PATH  metrics of a trained dictionary on other data
    saekit eval RUN --model M --text PATH --layer L   the dictionary spliced into its model
    saekit harvest ...           a transformer layer's activations over text files, as shards
    saekit browse RUN --data HARVEST --out DIR   a static site of what each feature responds to
    saekit export RUN --out DIR  the dictionary in SAELens's (or sparsify's, dictionary_learning's) format
    saekit import FOLDER         a dictionary in one of those formats, as a saekit run folder

Every setting of `saekit train` is an option generated from the settings dataclasses (their
field docstrings are the help). A mistake the user can fix prints one line `saekit: error: ...`
and exits with status 2, without a usage block or traceback.
"""

import argparse
import dataclasses
import os
import sys
import typing

import numpy as np
import torch

from . import distributed
from .classify import classify
from .config import PARTS, build_config
from .data import load_training_data, open_pairs
from .data.harvest import DOCUMENTS, DTYPES, VECTORS, harvest
from .errors import UserError
from .eval import evaluate_stream, spliced_eval
from .files import os_error_message
from .interop import FORMATS, export_run, import_run
from .kinds import KINDS
from .presets import PRESETS
from .run import RESUMABLE, Interrupted, RunFolder, resume_run, train_run, write_classification
from .run.folder import EVAL
from .run.sweep import is_sweep, parse_sweep, resume_sweep, sweep_configs, train_sweep
from .settings import dashed, field_docs, value_type
from .train.control import stop_is_final
from .viz.browser import browse
from .viz.report import save_density_png

GRADCHECK_TOLERANCE = 1e-9
REPORTED = (
    "cost",
    "reconstruction",
    "weight_decay",
    "sparsity",
    "rho_hat_mean",
    "mse",
    "fvu",
    "l0",
    "dead_fraction",
    "recovery",
    "accuracy",
    "accuracy_before_fine_tuning",
    "accuracy_raw_pixels",
)
ALIASES = {"kind": ["--arch", "--activation"], "n_hidden": ["--width"]}  # the names modern dictionaries go by
TITLES = {
    "data": "data",
    "model": "the model (every kind)",
    "optim": "optimisation",
    "run": "the run",
    "classify": "stacked layers and classification (MNIST, Fashion-MNIST)",
}


class Parser(argparse.ArgumentParser):
    """argparse with saekit's one-line errors: `saekit: error: ...`, status 2, no usage block."""

    def error(self, message):
        self.exit(2, f"saekit: error: {message}; see `{self.prog} --help`.\n")


def _kind_settings() -> dict[str, list[tuple[str, dataclasses.Field, str]]]:
    """Each kind setting's name -> [(kind, field, docstring)] over the kinds that have it."""
    settings: dict[str, list] = {}
    for kind, cls in KINDS.items():
        docs = field_docs(cls.Config)
        for f in dataclasses.fields(cls.Config):
            settings.setdefault(f.name, []).append((kind, f, docs.get(f.name, "")))
    return settings


def _by_value(pairs) -> dict:
    """{value: [kinds]} in first-seen order, from (kind, value) pairs."""
    grouped: dict = {}
    for kind, value in pairs:
        grouped.setdefault(value, []).append(kind)
    return grouped


def _kind_help(uses: list) -> str:
    """One help text for a setting several kinds have: each docstring and default with the kinds it holds for."""
    docs = _by_value((kind, doc) for kind, _, doc in uses)
    defaults = _by_value((kind, f.default) for kind, f, _ in uses)
    everyone = len(uses) == len(KINDS)
    if len(docs) == 1:
        text = ("" if everyone else f"[{', '.join(_kinds_of(uses))}] ") + next(iter(docs))
    else:
        text = " ".join(f"[{', '.join(kinds)}] {doc}" for doc, kinds in docs.items())
    if len(defaults) == 1:
        return f"{text} (default: {next(iter(defaults))})"
    return f"{text} (default: " + "; ".join(f"{d} for {', '.join(k)}" for d, k in defaults.items()) + ")"


def _kinds_of(uses: list) -> list[str]:
    return [kind for kind, _, _ in uses]


def _add_option(group, name: str, annotation, help_text: str) -> None:
    names = [f"--{dashed(name)}", *ALIASES.get(name, [])]
    kind = value_type(annotation)
    help_text = help_text.replace("%", "%%")  # argparse formats help with %: a docstring's "20%" is text
    if kind is bool:
        group.add_argument(*names, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    else:
        group.add_argument(*names, dest=name, type=kind, default=None, metavar=name.upper(), help=help_text)


def add_settings_arguments(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """One --option per setting (or per setting named in `only`), its help the field's docstring."""
    for part, cls in PARTS.items():
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        fields = [f for f in dataclasses.fields(cls) if only is None or f.name in only]
        if not fields:
            continue
        group = parser.add_argument_group(TITLES[part])
        for f in fields:
            _add_option(group, f.name, hints[f.name], f"{docs.get(f.name, '')} (default: {f.default})")
        if part == "data" and only is None:
            model = parser.add_argument_group(TITLES["model"])
            model.add_argument(
                "--kind",
                *ALIASES["kind"],
                dest="kind",
                default=None,
                metavar="KIND",
                help=f"the kind of sparse autoencoder: {', '.join(KINDS)} (default: sigmoid)",
            )
            for name, uses in _kind_settings().items():
                _add_option(model, name, typing.get_type_hints(KINDS[uses[0][0]].Config)[name], _kind_help(uses))


def _settings(args) -> dict:
    """The settings given on the command line."""
    names = ["kind", *(f.name for part in PARTS.values() for f in dataclasses.fields(part)), *_kind_settings()]
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def add_reading_arguments(parser, required: bool) -> None:
    """The options of reading text through a transformer (harvest, spliced evaluation)."""
    parser.add_argument(
        "--model",
        required=required,
        metavar="FOLDER_OR_PACKAGE",
        help="model folder (save_pretrained layout) or installed package that ships one",
    )
    parser.add_argument(
        "--text", required=required, nargs="+", metavar="PATH", help="text files, or folders of *.txt files"
    )
    parser.add_argument("--layer", type=int, help="hidden_states index: 0 = embeddings, L = output of block L")
    parser.add_argument("--hook-module", metavar="NAME", help="the output of this module instead (e.g. h.3.mlp)")
    parser.add_argument(
        "--target-layer", type=int, help="transcoder: also read this hidden_states index, the place it reconstructs"
    )
    parser.add_argument(
        "--target-hook-module", metavar="NAME", help="transcoder: or the output of this module (e.g. h.3.mlp)"
    )
    parser.add_argument("--context-length", type=int, default=128, help="tokens per window at most (default: 128)")
    parser.add_argument("--batch-size", type=int, default=32, help="windows per forward pass (default: 32)")
    parser.add_argument("--max-tokens", type=int, help="stop after this many text tokens (default: all the text)")
    parser.add_argument(
        "--document",
        choices=DOCUMENTS,
        default="line",
        help="one document per non-blank line or per file (default: line)",
    )
    parser.add_argument("--drop-first", action="store_true", help="leave out the first token of every window")
    parser.add_argument(
        "--keep-special", action="store_true", help="keep the special tokens (BOS, CLS, SEP, EOS; left out by default)"
    )
    parser.add_argument("--device", default="cpu", help="torch device for the model (default: cpu)")


def _reading(args) -> dict:
    """The reading options as keyword arguments of harvest and spliced_eval."""
    names = ("layer", "hook_module", "target_layer", "target_hook_module", "context_length", "batch_size")
    return {
        name: getattr(args, name) for name in (*names, "max_tokens", "document", "keep_special", "drop_first", "device")
    }


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="saekit", description="Sparse autoencoders: train, check, and look at what they learn.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    train = sub.add_parser(
        "train",
        help="train a sparse autoencoder and write a run folder",
        description="Train a sparse autoencoder. With no options: UFLDL's exercise on 8x8 "
        "natural-image patches (64-25-64, 400 L-BFGS iterations).",
    )
    train.add_argument("--preset", help=f"named settings to start from (default: ufldl-patches): {', '.join(PRESETS)}")
    train.add_argument(
        "--config", metavar="FILE", help="JSON file of settings (a run's config.json works), applied after the preset"
    )
    train.add_argument("--out", metavar="DIR", help="run folder to write (default: runs/<preset>-<time>)")
    train.add_argument(
        "--resume",
        metavar="RUN",
        help=f"continue the interrupted run in this folder (only "
        f"{', '.join('--' + dashed(n) for n in RESUMABLE)} may change)",
    )
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument(
        "--sweep",
        action="append",
        metavar="NAME=V1,V2",
        help="train one dictionary per value (per combination, when repeated) on the same batches, in one pass "
        "over the data, each into a run folder under --out, with summary.json and frontier.png; model and "
        "optimisation settings only, e.g. --sweep k=16,32,64 --sweep lr=1e-3,3e-3",
    )
    add_settings_arguments(train)

    check = sub.add_parser(
        "gradcheck",
        help="check the analytic gradient against finite differences",
        description="UFLDL's gradient checks: checkNumericalGradient on a quadratic, then the "
        "sparse autoencoder's cost on a few natural-image patches. Fails (status 1) when "
        f"norm(num - grad) / norm(num + grad) > {GRADCHECK_TOLERANCE:g}.",
    )
    check.add_argument("--n-examples", type=int, default=10, help="patches in the check (default: 10)")
    check.add_argument("--n-hidden", type=int, default=5, help="hidden units (default: 5)")
    check.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")

    sub.add_parser("presets", help="list the presets and what they change")

    cl = sub.add_parser(
        "classify",
        help="train and test a classifier on a trained run's codes",
        description="Drop the decoder, put a softmax on the hidden units of RUN's autoencoder (and "
        "its stacked layers), train it on the run's MNIST / Fashion-MNIST training images and test it "
        "on the test set; writes RUN/classification.json, RUN/classifier.safetensors and "
        "RUN/confusion.png.",
    )
    cl.add_argument("run", metavar="RUN", help="a run folder trained on mnist or fashion-mnist")
    cl.add_argument(
        "--protocol",
        default="softmax",
        choices=["softmax", "fine-tune", "self-taught"],
        help="softmax on frozen codes; fine-tune the encoders too; or UFLDL's self-taught split",
    )
    cl.add_argument("--device", help="torch device (default: the run's, where this machine has it, else cpu)")
    cl.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    add_settings_arguments(
        cl, tuple(n for n in PARTS["classify"].__dataclass_fields__ if n not in ("stack", "classify"))
    )

    ev = sub.add_parser(
        "eval",
        help="metrics of a trained dictionary on a data set, or spliced into its model",
        description="Print and save (RUN/eval.json, RUN/eval_density.png) the MSE, FVU, L0, dead "
        "fraction, feature density and decoder norms of RUN's dictionary on vectors from --data; or, "
        "with --model, --text and --layer (or --hook-module), run the model over the text with the "
        "layer's output replaced by the dictionary's reconstruction, by zeros and by the mean, and "
        "report the cross-entropy and KL scores (causal language models) or the cosine of the pooled "
        "outputs (sentence encoders) with the same metrics on the same tokens. A transcoder takes its "
        "target place too (--target-layer or --target-hook-module), whose output it replaces.",
    )
    ev.add_argument("run", metavar="RUN", help="a run folder")
    ev.add_argument("--data", metavar="PATH", help=".npy or .safetensors file, or a folder of shards")
    ev.add_argument("--data-key", metavar="KEY", help="tensor name in .safetensors files")
    ev.add_argument("--target-key", metavar="KEY", help="transcoder: the targets' tensor name (default: targets)")
    ev.add_argument("--target-data", metavar="PATH", help="transcoder: the targets, if not in --data's files")
    ev.add_argument("--max-rows", type=int, default=None, help="use only the first rows (default: all)")
    add_reading_arguments(ev.add_argument_group("spliced evaluation"), required=False)
    ev.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    hv = sub.add_parser(
        "harvest",
        help="save a transformer layer's activations over text files as shards",
        description="Run a Hugging Face transformers model (offline) over text files and save "
        "one layer's activations as .safetensors shards that `saekit train --data` streams; with "
        "--target-layer or --target-hook-module, also a second place's activations at the same tokens "
        "(a transcoder's targets, which `saekit train --target-key targets` reconstructs).",
    )
    add_reading_arguments(hv, required=True)
    hv.add_argument("--out", required=True, metavar="DIR", help="output folder for the shards and harvest.json")
    hv.add_argument("--shard-size", type=int, default=65536, help="rows per shard file (default: 65536)")
    hv.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="stored dtype (default: float32)")
    hv.add_argument(
        "--drop-outliers",
        type=float,
        metavar="FACTOR",
        help="drop rows whose norm exceeds FACTOR x the median norm (attention sinks; counted in harvest.json)",
    )
    hv.add_argument("--overwrite", action="store_true", help="replace a finished harvest in --out")
    hv.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    br = sub.add_parser(
        "browse",
        help="write a static site that shows what each feature responds to",
        description="Write a feature browser for RUN's dictionary over the harvest it was trained on: an "
        "index of every feature and a page per feature with its top activating contexts, contexts from "
        "several quantiles, its nearest features and (with --model) the logits it raises and lowers. "
        "The site opens from the file system: open DIR/index.html.",
    )
    br.add_argument("run", metavar="RUN", help="a run folder")
    br.add_argument("--data", required=True, metavar="HARVEST", help="the folder `saekit harvest` wrote")
    br.add_argument("--out", required=True, metavar="DIR", help="folder for the site (a site there is replaced)")
    br.add_argument(
        "--model", metavar="FOLDER_OR_PACKAGE", help="the causal language model, for the logits each atom moves"
    )
    br.add_argument("--max-rows", type=int, help="use only the first rows of the harvest (default: all)")
    br.add_argument("--batch-size", type=int, default=4096, help="rows encoded at once (default: 4096)")
    br.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    formats = ", ".join(f"{f.name} ({f.settings} + {f.weights})" for f in FORMATS.values())
    ex = sub.add_parser(
        "export",
        help="write a run's dictionary in SAELens's, sparsify's or dictionary_learning's format",
        description=f"Write RUN's dictionary as another library saves one: {formats}.",
    )
    ex.add_argument("run", metavar="RUN", help="a saekit run folder (its weights.safetensors)")
    ex.add_argument("--out", required=True, metavar="DIR", help="folder for the dictionary's files")
    ex.add_argument("--format", choices=list(FORMATS), default="saelens", help="whose format (default: saelens)")
    ex.add_argument(
        "--model-name",
        help="the model the activations came from (SAELens: metadata.model_name; dictionary-learning: lm_name)",
    )
    ex.add_argument(
        "--hook-name",
        help="where they came from, e.g. blocks.3.hook_resid_post (SAELens: metadata.hook_name; "
        "dictionary-learning: submodule_name; sparsify: the folder DIR/HOOK_NAME)",
    )
    ex.add_argument("--overwrite", action="store_true", help="replace a dictionary already in --out")

    im = sub.add_parser(
        "import",
        help="make a saekit run folder from a SAELens, sparsify or dictionary_learning dictionary",
        description=f"Read another library's dictionary folder into a saekit run folder: {formats}.",
    )
    im.add_argument("folder", metavar="FOLDER", help="the dictionary's folder (one hook point's, one trainer's)")
    im.add_argument("--format", choices=list(FORMATS), help="whose format (default: what the folder's files say)")
    im.add_argument("--out", metavar="DIR", help="run folder to write (default: runs/<format>-<time>)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = ["saekit", *(sys.argv[1:] if argv is None else argv)]
    commands = {
        "train": cmd_train,
        "gradcheck": cmd_gradcheck,
        "presets": cmd_presets,
        "eval": cmd_eval,
        "classify": cmd_classify,
        "harvest": cmd_harvest,
        "browse": cmd_browse,
        "export": cmd_export,
        "import": cmd_import,
    }
    try:
        return commands[args.command](args)
    except UserError as e:
        return _error(str(e))
    except BrokenPipeError:  # the reader of stdout went away (`saekit eval ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # the file system's own failures: read-only, full, a file where a folder should be
        return _error(os_error_message(e))
    except Interrupted as e:
        print(
            f"saekit: interrupted while writing the results; `saekit train --resume {e.folder}` writes them",
            file=sys.stderr,
        )
        return 130
    except KeyboardInterrupt:
        print("saekit: interrupted (a run stopped before its first checkpoint keeps nothing)", file=sys.stderr)
        return 130


def _error(message: str) -> int:
    print(f"saekit: error: {message}", file=sys.stderr)
    return 2


def cmd_presets(args) -> int:
    for name, preset in PRESETS.items():
        changes = ", ".join(f"{k}={v}" for k, v in preset.settings.items()) or "the defaults"
        print(f"{name}\n    {preset.help}\n    settings: {changes}")
    return 0


def cmd_train(args) -> int:
    settings = _settings(args)
    if args.resume and (args.preset or args.config):
        raise UserError("--resume continues a run with its own settings; leave out --preset and --config.")
    # Under torchrun, join the other processes first: only the first one writes the run folder.
    distributed.init_from_environment(settings.get("device", "cpu"))
    try:
        with stop_is_final():
            code = _train(args, settings)
    except BaseException:
        distributed.shutdown(None)
        raise
    distributed.shutdown(code)
    return code


def _train(args, settings: dict) -> int:
    progress, preset = not args.no_progress, args.preset or "ufldl-patches"
    if args.resume and is_sweep(args.resume):
        if settings or args.sweep:
            raise UserError("--resume continues a sweep with its members' own settings; give no other settings.")
        return _report_sweep(resume_sweep(args.resume, progress=progress))
    if args.resume:
        result = resume_run(args.resume, settings, progress=progress)
    elif args.sweep:
        members = sweep_configs(preset, args.config, settings, parse_sweep(args.sweep))
        return _report_sweep(train_sweep(members, args.out, preset=preset, command=args.argv, progress=progress))
    else:
        result = train_run(
            build_config(preset, args.config, settings), args.out, preset=preset, command=args.argv, progress=progress
        )
    return _report(result) if distributed.is_main() else 0


def _report_sweep(result) -> int:
    if not distributed.is_main():
        return 0
    if result.interrupted:
        return _report(result)
    for member in result.members:
        print(
            f"{member.folder.path.name}: "
            + ", ".join(f"{k} {member.metrics[k]:.4g}" for k in REPORTED if k in member.metrics)
        )
    print("wrote " + ", ".join(map(str, result.written)))
    return 0


def _report(result) -> int:
    if result.interrupted:
        print(f"interrupted at a checkpoint; continue with: saekit train --resume {result.folder}", file=sys.stderr)
        return 130
    print(", ".join(f"{k} {result.metrics[k]:.6g}" for k in REPORTED if k in result.metrics))
    print("wrote " + ", ".join(map(str, result.written)))
    return 0


def _device(asked: str | None, run_device: str) -> str:
    """The device to work on: the one asked for, else the run's where this machine has it, else the CPU."""
    if asked is not None:
        return asked
    if torch.device(run_device).type == "cuda" and not torch.cuda.is_available():
        print(f"the run trained on {run_device}, which this machine does not have; working on the cpu", file=sys.stderr)
        return "cpu"
    return run_device


def cmd_classify(args) -> int:
    folder = RunFolder.open(args.run)
    cfg = folder.load_config()
    cfg = dataclasses.replace(
        cfg, classify=dataclasses.replace(cfg.classify, classify=args.protocol, stack=None, **_settings(args))
    )
    device = _device(args.device, cfg.run.device)
    layers = folder.load_layers(device)
    data = load_training_data(cfg.data, layers[0].W1.dtype, device, cfg.run.seed)
    classification = classify(layers, cfg.classify, cfg.data, *data.labelled(), not args.no_progress)
    reported = write_classification(folder, classification)
    print(", ".join(f"{k} {v:.4f}" for k, v in reported.items()))
    print(
        f"wrote {folder.file('classification.json')}, {folder.file('classifier.safetensors')}, "
        f"{folder.file('confusion.png')}"
    )
    return 0


def cmd_eval(args) -> int:
    if (args.data is None) == (args.model is None):
        raise UserError("give --data (vectors) or --model with --text and --layer (spliced evaluation), not both.")
    if args.max_rows is not None and args.max_rows < 1:
        raise UserError(f"--max-rows must be a whole number >= 1 (got {args.max_rows}); leave it out for all rows.")
    folder = RunFolder(args.run)
    model = folder.load_model()
    if args.model is not None:
        if args.text is None:
            raise UserError("spliced evaluation reads text: give --text with text files or folders.")
        metrics, density = spliced_eval(model, args.model, args.text, **_reading(args), progress=not args.no_progress)
    else:
        target_key = args.target_key or (VECTORS[1] if model.transcoder else None)
        source = open_pairs(args.data, args.data_key, args.target_data, target_key)
        if source.widths != model.widths:
            raise UserError(
                f"{args.data} holds vectors of {source.widths[0]} (targets of {source.widths[1]}), but the "
                f"dictionary in {args.run} takes {model.n_inputs} (targets of {model.widths[1]})."
            )
        metrics, density = evaluate_stream(model, source, max_rows=args.max_rows)
        metrics["data"] = str(args.data)
    folder.write_json(EVAL, metrics)
    save_density_png(density, folder.file("eval_density.png"))
    for key, value in metrics.items():
        if isinstance(value, list):  # the text files: their number and the first
            value = f"{len(value)} files ({value[0]}{', ...' if len(value) > 1 else ''})"
        print(f"{key:>22}: {value:.6g}" if isinstance(value, float) else f"{key:>22}: {value}")
    print(f"wrote {folder.file(EVAL)}, {folder.file('eval_density.png')}")
    return 0


def cmd_harvest(args) -> int:
    manifest = harvest(
        args.model,
        args.text,
        args.out,
        **_reading(args),
        shard_size=args.shard_size,
        dtype=args.dtype,
        drop_outliers=args.drop_outliers,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    where = f"layer {args.layer}" if args.hook_module is None else f"module {args.hook_module}"
    if manifest["d_target"] is not None:
        target = args.target_hook_module or f"layer {args.target_layer}"
        where += f", with targets of d={manifest['d_target']} from {target},"
    print(
        f"harvested {manifest['n_tokens']} vectors of d={manifest['d']} from {where} of "
        f"{manifest['model']} into {manifest['n_shards']} shards in {args.out} "
        f"({manifest['seconds']:.1f} s)"
    )
    return 0


def cmd_browse(args) -> int:
    site = browse(
        args.run,
        args.data,
        args.out,
        model=args.model,
        batch_size=args.batch_size,
        max_rows=args.max_rows,
        progress=not args.no_progress,
    )
    print(
        f"wrote the browser of {site['n_features']} features over {site['n_rows']} tokens to {args.out} "
        f"({site['bytes'] / 1e6:.1f} MB, {site['seconds']:.0f} s); open {os.path.join(args.out, 'index.html')}"
    )
    return 0


def cmd_export(args) -> int:
    info = {key: value for key, value in (("model_name", args.model_name), ("hook_name", args.hook_name)) if value}
    model, folder = export_run(args.run, args.out, args.format, overwrite=args.overwrite, **info)
    print(f"wrote {model.describe()} as {FORMATS[args.format].describe(model)} to {folder}")
    return 0


def cmd_import(args) -> int:
    model, run, fmt = import_run(args.folder, args.out, args.format)
    print(f"imported {model.describe()} from the {fmt.title} folder {args.folder} into {run}")
    return 0


def cmd_gradcheck(args) -> int:
    from . import ufldl  # here, not above: its image readers (SciPy, scikit-image) add 0.7 s to every command's start

    if args.n_examples < 1 or args.n_hidden < 1:
        raise UserError("--n-examples and --n-hidden must be at least 1.")
    quadratic = ufldl.check_numerical_gradient()
    print(f"checkNumericalGradient (x1^2 + 3 x1 x2): relative difference {quadratic:.3g}")
    data = ufldl.sample_images(args.n_examples, seed=args.seed)
    visible = data.shape[0]
    theta = ufldl.initialize_parameters(args.n_hidden, visible, np.random.default_rng(args.seed))

    def cost(t):
        return ufldl.sparse_autoencoder_cost(t, visible, args.n_hidden, 1e-4, 0.01, 3.0, data)

    _, grad = cost(theta)
    numerical = ufldl.compute_numerical_gradient(lambda t: cost(t)[0], theta)
    difference = ufldl.relative_difference(numerical, grad)
    print(
        f"sparse autoencoder ({visible}-{args.n_hidden}-{visible}, {args.n_examples} patches, "
        f"{theta.size} parameters): relative difference {difference:.3g}"
    )
    ok = max(quadratic, difference) < GRADCHECK_TOLERANCE
    print("PASS" if ok else f"FAIL: above {GRADCHECK_TOLERANCE:g}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
