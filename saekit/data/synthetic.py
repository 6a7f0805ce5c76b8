"""Synthetic data with a known dictionary, to check that dictionary learning finds it.

    x (n, d) = codes (n, n_atoms) @ atoms (n_atoms, d) + noise

The atoms are Gaussian rows normalised to unit length. Every sample uses exactly k distinct
atoms with coefficients |N(0, 1)| (so codes are non-negative, as a TopK or ReLU autoencoder's
are), and noise is N(0, noise_std^2) per coordinate. Atoms can be used unequally often: one
draw picks atom i with probability proportional to (i + 1)^-alpha (alpha = 0: uniform; larger
alpha: a power law, atom 0 the most common, like the features of real activations).

`recovery_score` then says how much of the true dictionary a learned one contains: for each
true atom, the best cosine similarity with any learned atom, averaged.
"""

from typing import NamedTuple

import torch

from ..errors import UserError
from ..kernels.sparse import sparse_decode


class Sample(NamedTuple):
    x: torch.Tensor  # (n, d) float32 examples
    values: torch.Tensor  # (n, k) float32 coefficients |N(0, 1)|, non-zero almost surely
    indices: torch.Tensor  # (n, k) int64 distinct atoms per row; dense codes: dense_codes(values, indices, n_atoms)


class SyntheticDictionary:
    """A random dictionary of n_atoms unit-norm atoms in R^d and a sampler of k-sparse data from it.

    `seed` fixes the atoms and the stream that `sample(n)` continues; `sample(n, seed=s)`
    draws from its own generator instead, the same n rows on every call.
    """

    def __init__(self, d: int, n_atoms: int, k: int, noise_std: float = 0.0, alpha: float = 0.0, seed: int = 0):
        if d < 1 or n_atoms < 1:
            raise UserError(f"d and n_atoms must be at least 1 (got {d}, {n_atoms}).")
        if not 1 <= k <= n_atoms:
            raise UserError(f"k must be between 1 and n_atoms = {n_atoms} (got {k}).")
        if not 0 <= noise_std < float("inf"):
            raise UserError(f"noise_std must be a finite number >= 0 (got {noise_std}).")
        if not 0 <= alpha < float("inf"):
            raise UserError(f"alpha must be a finite number >= 0, 0 for uniform atom use (got {alpha}).")
        self.d, self.n_atoms, self.k, self.noise_std = d, n_atoms, k, noise_std
        self._stream = torch.Generator().manual_seed(seed)
        atoms = torch.randn(n_atoms, d, generator=self._stream, dtype=torch.float64)
        self.atoms = (atoms / atoms.norm(dim=1, keepdim=True)).float()  # (n_atoms, d)
        weights = torch.arange(1, n_atoms + 1, dtype=torch.float64) ** -alpha
        self.probabilities = weights / weights.sum()  # (n_atoms,) chance of each atom on one draw
        self._cdf = self.probabilities.cumsum(0)
        self._cdf[-1] = 1.0  # rounding must not leave a uniform draw in [0, 1) past the last atom
        # A row's last atom is redrawn until it differs from the k-1 before it; if those can
        # hold nearly all the probability, that takes about 1 / (what is left) draws.
        if self.probabilities[k - 1 :].sum() < 1e-3:
            raise UserError(
                f"alpha = {alpha} puts almost all use on fewer than k = {k} of the "
                f"{n_atoms} atoms, so k distinct atoms per sample would take very long "
                f"to draw; lower alpha or k, or add atoms."
            )

    def sample(self, n: int, seed: int | None = None) -> Sample:
        """n examples and the codes that made them. seed=None continues this dictionary's stream
        (reproducible for the same sequence of calls); an int draws from a fresh generator."""
        if n < 1:
            raise UserError(f"n must be at least 1 (got {n}).")
        gen = self._stream if seed is None else torch.Generator().manual_seed(seed)
        indices = self._choose_atoms(n, gen)
        values = torch.randn(n, self.k, generator=gen).abs()
        x = sparse_decode(values, indices, self.atoms)
        if self.noise_std > 0:
            x += self.noise_std * torch.randn(n, self.d, generator=gen)
        return Sample(x, values, indices)

    def _choose_atoms(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """(n, k) int64: per row, k atoms drawn one after another, each with probability in
        proportion to `probabilities` among the atoms not yet chosen in that row.

        A draw that repeats an earlier one in its row is drawn again, which is the same as
        drawing from the renormalised rest. Costs about n·k draws, not n·n_atoms.
        """
        chosen = torch.empty(n, self.k, dtype=torch.int64)
        for j in range(self.k):
            pending = torch.arange(n)
            while len(pending):
                u = torch.rand(len(pending), generator=gen, dtype=torch.float64)
                chosen[pending, j] = torch.searchsorted(self._cdf, u, right=True)
                repeats = (chosen[pending, :j] == chosen[pending, j : j + 1]).any(dim=1)
                pending = pending[repeats]
        return chosen


class Match(NamedTuple):
    cosine: torch.Tensor  # (n_true,) float64 best cosine similarity of each true atom
    learned: torch.Tensor  # (n_true,) int64 the learned atom that achieves it


def best_match(true_atoms, learned_atoms) -> Match:
    """For each true atom (row of (n_true, d)), the learned atom (row of (n_learned, d)) with
    the highest cosine similarity. The cosine is signed: codes are non-negative, so a flipped
    atom cannot stand in for the true one. A zero learned atom (a dead unit) has cosine 0 with
    everything. Accepts torch tensors or NumPy arrays; computes in float64.
    """
    true_atoms = _atom_rows(true_atoms, "true_atoms")
    learned_atoms = _atom_rows(learned_atoms, "learned_atoms")
    if true_atoms.shape[1] != learned_atoms.shape[1]:
        raise UserError(
            f"true_atoms and learned_atoms must have the same length d, got shapes "
            f"{tuple(true_atoms.shape)} and {tuple(learned_atoms.shape)}; pass atoms as rows."
        )
    true_norms = true_atoms.norm(dim=1, keepdim=True)
    if (true_norms == 0).any():
        raise UserError("true_atoms has a zero row; every true atom needs a direction.")
    learned_norms = learned_atoms.norm(dim=1, keepdim=True)
    true_unit = true_atoms / true_norms
    learned_unit = torch.where(learned_norms > 0, learned_atoms / learned_norms, 0.0)
    # Chunks of true atoms keep the (chunk, n_learned) similarity block near 2^22 numbers.
    chunk = max(1, 2**22 // learned_unit.shape[0])
    best = [(rows @ learned_unit.T).max(dim=1) for rows in true_unit.split(chunk)]
    return Match(torch.cat([b.values for b in best]), torch.cat([b.indices for b in best]))


def recovery_score(true_atoms, learned_atoms) -> float:
    """Mean over true atoms of the best cosine similarity with a learned atom, in [-1, 1]:
    1 when every true atom has a positively scaled copy among the learned ones."""
    return best_match(true_atoms, learned_atoms).cosine.mean().item()


def _atom_rows(atoms, name: str) -> torch.Tensor:
    atoms = torch.as_tensor(atoms).detach().to("cpu", torch.float64)
    if atoms.ndim != 2 or atoms.shape[0] < 1 or atoms.shape[1] < 1:
        raise UserError(f"{name} must be (n_atoms, d) with one atom per row, got shape {tuple(atoms.shape)}.")
    if not torch.isfinite(atoms).all():
        raise UserError(f"{name} contains NaN or inf; check the weights it came from.")
    return atoms
