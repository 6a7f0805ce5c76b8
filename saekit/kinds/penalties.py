"""The penalties kinds add to the reconstruction error, and weight decay: shared math, no models.

The classic term is UFLDL's  beta * sum_j KL(rho || rho_hat_j),  where rho_hat_j is hidden
unit j's mean activation. Everything here works on torch tensors and is differentiable by
autograd; the closed-form gradient of the classic cost lives in `saekit.kernels.classic`.
"""

import functools
import operator

import torch

# rho_hat is kept this far inside (0, 1) so that KL(rho || rho_hat) and its derivative stay
# finite when a sigmoid unit saturates (rho_hat -> 0 or 1); far below anything that matters.
RHO_HAT_MARGIN = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-3}


def clamp_rho_hat(rho_hat: torch.Tensor) -> torch.Tensor:
    eps = RHO_HAT_MARGIN.get(rho_hat.dtype, 1e-6)
    return rho_hat.clamp(eps, 1 - eps)


def kl_divergence(rho: float, rho_hat: torch.Tensor) -> torch.Tensor:
    """KL(rho || rho_hat) between Bernoulli(rho) and Bernoulli(rho_hat_j), per unit: (n_hidden,)."""
    rho_hat = clamp_rho_hat(rho_hat)
    return rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))


def kl_derivative(rho: float, rho_hat: torch.Tensor) -> torch.Tensor:
    """d KL(rho || rho_hat_j) / d rho_hat_j = -rho/rho_hat_j + (1-rho)/(1-rho_hat_j): (n_hidden,).

    This is the term UFLDL adds (times beta) to delta2 in back-propagation.
    """
    rho_hat = clamp_rho_hat(rho_hat)
    return -rho / rho_hat + (1 - rho) / (1 - rho_hat)


def kl_term(rho: float, beta: float):
    """The KL penalty as `saekit.kernels.classic` takes it: rho_hat -> (beta KL'(rho_hat) per unit, beta sum_j KL)."""

    def sparsity(rho_hat: torch.Tensor) -> tuple[torch.Tensor, float]:
        return beta * kl_derivative(rho, rho_hat), beta * float(kl_divergence(rho, rho_hat).sum())

    return sparsity


def weight_decay(lambda_: float, *weights: torch.Tensor) -> torch.Tensor:
    """(lambda/2) * sum of squared weights; biases are not passed in, so they carry no decay."""
    return 0.5 * lambda_ * functools.reduce(operator.add, [(w * w).sum() for w in weights])


class RunningRhoHat:
    """A running estimate of rho_hat for minibatch training (seed 002's "too large for memory" case).

    The exact KL gradient needs rho_hat over the whole training set, which a minibatch does
    not have. Instead of UFLDL's two passes over the data per step, we keep an exponential
    moving average of the batch means (`momentum` is the weight of the old estimate) and use
    the surrogate  beta * sum_j KL'(rho_hat_run_j) * mean_batch(a_j):  its gradient is KL's
    derivative taken at the running estimate times the gradient of the batch mean, an unbiased
    estimate of the gradient of rho_hat. The reported penalty uses the running estimate.
    """

    def __init__(self, n_hidden: int, momentum: float = 0.9):
        self.momentum = momentum
        self.rho_hat: torch.Tensor | None = None  # (n_hidden,), None until the first batch
        self.n_hidden = n_hidden

    def state_dict(self) -> dict:
        return {"rho_hat": self.rho_hat}

    def load_state_dict(self, state: dict) -> None:
        self.rho_hat = state["rho_hat"]

    @torch.no_grad()
    def observe(self, batch_sum: torch.Tensor, count: int, reduce=None) -> None:
        """Fold a batch into the estimate: batch_sum (n_hidden,) of activations over count examples.

        `reduce` sums a tensor over processes (data-parallel training), so the estimate follows
        the global batch's mean; by default the batch is all there is.
        """
        sums = torch.cat([batch_sum, batch_sum.new_tensor([count])])
        sums = reduce(sums) if reduce is not None else sums
        global_mean = sums[:-1] / sums[-1]
        if self.rho_hat is None:
            self.rho_hat = global_mean.clone()
        else:
            self.rho_hat.mul_(self.momentum).add_(global_mean, alpha=1 - self.momentum)

    @torch.no_grad()
    def slope_and_value(self, rho: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """beta * KL'(rho || rho_hat_run) per unit, and the reported penalty beta * sum_j KL(rho || rho_hat_run)."""
        assert self.rho_hat is not None, "observe a batch first"
        return beta * kl_derivative(rho, self.rho_hat), beta * kl_divergence(rho, self.rho_hat).sum()

    def penalty(self, h: torch.Tensor, rho: float, beta: float, reduce=None) -> tuple[torch.Tensor, torch.Tensor]:
        """h: (batch, n_hidden) activations. Returns (surrogate to differentiate, reported value, 0-d)."""
        self.observe(h.detach().sum(0), h.shape[0], reduce)
        slope, reported = self.slope_and_value(rho, beta)
        return (slope * h.mean(0)).sum(), reported


def contractive(slope: torch.Tensor, W1: torch.Tensor) -> torch.Tensor:
    """mean_i ||dh_i/dx_i||_F^2 in closed form: slope = f'(z) (batch, n_hidden), W1 (n_hidden, n_inputs).

    h_j = f(w_j . x + b_j), so dh_j/dx = f'(z_j) w_j and ||dh/dx||_F^2 = sum_j f'(z_j)^2 ||w_j||^2;
    f' is h(1 - h) for a sigmoid and the step 1[h > 0] for a ReLU (each kind passes its own).
    """
    return (slope.pow(2) @ W1.pow(2).sum(1)).mean()


class L1Penalty(torch.autograd.Function):
    """Seed 003's L1 layer: the identity going forward; going back it adds weight * sign(h).

    Its gradient is that of the loss term  weight * sum over the batch and units of |h|,
    which is how saekit's --penalty l1 computes it (as beta * mean_i ||h_i||_1, so
    beta = weight * batch size gives the same step). Kept to show and test the equivalence.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.save_for_backward(h)
        ctx.weight = weight
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad_output):
        (h,) = ctx.saved_tensors
        return grad_output + ctx.weight * h.sign(), None
