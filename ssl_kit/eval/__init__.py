"""Evaluation: k-NN (and its monitor), linear probe, fine-tuning and their commands; encoders come from ssl_kit.encoders."""
from ssl_kit.eval.knn import KNNMonitor, extract_features, weighted_knn

__all__ = ["KNNMonitor", "extract_features", "weighted_knn"]
