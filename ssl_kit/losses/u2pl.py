"""U2PL losses (Wang et al. CVPR 2022), METHODS.md section 6: entropy-ranked reliable pseudo labels, the
unsupervised cross-entropy on reliable pixels, and the contrastive loss whose negatives are unreliable
pixels kept in a per-class memory bank.

Conventions: ``K`` classes (background included), ``IGNORE = 255`` in label maps, pixel tensors are
``[B, H, W]`` and class maps ``[B, K, H, W]``.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE = 255


def unreliable_percent(epoch: int, max_epochs: int, alpha0: float = 20.0) -> float:
    """``alpha_t = alpha0 * (1 - epoch / E)``: the percentage of valid unlabeled pixels treated as unreliable
    (20 at epoch 0, 10 at E/2)."""
    return alpha0 * (1.0 - epoch / max(max_epochs, 1))


def pixel_entropy(probs: Tensor) -> Tensor:
    """``[B, K, H, W]`` probabilities -> ``[B, H, W]`` entropy ``-sum_k p log p`` (nats)."""
    return -(probs * torch.log(probs + 1e-10)).sum(dim=1)


def _rank_mask(entropy: Tensor, valid: Tensor, percent: float, highest: bool) -> Tensor:
    """The ``round(percent / 100 * N_valid)`` valid pixels of highest (or lowest) entropy, as a bool map."""
    flat, valid_flat = entropy.flatten(), valid.flatten()
    count = int(round(percent / 100.0 * int(valid_flat.sum())))
    mask = torch.zeros_like(valid_flat)
    if count > 0:
        fill = float("-inf") if highest else float("inf")
        scores = torch.where(valid_flat, flat, torch.full_like(flat, fill))
        mask[torch.topk(scores, count, largest=highest).indices] = True
    return mask.view_as(valid)


def high_entropy_mask(entropy: Tensor, valid: Tensor, percent: float) -> Tensor:
    """Unreliable pixels: exactly ``round(percent% of valid)`` valid pixels with the highest entropy.

    U2PL's code thresholds at ``np.percentile(entropy, 100 - percent)``; ranking gives the same pixels
    without interpolation, so the ignored fraction is exact (ties broken arbitrarily).

    Args:
        entropy: ``[B, H, W]``.
        valid: ``[B, H, W]`` bool (pseudo label not ignored).
        percent: alpha_t in percent.
    """
    return _rank_mask(entropy, valid, percent, highest=True)


def low_entropy_mask(entropy: Tensor, valid: Tensor, percent: float) -> Tensor:
    """The ``percent`` % valid pixels with the LOWEST entropy (the unlabeled anchor candidates)."""
    return _rank_mask(entropy, valid, percent, highest=False)


def entropy_masks(entropy: Tensor, valid: Tensor, percent: float, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(unreliable, anchor candidates): the ``percent`` % valid pixels of highest and of lowest entropy.

    ``labels`` None ranks the whole batch at once (the paper: with ~25 % foreground pixels early in training,
    most of the pixels dropped are foreground). With ``labels`` (``[B, H, W]`` pseudo labels) the ranking is
    done within each class, so every class loses ``percent`` % of its own pixels (``--model.unreliable_ranking
    class``, not the paper's).
    """
    if labels is None:
        return high_entropy_mask(entropy, valid, percent), low_entropy_mask(entropy, valid, percent)
    high, low = torch.zeros_like(valid), torch.zeros_like(valid)
    for c in labels[valid].unique().tolist():
        in_class = valid & (labels == c)
        high |= high_entropy_mask(entropy, in_class, percent)
        low |= low_entropy_mask(entropy, in_class, percent)
    return high, low


def unsupervised_ce(
    logits: Tensor, pseudo_labels: Tensor, reliable: Tensor, normalisation: Literal["paper", "authors"] = "paper"
) -> Tensor:
    """Cross-entropy of the student on reliable pseudo-labelled pixels.

    Args:
        logits: ``[B, K, H, W]`` student logits on the strong view.
        pseudo_labels: ``[B, H, W]`` teacher labels (``IGNORE`` where invalid).
        reliable: ``[B, H, W]`` bool, pixels that keep their pseudo label.
        normalisation: ``paper``: sum over reliable pixels / number of valid pixels (the paper's
            ``1 / (B H W)`` when nothing is ignored), so the term shrinks as fewer pixels are reliable;
            ``authors``: the reference code's mean over reliable pixels times ``B H W / N_reliable``.

    Returns:
        Scalar loss (0 with gradient when no pixel is reliable).
    """
    valid = pseudo_labels != IGNORE
    keep = reliable & valid
    per_pixel = F.cross_entropy(logits, pseudo_labels.masked_fill(~keep, IGNORE), ignore_index=IGNORE, reduction="none")
    n_keep = keep.sum()
    if n_keep == 0:
        return logits.sum() * 0.0
    if normalisation == "paper":
        return per_pixel.sum() / valid.sum()
    if normalisation == "authors":
        return per_pixel.sum() / n_keep * (pseudo_labels.numel() / n_keep)
    raise ValueError(f"normalisation must be 'paper' or 'authors', got {normalisation!r}")


class ClassMemoryBank(nn.Module):
    """Per-class FIFO queues of negative keys (teacher representations), in buffers so checkpoints carry them.

    Args:
        num_classes: K.
        size: keys kept per class (the oldest are overwritten).
        dim: key dimension.
    """

    def __init__(self, num_classes: int, size: int, dim: int) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("keys", torch.zeros(num_classes, size, dim))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))

    @torch.no_grad()
    def push(self, cls: int, keys: Tensor) -> None:
        """Enqueue ``[n, dim]`` keys for class ``cls`` (only the newest ``size`` when n > size)."""
        keys = keys.detach()[-self.size:].to(self.keys.dtype)
        n = keys.shape[0]
        if n == 0:
            return
        start = int(self.ptr[cls])
        idx = (torch.arange(n, device=self.keys.device) + start) % self.size
        self.keys[cls, idx] = keys
        self.ptr[cls] = (start + n) % self.size
        self.count[cls] = min(self.size, int(self.count[cls]) + n)

    def get(self, cls: int) -> Tensor:
        """``[count, dim]`` keys stored for class ``cls``."""
        return self.keys[cls, : int(self.count[cls])]


@torch.no_grad()
def gather_rows(x: Tensor) -> Tensor:
    """Concatenate ``[n_r, D]`` rows from every process (n_r may differ); identity without distributed.

    No gradient flows (keys are detached teacher features)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros(longest, *x.shape[1:], dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s)] for o, s in zip(out, sizes)])


def negative_candidates(
    probs: Tensor, labels: Tensor, unreliable: Tensor, n_labeled: int, low_rank: int = 3, high_rank: int = 20
) -> Tensor:
    """``[B, K, H, W]`` bool: pixel is a negative ("surely not c") for class c.

    * labeled pixels (first ``n_labeled``): c in the teacher's top ``low_rank`` but not the label;
    * unlabeled pixels: unreliable (high entropy) and c ranked in ``[low_rank, high_rank)`` by the teacher
      (``high_rank`` is capped at K).

    This is the paper's definition (Eq. 14-16). The reference code additionally requires the pixel's own
    label to be c, which leaves the labeled negatives empty (Haochen-Wang409/U2PL issue #171).

    Args:
        probs: ``[B, K, H, W]`` teacher probabilities.
        labels: ``[B, H, W]`` ground truth (labeled) / pseudo labels (unlabeled), ``IGNORE`` = invalid.
        unreliable: ``[B, H, W]`` bool high-entropy mask (only its unlabeled part is used).
        n_labeled: labeled images at the front of the batch.
    """
    num_classes = probs.shape[1]
    rank = probs.argsort(dim=1, descending=True).argsort(dim=1)  # rank of class c at each pixel
    valid = labels != IGNORE
    onehot = F.one_hot(labels.clamp(max=num_classes - 1), num_classes).permute(0, 3, 1, 2).bool()
    labeled = (rank[:n_labeled] < low_rank) & ~onehot[:n_labeled] & valid[:n_labeled, None]
    hi = min(high_rank, num_classes)
    unlabeled = (rank[n_labeled:] >= low_rank) & (rank[n_labeled:] < hi) & (unreliable[n_labeled:] & valid[n_labeled:])[:, None]
    return torch.cat([labeled, unlabeled])


def contrastive_logits(anchors: Tensor, positive: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """InfoNCE logits: cosine similarity / temperature, the positive in column 0.

    Args:
        anchors: ``[A, D]`` student features.
        positive: ``[D]`` class prototype (mean teacher feature).
        negatives: ``[A, N, D]`` teacher features.

    Returns:
        ``[A, 1 + N]``.
    """
    keys = torch.cat([positive.expand(anchors.shape[0], 1, -1), negatives], dim=1)
    return F.cosine_similarity(anchors.unsqueeze(1), keys, dim=2) / temperature


@torch.no_grad()
def push_negatives(bank: ClassMemoryBank, rep_teacher: Tensor, negatives: Tensor) -> None:
    """Enqueue, for each class c, the teacher features of this step's negative candidates for c, gathered
    from every process (rank order), into the class's memory bank.

    Args:
        bank: the per-class memory bank (updated in place).
        rep_teacher: ``[B, D, h, w]`` teacher representations.
        negatives: ``[B, K, h, w]`` bool from :func:`negative_candidates`.
    """
    feats_t = rep_teacher.detach().permute(0, 2, 3, 1)
    for c in range(negatives.shape[1]):
        bank.push(c, gather_rows(feats_t[negatives[:, c]]))


def contrastive_loss(
    rep: Tensor, rep_teacher: Tensor, probs_teacher: Tensor, labels: Tensor, anchor_region: Tensor,
    bank: ClassMemoryBank, num_anchors: int = 256, num_negatives: int = 50, temperature: float = 0.5,
    anchor_threshold: float = 0.3,
) -> tuple[Tensor, dict[str, float]]:
    """U2PL's contrastive loss of one device batch at representation resolution ``h x w``, against the
    memory bank as it is (see :func:`push_negatives`).

    For each class c with pixels in ``anchor_region`` (labeled pixels + reliable unlabeled pixels):
    anchors = ``num_anchors`` student features sampled (with replacement, global RNG) among those pixels of
    class c whose teacher probability for c exceeds ``anchor_threshold``; positive = mean teacher feature of
    the class's pixels; negatives = ``num_negatives`` keys per anchor sampled from the class's memory bank.

    Args:
        rep: ``[B, D, h, w]`` student representations (gradient flows here only).
        rep_teacher: ``[B, D, h, w]`` teacher representations.
        probs_teacher: ``[B, K, h, w]``.
        labels: ``[B, h, w]`` labels / pseudo labels (``IGNORE`` = none).
        anchor_region: ``[B, h, w]`` bool.
        bank: the per-class memory bank (read only).

    Returns:
        (loss averaged over the classes present, zero when at most one class is present;
        diagnostics: classes present, mean bank fill).
    """
    num_classes = probs_teacher.shape[1]
    feats = rep.permute(0, 2, 3, 1)
    feats_t = rep_teacher.detach().permute(0, 2, 3, 1)
    present = [c for c in range(num_classes) if bool(((labels == c) & anchor_region).any())]
    info = {"contrastive_classes": float(len(present)), "memory_bank_fill": float(bank.count.float().mean() / bank.size)}
    if len(present) <= 1:
        return rep.sum() * 0.0, info
    loss = rep.sum() * 0.0
    for c in present:
        region = (labels == c) & anchor_region
        candidates = feats[region & (probs_teacher[:, c] > anchor_threshold)]
        keys = bank.get(c)
        if candidates.shape[0] == 0 or keys.shape[0] == 0:
            continue
        anchors = candidates[torch.randint(len(candidates), (num_anchors,), device=candidates.device)]
        with torch.no_grad():
            positive = feats_t[region].mean(dim=0)
            sampled = keys[torch.randint(len(keys), (num_anchors * num_negatives,), device=keys.device)]
            sampled = sampled.view(num_anchors, num_negatives, -1)
        logits = contrastive_logits(anchors, positive, sampled, temperature)
        target = torch.zeros(num_anchors, dtype=torch.long, device=logits.device)
        loss = loss + F.cross_entropy(logits, target)
    return loss / len(present), info


def foreground_share(mask: Tensor, labels: Tensor) -> float:
    """Share of the ``mask``ed pixels whose (pseudo) label is foreground (class > 0, not ``IGNORE``); 0 when the
    mask is empty. With ``mask`` = the unreliable pixels: how much of what the entropy percentile drops is
    object rather than background."""
    selected = labels[mask]
    if selected.numel() == 0:
        return 0.0
    return float(((selected > 0) & (selected != IGNORE)).float().mean())
