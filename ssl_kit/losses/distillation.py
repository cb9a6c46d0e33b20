"""iBOT self-distillation loss with [CLS] and patch centers (Zhou et al. 2022), METHODS.md section 3."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


class IBOTLoss(nn.Module):
    """[CLS] cross-view distillation + masked-patch (MIM) distillation, with EMA-updated centers.

    Notation: G global views (teacher and masked student), V = G + local student views, B images,
    L patches per global view, K prototypes.

    * [CLS]: for every teacher global view q and student view v != q,
      ``CE(softmax((t_q - c) / tau_t), log_softmax(s_v / tau_s))`` averaged over images, then over
      the G * (V - 1) pairs (22 with 2 + 10 crops).
    * patch: for v == q only, per-patch CE with the teacher's patch distribution (center c2,
      temperature tau_t2), summed over MASKED patches and divided by max(#masked, 1) per image,
      averaged over images (unmasked images contribute 0), then over the G views.
    * Centers (buffers, so checkpoints carry them): c <- m c + (1 - m) mean(teacher [CLS] logits),
      c2 likewise over all teacher patch logits; the means are all-reduced across processes.

    Args:
        out_dim: K.
        student_temp: tau_s (0.1).
        center_momentum: m for c (0.9).
        center_momentum2: m for c2 (0.9).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 center_momentum2: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum, self.center_momentum2 = center_momentum, center_momentum2
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center2", torch.zeros(1, 1, out_dim))

    def forward(self, student_cls: Tensor, student_patch: Tensor, teacher_cls: Tensor, teacher_patch: Tensor,
                masks: Tensor, teacher_temp: float, teacher_temp2: float) -> tuple[Tensor, Tensor]:
        """Both loss terms (the total is their sum).

        Args:
            student_cls: ``[V, B, K]`` student [CLS] logits, global views first.
            student_patch: ``[G, B, L, K]`` student patch logits of the masked global views.
            teacher_cls: ``[G, B, K]``.
            teacher_patch: ``[G, B, L, K]``.
            masks: ``[G, B, L]`` bool, True = masked in the student's view.
            teacher_temp: tau_t for [CLS]; teacher_temp2: tau_t2 for patches.

        Returns:
            (cls_loss, patch_loss) scalars.
        """
        t_cls = F.softmax((teacher_cls - self.center) / teacher_temp, dim=-1)
        t_patch = F.softmax((teacher_patch - self.center2) / teacher_temp2, dim=-1)
        s_cls = F.log_softmax(student_cls / self.student_temp, dim=-1)
        s_patch = F.log_softmax(student_patch / self.student_temp, dim=-1)
        cls_terms, patch_terms = [], []
        for q in range(teacher_cls.shape[0]):
            for v in range(student_cls.shape[0]):
                if v == q:
                    per_patch = -(t_patch[q] * s_patch[v]).sum(dim=-1)  # [B, L]
                    m = masks[v].to(per_patch.dtype)
                    per_image = (per_patch * m).sum(dim=-1) / m.sum(dim=-1).clamp(min=1.0)
                    patch_terms.append(per_image.mean())
                else:
                    cls_terms.append(-(t_cls[q] * s_cls[v]).sum(dim=-1).mean())
        return torch.stack(cls_terms).mean(), torch.stack(patch_terms).mean()

    @torch.no_grad()
    def update_centers(self, teacher_cls: Tensor, teacher_patch: Tensor) -> None:
        """EMA of the batch means of the teacher logits, reduced over all processes (after the loss).

        Args:
            teacher_cls: ``[G, B, K]``; teacher_patch: ``[G, B, L, K]``.
        """
        cls_sum = teacher_cls.float().sum(dim=(0, 1)).view(1, -1)
        patch_sum = teacher_patch.float().mean(dim=2).sum(dim=(0, 1)).view(1, 1, -1)  # per image, then summed
        count = torch.tensor(float(teacher_cls.shape[0] * teacher_cls.shape[1]), device=cls_sum.device)
        if dist.is_available() and dist.is_initialized():
            for t in (cls_sum, patch_sum, count):
                dist.all_reduce(t)  # no gradient flows here: statistics only
        self.center.mul_(self.center_momentum).add_(cls_sum / count, alpha=1 - self.center_momentum)
        self.center2.mul_(self.center_momentum2).add_(patch_sum / count, alpha=1 - self.center_momentum2)


@torch.no_grad()
def teacher_entropies(teacher_logits: Tensor, center: Tensor, teacher_temp: float) -> tuple[Tensor, Tensor]:
    """How the teacher's centred, sharpened distributions sit between the two collapses of self-distillation.

    Both entropies are divided by ``log K`` (1 = uniform over the K prototypes, 0 = one prototype):

    * per image: the mean entropy of ``softmax((t - c) / tau)``. Near 1 the teacher says the same uniform
      thing for every image (centering has won over sharpening: the "uniform" collapse, where the [CLS]
      loss sits at ``log K``);
    * marginal: the entropy of the batch mean of those distributions. Near 0 every image lands on the same
      few prototypes (sharpening has won: the "one dimension" collapse).

    A working run has a low per-image and a high marginal entropy (DINO, Caron et al. 2021, section 5.3).

    Args:
        teacher_logits: ``[N, K]`` teacher [CLS] logits.
        center: ``[1, K]`` the center subtracted before the temperature.
        teacher_temp: tau.

    Returns:
        (per-image, marginal) normalised entropies, scalars in [0, 1].
    """
    probs = F.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1)
    log_k = torch.log(torch.tensor(float(probs.shape[-1]), device=probs.device))

    def entropy(p: Tensor) -> Tensor:
        return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=-1)

    return entropy(probs).mean() / log_k, entropy(probs.mean(dim=0)) / log_k
