"""Synthetic data with a known dictionary, to check that dictionary learning finds it.

    x (n, d) = codes (n, n_atoms) @ atoms (n_atoms, d) + noise

The atoms are Gaussian rows normalised to unit length. Every sample draws k distinct units with
coefficients |N(0, 1)| (so codes are non-negative, as a TopK or ReLU autoencoder's are), and
noise is N(0, noise_std^2) per coordinate. A unit is an atom, except for the children of a
hierarchy (below), which are never drawn on their own. Units can be used unequally often: one
draw picks unit u with probability proportional to (u + 1)^-alpha (alpha = 0: uniform; larger
alpha: a power law, unit 0 the most common, like the features of real activations).

Two harder ground truths, both off by default:

- A feature hierarchy (n_parents P, n_children C): atoms 0..P-1 are parents, and parent p has
  the C child atoms P + p C + j (j < C). When parent p is one of a sample's units, with
  probability child_probability exactly one of its children, chosen uniformly, fires with it
  (its own coefficient |N(0, 1)|). A child fires only with its parent and never with a sibling:
  the case where a dictionary absorbs the parent's direction into its children's atoms and the
  parent's own unit falls silent whenever a child fires (feature absorption, Chanin et al. 2024).
- Correlated features (n_pairs m, pair_probability): the first 2m atoms after the hierarchy
  form pairs (a, b); when a is drawn, b fires too with probability pair_probability (unless it
  already does), and likewise a with b. Each still fires on its own.

The units are the parents, then the atoms after the children, in that order (parents are the
most common under a power law, as general features are).

The scores say how much of the true dictionary a learned one contains:

- `recovery_score`: for each true atom, the best cosine with any learned atom, averaged;
- `mcc`: the mean cosine of the one-to-one matching of true atoms to learned ones with the
  largest total (the Hungarian assignment), as SAELens's synthetic benchmark computes it;
- `feature_recovery`: precision, recall and F1 of the true atoms recovered by that matching at a
  cosine threshold;
- `absorption`: how often a child's learned atom also carries its parent's direction.
"""

from typing import NamedTuple

import torch

from ..errors import UserError
from ..kernels.sparse import sparse_decode

MAX_ASSIGNMENT = 2**25  # entries of the cosine matrix a one-to-one matching may build (256 MiB of float64)
RECOVERED_COSINE = 0.9  # a true atom counts as recovered by a learned one at this cosine or more
ABSORBED_COSINE = 0.4  # a child's learned atom carries its parent's direction at this cosine or more


class Sample(NamedTuple):
    x: torch.Tensor  # (n, d) float32 examples
    values: (
        torch.Tensor
    )  # (n, w) float32 coefficients |N(0, 1)|; 0 marks padding (a child or partner that did not fire)
    indices: torch.Tensor  # (n, w) int64 atoms; dense codes: dense_codes(values, indices, n_atoms)


class SyntheticDictionary:
    """A random dictionary of n_atoms unit-norm atoms in R^d and a sampler of sparse data from it.

    `seed` fixes the atoms and the stream that `sample(n)` continues; `sample(n, seed=s)` draws
    from its own generator instead, the same n rows on every call. Without a hierarchy or pairs a
    sample has exactly k active atoms (w = k columns); the hierarchy adds k columns (the children
    of the drawn parents) and the pairs k more (the partners of the drawn units).

    Attributes: atoms (n_atoms, d); units (n_units,) the atom of each unit; probabilities
    (n_units,) the chance of each unit on one draw; parent_of and partner_of (n_atoms,) the
    parent and the partner of each atom, -1 for none.
    """

    def __init__(
        self,
        d: int,
        n_atoms: int,
        k: int,
        noise_std: float = 0.0,
        alpha: float = 0.0,
        seed: int = 0,
        *,
        n_parents: int = 0,
        n_children: int = 0,
        child_probability: float = 0.5,
        n_pairs: int = 0,
        pair_probability: float = 0.5,
    ):
        if d < 1 or n_atoms < 1:
            raise UserError(f"d and n_atoms must be at least 1 (got {d}, {n_atoms}).")
        problems = structure_problems(n_atoms, k, n_parents, n_children, n_pairs, child_probability, pair_probability)
        if problems:
            raise UserError("; ".join(problems) + ".")
        n_units = n_atoms - n_parents * n_children
        if not 0 <= noise_std < float("inf"):
            raise UserError(f"noise_std must be a finite number >= 0 (got {noise_std}).")
        if not 0 <= alpha < float("inf"):
            raise UserError(f"alpha must be a finite number >= 0, 0 for uniform atom use (got {alpha}).")
        self.d, self.n_atoms, self.k, self.noise_std = d, n_atoms, k, noise_std
        self.n_parents, self.n_children, self.child_probability = n_parents, n_children, child_probability
        self.n_pairs, self.pair_probability = n_pairs, pair_probability
        self._stream = torch.Generator().manual_seed(seed)
        atoms = torch.randn(n_atoms, d, generator=self._stream, dtype=torch.float64)
        self.atoms = (atoms / atoms.norm(dim=1, keepdim=True)).float()  # (n_atoms, d)
        free = n_parents * (1 + n_children)  # the first atom outside the hierarchy
        self.units = torch.cat([torch.arange(n_parents), torch.arange(free, n_atoms)])  # (n_units,)
        self.parent_of = torch.full((n_atoms,), -1, dtype=torch.int64)
        self.parent_of[n_parents:free] = torch.arange(n_parents).repeat_interleave(n_children)
        self.partner_of = torch.full((n_atoms,), -1, dtype=torch.int64)
        pairs = torch.arange(free, free + 2 * n_pairs).view(n_pairs, 2)
        self.partner_of[pairs] = pairs.flip(1)
        weights = torch.arange(1, n_units + 1, dtype=torch.float64) ** -alpha
        self.probabilities = weights / weights.sum()  # (n_units,) chance of each unit on one draw
        self._cdf = self.probabilities.cumsum(0)
        self._cdf[-1] = 1.0  # rounding must not leave a uniform draw in [0, 1) past the last unit
        # A row's last unit is redrawn until it differs from the k-1 before it; if those can
        # hold nearly all the probability, that takes about 1 / (what is left) draws.
        if self.probabilities[k - 1 :].sum() < 1e-3:
            raise UserError(
                f"alpha = {alpha} puts almost all use on fewer than k = {k} of the "
                f"{n_units} units, so k distinct units per sample would take very long "
                f"to draw; lower alpha or k, or add atoms."
            )

    def sample(self, n: int, seed: int | None = None) -> Sample:
        """n examples and the codes that made them. seed=None continues this dictionary's stream
        (reproducible for the same sequence of calls); an int draws from a fresh generator."""
        if n < 1:
            raise UserError(f"n must be at least 1 (got {n}).")
        gen = self._stream if seed is None else torch.Generator().manual_seed(seed)
        indices = self.units[self._choose_units(n, gen)]
        values = torch.randn(n, self.k, generator=gen).abs()
        drawn = indices
        if self.n_parents:
            child = (
                self.n_parents + drawn * self.n_children + torch.randint(self.n_children, drawn.shape, generator=gen)
            )
            fires = (drawn < self.n_parents) & (torch.rand(drawn.shape, generator=gen) < self.child_probability)
            values, indices = self._extend(values, indices, torch.where(fires, child, drawn), fires, gen)
        if self.n_pairs:
            partner = self.partner_of[drawn]
            already = (partner[:, :, None] == drawn[:, None, :]).any(2)
            fires = (partner >= 0) & ~already & (torch.rand(drawn.shape, generator=gen) < self.pair_probability)
            values, indices = self._extend(values, indices, torch.where(fires, partner, drawn), fires, gen)
        x = sparse_decode(values, indices, self.atoms)
        if self.noise_std > 0:
            x += self.noise_std * torch.randn(n, self.d, generator=gen)
        return Sample(x, values, indices)

    @staticmethod
    def _extend(values, indices, extra, fires, gen) -> tuple[torch.Tensor, torch.Tensor]:
        """values and indices with k more columns: the atoms `extra` (n, k) where `fires`, with
        coefficients |N(0, 1)|, and padding (coefficient 0) elsewhere."""
        extra_values = torch.randn(extra.shape, generator=gen).abs() * fires
        return torch.cat([values, extra_values], 1), torch.cat([indices, extra], 1)

    def _choose_units(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """(n, k) int64: per row, k units drawn one after another, each with probability in
        proportion to `probabilities` among the units not yet chosen in that row.

        A draw that repeats an earlier one in its row is drawn again, which is the same as
        drawing from the renormalised rest. Costs about n·k draws, not n·n_units.
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


def structure_problems(
    n_atoms: int,
    k: int,
    n_parents: int = 0,
    n_children: int = 0,
    n_pairs: int = 0,
    child_probability: float = 0.5,
    pair_probability: float = 0.5,
) -> list[str]:
    """What is wrong with these sizes of a synthetic dictionary (an empty list when nothing is)."""
    if min(n_parents, n_children, n_pairs) < 0:
        return [f"the numbers of parents, children and pairs must be >= 0 (got {n_parents}, {n_children}, {n_pairs})"]
    problems = []
    if (n_parents == 0) != (n_children == 0):
        problems.append(
            f"a hierarchy needs both parents and children per parent (got {n_parents} parents with "
            f"{n_children} children each); give both, or neither"
        )
    needed = n_parents * (1 + n_children) + 2 * n_pairs
    if needed > n_atoms:
        problems.append(
            f"{n_parents} parents with {n_children} children each and {n_pairs} pairs take {needed} atoms, "
            f"more than the {n_atoms} atoms; add atoms"
        )
    elif not 1 <= k <= n_atoms - n_parents * n_children:
        problems.append(
            f"k (atoms drawn per sample) must be between 1 and the {n_atoms - n_parents * n_children} atoms "
            f"that are not children (got {k})"
        )
    for name, p in (("child probability", child_probability), ("pair probability", pair_probability)):
        if not 0 <= p <= 1:
            problems.append(f"the {name} must lie in [0, 1] (got {p})")
    return problems


class Match(NamedTuple):
    cosine: torch.Tensor  # (n_true,) float64 cosine of each true atom with its learned atom (0 where it has none)
    learned: torch.Tensor  # (n_true,) int64 the learned atom matched to it (-1 where none)


def best_match(true_atoms, learned_atoms) -> Match:
    """For each true atom (row of (n_true, d)), the learned atom (row of (n_learned, d)) with
    the highest cosine similarity. The cosine is signed: codes are non-negative, so a flipped
    atom cannot stand in for the true one. A zero learned atom (a dead unit) has cosine 0 with
    everything. Accepts torch tensors or NumPy arrays; computes in float64.
    """
    true_unit, learned_unit = _unit_rows(true_atoms, learned_atoms)
    # Chunks of true atoms keep the (chunk, n_learned) similarity block near 2^22 numbers.
    chunk = max(1, 2**22 // learned_unit.shape[0])
    best = [(rows @ learned_unit.T).max(dim=1) for rows in true_unit.split(chunk)]
    return Match(torch.cat([b.values for b in best]), torch.cat([b.indices for b in best]))


def recovery_score(true_atoms, learned_atoms) -> float:
    """Mean over true atoms of the best cosine similarity with a learned atom, in [-1, 1]:
    1 when every true atom has a positively scaled copy among the learned ones."""
    return best_match(true_atoms, learned_atoms).cosine.mean().item()


def assignment(true_atoms, learned_atoms) -> Match:
    """The one-to-one matching of true atoms to learned ones with the largest sum of cosines
    (the Hungarian assignment, scipy.optimize.linear_sum_assignment), on signed cosines as in
    `best_match`. With more true atoms than learned ones, those left over have learned = -1.
    Refused where the cosine matrix would hold more than MAX_ASSIGNMENT numbers.
    """
    from scipy.optimize import linear_sum_assignment

    true_unit, learned_unit = _unit_rows(true_atoms, learned_atoms)
    size = true_unit.shape[0] * learned_unit.shape[0]
    if size > MAX_ASSIGNMENT:
        raise UserError(
            f"a one-to-one matching of {true_unit.shape[0]} true atoms to {learned_unit.shape[0]} learned "
            f"ones needs {size:,} cosines, more than the {MAX_ASSIGNMENT:,} allowed; match fewer atoms."
        )
    cosines = true_unit @ learned_unit.T
    rows, columns = linear_sum_assignment(cosines.numpy(), maximize=True)
    rows_t, columns_t = torch.from_numpy(rows).long(), torch.from_numpy(columns).long()
    learned = torch.full((true_unit.shape[0],), -1, dtype=torch.int64)
    learned[rows_t] = columns_t
    cosine = torch.zeros(true_unit.shape[0], dtype=torch.float64)
    cosine[rows_t] = cosines[rows_t, columns_t]
    return Match(cosine, learned)


def mcc(true_atoms, learned_atoms) -> float:
    """The mean cosine of the pairs of the one-to-one matching (`assignment`): min(n_true,
    n_learned) pairs. SAELens's synthetic benchmark computes it so, on absolute cosines; these
    are signed, which is the same wherever the matched cosines are not negative."""
    match = assignment(true_atoms, learned_atoms)
    return match.cosine[match.learned >= 0].mean().item()


class Recovered(NamedTuple):
    precision: float  # learned atoms matched one-to-one to a true atom at cosine >= threshold, over the learned atoms
    recall: float  # true atoms so matched, over the true atoms
    f1: float  # their harmonic mean


def feature_recovery(true_atoms, learned_atoms, threshold: float = RECOVERED_COSINE) -> Recovered:
    """Precision, recall and F1 of the true atoms recovered by the one-to-one matching (`assignment`)
    at cosine >= threshold. Every learned atom given counts in the precision: pass only the units
    that fire to leave dead ones out."""
    if not -1 <= threshold <= 1:
        raise UserError(f"threshold must be a cosine in [-1, 1] (got {threshold}).")
    match = assignment(true_atoms, learned_atoms)
    hits = int(((match.learned >= 0) & (match.cosine >= threshold)).sum())
    n_true, n_learned = len(match.learned), _atom_rows(learned_atoms, "learned_atoms").shape[0]
    return Recovered(hits / n_learned, hits / n_true, 2 * hits / (n_true + n_learned))


def absorption(true_atoms, learned_atoms, parent_of, threshold: float = ABSORBED_COSINE) -> float:
    """How often a child's learned atom also carries its parent's direction.

    For each child atom c of parent p (parent_of (n_true,): each true atom's parent, -1 for
    none), the learned atom closest to c (`best_match`) counts as absorbing p when its cosine is
    >= threshold with c and with p (a unit for c + p has cosine 1/sqrt(2) with each, one for c
    alone about 0 with p). Returns the fraction of children whose atom absorbs their parent.
    """
    true = _atom_rows(true_atoms, "true_atoms")
    parent_of = torch.as_tensor(parent_of).long().cpu()
    if parent_of.shape != (true.shape[0],) or not bool(((parent_of >= -1) & (parent_of < true.shape[0])).all()):
        raise UserError(f"parent_of must hold, for each of the {true.shape[0]} true atoms, its parent's index or -1.")
    children = (parent_of >= 0).nonzero().flatten()
    if len(children) == 0:
        raise UserError("parent_of names no parent: this dictionary has no hierarchy to absorb.")
    true_unit, learned_unit = _unit_rows(true, learned_atoms)
    match = best_match(true, learned_atoms)
    with_parent = (learned_unit[match.learned[children]] * true_unit[parent_of[children]]).sum(1)
    return ((match.cosine[children] >= threshold) & (with_parent >= threshold)).double().mean().item()


def dictionary_metrics(true_atoms, learned_atoms, live=None, parent_of=None) -> dict[str, float]:
    """A run's scores against its true dictionary: recovery over every learned atom; mcc and
    precision, recall and F1 (at RECOVERED_COSINE) over the live ones (live: (n_learned,) bool,
    default all), where their matching is small enough; absorption where parent_of names a
    hierarchy."""
    metrics = {"recovery": recovery_score(true_atoms, learned_atoms)}
    used = torch.as_tensor(learned_atoms) if live is None else torch.as_tensor(learned_atoms)[torch.as_tensor(live)]
    n_true = torch.as_tensor(true_atoms).shape[0]
    if 0 < n_true * used.shape[0] <= MAX_ASSIGNMENT:
        recovered = feature_recovery(true_atoms, used)
        metrics |= {"mcc": mcc(true_atoms, used), **recovered._asdict()}
    if parent_of is not None and bool((torch.as_tensor(parent_of) >= 0).any()):
        metrics["absorption"] = absorption(true_atoms, learned_atoms, parent_of)
    return metrics


def _unit_rows(true_atoms, learned_atoms) -> tuple[torch.Tensor, torch.Tensor]:
    """(true atoms, learned atoms) as float64 unit rows, after the checks; zero learned rows stay zero."""
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
    return true_atoms / true_norms, torch.where(learned_norms > 0, learned_atoms / learned_norms, 0.0)


def _atom_rows(atoms, name: str) -> torch.Tensor:
    atoms = torch.as_tensor(atoms).detach().to("cpu", torch.float64)
    if atoms.ndim != 2 or atoms.shape[0] < 1 or atoms.shape[1] < 1:
        raise UserError(f"{name} must be (n_atoms, d) with one atom per row, got shape {tuple(atoms.shape)}.")
    if not torch.isfinite(atoms).all():
        raise UserError(f"{name} contains NaN or inf; check the weights it came from.")
    return atoms
