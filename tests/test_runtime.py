"""ssl_kit.runtime: the eval-mode block restores every sub-module's own mode."""
from __future__ import annotations

import pytest
from torch import nn

from ssl_kit.runtime import eval_mode


def test_eval_mode_restores_each_submodule_exactly() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Sequential(nn.Dropout(0.5)))
    model.train()
    model[2].eval()  # e.g. an EMA teacher kept in eval mode inside a training method
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, True, False, False]


def test_eval_mode_restores_after_an_error() -> None:
    model = nn.Dropout(0.5).train()
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("inside")
    assert model.training
