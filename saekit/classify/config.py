"""The classification's part of a run's settings: stacked layers, the protocol, the softmax and fine-tuning."""

from dataclasses import dataclass
from typing import Literal

from ..errors import UserError
from ..settings import Settings


@dataclass
class ClassifyConfig(Settings):
    stack: str | None = None
    """Stacked autoencoder: hidden sizes of further autoencoders, each trained on the previous one's codes,
    e.g. '200'."""
    classify: Literal["none", "softmax", "fine-tune", "self-taught"] = "none"
    """After training: 'softmax' (a softmax on the codes, trained on the training images, tested on the test set),
    'fine-tune' (then back-propagate through the encoders too), 'self-taught' (UFLDL: softmax on the first half of
    the training digits 0-4, tested on the second half, against raw pixels) or 'none'."""
    softmax_weight_decay: float = 1e-4
    """Weight decay of the softmax classifier."""
    softmax_max_iter: int = 100
    """L-BFGS iterations for the softmax classifier."""
    finetune_weight_decay: float = 1e-4
    """Weight decay while fine-tuning, on the softmax and (with finetune_decay_encoders) the encoders' weights."""
    finetune_decay_encoders: bool = True
    """Fine-tuning decays the encoders' weights too; false decays the softmax's only, as UFLDL's stackedAECost does (it
    overfits more with 1e-4)."""
    finetune_max_iter: int = 400
    """L-BFGS iterations of fine-tuning."""

    def problems(self) -> list[str]:
        problems = (
            self.at_least(0, "softmax_weight_decay", "finetune_weight_decay")
            + self.finite("softmax_weight_decay", "finetune_weight_decay")
            + self.at_least(1, "softmax_max_iter", "finetune_max_iter")
        )
        try:
            self.stack_sizes()
        except UserError as e:
            problems.append(str(e))
        return problems

    def stack_sizes(self) -> list[int]:
        """'200' -> [200]; '200,100' -> [200, 100]; None -> []."""
        if self.stack is None:
            return []
        try:
            sizes = [int(part) for part in self.stack.split(",")]
        except ValueError:
            sizes = []
        if not sizes or min(sizes) < 1:
            raise UserError(f"--stack {self.stack!r} is not a list of hidden sizes such as '200' or '200,100'")
        return sizes

    def classifier_settings(self) -> dict:
        """The settings of the classifier itself (what `saekit classify` takes and records)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("stack", "classify")}
