"""A whole run from its settings: data, model, training, run folder, metrics, stages, pictures.

    result = train_run(cfg, out="runs/mine")      # what `saekit train` does after parsing
    result = resume_run("runs/mine")              # what `saekit train --resume runs/mine` does

Full-batch runs (L-BFGS) keep the model in memory and write it at the end (or on Ctrl-C);
minibatch runs write a checkpoint every optim.checkpoint_every steps. Either way, an
interrupted run leaves a folder that `resume_run` continues, and the result says it was
interrupted. Under torchrun, join the process group first (saekit.distributed): every process
trains, only the first writes the folder.
"""

import dataclasses
import functools
from pathlib import Path
from typing import NamedTuple

import torch

from .. import distributed
from ..classify import classify
from ..classify.stacked import Layers, pretrain_stack
from ..config import TrainConfig
from ..data import Dataset, load_training_data
from ..data.synthetic import recovery_score
from ..errors import UserError
from ..eval import evaluate, evaluate_stream
from ..kinds import SparseAutoencoder, build
from ..train import Minibatch, fit
from ..viz.report import save_confusion_png, save_density_png, write_pictures
from .folder import CLASSIFICATION, INITIAL, METRICS, TENSORBOARD, RunFolder

EVAL_ROWS = 100_000  # rows of streamed training data the final metrics are computed on
CLASSIFICATION_REPORTED = ("accuracy", "accuracy_before_fine_tuning", "accuracy_raw_pixels")
# Settings that may change on --resume: how long to train, and the per-process batch (another
# process count with the same global batch). Every other setting is the run's own.
RESUMABLE = ("max_iter", "epochs", "steps", "batch_size")


class RunResult(NamedTuple):
    folder: RunFolder
    model: SparseAutoencoder  # the trained model (for raw inputs: the input scale folded in)
    metrics: dict  # what metrics.json holds
    history: list[dict]  # the rows of history.csv
    interrupted: bool  # stopped by Ctrl-C or SIGTERM; resume_run continues it
    written: list[Path]  # the files written at the end (metrics, weights, pictures)


def train_run(
    cfg: TrainConfig,
    out: str | Path | None = None,
    *,
    preset: str = "custom",
    command: list[str] | None = None,
    progress: bool = True,
) -> RunResult:
    """Train a new run into `out` (default runs/<preset>-<time>) as cfg says."""
    data = _prepare(cfg)  # before the run folder is made: a refused run leaves nothing behind
    folder = RunFolder.create(out, preset) if distributed.is_main() else RunFolder(out or "")
    if distributed.is_main():
        folder.save_config(cfg, preset, command)
    return _train(folder, cfg, data, resumed=False, progress=progress)


def resume_run(run_dir: str | Path, changes: dict | None = None, *, progress: bool = True) -> RunResult:
    """Continue the interrupted run in run_dir; `changes` may set RESUMABLE settings only."""
    folder = RunFolder.open(run_dir)
    changes = changes or {}
    refused = sorted(set(changes) - set(RESUMABLE))
    if refused:
        raise UserError(
            f"--resume continues a run with its own settings; only {', '.join(RESUMABLE)} may "
            f"change (not {', '.join(refused)})."
        )
    cfg = folder.load_config()
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, **changes))
    data = _prepare(cfg)
    return _train(folder, cfg, data, resumed=True, progress=progress)


def _prepare(cfg: TrainConfig) -> Dataset:
    """What must hold before anything is written: the device, optional packages, the data."""
    cfg.run.require_device()
    if cfg.run.tensorboard:
        _summary_writer_class()
    if cfg.optim.full_batch and distributed.is_distributed():
        raise UserError("L-BFGS trains on the full batch in one process; use --optimizer adam under torchrun.")
    data = load_training_data(cfg.data, cfg.run.torch_dtype, cfg.run.device, cfg.run.seed)
    if data.x is not None:
        _check_data(data.x, cfg)
    return data


def _check_data(x: torch.Tensor, cfg: TrainConfig) -> None:
    if not torch.isfinite(x).all():
        raise UserError("the training data contain NaN or infinite values; clean the data first.")
    if cfg.model.output == "sigmoid" and (x.min() < 0 or x.max() > 1):
        raise UserError(
            f"sigmoid outputs reconstruct values in [0, 1], but the data span [{float(x.min()):.3g}, "
            f"{float(x.max()):.3g}]; rescale the data or use --output linear."
        )


def _announce(folder: RunFolder, cfg: TrainConfig, data: Dataset, model, done: int, total: int, unit: str) -> None:
    if distributed.is_main():
        processes = f", {distributed.world_size()} processes" if distributed.is_distributed() else ""
        print(
            f"run folder: {folder}\ndata: {data.description}\nmodel: {model.describe()}, weight decay "
            f"{cfg.model.weight_decay}\ntraining: {cfg.optim.optimizer}, {total - done} of {total} {unit} to go"
            f"{processes}",
            flush=True,
        )


def _train(folder: RunFolder, cfg: TrainConfig, data: Dataset, resumed: bool, progress: bool) -> RunResult:
    train = _train_full_batch if cfg.optim.full_batch else _train_minibatch
    return train(folder, cfg, data, resumed, progress)


def _new_model(cfg: TrainConfig, n_inputs: int) -> SparseAutoencoder:
    return build(cfg.model, n_inputs, dtype=cfg.run.torch_dtype, device=cfg.run.device, seed=cfg.run.seed)


def _train_full_batch(folder: RunFolder, cfg: TrainConfig, data: Dataset, resumed: bool, progress: bool) -> RunResult:
    history = folder.load_history() if resumed else []
    if resumed:
        model = folder.load_model(device=cfg.run.device)
    else:
        model = _new_model(cfg, data.in_memory().shape[1])
        folder.save_model(model, INITIAL)
    total = cfg.optim.max_iter
    _announce(folder, cfg, data, model, len(history), total, "iterations")
    interrupted = False
    if len(history) < total:
        optim = dataclasses.replace(cfg.optim, max_iter=total - len(history))
        new_rows, interrupted = fit(
            model, data.in_memory(), optim, corruption=cfg.data.corruption_fn(), seed=cfg.run.seed, progress=progress
        )
        history += [dict(row, step=row["step"] + len(history)) for row in new_rows]
    folder.save_model(model)
    folder.save_history(history)
    folder.write_state(len(history), total)
    return _finish(folder, cfg, data, model, history, interrupted, evaluate(model, data.in_memory()), progress)


def _train_minibatch(folder: RunFolder, cfg: TrainConfig, data: Dataset, resumed: bool, progress: bool) -> RunResult:
    if resumed:
        model, state, history = folder.load_checkpoint(cfg.run.device)
    else:
        model, state, history = _new_model(cfg, data.source.d), None, []
        if distributed.is_main():
            folder.save_model(model, INITIAL)
    trainer = Minibatch(
        model,
        data.source,
        cfg.optim,
        seed=cfg.run.seed,
        corruption=cfg.data.corruption_fn(),
        state=state,
        history=history,
    )

    def checkpoint():
        if distributed.is_main():
            folder.save_checkpoint(model, trainer.state_dict(), history)
            folder.write_state(trainer.step, trainer.total_steps)

    _announce(folder, cfg, data, model, trainer.step, trainer.total_steps, "steps")
    on_row = _tensorboard(folder) if cfg.run.tensorboard and distributed.is_main() else None
    _, interrupted = trainer.run(progress=progress, checkpoint=checkpoint, on_row=on_row)
    checkpoint()
    final = model.folded(trainer.scale)
    if not distributed.is_main():
        return RunResult(folder, final, {}, history, interrupted, [])
    folder.save_model(final)
    metrics, density = evaluate_stream(final, data.source, max_rows=EVAL_ROWS)
    if data.true_atoms is not None:
        metrics["recovery"] = recovery_score(data.true_atoms, final.W2.t())
    if data.x is not None:  # the exact cost over all the data
        exact = evaluate(final, data.x)
        metrics.update({k: exact[k] for k in ("cost", "reconstruction", "sparsity", "weight_decay", "rho_hat_mean")})
    save_density_png(density, folder.file("density.png"))
    return _finish(folder, cfg, data, final, history, interrupted, metrics, progress)


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def _tensorboard(folder: RunFolder):
    """A history-row callback that also logs to TensorBoard, in RUN/tensorboard."""
    writer = _summary_writer_class()(str(folder.file(TENSORBOARD)))

    def log(row: dict) -> None:
        for key, value in row.items():
            if key != "step":
                writer.add_scalar(key, value, row["step"])
        writer.flush()

    return log


def _stages(folder: RunFolder, cfg: TrainConfig, data: Dataset, model, progress: bool) -> dict:
    """Stacked layers and the classifier, where the settings ask for them; the metrics they add."""
    layers = [model]
    sizes = cfg.classify.stack_sizes()
    if sizes:
        with torch.no_grad():
            codes = model.features(data.in_memory())
        layers += pretrain_stack(
            codes,
            sizes,
            Layers(cfg.model, cfg.optim, cfg.run.seed),
            dtype=codes.dtype,
            device=codes.device,
            progress=progress,
        )
        folder.save_layers(layers[1:])
    if cfg.classify.classify == "none":
        return {}
    return write_classification(folder, classify(layers, cfg.classify, cfg.data, *data.labelled(), progress))


def write_classification(folder: RunFolder, classification) -> dict:
    """classification.json, classifier.safetensors and the confusion matrices; returns the accuracies."""
    for confusion in classification.confusions:
        save_confusion_png(confusion.result, folder.file(f"{confusion.name}.png"), confusion.title)
    folder.save_classifier(classification.model, classification.class_names)
    folder.write_json(CLASSIFICATION, classification.result)
    return {k: classification.result[k] for k in CLASSIFICATION_REPORTED if k in classification.result}


def _finish(
    folder: RunFolder,
    cfg: TrainConfig,
    data: Dataset,
    model,
    history: list[dict],
    interrupted: bool,
    metrics: dict,
    progress: bool,
) -> RunResult:
    if not interrupted:
        metrics.update(_stages(folder, cfg, data, model, progress))
    folder.write_json(METRICS, metrics)
    initial = folder.load_model(INITIAL, cfg.run.device)
    x = data.x if data.x is not None else data.source.read(0, min(data.source.n, 100)).to(model.W1.dtype)
    corruption = cfg.data.corruption_fn()
    corrupt = None
    if corruption is not None:
        generator = torch.Generator().manual_seed(cfg.run.seed)
        corrupt = functools.partial(corruption, generator=generator)
    pictures = write_pictures(folder.path, model, x, history, data.image_shape, initial, corrupt)
    written = [folder.file(METRICS), folder.file("weights.safetensors"), *pictures]
    return RunResult(folder, model, metrics, history, interrupted, written)
