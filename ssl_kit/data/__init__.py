"""Data modules, readers and device-side augmentation."""
from ssl_kit.data.detection_module import DetectionDataModule
from ssl_kit.data.module import MultiCropDataModule, PretrainDataModule
from ssl_kit.data.segmentation_module import SegmentationDataModule
from ssl_kit.data.semi import SemiSupervisedDataModule

__all__ = ["DetectionDataModule", "MultiCropDataModule", "PretrainDataModule", "SegmentationDataModule", "SemiSupervisedDataModule"]
