"""ssl_kit: self- and semi-supervised pretraining for vision transformers (PyTorch Lightning + timm)."""

__version__ = "0.1.0"

from ssl_kit import rpe as _rpe  # noqa: E402,F401  (registers the iRPE ViT with timm)
