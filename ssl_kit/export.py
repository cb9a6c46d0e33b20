"""Encoder export: ``model.safetensors`` + ``config.json`` that plain timm loads.

Load with::

    cfg = json.load(open("encoder/config.json"))
    model = timm.create_model(cfg["timm_name"], pretrained=True, **cfg["kwargs"], pretrained_cfg_overlay=dict(
        file="encoder/model.safetensors", num_classes=cfg["kwargs"]["num_classes"]))  # keeps a saved head

or :func:`load_exported_encoder`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
from safetensors.torch import save_file
from torch import nn

from ssl_kit.encoders import EncoderSpec
from ssl_kit.errors import UserError

WEIGHTS, CONFIG = "model.safetensors", "config.json"
# the key under which a method checkpoint records its encoder spec (read by evaluation and export)
CHECKPOINT_KEY = "ssl_kit"


def export_encoder(encoder: nn.Module, spec: EncoderSpec, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the encoder's weights and the timm name/kwargs that rebuild it.

    Args:
        encoder: the timm VisionTransformer (teacher or student).
        spec: its :class:`EncoderSpec`.
        out_dir: destination folder (created).
        extra: informational fields for config.json (method, epoch, ...).

    Returns:
        The folder written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt", "timm_name": spec.timm_name})
    config = {"timm_name": spec.timm_name, "kwargs": spec.kwargs, **(extra or {})}
    (out / CONFIG).write_text(json.dumps(config, indent=2, default=str) + "\n")
    return out


def load_exported_encoder(path: str | Path, **overrides: Any) -> nn.Module:
    """Rebuild an exported encoder with ``timm.create_model(..., pretrained=True)``.

    Args:
        path: the export folder (or its config.json).
        **overrides: kwargs that replace the saved ones (e.g. ``img_size`` for another resolution;
            timm then resamples the position embedding).
    """
    folder = Path(path)
    if folder.name == CONFIG:
        folder = folder.parent
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise UserError(f"{folder} is not an ssl_kit encoder export (needs {CONFIG} and {WEIGHTS}).")
    config = json.loads((folder / CONFIG).read_text())
    kwargs = dict(config["kwargs"], **overrides)
    # the overlay's num_classes is the SAVED head size: timm keeps a saved classifier head only when it matches
    overlay = dict(file=str(folder / WEIGHTS), num_classes=config["kwargs"].get("num_classes", 0))
    return timm.create_model(config["timm_name"], pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
