"""Pictures of a run: what the autoencoder learned, what it saw, how well it reconstructs, how it trained.

Image pictures are drawn only when examples are images (image_shape is not None):

    features.png, features_before.png, features_updates.png  encoder rows W1[j] as images: after, before, after - before
    decoder.png, decoder_before.png, decoder_updates.png     decoder columns W2[:, j]: what unit j writes
    inputs.png                                               the first training examples
    reconstructions.png, reconstructions_before.png          inputs beside reconstructions, after and before training
    denoised.png                                             denoising: corrupted input, reconstruction, clean input
    cost.png                                                 the cost and its terms per step
    density.png                                              feature density (minibatch runs)
    confusion.png, confusion_fine_tuned.png                  classifiers: confusion matrices

The reconstruction pictures show the first N_PAIRS examples, most contrast (standard deviation)
first, as labelled groups on one grey scale (saekit.viz.pictures.side_by_side). The
before/after/updates pictures are the ones seed 003's lecture draws for its L1 autoencoder.
"""

from pathlib import Path

import numpy as np
import torch

from .pictures import (
    confusion_matrix_image,
    histogram_chart,
    line_chart,
    save_filters,
    save_images,
    save_png,
    save_side_by_side,
    scatter_chart,
)

N_SHOWN = 100  # examples drawn in the inputs picture
N_PAIRS = 50  # examples drawn in the reconstruction pictures
MAX_FILTERS = 400  # hidden units drawn in the weight pictures


def _np(t: torch.Tensor):
    return t.detach().float().cpu().numpy()


@torch.no_grad()
def _weight_pictures(run_dir: Path, model, initial, image_shape) -> list[Path]:
    written = []
    encoder, decoder = model.W1[:MAX_FILTERS], model.W2.t()[:MAX_FILTERS]
    written.append(save_filters(_np(encoder), run_dir / "features.png", image_shape=image_shape))
    written.append(save_filters(_np(decoder), run_dir / "decoder.png", image_shape=image_shape))
    if initial is not None:
        encoder0, decoder0 = initial.W1[:MAX_FILTERS], initial.W2.t()[:MAX_FILTERS]
        for name, before, after in (("features", encoder0, encoder), ("decoder", decoder0, decoder)):
            written.append(save_filters(_np(before), run_dir / f"{name}_before.png", image_shape=image_shape))
            written.append(save_filters(_np(after - before), run_dir / f"{name}_updates.png", image_shape=image_shape))
    return written


def most_contrast_first(x: torch.Tensor) -> torch.Tensor:
    """The rows of x (n, d) ordered by decreasing standard deviation (ties keep their order)."""
    return x[torch.sort(x.std(dim=1), descending=True, stable=True).indices]


def _pairs(title: str, image_shape, labels=("input", "output")) -> dict:
    return {"title": title, "labels": labels, "image_shape": image_shape}


@torch.no_grad()
def write_pictures(
    run_dir, model, x: torch.Tensor, history: list[dict], image_shape, initial=None, corrupt=None
) -> list[Path]:
    """Write the run's pictures (see the module docstring); `initial` is the model before training, if
    known; `corrupt` (rows -> corrupted rows) is a denoising run's corruption."""
    run_dir = Path(run_dir)
    written = []
    if image_shape is not None:
        written += _weight_pictures(run_dir, model, initial, image_shape)
        written.append(save_images(_np(x[:N_SHOWN]), run_dir / "inputs.png", image_shape=image_shape))
        shown = most_contrast_first(x[:N_PAIRS])
        for name, m, when in (("reconstructions", model, "after"), ("reconstructions_before", initial, "before")):
            if m is not None:
                title = f"The first {len(shown)} examples (most contrast first) and the model's output {when} training"
                path = run_dir / f"{name}.png"
                written.append(save_side_by_side(_np(shown), _np(m(shown).x_hat), path, **_pairs(title, image_shape)))
        if corrupt is not None:
            noisy = corrupt(shown)
            title = f"The first {len(shown)} examples (most contrast first): corrupted, the model's output, clean"
            kw = _pairs(title, image_shape, labels=("corrupted", "output", "clean"))
            written.append(
                save_side_by_side(_np(noisy), _np(model(noisy).x_hat), run_dir / "denoised.png", _np(shown), **kw)
            )
    if history:
        steps = [row["step"] for row in history]  # minibatch runs log every cfg.log_every steps
        series = {  # the terms a trainer logs: minibatch rows have the AuxK term too, L-BFGS rows do not
            k: np.array([steps, [row[k] for row in history]], dtype=np.float64)
            for k in ("cost", "reconstruction", "sparsity", "aux", "weight_decay")
            if k in history[0]
        }
        chart = line_chart(series, title="Cost J and its terms", xlabel="step", ylabel="value (log scale)", log_y=True)
        written.append(save_png(chart, run_dir / "cost.png"))
    return written


def save_density_png(density: torch.Tensor, path) -> Path:
    """Feature-density histogram: log10 of each unit's firing frequency; dead units are counted apart."""
    with np.errstate(divide="ignore"):
        log_density = np.log10(density.double().cpu().numpy())
    chart = histogram_chart(log_density, bins=50, title="Feature density", xlabel="log10(firing frequency)")
    return save_png(chart, path)


def save_confusion_png(result: dict, path, title: str = "Confusion matrix") -> Path:
    """Draw evaluate_classifier's confusion matrix and write it as a PNG (atomically). Returns the path."""
    return save_png(confusion_matrix_image(result["confusion_matrix"], result["class_names"], title), path)


def save_frontier_png(points: list[tuple[str, float, float]], path) -> Path:
    """FVU against L0 of the members of a sweep: points (label, l0, fvu), each labelled."""
    return save_png(
        scatter_chart(
            points,
            title="Sweep: reconstruction against sparsity",
            xlabel="L0 (active codes per example)",
            ylabel="FVU (fraction of variance unexplained)",
        ),
        path,
    )
