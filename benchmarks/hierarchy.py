"""TopK, BatchTopK and Matryoshka on hierarchy data: the README's table and picture.

    python benchmarks/hierarchy.py RUN [RUN ...] OUT.png

Each RUN is a finished `saekit train` run on `--data synthetic` with `--synthetic-parents`. Prints
one row per run (its metrics.json; the mean cosine of the children's closest learned atoms with
their parents; and how often a parent's unit stays silent when a child fires, though a parent
always fires with its children); draws, for each run, each child
feature's closest learned atom by its cosine with the child (x) and with the child's parent (y):
atoms up and right of the dashed lines carry their parent's direction (absorption).
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from saekit.data.synthetic import ABSORBED_COSINE, SyntheticDictionary, best_match  # noqa: E402
from saekit.run import RunFolder  # noqa: E402

KEYS = ("fvu", "l0", "recovery", "mcc", "precision", "recall", "f1", "absorption")


def truth_and_model(run):
    """(the run's true dictionary and its training sample, the trained model, the run's settings)."""
    folder = RunFolder.open(run)
    cfg = folder.load_config()
    d = cfg.data
    truth = SyntheticDictionary(
        d.synthetic_inputs,
        d.synthetic_atoms,
        d.synthetic_k,
        seed=cfg.run.seed,
        n_parents=d.synthetic_parents,
        n_children=d.synthetic_children,
        child_probability=d.synthetic_child_probability,
        n_pairs=d.synthetic_pairs,
        pair_probability=d.synthetic_pair_probability,
    )
    return truth, truth.sample(d.n_examples), folder.load_model().eval(), cfg


def child_cosines(truth, model):
    """Each child's closest learned atom: (its cosine with the child, with the child's parent)."""
    learned = model.W2.detach().t().double()
    learned = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-12)
    children = (truth.parent_of >= 0).nonzero().flatten()
    match = best_match(truth.atoms, learned)
    with_parent = (learned[match.learned[children]] * truth.atoms.double()[truth.parent_of[children]]).sum(1)
    return match.cosine[children], with_parent


def parent_silence(truth, sample, model):
    """Over the events (a child fires): the fraction where the parent's closest learned unit is silent."""
    true_active = torch.zeros(len(sample.x), truth.n_atoms).scatter_add(1, sample.indices, sample.values) > 0
    with torch.no_grad():
        fires = model.features(sample.x.to(model.W1.dtype)) > 0
    parent_unit = best_match(truth.atoms, model.W2.detach().t()).learned
    silent = events = 0
    for child in (truth.parent_of >= 0).nonzero().flatten().tolist():
        rows = true_active[:, child]
        events += int(rows.sum())
        silent += int((~fires[rows, parent_unit[truth.parent_of[child]]]).sum())
    return silent / events


runs, out = sys.argv[1:-1], sys.argv[-1]
fig, axes = plt.subplots(1, len(runs), figsize=(3.6 * len(runs), 3.7), sharex=True, sharey=True, squeeze=False)
print("| kind | " + " | ".join(KEYS) + " | parent cosine | parent silent |")
print("|---" * (len(KEYS) + 3) + "|")
for ax, run in zip(axes[0], runs):
    truth, sample, model, cfg = truth_and_model(run)
    metrics = json.loads((RunFolder.open(run).path / "metrics.json").read_text())
    silent = parent_silence(truth, sample, model)
    with_child, with_parent = child_cosines(truth, model)
    numbers = [metrics[k] for k in KEYS] + [float(with_parent.mean()), silent]
    print(f"| {cfg.model.kind} | " + " | ".join(f"{x:.3f}" for x in numbers) + " |")
    absorbed = (with_child >= ABSORBED_COSINE) & (with_parent >= ABSORBED_COSINE)
    ax.scatter(with_child[~absorbed], with_parent[~absorbed], s=14, color="tab:blue", label="child alone")
    ax.scatter(with_child[absorbed], with_parent[absorbed], s=14, color="tab:red", label="carries its parent")
    ax.axvline(ABSORBED_COSINE, color="grey", ls="--", lw=0.8)
    ax.axhline(ABSORBED_COSINE, color="grey", ls="--", lw=0.8)
    ax.set_title(f"{cfg.model.kind}: {int(absorbed.sum())} of {len(absorbed)} children absorbed", fontsize=10)
    ax.set_xlabel("cosine with the child")
    ax.set_xlim(-0.1, 1.05)
    ax.set_ylim(-0.4, 1.05)
axes[0][0].set_ylabel("cosine with its parent")
axes[0][0].legend(loc="upper left", fontsize=8)
fig.suptitle("Each child feature's closest learned atom", fontsize=11)
fig.tight_layout()
fig.savefig(out, dpi=110)
print("wrote", out)
