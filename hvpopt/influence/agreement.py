"""How well predicted influence agrees with a reference (retraining, a converged solve): correlations."""

import numpy as np


def pearson(a, b) -> float:
    """Pearson correlation of the entries of two equally sized arrays (computed in float64)."""
    return float(np.corrcoef(np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64))[0, 1])


def spearman(a, b) -> float:
    """Spearman rank correlation: Pearson's of the entries' ranks (ties ranked in order of appearance)."""
    return pearson(_ranks(a), _ranks(b))


def _ranks(x) -> np.ndarray:
    x = np.ravel(x)
    ranks = np.empty(x.size)
    ranks[np.argsort(x, kind="stable")] = np.arange(x.size)
    return ranks
