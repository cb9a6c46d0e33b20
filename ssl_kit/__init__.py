"""ssl_kit: self- and semi-supervised pretraining for vision transformers (PyTorch Lightning + timm)."""

__version__ = "0.1.0"
