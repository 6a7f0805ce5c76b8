"""TopK SAE training speed and quality of the trainers a user would otherwise pick, on one data file.

Run it with the peers' own venv, never saekit's (the peers are not, and must not become,
dependencies of saekit):

    python3 -m venv /work/peers-venv
    /work/peers-venv/bin/pip install torch==2.13.0 eai-sparsify sae-lens dictionary-learning
    /work/peers-venv/bin/python benchmarks/peers.py --make-data /tmp/acts.npy
    /work/peers-venv/bin/python benchmarks/peers.py --data /tmp/acts.npy --json /tmp/peers.json \
        --width 16384 --k 32 --steps 30 --batch 4096

Each peer trains a TopK SAE of `width` latents, `k` active, on the same rows in the same order,
with its own model class and training loop, in its own subprocess (one crash or a missing
package costs one row, not the run):

- sparsify (PyPI eai-sparsify): `sparsify.Trainer` with `TrainConfig(SaeConfig(k, num_latents))`,
  fed through a stand-in "model" whose one layer replays rows of the data file (the Trainer
  only trains on a transformers model's hidden states); defaults: Signum in ScheduleFree,
  lr 5e-3/sqrt(width/2^14), b_dec = first batch's mean. Without Triton it decodes with
  torch's embedding_bag. The FVU is read from the ScheduleFree averaged weights
  (`optimizer.eval()`), the weights sparsify saves.
- SAELens (PyPI sae-lens): `TopKTrainingSAE(TopKTrainingSAEConfig(d_in, d_sae, k))` trained by
  `SAETrainer(SAETrainerConfig(...), sae, data_provider=iterator of batches).fit()`;
  defaults: Adam lr 3e-4 constant, grad-norm clip 1, AuxK 1.0, decoder init norm 0.1,
  b_dec = 0. lr_end = lr/10 is set as its LanguageModelSAERunnerConfig would (SAETrainer
  asserts it is given).
- dictionary_learning (PyPI dictionary-learning): `training.trainSAE(data, [TopKTrainer config],
  steps, device="cpu")` with `AutoEncoderTopK`; defaults: Adam lr 2e-4/sqrt(width/2^14), AuxK
  1/32, b_dec = first batch's geometric median, except warmup_steps=0: its default 1000 must
  be below `steps` (it asserts) and the other trainers here have no warm-up.
- plain_torch_dense: a reference written here: encoder matmul, ReLU, topk, scatter into
  dense codes, dense decoder matmul, loss = FVU of the batch, Adam lr 2e-4/sqrt(width/2^14),
  decoder rows renormalised after each step, b_dec = first batch's mean.

What is measured, identically for every row:
- samples_per_s: batch / the median time of one training step, over steps 2..N; a step's
  time runs from the end of one optimizer step to the end of the next (torch's global
  optimizer step post-hook marks each end), so it holds everything the trainer does per
  batch. Set-up, imports, the first (warm-up) step and the final save are outside.
  samples_per_s_mean is (steps - 1) * batch / the whole window: on a shared machine the two
  part, and the median is the one other processes' bursts move least.
- fvu: on the held-out rows (the last --heldout rows of the file, never trained on), with
  this script's code: x_hat from the peer's own forward pass, then
  FVU = sum ||x_hat - x||^2 / sum ||x - mean(x)||^2 (mean over the held-out rows, float64
  sums).

THE INTERFACE for other scripts (e.g. saekit's own trainer, added by a separate script):

Data file: a .npy of float32, shape (n_rows, d), C order. Rows [0, n_train) train (n_train =
--train-rows, default n_rows - heldout),
in order: batch i (0-based) holds rows (i*batch + j) mod n_train for j in [0, batch). Rows
[n_rows - heldout, n_rows) are the held-out set for the FVU. `--make-data PATH` writes
n_rows x d (default 200,000 x 512) from a fixed seed with numpy alone: a random dictionary of
16,384 unit-norm atoms, power-law atom frequencies, 32 atoms per row (drawn with
replacement) with Exp(1) coefficients, a constant offset N(0, 0.1^2) per feature and Gaussian
noise of standard deviation 0.05 per feature.

JSON (--json OUT.json): {"config": {"data", "n_rows", "d", "heldout", "width", "k", "batch",
"steps", "threads", "torch", "python", "cpu"}, "results": [row, ...]}; each row has
"name", "version" (package version, or null), "samples_per_s" and "fvu" (floats, or null
where it failed), "l0" and "dead_fraction" (the codes' mean count of positive values per
held-out row, and the share of units never positive on them), "peak_rss_mb" (the process's
largest resident memory), "steps" (optimizer steps run), "notes" (optimizer, lr, deviations from the
defaults, or why it failed, and a warning where the machine was busy), plus
"samples_per_s_mean", "samples_per_cpu_s" (batch / the median process CPU seconds of a
step, all threads), "timed_steps" and "seconds" (the timing window) and "load_avg" (the
1-minute load average before and after the peer ran).
"""

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

# ----------------------------------------------------------------------------- data


def make_data(path, n_rows=200_000, d=512, n_atoms=16_384, active=32, seed=0):
    """Write synthetic sparse activations (n_rows, d) float32 to `path`, atomically."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((n_atoms, d)).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    # Power-law frequencies, as in language-model features: a few common atoms, a long tail.
    freq = 1.0 / np.arange(1, n_atoms + 1) ** 0.6
    freq = rng.permutation(freq / freq.sum())
    offset = rng.normal(0.0, 0.1, d).astype(np.float32)
    X = np.empty((n_rows, d), np.float32)
    chunk = 2_000  # (chunk, active, d) gather stays near 130 MB
    for start in range(0, n_rows, chunk):
        rows = min(chunk, n_rows - start)
        idx = rng.choice(n_atoms, size=(rows, active), p=freq)
        coef = rng.exponential(1.0, (rows, active)).astype(np.float32)
        X[start : start + rows] = np.einsum("ra,rad->rd", coef, atoms[idx])
        X[start : start + rows] += offset + rng.normal(0.0, 0.05, (rows, d)).astype(np.float32)
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".npy", delete=False) as tmp:
        np.save(tmp, X)
    os.chmod(tmp.name, 0o644)  # NamedTemporaryFile makes it private; a data file is shared
    os.replace(tmp.name, path)


def load_split(path, heldout, train_rows=None):
    """(X_train, X_heldout) float32 torch tensors: the first train_rows rows (all but the held-out ones
    if None), and the last heldout rows."""
    X = np.load(path, mmap_mode="r")
    if X.dtype != np.float32 or X.ndim != 2 or X.shape[0] <= heldout:
        sys.exit(f"{path}: need float32 rows (n, d) with n > --heldout {heldout}, got {X.dtype} {X.shape}")
    n_train = len(X) - heldout if train_rows is None else min(train_rows, len(X) - heldout)
    return torch.from_numpy(np.array(X[:n_train])), torch.from_numpy(np.array(X[-heldout:]))


def batch_index(i, batch, n_train):
    """Row numbers (batch,) of training batch i: consecutive rows, wrapping round the train set."""
    return torch.arange(i * batch, (i + 1) * batch) % n_train


def batches(X_train, steps, batch):
    """The `steps` training batches, (batch, d) each, the same for every trainer."""
    for i in range(steps):
        yield X_train[batch_index(i, batch, len(X_train))]


# ----------------------------------------------------------------------------- measuring


class StepClock:
    """Times the end of every optimizer step of any torch optimizer in this process."""

    def __init__(self):
        self.wall, self.cpu = [], []
        self.handle = register_optimizer_step_post_hook(lambda *_: self.mark())

    def mark(self):
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())  # all of this process's threads

    def result(self, batch):
        """Throughput over the steps after the first (a warm-up): a dict of JSON fields.

        The machine may be shared: the median step time is the figure least moved by other
        processes' bursts, so samples_per_s uses it; the mean over the window is kept beside
        it. CPU time is what the step cost this process whatever else ran: samples_per_cpu_s
        compares trainers' work even where the load moved between their runs.
        """
        self.handle.remove()
        step_seconds = np.diff(self.wall)
        return {
            "samples_per_s": batch / float(np.median(step_seconds)),
            "samples_per_s_mean": len(step_seconds) * batch / float(step_seconds.sum()),
            "samples_per_cpu_s": batch / float(np.median(np.diff(self.cpu))),
            "timed_steps": len(step_seconds),
            "seconds": float(step_seconds.sum()),
        }


@torch.no_grad()
def fvu(reconstruct, X, chunk=2048):
    """sum ||x_hat - x||^2 / sum ||x - mean||^2 over the rows of X (n, d); float64 sums."""
    mean = X.double().mean(0)
    err = var = 0.0
    for start in range(0, len(X), chunk):
        x = X[start : start + chunk]
        err += (reconstruct(x).double() - x.double()).pow(2).sum().item()
        var += (x.double() - mean).pow(2).sum().item()
    return err / var


@torch.no_grad()
def sparsity(codes, X, width, chunk=2048):
    """(l0: mean number of positive codes per row, dead_fraction: share of the width never positive) over X."""
    fired = torch.zeros(width, dtype=torch.bool)
    active = 0.0
    for start in range(0, len(X), chunk):
        positive = codes(X[start : start + chunk]) > 0
        active += positive.sum().item()
        fired |= positive.any(0)
    return active / len(X), 1.0 - fired.double().mean().item()


def peak_rss_mb() -> float:
    """This process's largest resident set so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- the trainers
# Each takes (X_train, args, workdir), trains, and returns (reconstruct, codes, notes, version);
# `reconstruct` maps rows (b, d) to the trained model's x_hat (b, d), `codes` to its dense codes
# (b, width); workdir is a scratch folder for the checkpoints the libraries write, removed afterwards.


class ReplayModel(nn.Module):
    """Stands in for a transformers model for sparsify's Trainer: the 'tokens' are row numbers
    of the data, and the one layer's hidden states are those rows, (batch, seq, d)."""

    def __init__(self, rows):
        super().__init__()
        self.rows = rows
        self.layers = nn.ModuleList([nn.Identity()])
        self.config = SimpleNamespace(num_hidden_layers=1)

    @property
    def base_model(self):  # a property: as a submodule it would make a cycle
        return self

    @property
    def device(self):
        return self.rows.device

    @property
    def dummy_inputs(self):
        return {"input_ids": torch.zeros(1, 1, dtype=torch.long)}

    def forward(self, input_ids):
        return self.layers[0](self.rows[input_ids])


class RowSequences(torch.utils.data.Dataset):
    """Training rows grouped into 'sequences' of `seq` row numbers, in batch_index order."""

    def __init__(self, n_train, n_samples, seq):
        self.n_train, self.seq, self.n = n_train, seq, n_samples // seq

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"input_ids": torch.arange(i * self.seq, (i + 1) * self.seq) % self.n_train}


def train_sparsify(X_train, args, workdir):
    import sparsify.utils
    from sparsify import SaeConfig, TrainConfig, Trainer

    # sparsify counts its batch in sequences: group rows so a batch is still `batch` rows.
    seq = math.gcd(args.batch, 64)
    cfg = TrainConfig(
        SaeConfig(k=args.k, num_latents=args.width),
        batch_size=args.batch // seq,
        log_to_wandb=False,
        save_dir=workdir,
    )
    data = RowSequences(len(X_train), args.steps * args.batch, seq)
    trainer = Trainer(cfg, data, ReplayModel(X_train))
    trainer.fit()
    (opt,) = trainer.optimizers
    if hasattr(opt, "eval"):
        opt.eval()  # ScheduleFree: the averaged weights, the ones sparsify saves
    (sae,) = trainer.saes.values()
    decoder = sparsify.utils.decoder_impl.__name__
    notes = (
        f"sparsify.Trainer, optimizer={cfg.optimizer} "
        f"lr={trainer.optimizers[0].param_groups[0]['lr']:.2e}, decoder={decoder}, "
        f"fed by a row-replay stand-in model (seq={seq}); "
        f"float32_matmul_precision={torch.get_float32_matmul_precision()} (set by fit)"
    )

    def codes(x):
        encoded = sae.encode(x)
        return torch.zeros(len(x), args.width).scatter_(1, encoded.top_indices, encoded.top_acts)

    return (lambda x: sae(x).sae_out), codes, notes, importlib.metadata.version("eai-sparsify")


def train_saelens(X_train, args, workdir):
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=args.d, d_sae=args.width, k=args.k, dtype="float32", device="cpu"))
    cfg = SAETrainerConfig(total_training_samples=args.steps * args.batch, train_batch_size_samples=args.batch)
    cfg.lr_end = cfg.lr / 10  # as LanguageModelSAERunnerConfig sets it
    trainer = SAETrainer(cfg, sae, data_provider=batches(X_train, args.steps, args.batch))
    trainer.fit()
    sae.eval()
    notes = f"SAETrainer + TopKTrainingSAE, Adam lr={cfg.lr:.2e} constant, lr_end=lr/10 set"
    return (lambda x: sae(x)), sae.encode, notes, importlib.metadata.version("sae-lens")


def train_dictionary_learning(X_train, args, workdir):
    from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer
    from dictionary_learning.training import trainSAE

    config = dict(
        trainer=TopKTrainer,
        steps=args.steps,
        activation_dim=args.d,
        dict_size=args.width,
        k=args.k,
        layer=0,
        lm_name="synthetic",
        warmup_steps=0,
        device="cpu",
        seed=0,
    )
    trainSAE(batches(X_train, args.steps, args.batch), [config], steps=args.steps, save_dir=workdir, device="cpu")
    # trainSAE returns nothing: read the trained model back the way its users do.
    ae = AutoEncoderTopK.from_pretrained(os.path.join(workdir, "trainer_0", "ae.pt"))
    with open(os.path.join(workdir, "trainer_0", "config.json")) as f:
        lr = json.load(f)["trainer"]["lr"]
    notes = f"trainSAE + TopKTrainer/AutoEncoderTopK, Adam lr={lr:.2e}, warmup_steps=0 (default 1000 >= steps asserts)"
    return ae, ae.encode, notes, importlib.metadata.version("dictionary-learning")


def train_plain_torch_dense(X_train, args, workdir):
    torch.manual_seed(0)
    W_dec = torch.randn(args.width, args.d)  # (n, d), rows are atoms
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec.T.clone().requires_grad_()  # (d, n)
    W_dec.requires_grad_()
    b_enc = torch.zeros(args.width, requires_grad=True)
    b_dec = torch.zeros(args.d, requires_grad=True)
    lr = 2e-4 / (args.width / 2**14) ** 0.5
    opt = torch.optim.Adam([W_enc, W_dec, b_enc, b_dec], lr=lr)

    def codes(x):
        pre = torch.relu((x - b_dec) @ W_enc + b_enc)  # (b, n)
        values, indices = pre.topk(args.k, dim=1, sorted=False)
        return torch.zeros_like(pre).scatter_(1, indices, values)

    def reconstruct(x):
        return codes(x) @ W_dec + b_dec

    for i, x in enumerate(batches(X_train, args.steps, args.batch)):
        if i == 0:
            with torch.no_grad():
                b_dec.copy_(x.mean(0))
        loss = (reconstruct(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)
    notes = f"reference: dense codes, Adam lr={lr:.2e}, FVU loss, unit-norm decoder rows"
    return reconstruct, codes, notes, None


TRAINERS = {
    "sparsify": train_sparsify,
    "saelens": train_saelens,
    "dictionary_learning": train_dictionary_learning,
    "plain_torch_dense": train_plain_torch_dense,
}


# ----------------------------------------------------------------------------- running


def run_one(name, args):
    """Train one peer in this process and return its JSON row."""
    torch.set_num_threads(args.threads)
    X_train, X_heldout = load_split(args.data, args.heldout, args.train_rows)
    if X_train.shape[1] != args.d:
        sys.exit(f"--d {args.d} but {args.data} has rows of {X_train.shape[1]} features")
    load_before = os.getloadavg()[0]
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="peers-") as workdir:
        reconstruct, codes, notes, version = TRAINERS[name](X_train, args, workdir)
    timing = clock.result(args.batch)
    load = [load_before, os.getloadavg()[0]]
    if max(load) > os.cpu_count():
        notes += f"; machine busy: 1-min load average {load[0]:.1f} -> {load[1]:.1f} on {os.cpu_count()} cores"
    l0, dead = sparsity(codes, X_heldout, args.width)
    return {
        "name": name,
        "version": version,
        "fvu": fvu(reconstruct, X_heldout),
        "l0": l0,
        "dead_fraction": dead,
        "peak_rss_mb": peak_rss_mb(),
        "steps": timing["timed_steps"] + 1,
        "notes": notes,
        **timing,
        "load_avg": load,
    }


def run_child(name, args):
    """Run one peer in a subprocess; a failure becomes a row whose notes say why."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        argv = [sys.executable, os.path.abspath(__file__), "--child", name, "--child-out", out]
        for key in ("data", "width", "k", "d", "steps", "batch", "heldout", "threads", "train_rows"):
            if getattr(args, key) is not None:
                argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        log = os.path.join(tmp, "log.txt")
        try:
            with open(log, "w") as f:
                rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout after {args.timeout} s"
        if rc == 0:
            with open(out) as f:
                return json.load(f)
        with open(log) as f:
            tail = f.read()[-1500:]
        print(f"--- {name} failed ({rc}):\n{tail}", file=sys.stderr)
        last = [line for line in tail.strip().splitlines() if line.strip()][-1:] or ["no output"]
        return {
            "name": name,
            "version": package_version(name),
            "samples_per_s": None,
            "fvu": None,
            "l0": None,
            "dead_fraction": None,
            "peak_rss_mb": None,
            "steps": 0,
            "notes": f"failed ({rc}): {last[0]}",
            "samples_per_s_mean": None,
            "samples_per_cpu_s": None,
            "timed_steps": 0,
            "seconds": None,
            "load_avg": None,
        }


def package_version(name):
    dist = {"sparsify": "eai-sparsify", "saelens": "sae-lens", "dictionary_learning": "dictionary-learning"}
    try:
        return importlib.metadata.version(dist[name]) if name in dist else None
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name():
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def print_table(rows):
    def number(value, form):
        return "-" if value is None else format(value, form)

    print(f"{'trainer':<22}{'version':<10}{'samples/s':>11}{'(mean)':>9}{'/cpu-s':>9}{'FVU':>9}  notes")
    for r in rows:
        print(
            f"{r['name']:<22}{r['version'] or '':<10}{number(r['samples_per_s'], ',.0f'):>11}"
            f"{number(r['samples_per_s_mean'], ',.0f'):>9}{number(r['samples_per_cpu_s'], ',.0f'):>9}"
            f"{number(r['fvu'], '.4f'):>9}  {r['notes']}"
        )


def write_json(path, obj):
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".json", delete=False) as tmp:
        json.dump(obj, tmp, indent=2)
    os.replace(tmp.name, path)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--make-data", metavar="PATH", help="write the synthetic data file and exit")
    p.add_argument("--rows", type=int, default=200_000, help="rows for --make-data")
    p.add_argument("--seed", type=int, default=0, help="seed for --make-data")
    p.add_argument("--data", help=".npy of float32 rows (n, d)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--heldout", type=int, default=8192, help="last rows of the file, for the FVU")
    p.add_argument("--train-rows", type=int, help="train on the first rows only (default: all but the held-out)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--peers", default=",".join(TRAINERS), help="comma-separated subset of " + ",".join(TRAINERS))
    p.add_argument("--timeout", type=int, default=900, help="seconds per peer")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.make_data:
        make_data(args.make_data, n_rows=args.rows, d=args.d, seed=args.seed)
        return
    if args.child:
        write_json(args.child_out, run_one(args.child, args))
        return
    if not args.data:
        p.error("--data is required (make one with --make-data PATH)")
    if args.steps < 2:
        p.error("--steps must be at least 2: the first step is a warm-up, left out of the timing")
    unknown = set(args.peers.split(",")) - set(TRAINERS)
    if unknown:
        p.error(f"unknown peers {sorted(unknown)}; choose from {','.join(TRAINERS)}")

    n_rows = np.load(args.data, mmap_mode="r").shape[0]
    rows = []
    for name in args.peers.split(","):
        print(f"training {name} ...", file=sys.stderr, flush=True)
        rows.append(run_child(name, args))
    config = {
        "data": os.path.abspath(args.data),
        "n_rows": n_rows,
        "d": args.d,
        "heldout": args.heldout,
        "width": args.width,
        "k": args.k,
        "batch": args.batch,
        "steps": args.steps,
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
    }
    print_table(rows)
    if args.json:
        write_json(args.json, {"config": config, "results": rows})


if __name__ == "__main__":
    main()
