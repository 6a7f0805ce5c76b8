"""TopK dictionary training: saekit against the trainers a user would otherwise pick, same data, same run.

saekit's trainer (`saekit.train.Minibatch`, the `topk` preset) trains a TopK dictionary on a
.npy file of vectors; then `benchmarks/peers.py` trains sparsify, SAELens, dictionary_learning
and a plain-PyTorch dense-decoding reference on the same file, in their own virtual
environment (they are never saekit's dependencies). Each row reports samples per second (the
batch over the median time of one training step, the first step excluded) and the FVU reached
on held-out rows after the same number of steps; the last column is saekit's speed over the row's.

    python benchmarks/topk_training.py --peers-python /work/peers-venv/bin/python \\
        --width 16384 --k 32 --d 512 --steps 30 --batch 4096

The peers' environment: python3 -m venv PEERS && PEERS/bin/pip install torch==2.13.0
eai-sparsify sae-lens dictionary-learning. Without --peers-python (or where it is missing) only
saekit runs, and the output says so. The data file is made by peers.py --make-data (numpy
only: a random dictionary of 16,384 atoms, 32 active per row, noise), the interface both share.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from saekit.config import build_config
from saekit.data.vectors import ArraySource
from saekit.eval import evaluate_stream
from saekit.kinds import build
from saekit.train import Minibatch

HERE = Path(__file__).resolve().parent


def run_saekit(path: Path, args) -> dict:
    rows = np.load(path, mmap_mode="r")
    n_train = rows.shape[0] - args.heldout
    cfg = build_config(
        "topk",
        overrides={
            "data": str(path),
            "n_hidden": args.width,
            "k": args.k,
            "steps": args.steps,
            "batch_size": args.batch,
            "aux_k": 256,
            "dead_after": 10 * args.batch,
            "lr": args.lr,
            "log_every": args.steps,
            "checkpoint_every": 10**9,
            "autocast": args.autocast,
        },
    )
    model = build(cfg.model, rows.shape[1], dtype=torch.float32, seed=cfg.run.seed)
    trainer = Minibatch(model, ArraySource(rows[:n_train]), cfg.optim, seed=cfg.run.seed)
    ends = []
    trainer.optimizer.register_step_post_hook(lambda *_: ends.append(time.perf_counter()))
    trainer.run(progress=False)
    step_seconds = np.diff(ends)  # step 2..N: the first step (warm-up) has no start mark
    final = model.folded(trainer.scale)
    metrics, _ = evaluate_stream(final, ArraySource(rows[n_train:]))
    notes = f"Adam lr {args.lr:g}, AuxK 256, geometric-median b_dec, unit-norm decoder, inputs scaled"
    return {
        "name": "saekit" + (f" ({args.autocast} matmul)" if args.autocast != "none" else ""),
        "samples_per_s": args.batch / statistics.median(step_seconds),
        "fvu": metrics["fvu"],
        "steps": trainer.step,
        "notes": notes,
    }


def run_peers(path: Path, args) -> list[dict]:
    if not args.peers_python or not Path(args.peers_python).exists():
        print(
            f"peers not run: no peers' python at {args.peers_python!r}; make one with\n"
            "  python3 -m venv PEERS && PEERS/bin/pip install torch==2.13.0 eai-sparsify sae-lens dictionary-learning\n"
            "and pass --peers-python PEERS/bin/python"
        )
        return []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peers.json"
        command = [
            args.peers_python,
            str(HERE / "peers.py"),
            "--data",
            str(path),
            "--json",
            str(out),
            "--width",
            str(args.width),
            "--k",
            str(args.k),
            "--d",
            str(args.d),
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--heldout",
            str(args.heldout),
        ]
        subprocess.run(command, check=False)
        if not out.exists():
            print("peers.py wrote no results; see its output above")
            return []
        return json.loads(out.read_text())["results"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a .npy of float32 rows (default: made by peers.py --make-data)")
    parser.add_argument("--peers-python", help="python of a venv where the peers are installed")
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--heldout", type=int, default=8192)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--autocast", default="none", choices=["none", "bf16"], help="also a bf16 run of saekit")
    args = parser.parse_args()
    path = args.data or Path(tempfile.gettempdir()) / f"saekit-bench-{args.d}.npy"
    if not path.exists():
        maker = args.peers_python if args.peers_python and Path(args.peers_python).exists() else sys.executable
        subprocess.run([maker, str(HERE / "peers.py"), "--make-data", str(path), "--d", str(args.d)], check=True)
    print(
        f"data {path}, width {args.width}, k {args.k}, batch {args.batch}, {args.steps} steps, "
        f"{torch.get_num_threads()} threads"
    )
    rows = [run_saekit(path, args)]
    rows += run_peers(path, args)
    ours = rows[0]["samples_per_s"]
    print(f"\n{'trainer':28s} {'samples/s':>10s} {'FVU':>7s} {'saekit speed / this':>20s}")
    for row in rows:
        speed, fvu = row.get("samples_per_s"), row.get("fvu")
        if speed is None:
            print(f"{row['name']:28s} {'failed':>10s}   {row.get('notes', '')[:90]}")
            continue
        print(f"{row['name']:28s} {speed:10.0f} {fvu:7.3f} {ours / speed:19.2f}x")


if __name__ == "__main__":
    main()
