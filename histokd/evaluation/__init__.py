"""Evaluation: linear probes on frozen encoders and classification metrics."""

from histokd.evaluation.metrics import classification_metrics
from histokd.evaluation.probe import extract_features, linear_probe, stratified_subset

__all__ = ["classification_metrics", "extract_features", "linear_probe", "stratified_subset"]
