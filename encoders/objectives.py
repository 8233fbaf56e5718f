"""Objectives that learn the common space and the hash functions.

Pairs of batches (za, zb) come from two modalities. ``la``/``lb`` are labels; when
they are None the pairs are co-occurrence pairs (row i of za goes with row i of zb
and with nothing else).
  linear_gcca     closed-form (generalised) CCA over two or more views: the classic baseline
  dcca_loss       deep CCA: minus the sum of canonical correlations of a batch
  triplet_loss    batch-hard triplet margin loss on cosine similarity
  contrastive_loss  symmetric InfoNCE with every same-label item as a positive
  hashing_loss    similarity-preserving likelihood on relaxed codes + quantisation + bit balance
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

OBJECTIVES = ("contrastive", "triplet", "dcca", "cca")


def positives(
    la: torch.Tensor | None, lb: torch.Tensor | None, n_a: int, n_b: int, device: torch.device
) -> torch.Tensor:
    """Boolean (n_a, n_b): which pairs match (same label, or same row without labels)."""
    if la is None or lb is None:
        if n_a != n_b:
            raise ValueError(f"co-occurrence pairs need equal batch sizes, got {n_a} and {n_b}")
        return torch.eye(n_a, dtype=torch.bool, device=device)
    return la[:, None] == lb[None, :]


def contrastive_loss(
    za: torch.Tensor, zb: torch.Tensor, la: torch.Tensor | None = None, lb: torch.Tensor | None = None,
    temperature: float = 0.1,
) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE on L2-normalised embeddings."""
    za, zb = F.normalize(za, dim=1), F.normalize(zb, dim=1)
    logits = za @ zb.T / temperature
    pos = positives(la, lb, len(za), len(zb), za.device)

    def one_side(lg: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        log_prob = lg - torch.logsumexp(lg, dim=1, keepdim=True)
        has = p.any(dim=1)
        per_row = -(log_prob * p).sum(dim=1)[has] / p.sum(dim=1)[has]
        return per_row.mean()

    return 0.5 * (one_side(logits, pos) + one_side(logits.T, pos.T))


def triplet_loss(
    za: torch.Tensor, zb: torch.Tensor, la: torch.Tensor | None = None, lb: torch.Tensor | None = None,
    margin: float = 0.2,
) -> torch.Tensor:
    """Batch-hard triplets both ways: hardest positive vs hardest negative, cosine similarity."""
    za, zb = F.normalize(za, dim=1), F.normalize(zb, dim=1)
    sim = za @ zb.T
    pos = positives(la, lb, len(za), len(zb), za.device)

    def one_side(s: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        valid = p.any(dim=1) & (~p).any(dim=1)
        hardest_pos = s.masked_fill(~p, float("inf")).amin(dim=1)
        hardest_neg = s.masked_fill(p, float("-inf")).amax(dim=1)
        return F.relu(margin - hardest_pos + hardest_neg)[valid].mean()

    return 0.5 * (one_side(sim, pos) + one_side(sim.T, pos.T))


def dcca_loss(za: torch.Tensor, zb: torch.Tensor, k: int | None = None, reg: float = 1e-3) -> torch.Tensor:
    """Minus the sum of the top-k canonical correlations between paired batches (Andrew et al. 2013)."""
    n = za.shape[0]
    if n < 2:
        raise ValueError(f"dcca_loss needs at least 2 pairs, got {n}")
    a = za.float() - za.float().mean(0)
    b = zb.float() - zb.float().mean(0)
    saa = a.T @ a / (n - 1) + reg * torch.eye(a.shape[1], device=a.device)
    sbb = b.T @ b / (n - 1) + reg * torch.eye(b.shape[1], device=b.device)
    sab = a.T @ b / (n - 1)
    t = _inv_sqrt(saa) @ sab @ _inv_sqrt(sbb)
    corr = torch.linalg.svdvals(t)
    k = k or min(n - 1, len(corr))
    return -corr[:k].sum() / k


def _inv_sqrt(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return vecs @ torch.diag(vals.clamp_min(1e-9).rsqrt()) @ vecs.T


@dataclasses.dataclass(frozen=True)
class HashLoss:
    total: torch.Tensor
    similarity: torch.Tensor
    quantization: torch.Tensor
    balance: torch.Tensor


def hashing_loss(
    ha: torch.Tensor,
    hb: torch.Tensor,
    la: torch.Tensor | None = None,
    lb: torch.Tensor | None = None,
    quantization_weight: float = 0.1,
    balance_weight: float = 0.1,
) -> HashLoss:
    """DCMH-style loss on relaxed codes ha, hb in [-1, 1] (e.g. tanh of hash logits).

    similarity: negative log-likelihood of the pair relation under
      sigmoid(<ha, hb> * 4 / bits), averaged over pairs;
    quantization: mean (|h| - 1)^2, pushes relaxed codes to +-1;
    balance: mean squared per-bit batch mean, asks each bit to split the data in half.
    """
    bits = ha.shape[1]
    theta = ha @ hb.T * (4.0 / bits)
    s = positives(la, lb, len(ha), len(hb), ha.device).float()
    # weight positives and negatives equally so that 10 classes do not drown the positives
    w_pos = 0.5 / s.sum().clamp_min(1.0)
    w_neg = 0.5 / (1.0 - s).sum().clamp_min(1.0)
    nll = F.softplus(theta) - s * theta
    similarity = (nll * (s * w_pos + (1.0 - s) * w_neg)).sum()
    quantization = 0.5 * (((ha.abs() - 1.0) ** 2).mean() + ((hb.abs() - 1.0) ** 2).mean())
    balance = 0.5 * ((ha.mean(0) ** 2).mean() + (hb.mean(0) ** 2).mean())
    total = similarity + quantization_weight * quantization + balance_weight * balance
    return HashLoss(total, similarity, quantization, balance)


@dataclasses.dataclass(frozen=True)
class GccaFit:
    """Per-view projections of a (generalised) CCA fit: z_v = (x_v - means[v]) @ weights[v]."""

    weights: list[np.ndarray]  # (d_v, dim)
    means: list[np.ndarray]  # (d_v,)
    eigenvalues: np.ndarray  # (dim,) sum of squared correlations with the shared space, descending


def linear_gcca(views: list[np.ndarray], dim: int, reg: float = 1e-3) -> GccaFit:
    """MAXVAR generalised CCA (Kettenring 1971); with two views it is classic CCA.

    Each view (N, d_v) is centred and whitened with ridge ``reg`` (relative to its
    mean variance); the shared space is spanned by the top ``dim`` left singular
    vectors of the concatenated whitened views; each view's projection is the
    regularised least-squares map onto it.
    """
    if len(views) < 2:
        raise ValueError(f"linear_gcca needs at least 2 views, got {len(views)}")
    n = views[0].shape[0]
    if any(v.shape[0] != n for v in views):
        raise ValueError(f"views must have the same number of rows, got {[v.shape[0] for v in views]}")
    if dim > n:
        raise ValueError(f"{dim = } must be <= the number of samples {n}")
    means, whiteners, centred, used = [], [], [], []
    for v in views:
        x = np.asarray(v, dtype=np.float64)
        keep = np.flatnonzero(x.std(axis=0) > 0)  # constant columns carry nothing
        used.append(keep)
        x = x[:, keep]
        mu = x.mean(axis=0)
        xc = x - mu
        cov = xc.T @ xc / n
        ridge = reg * max(np.trace(cov) / cov.shape[0], 1e-12)
        vals, vecs = np.linalg.eigh(cov + ridge * np.eye(cov.shape[0]))
        whiteners.append((vecs / np.sqrt(vals)) @ vecs.T)
        means.append(mu)
        centred.append(xc)
    stacked = np.concatenate([xc @ w for xc, w in zip(centred, whiteners)], axis=1) / np.sqrt(n)
    # left singular vectors of `stacked` via the eigen-decomposition of the smaller Gram matrix
    if stacked.shape[0] <= stacked.shape[1]:
        vals, u = np.linalg.eigh(stacked @ stacked.T)
        vals, u = vals[::-1], u[:, ::-1]
    else:
        vals, v = np.linalg.eigh(stacked.T @ stacked)
        vals, v = vals[::-1], v[:, ::-1]
        u = stacked @ v[:, :dim] / np.sqrt(np.maximum(vals[:dim], 1e-12))
    vals = np.maximum(vals, 0.0)
    g = u[:, :dim] * np.sqrt(n)  # shared coordinates, unit variance
    eig = np.zeros(dim)
    eig[: min(dim, len(vals))] = vals[:dim]
    weights = []
    for xc, w, keep, v in zip(centred, whiteners, used, views):
        full = np.zeros((v.shape[1], g.shape[1]))
        full[keep] = w @ (w.T @ (xc.T @ g)) / n
        weights.append(full)
    means = [np.asarray(v, dtype=np.float64).mean(axis=0) for v in views]
    if g.shape[1] < dim:
        weights = [np.pad(w, ((0, 0), (0, dim - w.shape[1]))) for w in weights]
    return GccaFit([w.astype(np.float32) for w in weights], [m.astype(np.float32) for m in means], eig)


def itq_rotation(z: np.ndarray, iterations: int = 50, seed: int = 0) -> np.ndarray:
    """Iterative quantisation (Gong & Lazebnik 2011): orthogonal R so that sign(z @ R) loses least.

    ``z`` (N, K) is centred data; returns R (K, K).
    """
    z = np.asarray(z, dtype=np.float64)
    k = z.shape[1]
    r, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((k, k)))
    for _ in range(iterations):
        b = np.sign(z @ r)
        b[b == 0] = 1.0
        u, _, vt = np.linalg.svd(z.T @ b)
        r = u @ vt
    return r
