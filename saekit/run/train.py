"""A whole run from its settings: data, model, training, run folder, metrics, stages, pictures.

    result = train_run(cfg, out="runs/mine")      # what `saekit train` does after parsing
    result = resume_run("runs/mine")              # what `saekit train --resume runs/mine` does

The life of a run, and what a kill at any moment leaves:

1. Every check that can fail before training (device, memory, data, settings) runs before the
   folder is made; a run that fails before its first checkpoint removes what it wrote.
2. config.json and initial.safetensors are written; history.csv grows a row at a time.
3. Every optim.checkpoint_every steps (and at the end, and on Ctrl-C or SIGTERM, at a step's
   end) a checkpoint unit is written (saekit.run.folder): a kill leaves the previous checkpoint or
   the new one. Resuming cuts history.csv back to the checkpoint's step, and the steps after it
   are trained again, to the same weights.
4. At the end: weights.safetensors, metrics.json, stacked layers and classifier, pictures, then
   state.json says finished. A kill or Ctrl-C before that leaves a run that --resume finishes.

Under torchrun, join the process group first (saekit.distributed): every process trains, only
the first writes the folder.
"""

import dataclasses
import functools
import sys
from pathlib import Path
from typing import NamedTuple

import torch

from .. import distributed
from ..classify import classify
from ..classify.stacked import Layers, pretrain_stack
from ..config import PARTS, TrainConfig
from ..data import Dataset, load_training_data
from ..data.synthetic import dictionary_metrics
from ..errors import Diverged, UserError
from ..eval import evaluate, evaluate_stream
from ..eval.metrics import filter_localization
from ..kinds import SparseAutoencoder, build
from ..train import Estimate, check_fits, estimate, trainer_for
from ..train.control import StepBoundaryStop, TermAsInterrupt
from ..viz.report import save_confusion_png, save_density_png, write_pictures
from .folder import CLASSIFICATION, INITIAL, METRICS, STATE, TENSORBOARD, RunFolder

EVAL_ROWS = 100_000  # rows of streamed training data the final metrics are computed on
CLASSIFICATION_REPORTED = ("accuracy", "accuracy_before_fine_tuning", "accuracy_raw_pixels")
# Settings that may change on --resume (applied and recorded in config.json): how long to train,
# the per-process batch (another process count with the same global batch; the stream checks),
# and how often to log and checkpoint. Every other setting is the run's own.
RESUMABLE = (
    "max_iter",
    "epochs",
    "steps",
    "batch_size",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "tensorboard",
)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM after training, while the results were written: --resume writes them."""

    def __init__(self, folder: RunFolder):
        super().__init__(str(folder))
        self.folder = folder


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
    if not distributed.is_main():
        return _train(RunFolder(out or ""), cfg, data, resumed=False, progress=progress)
    folder = RunFolder.create(out, preset)
    try:
        folder.save_config(cfg, preset, command)
        return _train(folder, cfg, data, resumed=False, progress=progress)
    except BaseException:
        if not folder.has_checkpoint():  # nothing to resume: leave no half-made run behind
            folder.discard()
        raise


def resume_run(run_dir: str | Path, changes: dict | None = None, *, progress: bool = True) -> RunResult:
    """Continue the run in run_dir from its newest sound checkpoint (or from the start if it has none).

    `changes` are settings given again: RESUMABLE ones are applied and recorded in config.json,
    any other that differs from the run's own is refused with the list of differences.
    """
    folder = RunFolder.open(run_dir)
    cfg = folder.load_config()
    flat = cfg.flat()
    differing = {k: v for k, v in (changes or {}).items() if flat.get(k) != v}
    fixed = {k: v for k, v in differing.items() if k not in RESUMABLE}
    if fixed:
        listed = ", ".join(f"{k} ({flat.get(k)!r} in the run, {v!r} given)" for k, v in sorted(fixed.items()))
        raise UserError(
            f"--resume continues a run with its own settings; these differ: {listed}. Leave them out, "
            f"or start a new run (only {', '.join(RESUMABLE)} may change)."
        )
    if differing:
        cfg = TrainConfig.from_flat({**flat, **differing})
    data = _prepare(cfg)
    return _train(folder, cfg, data, resumed=True, progress=progress, changes=differing)


def _prepare(cfg: TrainConfig, *others: TrainConfig) -> Dataset:
    """What must hold before anything is written: the device, optional packages, the data, the memory
    (of this run's model, and of the others trained beside it in a sweep)."""
    cfg.run.require_device()
    if cfg.run.tensorboard:
        _summary_writer_class()
    if cfg.optim.full_batch and distributed.is_distributed():
        raise UserError("L-BFGS trains on the full batch in one process; use --optimizer adam under torchrun.")
    data = load_training_data(cfg.data, cfg.run.torch_dtype, cfg.run.device, cfg.run.seed)
    if data.x is not None:
        _check_data(data.x, cfg)
    itemsize = torch.empty(0, dtype=cfg.run.torch_dtype).element_size()
    needs = [estimate(data.source.d, c.model.n_hidden, c.optim, itemsize, data.source.n) for c in (cfg, *others)]
    check_fits(Estimate(*(sum(parts) for parts in zip(*needs))), cfg.run.device)
    return data


def _check_data(x: torch.Tensor, cfg: TrainConfig) -> None:
    if not torch.isfinite(x).all():
        raise UserError("the training data contain NaN or infinite values; clean the data first.")
    if cfg.model.output == "sigmoid" and (x.min() < 0 or x.max() > 1):
        raise UserError(
            f"sigmoid outputs reconstruct values in [0, 1], but the data span [{float(x.min()):.3g}, "
            f"{float(x.max()):.3g}]; rescale the data or use --output linear."
        )


def _say(message: str) -> None:
    if distributed.is_main():
        print(message, file=sys.stderr, flush=True)


def _announce(folder: RunFolder, cfg: TrainConfig, data: Dataset, model, done: int, total: int) -> None:
    if distributed.is_main():
        processes = f", {distributed.world_size()} processes" if distributed.is_distributed() else ""
        unit = "iterations" if cfg.optim.full_batch else "steps"
        print(
            f"run folder: {folder}\ndata: {data.description}\nmodel: {model.describe()}, weight decay "
            f"{cfg.model.weight_decay}\ntraining: {cfg.optim.optimizer}, {total - done} of {total} {unit} to go"
            f"{processes}",
            flush=True,
        )


def _fixed_settings(cfg: TrainConfig) -> dict:
    """The settings a checkpoint must agree with to be resumed: all but RESUMABLE."""
    return {k: v for k, v in cfg.flat().items() if k not in RESUMABLE}


def _defaults(cfg: TrainConfig) -> dict:
    """Every setting's default value for cfg's kind."""
    classes = [*PARTS.values(), type(cfg.model)]
    fields = (f for cls in classes for f in dataclasses.fields(cls))
    return {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}


def _start(folder: RunFolder, cfg: TrainConfig, data: Dataset, resumed: bool, at_most: int | None = None):
    """(model, trainer state, history) to train from: the newest sound checkpoint (of a step up to
    at_most), or the seed's start."""
    checkpoint = None
    if resumed:  # settings added since an older saekit wrote the checkpoint match at their defaults
        checkpoint = folder.load_checkpoint(_fixed_settings(cfg), cfg.run.device, at_most, _defaults(cfg))
    if checkpoint is None:
        if resumed:
            _say(f"{folder} has no checkpoint yet: training from the start")
        n_inputs, n_outputs = data.widths
        model = build(
            cfg.model,
            n_inputs,
            n_outputs=n_outputs,
            dtype=cfg.run.torch_dtype,
            device=cfg.run.device,
            seed=cfg.run.seed,
        )
        if distributed.is_main():
            folder.save_model(model, INITIAL)
            folder.save_history([])
        return model, None, []
    for problem in checkpoint.skipped:
        _say(f"saekit: {problem}; resuming from the checkpoint of step {checkpoint.step} instead")
    if distributed.is_main():
        folder.save_history(checkpoint.history)  # cut back to the checkpoint's step
    return checkpoint.model, checkpoint.trainer_state, checkpoint.history


class Job:
    """The training of one run folder: its model and trainer (from the start or the newest sound
    checkpoint), its checkpoints and its results. A sweep runs several, on one stream."""

    def __init__(
        self,
        folder: RunFolder,
        cfg: TrainConfig,
        data: Dataset,
        resumed: bool,
        *,
        stream=None,
        at_most: int | None = None,
    ):
        self.folder, self.cfg, self.data = folder, cfg, data
        self.model, state, history = _start(folder, cfg, data, resumed, at_most)
        self.trainer = trainer_for(
            self.model,
            data,
            cfg.optim,
            seed=cfg.run.seed,
            corruption=cfg.data.corruption_fn(),
            state=state,
            history=history,
            stream=stream,
        )
        self.settings = _fixed_settings(cfg)
        self.on_row = _row_writer(folder, cfg)

    def checkpoint(self) -> None:
        """A checkpoint unit of the trainer's present step (never of weights that are not finite)."""
        if not distributed.is_main():
            return
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise Diverged(
                f"the weights hold NaN or infinite values after step {self.trainer.step}; the learning "
                f"rate (--lr) or a penalty weight is likely too large: start again with a smaller one"
            )
        cfg, trainer = self.cfg, self.trainer
        self.folder.save_checkpoint(
            self.model, trainer.state_dict(), trainer.history, self.settings, cfg.optim.keep_checkpoints
        )
        self.folder.write_state(trainer.step, trainer.total_steps)

    def result(self, interrupted: bool, progress: bool) -> RunResult:
        """The run's results, written once its training is done (see _finish)."""
        folder, trainer = self.folder, self.trainer
        final = self.model.folded(trainer.scale)
        if not distributed.is_main():
            return RunResult(folder, final, {}, trainer.history, interrupted, [])
        if interrupted:
            return RunResult(folder, final, {}, trainer.history, True, [folder.file(STATE)])
        try:
            return _finish(folder, self.cfg, self.data, final, trainer.history, trainer.total_steps, progress)
        except KeyboardInterrupt:
            raise Interrupted(folder) from None


def _train(
    folder: RunFolder, cfg: TrainConfig, data: Dataset, resumed: bool, progress: bool, changes: dict | None = None
) -> RunResult:
    """Train from the start or the newest checkpoint; `changes` (settings changed on resume) are recorded
    in config.json once the checkpoint has been read."""
    with TermAsInterrupt():  # SIGTERM outside training steps: as Ctrl-C, never a half-written file
        job = Job(folder, cfg, data, resumed)
        _announce(folder, cfg, data, job.model, job.trainer.step, job.trainer.total_steps)
        if changes and distributed.is_main():
            folder.record_resume(cfg, changes)
        with StepBoundaryStop() as stop:  # a signal waits for the last checkpoint, too
            _, interrupted = job.trainer.run(progress=progress, checkpoint=job.checkpoint, on_row=job.on_row)
            job.checkpoint()
        return job.result(interrupted or stop.requested, progress)


def _row_writer(folder: RunFolder, cfg: TrainConfig):
    """The callback for each new history row: history.csv, and TensorBoard if asked for."""
    if not distributed.is_main():
        return None
    writer = _summary_writer_class()(str(folder.file(TENSORBOARD))) if cfg.run.tensorboard else None

    def on_row(row: dict) -> None:
        folder.append_history(row)
        if writer is not None:
            for key, value in row.items():
                if key != "step":
                    writer.add_scalar(key, value, row["step"])
            writer.flush()

    return on_row


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def _metrics(cfg: TrainConfig, data: Dataset, model) -> tuple[dict, torch.Tensor]:
    """Reconstruction and sparsity over the data (at most EVAL_ROWS streamed), the exact cost where the
    data are in memory, the recovery of a known dictionary (saekit.data.synthetic.dictionary_metrics: the
    one-to-one scores over the units that fired), how local the filters are on images; and each unit's density."""
    metrics, density = evaluate_stream(model, data.source, max_rows=EVAL_ROWS)
    if data.x is not None:
        metrics.update(evaluate(model, data.x))
    if data.true_atoms is not None:
        metrics.update(dictionary_metrics(data.true_atoms, model.W2.t(), density > 0, data.true_parents))
    if data.image_shape is not None:
        metrics["filter_localization"] = filter_localization(model.W1, data.image_shape)
    return metrics, density


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
    folder: RunFolder, cfg: TrainConfig, data: Dataset, model, history: list[dict], total: int, progress: bool
) -> RunResult:
    """The results of a run whose training is done; state.json says finished only once all are written."""
    folder.save_model(model)
    metrics, density = _metrics(cfg, data, model)
    save_density_png(density, folder.file("density.png"))
    metrics.update(_stages(folder, cfg, data, model, progress))
    folder.write_json(METRICS, metrics)
    initial = folder.load_model(INITIAL, cfg.run.device)
    x = (
        data.x
        if data.x is not None
        else data.source.split(data.source.read(0, min(data.source.n, 100)))[0].to(model.W1.dtype)
    )
    corruption = cfg.data.corruption_fn()
    corrupt = None
    if corruption is not None:
        corrupt = functools.partial(corruption, generator=torch.Generator().manual_seed(cfg.run.seed))
    pictures = write_pictures(folder.path, model, x, history, data.image_shape, initial, corrupt)
    folder.write_state(total, total, finished=True)
    written = [folder.file(METRICS), folder.file("weights.safetensors"), folder.file("density.png"), *pictures]
    return RunResult(folder, model, metrics, history, False, written)
