"""Data modules, readers and device-side augmentation."""
from ssl_kit.data.module import MultiCropDataModule, PretrainDataModule
from ssl_kit.data.segmentation_module import SegmentationDataModule
from ssl_kit.data.semi import SemiSupervisedDataModule

__all__ = ["MultiCropDataModule", "PretrainDataModule", "SegmentationDataModule", "SemiSupervisedDataModule"]
