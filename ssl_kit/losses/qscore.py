"""Q-score (Kalibhat et al. 2022, arXiv 2203.01881), METHODS.md section 8.

For a representation h_i in R^l:  Q_i = ((max_j h_ij - mean_j h_ij) / std_j h_ij) / ||h_i||_1.
High Q: a few features stand out (likely classified correctly downstream); low Q: likely wrong.

Choices for ViTs (whose features can be negative), documented here and used everywhere:

* h is the encoder's [CLS] token after its final LayerNorm, RAW (no ReLU/abs): the max is the
  most positive feature and the L1 norm counts negative features too.
* sigma is the POPULATION standard deviation (``unbiased=False``): h = [4, 0, 0, 0] -> 0.433.
* sigma and the L1 norm are guarded with ``eps`` (a constant vector gives Q = 0, not NaN).
* sparsity (for monitoring) is the fraction of entries with |h_ij| < eta.
"""
from __future__ import annotations

from torch import Tensor


def qscore(h: Tensor, eps: float = 1e-6, unbiased: bool = False) -> Tensor:
    """Per-sample Q-score.

    Args:
        h: ``[N, l]`` representations.
        eps: guard added to sigma and to the L1 norm.
        unbiased: Bessel-corrected sigma (False: population sigma, the documented choice).

    Returns:
        ``[N]`` scores.
    """
    mu = h.mean(dim=-1)
    sigma = h.std(dim=-1, unbiased=unbiased) if h.shape[-1] > 1 else h.new_zeros(h.shape[:-1])
    z = (h.max(dim=-1).values - mu) / (sigma + eps)
    return z / (h.abs().sum(dim=-1) + eps)


def qscore_regularizer(h: Tensor, lambda1: float = 1e-4, lambda2: float = 1e-4, eps: float = 1e-6,
                       unbiased: bool = False) -> Tensor:
    """The modified Q-score regulariser added to an SSL loss.

    R = - lambda1 * sum_{i: Q_i < alpha} Q_i + lambda2 * sum_{k: ||H_:k||_1 > beta} ||H_:k||_1,
    alpha = batch mean of Q, beta = batch mean of the column L1 norms (thresholds, no gradient).

    Args:
        h: ``[N, l]`` representations of the batch (with gradient).
        lambda1: weight of the low-Q sample term.
        lambda2: weight of the column-L1 term (stops one feature being active for every sample).

    Returns:
        Scalar R (to be ADDED to the SSL loss).
    """
    q = qscore(h, eps=eps, unbiased=unbiased)
    low_q = q < q.detach().mean()
    columns = h.abs().sum(dim=0)
    busy = columns > columns.detach().mean()
    return -lambda1 * q[low_q].sum() + lambda2 * columns[busy].sum()


def sparsity(h: Tensor, eta: float = 0.05) -> Tensor:
    """Fraction of entries with ``|h| < eta`` (scalar)."""
    return (h.abs() < eta).float().mean()
