"""Data modules, readers and device-side augmentation."""
from ssl_kit.data.module import PretrainDataModule

__all__ = ["PretrainDataModule"]
