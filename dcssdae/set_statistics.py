"""Statistics over a set of scored images: bootstrap intervals, the Frechet distance and KID from features, and the
gathering of per-image values across DDP ranks. Pure functions of tensors (no network), used by `dcssdae.metrics`.

- `bootstrap_ci`: the percentile bootstrap interval of a mean over images (Efron & Tibshirani 1993, "An
  Introduction to the Bootstrap", ch. 13): resample the n per-image values with replacement, B times, and take the
  2.5% and 97.5% quantiles of the B means. Deterministic given the seed.
- `FrechetReference.distance`: the Frechet distance between Gaussians fitted to two feature sets (Heusel et al.
  2017, Eq. 6), d^2 = |mu_r - mu_f|^2 + tr(S_r) + tr(S_f) - 2 tr((S_r S_f)^(1/2)). The reference set's statistics are
  computed once and reused for every compared set. The trace term is exact either way it is computed: from the
  singular values of A B^T / sqrt((n-1)(m-1)) (A, B the centred features; small sets), or from the eigenvalues of
  the symmetric S_r^(1/2) S_f S_r^(1/2) (large sets), both avoiding torchmetrics' non-symmetric 2048 x 2048
  eigendecomposition (8-30 s each on 2 CPU cores).
- `kernel_inception_distance`: KID (Binkowski et al. 2018, "Demystifying MMD GANs", Sec. 3), the unbiased MMD^2 with
  the cubic polynomial kernel k(a, b) = (a.b / d + 1)^3 (torchmetrics' `poly_mmd`), averaged over random subsets
  of both sets, with its standard deviation over the subsets. Subsets come from a seeded generator, not the global
  random stream.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

KID_SUBSETS = 100
KID_MAX_SUBSET_SIZE = 1000


# ----------------------------------------------------------------------------------------------------------------
# Per-image values of every rank.


def gather_cat(local: Tensor) -> Tensor:
    """`local` of every rank concatenated along dim 0 in rank order (sizes may differ, even be 0); `local` itself
    without torch.distributed. A collective under DDP: every rank must call it, in the same order."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return local
    if torch.distributed.get_world_size() == 1:
        return local
    from torchmetrics.utilities.distributed import gather_all_tensors

    return torch.cat(gather_all_tensors(local))


# ----------------------------------------------------------------------------------------------------------------
# Percentile bootstrap of a mean (Efron & Tibshirani 1993, ch. 13).


def bootstrap_ci(values: Tensor, samples: int = 1000, level: float = 0.95, seed: int = 0) -> list[float]:
    """[lo, hi]: the `level` percentile-bootstrap interval of the mean of `values` (n,), from `samples` resamples
    drawn with a generator seeded by `seed` (the same resamples for every metric of the same n: a paired bootstrap).
    """
    v = values.detach().double().cpu().flatten()
    n = len(v)
    if n == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    generator = torch.Generator().manual_seed(seed)
    means, chunk = [], max(1, 2**22 // n)  # at most ~4 M indices (32 MB) at a time
    for start in range(0, samples, chunk):
        index = torch.randint(n, (min(chunk, samples - start), n), generator=generator)
        means.append(v[index].mean(dim=1))
    tail = (1 - level) / 2
    lo, hi = torch.quantile(torch.cat(means), torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return [lo, hi]


# ----------------------------------------------------------------------------------------------------------------
# Frechet distance (Heusel et al. 2017, Eq. 6), with the reference statistics computed once.


class FrechetReference:
    """The reference set's mean and covariance (and, when needed, its square root), computed once; `distance(f)`
    for each set compared with it."""

    def __init__(self, features: Tensor) -> None:
        """
        Args:
            features: (n, d) features of the reference images (n >= 2).
        """
        f = features.double()
        self.n, self.dim = f.shape
        self.mean = f.mean(dim=0)
        self.centred = f - self.mean  # A: (n, d)
        self.trace = self.centred.square().sum().item() / (self.n - 1)
        self._cov_sqrt: Tensor | None = None

    def cov_sqrt(self) -> Tensor:
        """S_r^(1/2) (symmetric, from the eigendecomposition of S_r; negative round-off eigenvalues set to 0)."""
        if self._cov_sqrt is None:
            cov = self.centred.T @ self.centred / (self.n - 1)
            eigenvalues, vectors = torch.linalg.eigh(cov)
            self._cov_sqrt = (vectors * eigenvalues.clamp(min=0).sqrt()) @ vectors.T
        return self._cov_sqrt

    def distance(self, features: Tensor) -> float:
        """Frechet distance between this reference and `features` (m, d), m >= 2; clamped at 0 (round-off)."""
        f = features.double().to(self.mean.device)
        m = len(f)
        mean = f.mean(dim=0)
        centred = f - mean  # B: (m, d)
        trace = centred.square().sum().item() / (m - 1)
        if self.n * m <= self.dim**2:  # tr (S_r S_f)^(1/2) = nuclear norm of A B^T / sqrt((n-1)(m-1))
            cross = torch.linalg.svdvals(self.centred @ centred.T).sum().item() / math.sqrt((self.n - 1) * (m - 1))
        else:  # S_r S_f is similar to the symmetric R S_f R, R = S_r^(1/2)
            root = self.cov_sqrt()
            inner = root @ (centred.T @ centred / (m - 1)) @ root
            cross = torch.linalg.eigvalsh(inner).clamp(min=0).sqrt().sum().item()
        return max((self.mean - mean).square().sum().item() + self.trace + trace - 2 * cross, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# KID (Binkowski et al. 2018): unbiased polynomial-kernel MMD^2 over random subsets.


def kid_subset_size(num_images: int) -> int:
    """Subset size for KID on `num_images` per set: 1000 (the usual size) when there are 2000 images or more, else
    half the set (so that the subsets differ and their spread means something), at least 2."""
    return max(2, min(KID_MAX_SUBSET_SIZE, num_images // 2))


def kernel_inception_distance(real: Tensor, fake: Tensor, subsets: int = KID_SUBSETS,
                              subset_size: int | None = None, seed: int = 0) -> tuple[float, float, int]:
    """(KID mean, standard deviation over the subsets, subset size) of features `real` (n, d) and `fake` (m, d).

    Each of `subsets` draws picks `subset_size` (default `kid_subset_size(min(n, m))`) rows of each set without
    replacement, independently, as torchmetrics' KernelInceptionDistance does, from a generator seeded by `seed`.
    """
    from torchmetrics.image.kid import poly_mmd

    n, m = len(real), len(fake)
    size = subset_size or kid_subset_size(min(n, m))
    if size > min(n, m) or size < 2:
        raise ValueError(f"KID subsets of {size} need at least {max(size, 2)} images per set, got {n} and {m}")
    generator = torch.Generator().manual_seed(seed)
    real, fake = real.double(), fake.double()
    scores = []
    for _ in range(subsets):
        pick_real = torch.randperm(n, generator=generator)[:size].to(real.device)
        pick_fake = torch.randperm(m, generator=generator)[:size].to(fake.device)
        scores.append(poly_mmd(real[pick_real], fake[pick_fake]))
    scores = torch.stack(scores)
    return scores.mean().item(), scores.std(unbiased=False).item(), size
