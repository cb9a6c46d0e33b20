"""Q-score (Kalibhat et al. 2022, arXiv 2203.01881), METHODS.md section 8.

For a representation h_i in R^l:  Q_i = ((max_j h_ij - mean_j h_ij) / std_j h_ij) / ||h_i||_1.
High Q: a few features stand out (likely classified correctly downstream); low Q: likely wrong.

The formulas here are the paper's, on whatever ``h`` they are given. What ``h`` is for a ViT is the
adaptation (the paper scores post-ReLU, pooled ResNet features, which are non-negative):

* ``space="raw"``: the encoder's readout after its final LayerNorm as it is (signed). Measured on the
  MAE recipe's [CLS] (batch 256, 192 dims): the sum-reduced regulariser is a column-L1 penalty of about 2
  against a Q term of about 2e-4, which a smaller LayerNorm gain satisfies.
* ``space="abs"``: ``|h|``, non-negative like the paper's post-ReLU features (a gain still rescales it).
* ``space="standardized"``: :func:`standardize_rectify`, each dimension centred and scaled by its statistics
  over the batch (or the scored set) and rectified: unchanged by any positive per-dimension scale or shift
  of ``h``, so a LayerNorm gain or bias cannot lower the regulariser.
* How well Q predicts a linear probe's mistakes on the MAE recipe's encoders (AUROC, seeds 0 / 1, [CLS];
  ``benchmarks/qscore_spaces.py``): raw 0.56 / 0.49, abs 0.58 / 0.59, standardized 0.38 / 0.38 (Q of
  standardized features marks atypical images, which the probe gets wrong more often); on the mean patch
  token every space is at or below 0.57. The paper's AUPRC of about 0.9 on ResNets does not carry over.
* sigma is the POPULATION standard deviation (``unbiased=False``): h = [4, 0, 0, 0] -> 0.433.
* sigma and the L1 norm are guarded with ``eps`` (a constant vector gives Q = 0, not NaN).
* ``reduction="mean"`` averages the two terms over their selected samples / columns instead of summing,
  so their size does not grow with the batch or the width (``sum`` is the paper's).
* sparsity (for monitoring) is the fraction of entries with |h_ij| < eta.
"""
from __future__ import annotations

from typing import Literal

from torch import Tensor

Space = Literal["raw", "abs", "standardized"]


def standardize_rectify(h: Tensor, eps: float = 1e-6) -> Tensor:
    """``[N, l] -> [N, l]``: ``relu((h - mean_N h) / std_N h)`` per dimension (population std over the N rows,
    with gradient). For any positive per-dimension scale ``a`` and shift ``b``, ``a * h + b`` maps to the same
    output (up to ``eps``)."""
    centred = h - h.mean(dim=0, keepdim=True)
    return (centred / (centred.pow(2).mean(dim=0, keepdim=True).sqrt() + eps)).relu()


def feature_space(h: Tensor, space: Space) -> Tensor:
    """The features Q-score is computed on (see the module docstring)."""
    if space == "raw":
        return h
    if space == "abs":
        return h.abs()
    if space == "standardized":
        return standardize_rectify(h)
    raise ValueError(f"unknown Q-score feature space {space!r}: use raw, abs or standardized")


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
                       unbiased: bool = False, reduction: Literal["sum", "mean"] = "sum") -> Tensor:
    """The modified Q-score regulariser added to an SSL loss.

    R = - lambda1 * sum_{i: Q_i < alpha} Q_i + lambda2 * sum_{k: ||H_:k||_1 > beta} ||H_:k||_1,
    alpha = batch mean of Q, beta = batch mean of the column L1 norms (thresholds, no gradient).
    ``reduction="mean"`` takes means instead of the two sums and of the column L1 norms.

    Args:
        h: ``[N, l]`` representations of the batch (with gradient), in the chosen feature space.
        lambda1: weight of the low-Q sample term.
        lambda2: weight of the column-L1 term (stops one feature being active for every sample).
        reduction: ``sum`` (the paper) or ``mean``.

    Returns:
        Scalar R (to be ADDED to the SSL loss).
    """
    q = qscore(h, eps=eps, unbiased=unbiased)
    low_q = q < q.detach().mean()
    columns = h.abs().sum(dim=0) if reduction == "sum" else h.abs().mean(dim=0)
    busy = columns > columns.detach().mean()
    if reduction == "sum":
        return -lambda1 * q[low_q].sum() + lambda2 * columns[busy].sum()
    q_term = q[low_q].mean() if low_q.any() else q.sum() * 0
    column_term = columns[busy].mean() if busy.any() else columns.sum() * 0
    return -lambda1 * q_term + lambda2 * column_term


def sparsity(h: Tensor, eta: float = 0.05) -> Tensor:
    """Fraction of entries with ``|h| < eta`` (scalar)."""
    return (h.abs() < eta).float().mean()
