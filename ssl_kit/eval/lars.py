"""LARS as used by the MAE linear-probe protocol (You et al. 2017; MAE's util/lars.py behaviour)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio; 1-D parameters (biases, norms) are excluded
    from both weight decay and the trust-ratio adaptation.

    For a parameter ``p`` with ``p.ndim > 1``::

        d = grad + weight_decay * p
        d = d * (trust_coefficient * ||p|| / ||d||)   (1 when either norm is 0)

    then ``mu = momentum * mu + d`` and ``p -= lr * mu`` for every parameter.

    Args:
        params: parameters or groups.
        lr: learning rate.
        weight_decay: L2 added to the update of > 1-D parameters.
        momentum: heavy-ball momentum.
        trust_coefficient: eta of the trust ratio.
    """

    def __init__(
        self, params: Iterable[Tensor] | Iterable[dict], lr: float = 0.0, weight_decay: float = 0.0,
        momentum: float = 0.9, trust_coefficient: float = 0.001,
    ) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    p_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    one = torch.ones_like(p_norm)
                    ratio = torch.where(
                        p_norm > 0, torch.where(d_norm > 0, group["trust_coefficient"] * p_norm / d_norm, one), one
                    )
                    d = d.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(d)
                p.add_(mu, alpha=-group["lr"])
        return loss
