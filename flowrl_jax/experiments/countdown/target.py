"""The exact target distribution p(y|x) ∝ π_ref(y|x)·exp(β r(x, y)) of a Countdown problem.

The reward is 1 on the enumerated valid answers and 0 on every other sequence, so the
normaliser needs only π_ref on the valid answers:
Z = e^β Σ_valid π_ref(y) + (1 − Σ_valid π_ref(y)).
"""

from __future__ import annotations

import numpy as np


def target_distribution(ref_logp_valid: np.ndarray, beta: float) -> tuple[np.ndarray, float]:
    """(target mass on each valid answer, target mass on all other sequences), float64.

    `ref_logp_valid` holds log π_ref of each valid answer (EOS included)."""
    lp = np.asarray(ref_logp_valid, np.float64)
    if lp.ndim != 1 or lp.size == 0:
        raise ValueError(f"ref_logp_valid: need a non-empty vector, got shape {lp.shape}")
    valid_mass = float(np.exp(lp).sum())
    if valid_mass > 1 + 1e-9:
        raise ValueError(f"ref_logp_valid: the valid answers hold {valid_mass} > 1 of π_ref")
    other = max(1.0 - valid_mass, 0.0)
    # log Z = log(e^β V + other), computed without overflowing for large β
    log_terms = [beta + np.log(valid_mass)] + ([np.log(other)] if other > 0 else [])
    log_z = float(np.logaddexp.reduce(log_terms))
    return np.exp(lp + beta - log_z), float(other * np.exp(-log_z))


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p‖q) of two distributions over the same outcomes (float64, 0·log 0 = 0)."""
    p = np.asarray(p, np.float64)
    q = np.clip(np.asarray(q, np.float64), 1e-300, None)
    return float(np.sum(np.where(p > 0, p * (np.log(np.clip(p, 1e-300, None)) - np.log(q)), 0.0)))
