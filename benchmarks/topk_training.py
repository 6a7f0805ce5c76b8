"""TopK dictionary training, saekit against the trainers a user would otherwise pick: same data, same run.

Every trainer trains a TopK dictionary of --width latents, --k active, on the same rows in the
same order (the first n_train rows of a .npy file, batch after batch; the last --heldout rows
are never trained on) in a process of its own: saekit here (the `topk` preset with only the
data, width, k, batch and steps given, plus --no-shuffle so that every trainer sees the same
batches), the peers through `peers.py` in their own virtual environment (they are never
saekit's dependencies). The trainers take turns over --repeats rounds, the order reversed
every other round, so that a change of the machine's load falls on all of them alike.

Each row records:
- samples_per_s: the batch over the median time of one training step (steps 2..N);
- samples_per_cpu_s: the batch over the median CPU seconds of one step, all of the process's
  threads: the figure other processes' load moves least;
- peak_rss_mb: the process's largest resident memory;
- fvu, l0, dead_fraction on the held-out rows;
- load: the 1-minute load average before and after (a ratio of rows that met different loads
  is not a result: alternate, repeat, and compare medians);
- saekit's rows also time the encoder's product alone in the same process (product_ms,
  median of 5: (batch, d) @ (d, width) in the run's precision) and report the step's time
  over it (step_over_product): the product is the one dense part of the step.

    python benchmarks/topk_training.py --peers-python /work/peers/venv/bin/python \\
        --width 16384 --k 32 --d 512 --batch 4096 --steps 10 --repeats 3
    # quality at equal tokens, and at equal wall time (each trainer gets the steps it manages
    # in that many seconds at the speed this run measured):
    python benchmarks/topk_training.py --data minilm.npy --d 384 --width 4096 --k 32 --batch 2048 \\
        --steps 200 --wall-seconds 120 --peers-python ...

--data defaults to a synthetic file made by `peers.py --make-data` (numpy only). The
trainers: saekit (float32), saekit-bf16 (the encoder product in bfloat16, float32 weights and
optimizer state), saekit-batchtopk (the `batchtopk` preset, float32), and the peers (sparsify,
saelens, dictionary_learning, plain_torch_dense).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from peers import StepClock, fvu, load_split, peak_rss_mb, sparsity  # noqa: E402

# trainer name -> (preset, --autocast)
SAEKIT = {"saekit": ("topk", "none"), "saekit-bf16": ("topk", "bf16"), "saekit-batchtopk": ("batchtopk", "none")}
PEERS = ("sparsify", "saelens", "dictionary_learning", "plain_torch_dense")


# ----------------------------------------------------------------------------- saekit's worker


def product_ms(x: torch.Tensor, W1: torch.Tensor, bias: torch.Tensor, autocast: str) -> float:
    """Median milliseconds of the encoder's product alone, as the trainer computes it."""

    def once():
        if autocast == "bf16":
            torch.addmm(bias.bfloat16(), x.bfloat16(), W1.t().bfloat16())
        else:
            torch.addmm(bias, x, W1.t())

    once()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def run_saekit(args, name: str, preset: str, autocast: str) -> dict:
    from saekit.config import build_config
    from saekit.data.vectors import ArraySource
    from saekit.kinds import build
    from saekit.train import Minibatch

    X_train, X_heldout = load_split(args.data, args.heldout, args.train_rows)
    settings = {
        "data": str(args.data),
        "n_hidden": args.width,
        "k": args.k,
        "steps": args.steps,
        "batch_size": args.batch,
        "shuffle": False,
        "autocast": autocast,
        "log_every": args.steps,
        "checkpoint_every": 10**9,
    }
    cfg = build_config(preset, overrides=settings)
    model = build(cfg.model, X_train.shape[1], dtype=torch.float32, seed=cfg.run.seed)
    trainer = Minibatch(model, ArraySource(X_train), cfg.optim, seed=cfg.run.seed)
    load_before = os.getloadavg()[0]
    clock = StepClock()
    trainer.run(progress=False)
    timing = clock.result(args.batch)
    load = [load_before, os.getloadavg()[0]]
    final = model.folded(trainer.scale)
    final.eval()
    product = product_ms(X_train[: args.batch] * trainer.scale, model.W1.detach(), model.b1.detach(), autocast)
    step_ms = 1000 * args.batch / timing["samples_per_s"]
    l0, dead = sparsity(final.features, X_heldout, args.width)
    import saekit

    return {
        "name": name,
        "version": saekit.__version__,
        "fvu": fvu(lambda x: final(x).x_hat, X_heldout),
        "l0": l0,
        "dead_fraction": dead,
        "peak_rss_mb": peak_rss_mb(),
        "steps": trainer.step,
        "load_avg": load,
        "product_ms": product,
        "step_ms": step_ms,
        "step_over_product": step_ms / product,
        "notes": f"{preset} preset: Adam lr {cfg.optim.lr:g}, AuxK {cfg.model.aux_k}, autocast {autocast}",
        **timing,
    }


# ----------------------------------------------------------------------------- the orchestra


def run_row(name: str, args, steps: int, out: Path) -> dict:
    """One trainer in a process of its own; its JSON row, or a row saying why it failed."""
    common = [
        "--data",
        str(args.data),
        "--width",
        str(args.width),
        "--k",
        str(args.k),
        "--d",
        str(args.d),
        "--batch",
        str(args.batch),
        "--steps",
        str(steps),
        "--heldout",
        str(args.heldout),
        "--train-rows",
        str(args.train_rows),
    ]
    if name in SAEKIT:
        argv = [sys.executable, __file__, "--worker", name, "--worker-out", str(out), *common]
    else:
        argv = [args.peers_python, str(HERE / "peers.py"), "--child", name, "--child-out", str(out), *common]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout)
    if result.returncode == 0 and out.exists():
        return json.loads(out.read_text())
    tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"name": name, "samples_per_s": None, "notes": f"failed ({result.returncode}): {tail[0]}"}


def rounds(args, steps_of) -> list[dict]:
    """--repeats rounds of every trainer, the order reversed every other round."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            order = args.trainers if r % 2 == 0 else args.trainers[::-1]
            for name in order:
                print(f"round {r + 1}: {name} ...", file=sys.stderr, flush=True)
                row = run_row(name, args, steps_of(name), Path(tmp) / f"{name}-{r}.json")
                rows.append({**row, "round": r + 1})
    return rows


def median_of(rows: list[dict], name: str, key: str):
    values = [r[key] for r in rows if r["name"] == name and r.get(key) is not None]
    return statistics.median(values) if values else None


def table(rows: list[dict], trainers: list[str], title: str) -> str:
    keys = ("samples_per_s", "samples_per_cpu_s", "peak_rss_mb", "fvu", "l0", "dead_fraction", "step_over_product")
    lines = [f"\n{title}", f"{'trainer':22s}" + "".join(f"{k:>18s}" for k in keys) + f"{'loads':>16s}"]
    for name in trainers:
        cells = []
        for key in keys:
            value = median_of(rows, name, key)
            cells.append(f"{'-':>18s}" if value is None else f"{value:18.4g}")
        loads = [x for r in rows if r["name"] == name and r.get("load_avg") for x in r["load_avg"]]
        spread = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-"
        lines.append(f"{name:22s}" + "".join(cells) + f"{spread:>16s}")
    return "\n".join(lines)


def ratios(rows: list[dict], trainers: list[str]) -> str:
    ours = [t for t in trainers if t in SAEKIT]
    lines = ["\nsaekit's speed over each peer (medians; wall samples/s, and samples per CPU-second):"]
    for mine in ours:
        for peer in (t for t in trainers if t not in SAEKIT):
            a, b = median_of(rows, mine, "samples_per_s"), median_of(rows, peer, "samples_per_s")
            c, d = median_of(rows, mine, "samples_per_cpu_s"), median_of(rows, peer, "samples_per_cpu_s")
            if None not in (a, b, c, d):
                lines.append(f"  {mine} / {peer}: {a / b:.2f}x wall, {c / d:.2f}x per CPU-second")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, help=".npy of float32 rows (default: made by peers.py --make-data)")
    p.add_argument("--peers-python", help="python of the venv where the peers are installed")
    p.add_argument(
        "--trainers",
        default="saekit,saekit-bf16,sparsify,plain_torch_dense",
        help=f"comma-separated, from {', '.join([*SAEKIT, *PEERS])}",
    )
    p.add_argument("--width", type=int, default=16384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--heldout", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--wall-seconds", type=float, help="also train each trainer for this long (at its measured speed)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per trainer per round")
    p.add_argument("--json", type=Path, help="write every row and the settings here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--train-rows", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(run_saekit(args, args.worker, *SAEKIT[args.worker])))
        return
    args.trainers = args.trainers.split(",")
    unknown = set(args.trainers) - {*SAEKIT, *PEERS}
    if unknown:
        p.error(f"unknown trainers {sorted(unknown)}")
    if any(t in PEERS for t in args.trainers) and not (args.peers_python and Path(args.peers_python).exists()):
        p.error(
            "the peers need --peers-python: python3 -m venv PEERS && PEERS/bin/pip install torch==2.13.0 "
            "eai-sparsify sae-lens dictionary-learning (then remove its torchvision)"
        )
    if args.data is None:
        args.data = Path(tempfile.gettempdir()) / f"saekit-bench-{args.d}.npy"
        if not args.data.exists():
            maker = args.peers_python or sys.executable
            subprocess.run(
                [maker, str(HERE / "peers.py"), "--make-data", str(args.data), "--d", str(args.d)], check=True
            )
    n_rows = np.load(args.data, mmap_mode="r").shape[0]
    args.train_rows = (n_rows - args.heldout) // args.batch * args.batch  # whole batches: every trainer alike
    print(
        f"data {args.data}: {args.train_rows} training rows, {args.heldout} held out; width {args.width}, "
        f"k {args.k}, batch {args.batch}, {args.steps} steps, {args.repeats} rounds, {os.cpu_count()} cores"
    )
    rows = rounds(args, lambda name: args.steps)
    report = table(rows, args.trainers, f"equal steps ({args.steps} of {args.batch} rows): medians over rounds")
    report += ratios(rows, args.trainers)
    wall_rows = []
    if args.wall_seconds:

        def steps_in_time(name):
            speed = median_of(rows, name, "samples_per_s") or 1.0
            return max(2, int(args.wall_seconds * speed / args.batch))

        wall_rows = rounds(args, steps_in_time)
        report += table(
            wall_rows, args.trainers, f"equal wall time ({args.wall_seconds:g} s of steps at each one's speed)"
        )
    print(report)
    if args.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.write_text(
            json.dumps(
                {
                    "settings": settings,
                    "equal_steps": rows,
                    "equal_wall_time": wall_rows,
                    "torch": torch.__version__,
                    "report": report,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
