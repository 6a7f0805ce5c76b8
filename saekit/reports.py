"""Pictures of a run: what the autoencoder learned, what it saw, how well it reconstructs, how it trained."""

from pathlib import Path

import torch

from .pictures import line_chart, save_filters, save_images, save_png, save_side_by_side

N_SHOWN = 100  # examples drawn in the input and reconstruction pictures


@torch.no_grad()
def write_pictures(run_dir, model, x: torch.Tensor, history: list[dict], image_shape) -> list[Path]:
    """features.png (W1's rows as tiles, like UFLDL's display_network), inputs.png,
    reconstructions.png (each input beside its reconstruction) and cost.png (the cost per step).
    Image pictures are drawn only when examples are images (image_shape is not None)."""
    run_dir = Path(run_dir)
    written = []
    if image_shape is not None:
        shown = x[:N_SHOWN]
        x_hat = model(shown).x_hat
        to_np = lambda t: t.detach().float().cpu().numpy()
        written.append(save_filters(to_np(model.W1), run_dir / "features.png", image_shape=image_shape))
        written.append(save_images(to_np(shown), run_dir / "inputs.png", image_shape=image_shape))
        written.append(save_side_by_side(to_np(shown[:50]), to_np(x_hat[:50]), run_dir / "reconstructions.png",
                                         image_shape=image_shape))
    if history:
        series = {k: [row[k] for row in history] for k in ("cost", "reconstruction", "sparsity", "weight_decay")}
        chart = line_chart(series, title="Cost J and its terms", xlabel="step", ylabel="value (log scale)", log_y=True)
        written.append(save_png(chart, run_dir / "cost.png"))
    return written
