"""ssl_kit: self- and semi-supervised pretraining for vision transformers (PyTorch Lightning + timm)."""

__version__ = "0.1.0"

from ssl_kit import encoders as _encoders  # noqa: E402,F401  (registers the iRPE ViT with timm)
