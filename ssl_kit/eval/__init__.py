"""Evaluation: k-NN (and, later, linear probe and fine-tuning)."""
from ssl_kit.eval.knn import KNNMonitor, extract_features, weighted_knn

__all__ = ["KNNMonitor", "extract_features", "weighted_knn"]
