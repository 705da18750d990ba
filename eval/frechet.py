"""Fréchet distance between Gaussians fitted to two feature sets (the formula behind FID).

    d^2 = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2})

Everything is computed in float64 with numpy alone (no scipy). The trace term uses
tr((S_a S_b)^{1/2}) = tr((S_a^{1/2} S_b S_a^{1/2})^{1/2}): the inner matrix is symmetric PSD, so
its eigenvalues come from a symmetric eigendecomposition, and round-off negatives are clamped to 0.

Notation: N samples, F feature dimensions.
"""
import numpy as np


def _to_numpy64(x):
    """Any array-like or torch tensor -> float64 numpy array (no torch import needed)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _sqrt_psd(a):
    """Symmetric square root of a symmetric PSD matrix a: (F, F) -> (F, F)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def gaussian_stats(feats):
    """Mean and (unbiased) covariance of a feature set.

    Args:
        feats: (N, F) numpy array or torch tensor, N >= 2.
    Returns:
        mu: (F,) float64, sigma: (F, F) float64.
    """
    x = _to_numpy64(feats)  # (N, F)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"feats must have shape (N, F) with N >= 2, got {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_from_stats(mu1, s1, mu2, s2):
    """Fréchet distance between N(mu1, s1) and N(mu2, s2).

    Args:
        mu1, mu2: (F,) means.  s1, s2: (F, F) symmetric PSD covariances.
    Returns:
        float >= 0 (tiny negative round-off is clamped to 0).
    """
    mu1, mu2, s1, s2 = (_to_numpy64(a) for a in (mu1, mu2, s1, s2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape}, {mu2.shape}; sigma {s1.shape}, {s2.shape}")
    r = _sqrt_psd(s1)                       # (F, F)
    m = r @ s2 @ r                          # (F, F), same eigenvalues as s1 s2
    w = np.linalg.eigvalsh((m + m.T) / 2)   # (F,)
    tr_covmean = np.sqrt(np.clip(w, 0.0, None)).sum()
    diff = mu1 - mu2                        # (F,)
    return max(float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean), 0.0)


def frechet_distance(feats_a, feats_b):
    """Fréchet distance between Gaussians fitted to two feature sets.

    Args:
        feats_a: (N_a, F), feats_b: (N_b, F) numpy arrays or torch tensors.
    Returns:
        float.
    """
    return frechet_from_stats(*gaussian_stats(feats_a), *gaussian_stats(feats_b))
