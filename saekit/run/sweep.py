"""A sweep: several dictionaries trained on the same batches in one pass over the data, each into a
run folder of its own.

    saekit train --preset topk --data acts/ --sweep k=16,32,64 --sweep lr=1e-3,3e-3 --out runs/sweep

    OUT/sweep.json        the swept settings, each member's folder and its changes, the preset
    OUT/<member>/         one run folder per member, named by its changes (k=16,lr=0.001): config.json,
                          checkpoint/, weights.safetensors, metrics.json, history.csv, pictures
    OUT/summary.json      each member's changes and final metrics; summary.csv, the same as a table
    OUT/frontier.png      FVU against L0 across the members
    OUT/state.json        steps done, and whether every member's results were written

The members share the data, the batches and the loop (batch size, steps, logging, checkpoints,
seed): only settings of the model (any kind's, the kind included) and of its optimisation may
vary (SWEEPABLE). A checkpoint of the sweep is a checkpoint of every member at one step; resuming
takes the newest step that every member has a sound checkpoint of, so a kill between members'
writes costs one checkpoint interval, never consistency.
"""

import csv
import io
import itertools
import time
import typing
from pathlib import Path
from typing import NamedTuple

from .. import distributed, kinds
from ..config import PARTS, TrainConfig, build_config
from ..errors import UserError
from ..files import atomic_write, read_json, write_json
from ..settings import dashed, value_type
from ..train.control import StepBoundaryStop, TermAsInterrupt
from ..train.minibatch import Minibatch
from ..train.sweep import Sweep
from ..viz.report import save_frontier_png
from .folder import CONFIG, RunFolder
from .train import Job, RunResult, _announce, _prepare

SWEEP = "sweep.json"
SUMMARY = "summary.json"
# The optimisation settings a member may have of its own; every model setting may vary too.
OPTIMISATION = ("lr", "optimizer", "normalize_decoder", "decoder_bias_init", "dead_after", "autocast", "scale_inputs")
REPORTED = ("fvu", "l0", "dead_fraction", "mse", "recovery", "mcc", "f1")


class SweepResult(NamedTuple):
    folder: Path
    members: list[RunResult]
    interrupted: bool
    written: list[Path]


def sweepable(name: str) -> bool:
    return (
        name == "kind"
        or name in OPTIMISATION
        or any(name in kinds.kind_class(k).Config.__dataclass_fields__ for k in kinds.KINDS)
    )


def parse_sweep(specs: list[str]) -> dict[str, list]:
    """["k=16,32", "lr=1e-3,3e-3"] -> {"k": [16, 32], "lr": [0.001, 0.003]}, each value of its setting's type."""
    swept: dict[str, list] = {}
    for spec in specs:
        name, _, values = spec.partition("=")
        name = name.strip().replace("-", "_")
        if not values or not name:
            raise UserError(f"--sweep {spec!r} is not NAME=V1,V2,... (for example --sweep k=16,32,64)")
        if not sweepable(name):
            raise UserError(
                f"--sweep {dashed(name)}: the members of a sweep share their data, batches and loop; "
                f"only model and optimisation settings may vary ({', '.join(OPTIMISATION)}, k, ...)"
            )
        swept[name] = [_typed(name, v.strip()) for v in values.split(",")]
    return swept


def _typed(name: str, text: str):
    if name == "kind":
        return text
    classes = [
        cls for cls in (*PARTS.values(), *(k.Config for k in kinds.KINDS.values())) if name in cls.__dataclass_fields__
    ]
    kind = value_type(typing.get_type_hints(classes[0])[name])
    try:
        return {"true": True, "false": False}[text.lower()] if kind is bool else kind(text)
    except (KeyError, ValueError):
        raise UserError(f"--sweep {dashed(name)}: {text!r} is not a {kind.__name__}") from None


def member_name(changes: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in changes.items())


def sweep_configs(preset: str, config_file: str | None, overrides: dict, swept: dict[str, list]) -> list[tuple]:
    """(name, changes, TrainConfig) of every member: the settings' product, each built like a run's own."""
    members = []
    for values in itertools.product(*swept.values()):
        changes = dict(zip(swept, values))
        members.append((member_name(changes), changes, build_config(preset, config_file, {**overrides, **changes})))
    _check_shared([cfg for _, _, cfg in members])
    return members


def _check_shared(configs: list[TrainConfig]) -> None:
    first = configs[0]
    loop = {k: v for k, v in first.optim.to_dict().items() if k not in OPTIMISATION}
    for cfg in configs:
        if cfg.optim.full_batch:
            raise UserError("a sweep trains on shared minibatches: use --optimizer adam or sgd, not lbfgs")
        if cfg.classify.stack or cfg.classify.classify != "none":
            raise UserError("a sweep trains dictionaries only: leave out --stack and --classify")
        same = (cfg.data, cfg.run) == (first.data, first.run)
        if not same or {k: v for k, v in cfg.optim.to_dict().items() if k not in OPTIMISATION} != loop:
            raise UserError("the members of a sweep must share their data, batches and loop settings")


def train_sweep(
    members: list[tuple],
    out: str | Path | None,
    *,
    preset: str = "custom",
    command: list[str] | None = None,
    progress: bool = True,
) -> SweepResult:
    """Train the members (from sweep_configs) into OUT (default runs/sweep-<time>)."""
    data = _prepare(*(cfg for _, _, cfg in members))
    parent = Path(out) if out else Path("runs") / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    if (parent / SWEEP).exists() or (parent / CONFIG).exists():
        raise UserError(f"{parent} already holds a run; choose another --out, or continue it with --resume {parent}.")
    folders = []
    if distributed.is_main():
        parent.mkdir(parents=True, exist_ok=True)
    for name, changes, cfg in members:
        folder = RunFolder.create(parent / name, name) if distributed.is_main() else RunFolder(parent / name)
        if distributed.is_main():
            folder.save_config(cfg, preset, command, sweep={"folder": str(parent), "changes": changes})
        folders.append(folder)
    if distributed.is_main():
        write_json(
            parent / SWEEP,
            {
                "preset": preset,
                "members": [{"folder": n, "changes": c} for n, c, _ in members],
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
    try:
        return _run(parent, folders, [cfg for _, _, cfg in members], data, resumed=False, progress=progress)
    except BaseException:
        if not any(f.has_checkpoint() for f in folders):  # nothing to resume: leave nothing behind
            for folder in folders:
                folder.discard()
            (parent / SWEEP).unlink(missing_ok=True)
            if not any(parent.iterdir()):
                parent.rmdir()
        raise


def resume_sweep(path: str | Path, *, progress: bool = True) -> SweepResult:
    """Continue the sweep in path from the newest step every member has a sound checkpoint of."""
    parent = Path(path)
    record = read_json(parent / SWEEP)
    folders = [RunFolder.open(parent / m["folder"]) for m in record["members"]]
    configs = [f.load_config() for f in folders]
    _check_shared(configs)
    data = _prepare(*configs)
    return _run(parent, folders, configs, data, resumed=True, progress=progress)


def is_sweep(path: str | Path) -> bool:
    return (Path(path) / SWEEP).is_file()


def _common_step(folders: list[RunFolder]) -> int | None:
    steps = [set(f.checkpoint_steps()) for f in folders]
    common = set.intersection(*steps) if steps else set()
    return max(common) if common else None


def _run(
    parent: Path, folders: list[RunFolder], configs: list[TrainConfig], data, resumed: bool, progress: bool
) -> SweepResult:
    with TermAsInterrupt():
        at_most = _common_step(folders) if resumed else None
        resumed = at_most is not None  # with no step every member has, all start again
        first = Job(folders[0], configs[0], data, resumed, at_most=at_most)
        assert isinstance(first.trainer, Minibatch)  # _check_shared refused full-batch members
        stream = first.trainer.stream
        jobs = [first] + [
            Job(f, c, data, resumed, stream=stream, at_most=at_most) for f, c in zip(folders[1:], configs[1:])
        ]
        sweep = Sweep([job.trainer for job in jobs if isinstance(job.trainer, Minibatch)])
        _announce(folders[0], configs[0], data, first.model, sweep.step, sweep.total_steps)

        def checkpoint() -> None:
            for job in jobs:
                job.checkpoint()
            if distributed.is_main():
                write_json(
                    parent / "state.json",
                    {"steps_done": sweep.step, "steps_total": sweep.total_steps, "finished": False},
                )

        with StepBoundaryStop() as stop:
            interrupted = sweep.run(progress, checkpoint, [job.on_row for job in jobs])
            checkpoint()
        interrupted = interrupted or stop.requested
        results = [job.result(interrupted, progress) for job in jobs]
    if interrupted or not distributed.is_main():
        return SweepResult(parent, results, interrupted, [])
    written = _summarise(parent, folders, results)
    write_json(
        parent / "state.json", {"steps_done": sweep.total_steps, "steps_total": sweep.total_steps, "finished": True}
    )
    return SweepResult(parent, results, False, written)


def _summarise(parent: Path, folders: list[RunFolder], results: list[RunResult]) -> list[Path]:
    """summary.json, summary.csv and frontier.png of the finished members."""
    rows = []
    for folder, result in zip(folders, results):
        changes = folder.record().get("sweep", {}).get("changes", {})
        rows.append({"member": folder.path.name, **changes, **{k: result.metrics.get(k) for k in REPORTED}})
    summary = write_json(parent / SUMMARY, rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
    writer.writeheader()
    writer.writerows(rows)
    table = atomic_write(parent / "summary.csv", buf.getvalue().encode())
    frontier = save_frontier_png([(r["member"], r["l0"], r["fvu"]) for r in rows], parent / "frontier.png")
    return [summary, table, frontier]
