"""Sample-quality evaluation for the 32x32 MNIST DiT.

A small digit CNN (trained by ``scripts/train_classifier.py``) stands in for Inception: FID on its
penultimate features, sFID on an early spatial map, Inception Score from its posteriors, k-NN
precision/recall, and class accuracy of class-conditional samples, all against 1,000 held-out digits.

Example:
    >>> from qc_compiler.eval import evaluate, frechet_distance
    >>> scores = evaluate(images, labels)        # doctest: +SKIP
    >>> scores["fid"], scores["class_acc"]       # doctest: +SKIP
"""
from .classifier import DEFAULT_CLASSIFIER_PATH, ClassifierConfig, DigitClassifier, load_classifier
from .metrics import (
    MetricError, class_accuracy, frechet_distance, gaussian_stats, inception_score, knn_radii, precision_recall,
)
from .suite import (
    DEFAULT_REFERENCE_PATH, compute_reference, evaluate, extract_features, fidelity, inception_fid, load_reference,
    real_noise_floor, save_reference,
)

__all__ = [
    "DEFAULT_CLASSIFIER_PATH", "ClassifierConfig", "DigitClassifier", "load_classifier",
    "MetricError", "class_accuracy", "frechet_distance", "gaussian_stats", "inception_score", "knn_radii",
    "precision_recall",
    "DEFAULT_REFERENCE_PATH", "compute_reference", "evaluate", "extract_features", "fidelity", "inception_fid",
    "load_reference", "real_noise_floor", "save_reference",
]
