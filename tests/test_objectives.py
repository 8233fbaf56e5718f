"""Training objectives: each prefers the right answer, and CCA finds a shared latent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xmodal_index.encoders.objectives import contrastive_loss, dcca_loss, hashing_loss, linear_gcca, triplet_loss


def _clustered(n_per: int, classes: int, dim: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    labels = torch.arange(classes).repeat_interleave(n_per)
    return centres[labels] + noise * torch.randn(len(labels), dim, generator=g), labels


def test_contrastive_loss_prefers_aligned_pairs():
    za = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    aligned = contrastive_loss(za, za + 0.05 * torch.randn(32, 16))
    shuffled = contrastive_loss(za, za[torch.randperm(32)])
    assert aligned < shuffled


def test_contrastive_loss_with_labels_prefers_class_structure():
    za, la = _clustered(8, 4, 16, 0.1, seed=1)
    zb, lb = _clustered(8, 4, 16, 0.1, seed=2)
    good = contrastive_loss(za, zb, la, lb)
    bad = contrastive_loss(za, zb, la, lb[torch.randperm(len(lb), generator=torch.Generator().manual_seed(3))])
    assert good < bad


def test_triplet_loss_is_zero_once_the_margin_is_met():
    za = torch.eye(4)
    assert triplet_loss(za, za.clone(), torch.arange(4), torch.arange(4), margin=0.5) == 0.0
    assert triplet_loss(za, za[[1, 0, 3, 2]], torch.arange(4), torch.arange(4), margin=0.5) > 0.0


def test_dcca_loss_reaches_minus_one_for_linearly_related_views():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 3, generator=g)
    za = z @ torch.randn(3, 3, generator=g)
    zb = z @ torch.randn(3, 3, generator=g) + 1.0
    independent = torch.randn(500, 3, generator=g)
    assert dcca_loss(za, zb, k=3).item() == pytest.approx(-1.0, abs=0.03)
    assert dcca_loss(za, independent, k=3).item() > -0.3


def test_hashing_loss_prefers_codes_that_agree_on_matching_items():
    labels = torch.tensor([0, 0, 1, 1])
    codes = torch.tensor([[1.0, 1, -1, -1], [1, 1, -1, -1], [-1, -1, 1, 1], [-1, -1, 1, 1]])
    good = hashing_loss(codes, codes, labels, labels)
    bad = hashing_loss(codes, codes, labels, labels.flip(0))
    assert good.similarity < bad.similarity
    assert good.quantization == 0.0 and good.balance == 0.0


def test_hashing_loss_penalises_unbalanced_and_unquantised_bits():
    loss = hashing_loss(torch.full((4, 8), 0.5), torch.full((4, 8), 0.5))
    assert loss.quantization == pytest.approx(0.25)
    assert loss.balance == pytest.approx(0.25)


def _paired_views(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(7)
    a, b = mix.standard_normal((2, 20)), mix.standard_normal((2, 12))
    z = rng.standard_normal((n, 2))
    x = z @ a + 0.1 * rng.standard_normal((n, 20))
    y = z @ b + 0.1 * rng.standard_normal((n, 12))
    return z, x, y


def test_cca_recovers_the_shared_latent_out_of_sample():
    _, x, y = _paired_views(2000, seed=0)
    fit = linear_gcca([x, y], dim=2)
    z, xt, yt = _paired_views(500, seed=1)
    px = (xt - fit.means[0]) @ fit.weights[0]
    py = (yt - fit.means[1]) @ fit.weights[1]
    for proj in (px, py):
        coef, *_ = np.linalg.lstsq(np.c_[proj, np.ones(len(proj))], z, rcond=None)
        residual = z - np.c_[proj, np.ones(len(proj))] @ coef
        assert 1.0 - residual.var() / z.var() > 0.95  # the latent is a linear function of the projection
    for k in range(2):
        assert np.corrcoef(px[:, k], py[:, k])[0, 1] > 0.95


def test_cca_ranks_shared_directions_before_noise():
    _, x, y = _paired_views(1000, seed=2)
    fit = linear_gcca([x, y], dim=5)
    assert fit.eigenvalues[1] > 1.8 and fit.eigenvalues[2] < 1.3  # 2 = perfect agreement of two views


def test_cca_with_three_views_aligns_all_of_them():
    _, x, y = _paired_views(1500, seed=3)
    w = np.c_[x[:, :5], y[:, :5]] + 0.1 * np.random.default_rng(4).standard_normal((1500, 10))
    fit = linear_gcca([x, y, w], dim=2)
    projections = [(v - m) @ wt for v, m, wt in zip((x, y, w), fit.means, fit.weights)]
    assert np.corrcoef(projections[0][:, 0], projections[2][:, 0])[0, 1] > 0.9


def test_cca_refuses_mismatched_views():
    with pytest.raises(ValueError, match="same number of rows"):
        linear_gcca([np.zeros((5, 2)), np.zeros((6, 2))], dim=1)
