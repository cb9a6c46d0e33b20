"""Encoders in and out: the timm-loadable export (``model.safetensors`` + ``config.json``), the record a method
checkpoint carries, and :func:`load_encoder`, which gets an encoder to evaluate from a checkpoint, an export or a
random initialisation.

An export loads with plain timm::

    cfg = json.load(open("encoder/config.json"))
    model = timm.create_model(cfg["timm_name"], pretrained=True, **cfg["kwargs"], pretrained_cfg_overlay=dict(
        file="encoder/model.safetensors", num_classes=cfg["kwargs"]["num_classes"]))  # keeps a saved head

or :func:`load_exported_encoder`. :func:`load_encoder` ends the same way for all three sources: a timm
VisionTransformer built with ``timm.create_model`` from the recorded name and kwargs (plus evaluation overrides such as
``num_classes``, ``global_pool`` or ``drop_path_rate``), and the weights loaded through timm's own ViT checkpoint
filter, which resamples the position embedding when the evaluation image size differs.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from ssl_kit.encoders.factory import EncoderSpec, build_random_encoder, resolve_encoder_spec, select_attention_kernel
from ssl_kit.errors import UserError

log = logging.getLogger("ssl_kit")

WEIGHTS, CONFIG = "model.safetensors", "config.json"
# the key under which a method checkpoint records its encoder spec (read by evaluation and export)
CHECKPOINT_KEY = "ssl_kit"
# ``--random_init same``: the checkpoint's / export's own network, untrained
SAME = "same"
# Keys an evaluation head may add or drop relative to the pretrained encoder.
_HEAD_KEYS = ("head.", "fc_norm.", "norm.")


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


def read_export_config(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The export folder (given as the folder or its config.json) and its config; a clear error when it is not one."""
    folder = Path(path)
    if folder.name == CONFIG:
        folder = folder.parent
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise UserError(f"{folder} is not an ssl_kit encoder export (needs {CONFIG} and {WEIGHTS}).")
    return folder, json.loads((folder / CONFIG).read_text())


def load_exported_encoder(path: str | Path, **overrides: Any) -> nn.Module:
    """Rebuild an exported encoder with ``timm.create_model(..., pretrained=True)``.

    Args:
        path: the export folder (or its config.json).
        **overrides: kwargs that replace the saved ones (e.g. ``img_size`` for another resolution;
            timm then resamples the position embedding).
    """
    folder, config = read_export_config(path)
    kwargs = dict(config["kwargs"], **overrides)
    # the overlay's num_classes is the SAVED head size: timm keeps a saved classifier head only when it matches
    overlay = dict(file=str(folder / WEIGHTS), num_classes=config["kwargs"].get("num_classes", 0))
    return timm.create_model(config["timm_name"], pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


@dataclass
class EncoderSource:
    """Where the encoder comes from: exactly one of the three, or ``random_init="same"`` with ``ckpt`` or ``encoder``
    (that network's architecture at its method's own initialisation: the like-for-like baseline)."""

    ckpt: str | None = None
    encoder: str | None = None
    random_init: str | None = None
    patch_size: int = 16
    encoder_kwargs: dict[str, Any] | None = None

    @property
    def same_random_init(self) -> bool:
        return self.random_init == SAME

    def describe(self) -> str:
        if self.same_random_init:
            return f"random init of the network in {self.ckpt or self.encoder}"
        if self.ckpt:
            return f"checkpoint {self.ckpt}"
        if self.encoder:
            return f"export {self.encoder}"
        return f"random init {self.random_init}"


def read_checkpoint(path: Path) -> tuple[EncoderSpec, dict[str, torch.Tensor], dict[str, Any]]:
    """The encoder spec, its weights and the method record of an ssl_kit checkpoint."""
    if not path.is_file():
        raise UserError(f"Checkpoint {path} does not exist.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # lazy: the record alone reads little
    except Exception as err:  # unpickling errors have many types
        raise UserError(f"Cannot read checkpoint {path}: {err}") from err
    record = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None
    if record is None:
        raise UserError(
            f"{path} is not an ssl_kit method checkpoint (it has no '{CHECKPOINT_KEY}' encoder record). "
            "Pass a checkpoint written by ssl-pretrain, or an exported encoder with --encoder DIR."
        )
    prefix = record["export_prefix"]
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise UserError(f"{path}: no weights under '{prefix}' in the checkpoint's state_dict.")
    enc = record["encoder"]
    return EncoderSpec(enc["timm_name"], dict(enc["kwargs"])), state, record


def read_export(path: Path) -> tuple[EncoderSpec, dict[str, torch.Tensor], dict[str, Any]]:
    """The encoder spec, its weights and the config (method record included) of an export."""
    folder, config = read_export_config(path)
    return EncoderSpec(config["timm_name"], dict(config["kwargs"])), load_file(str(folder / WEIGHTS)), config


def encoder_record(source: EncoderSource) -> tuple[EncoderSpec | None, dict[str, Any]]:
    """The spec and the method record (``method``, ``readout``, ``encoder_init``; older files carry only ``method``)
    of a checkpoint or export; ``(None, {})`` for a named random init."""
    if source.ckpt:
        spec, _, record = read_checkpoint(Path(source.ckpt))
        return spec, record
    if source.encoder:
        _, config = read_export_config(source.encoder)
        return EncoderSpec(config["timm_name"], dict(config["kwargs"])), config
    return None, {}


# records written before ``encoder_init`` was saved: iBOT kept timm's init, every other method MAE's
def recorded_init(record: dict[str, Any]) -> str:
    return record.get("encoder_init") or ("timm" if record.get("method") == "IBOT" else "mae")


def load_encoder(
    source: EncoderSource, img_size: int, in_chans: int, **overrides: Any
) -> tuple[VisionTransformer, EncoderSpec]:
    """Build the encoder for evaluation at ``img_size`` / ``in_chans``.

    Args:
        source: checkpoint, export or random-init name.
        img_size: evaluation resolution (the position embedding is resampled if it differs).
        in_chans: channels of the evaluation data (must match the encoder's).
        **overrides: timm kwargs for evaluation (``num_classes``, ``global_pool``, ``drop_path_rate``; a different
            ``patch_size`` resamples the patch embedding).

    Returns:
        The model and the spec it was built from (with the overrides applied).
    """
    given = [x for x in (source.ckpt, source.encoder, source.random_init) if x]
    if source.same_random_init and len(given) != 2:
        raise UserError("--random_init same evaluates the untrained network of a --ckpt CHECKPOINT or an "
                        "--encoder EXPORT_DIR: give exactly one of them with it.")
    if len(given) != 1 and not source.same_random_init:
        raise UserError("Give exactly one of --ckpt CHECKPOINT, --encoder EXPORT_DIR or --random_init NAME "
                        "(or --random_init same with one of the first two).")
    if source.random_init and not source.same_random_init:
        kwargs = {**(source.encoder_kwargs or {}), **overrides}
        given_by_data = {"img_size": img_size, "in_chans": in_chans, "patch_size": source.patch_size}
        for key, value in given_by_data.items():
            if key in kwargs and kwargs.pop(key) != value:
                flag = "--patch_size" if key == "patch_size" else f"--data.{key}"
                raise UserError(f"encoder_kwargs sets {key} but {flag} gives {value}: set it with {flag} only.")
        spec = resolve_encoder_spec(source.random_init, **given_by_data, **kwargs)
        model = build_random_encoder(spec, "mae")
        select_attention_kernel(model, 1 + model.patch_embed.num_patches)
        return model, spec
    spec, state, record = read_checkpoint(Path(source.ckpt)) if source.ckpt else read_export(Path(source.encoder))
    if source.same_random_init:
        state = build_random_encoder(spec, recorded_init(record)).state_dict()
    trained_chans, trained_size = spec.kwargs.get("in_chans", 3), spec.kwargs.get("img_size")
    if trained_chans != in_chans:
        raise UserError(
            f"The encoder was trained on {trained_chans}-channel images but the data have {in_chans}: "
            f"pass --data.in_chans {trained_chans}."
        )
    trained_patch = spec.kwargs.get("patch_size", 16)
    patch = overrides.get("patch_size", trained_patch)
    if patch != trained_patch:
        log.warning("Encoder trained with patch %s, used with patch %s: patch embedding resampled (timm "
                    "resample_patch_embed, pseudo-inverse resize).", trained_patch, patch)
    if img_size % patch:
        raise UserError(f"--data.img_size {img_size} is not divisible by the encoder's patch size {patch}.")
    kwargs = dict(spec.kwargs, img_size=img_size, **overrides)
    model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    if trained_size is not None and trained_size != img_size:
        log.warning(
            "Encoder trained at %s px, evaluated at %s px: position embedding resampled (bicubic) from a "
            "%dx%d to a %dx%d patch grid.", trained_size, img_size, trained_size // trained_patch, trained_size // trained_patch,
            img_size // patch, img_size // patch,
        )
    filtered = checkpoint_filter_fn(state, model)
    missing, unexpected = model.load_state_dict(filtered, strict=False)
    bad = [k for k in list(missing) + list(unexpected) if not k.startswith(_HEAD_KEYS)]
    if bad:
        raise UserError(f"The saved encoder does not fit {spec.timm_name} with {kwargs}: mismatched weights {bad[:6]}.")
    if missing:
        log.info("new evaluation parameters (not in the pretrained encoder): %s", ", ".join(sorted(missing)))
    select_attention_kernel(model, 1 + model.patch_embed.num_patches)  # CPU: explicit softmax for short sequences
    return model, EncoderSpec(spec.timm_name, kwargs)
