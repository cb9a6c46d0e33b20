"""Data modules, readers and device-side augmentation."""
from ssl_kit.data.module import MultiCropDataModule, PretrainDataModule

__all__ = ["MultiCropDataModule", "PretrainDataModule"]
