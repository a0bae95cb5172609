import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits

import qc_compiler as qc
from qc_compiler.passes import (DBSCANCalibration, KMeansCalibration, RandomCalibration, TAPCalibration,
                               UniformCalibration)
from qc_compiler.calibration import (SELECTORS,
                                     draw_per_cluster, register_selector, tap_clusters)
from qc_compiler.passes import StepCache
from qc_compiler.pipeline import Pass, PassContext, PassResult, register_pass
from conftest import make_tiny

SEEN = []  # what RecordCalibrationSet saw, one CalibrationPool per compile


@register_pass
class RecordCalibrationSet(Pass):
    """Test pass: needs the calibration set and records it."""

    name = "test_record_calibration_set"
    requires = frozenset({"calibration_set"})

    def run(self, gm, ctx):
        SEEN.append((ctx.artifacts["calibration_set"], ctx.artifacts["calibration_pool_size"]))
        return PassResult(gm, modified=False)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)
    SEEN.clear()
    with threadpool_limits(1):
        yield


def clustered_pool(k=10, per=200, dim=64, seed=0):
    """k well-separated Gaussian clusters in distinct directions, cluster j on steps 5j..5j+4."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, dim)) * 3
    x = np.concatenate([c + rng.normal(size=(per, dim)) for c in centers]).astype(np.float32)
    steps = np.concatenate([rng.integers(5 * j, 5 * j + 5, per) for j in range(k)])
    return x, steps, np.repeat(np.arange(k), per)


# --- TAP -----------------------------------------------------------------------------------------

def test_tap_is_deterministic_per_seed_with_parallel_rounds():
    x, steps, _ = clustered_pool(k=5, per=100)
    runs = [SELECTORS["tap"](x, steps, size=40, seed=s, clusters=20, n_jobs=3) for s in (7, 7, 8)]
    assert np.array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])
    assert len(runs[0]) == 40 and len(np.unique(runs[0])) == 40


def test_tap_recovers_known_clusters():
    x, steps, truth = clustered_pool()
    labels = tap_clusters(x, steps, clusters=10, seed=0)
    assert adjusted_rand_score(truth, labels) > 0.9
    chosen = SELECTORS["tap"](x, steps, size=100, seed=0, clusters=10)
    assert len(chosen) == 100
    assert np.bincount(truth[chosen], minlength=10).min() >= 3  # every true cluster is represented


def test_tap_with_capped_landmarks_still_recovers_clusters(monkeypatch):
    import qc_compiler.calibration.tap as tap

    seen = []
    real = tap.tap_embedding
    monkeypatch.setattr(tap, "tap_embedding", lambda xn, s, **kw: seen.append(kw["n_landmarks"]) or real(xn, s, **kw))
    x, steps, truth = clustered_pool()
    labels = tap_clusters(x, steps, clusters=10, seed=0, max_landmarks=30)
    assert set(seen) == {30}  # N/20 = 100 landmarks, capped at 30
    assert adjusted_rand_score(truth, labels) > 0.9


def test_tap_temporal_term_separates_identical_features_at_distant_steps():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 64)).astype(np.float32)  # one feature distribution...
    steps = np.concatenate([rng.integers(0, 5, 300), rng.integers(40, 45, 300)])  # ...two step ranges
    truth = np.repeat([0, 1], 300)
    assert adjusted_rand_score(truth, tap_clusters(x, steps, clusters=2, alpha=0.5, seed=0)) > 0.9
    assert adjusted_rand_score(truth, tap_clusters(x, steps, clusters=2, alpha=1.0, seed=0)) < 0.1


def test_per_cluster_draw_sizes():
    sizes = [400, 120, 60, 30, 8, 2, 1, 200, 90, 89]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    idx = draw_per_cluster(labels, size=60, seed=0)
    counts = np.bincount(labels[idx], minlength=len(sizes))
    assert len(idx) == 60 and len(np.unique(idx)) == 60
    for have, size in zip(counts, sizes):
        assert have == size if size < 3 else 3 <= have <= 10
    assert counts[0] == 10 and counts[0] >= counts[2] >= counts[4]  # in proportion to cluster size
    # the total wins when 3..10 per cluster cannot meet it
    assert len(draw_per_cluster(labels, size=15, seed=0)) == 15
    assert len(draw_per_cluster(labels, size=500, seed=0)) == 500
    assert len(draw_per_cluster(labels, size=5000, seed=0)) == len(labels)


# --- baselines -----------------------------------------------------------------------------------

def test_uniform_selects_evenly_spaced_steps():
    steps = np.repeat(np.arange(50), 10)  # 50 steps x 10 samples
    idx = SELECTORS["uniform"](np.zeros((500, 4), np.float32), steps, size=100, seed=0, num_steps=25)
    chosen, counts = np.unique(steps[idx], return_counts=True)
    assert len(idx) == 100 and len(np.unique(idx)) == 100
    assert len(chosen) == 25 and chosen[0] == 0 and chosen[-1] == 49
    assert set(np.diff(chosen)) <= {2, 3} and (counts == 4).all()
    # fewer steps present than asked: all of them, still the right count
    few = SELECTORS["uniform"](np.zeros((500, 4), np.float32), steps % 5, size=100, seed=0)
    assert len(few) == 100 and len(np.unique((steps % 5)[few])) == 5


@pytest.mark.parametrize("name", ["random", "kmeans", "dbscan", "agglomerative"])
def test_baselines_return_unique_valid_indices(name):
    x, steps, truth = clustered_pool(k=5, per=100)
    options = {"clusters": 10} if name in ("kmeans", "agglomerative") else {}
    if name == "agglomerative":
        options["max_fit"] = 200  # exercises the nearest-centroid assignment of the other 300
    idx = SELECTORS[name](x, steps, size=50, seed=0, **options)
    assert len(np.unique(idx)) == len(idx) and 45 <= len(idx) <= 50
    assert idx.min() >= 0 and idx.max() < len(x)
    if name != "random":  # clustering selectors cover every true cluster
        assert np.bincount(truth[idx], minlength=5).min() >= 3


def test_registry_is_open():
    @register_selector("first_items")
    def first(features, steps, size, seed):
        return np.arange(min(size, len(features)))

    try:
        assert SELECTORS["first_items"](np.zeros((5, 2), np.float32), np.zeros(5), 3, 0).tolist() == [0, 1, 2]
    finally:
        del SELECTORS["first_items"]


@pytest.mark.parametrize("name", sorted({"uniform", "random", "kmeans", "dbscan", "agglomerative", "tap"}))
def test_nan_features_raise_calibration_error(name):
    x, steps, _ = clustered_pool(k=3, per=20, dim=8)
    x[5, 3] = np.nan
    with pytest.raises(qc.CalibrationError, match="NaN or inf"):
        SELECTORS[name](x, steps, size=10, seed=0)


@pytest.mark.parametrize("make, match", [
    (lambda: TAPCalibration(size=0), "size"),
    (lambda: TAPCalibration(alpha=1.5), "alpha"),
    (lambda: TAPCalibration(rounds=0), "rounds"),
    (lambda: TAPCalibration(clusters=0), "clusters"),
    (lambda: TAPCalibration(landmark_ratio=0), "landmark_ratio"),
    (lambda: TAPCalibration(embed_dim=0), "embed_dim"),
    (lambda: TAPCalibration(pool_labels=0), "pool_labels"),
    (lambda: UniformCalibration(num_steps=0), "num_steps"),
    (lambda: KMeansCalibration(clusters=-1), "clusters"),
    (lambda: DBSCANCalibration(eps=0.0), "eps"),
    (lambda: RandomCalibration(seed=-1), "seed"),
])
def test_bad_options_are_rejected(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_options_round_trip_through_the_registry():
    p = TAPCalibration(clusters=5, size=20, alpha=0.3, embed_dim=4)
    rebuilt = qc.pipeline.PASS_REGISTRY[p.name](**p.options())
    assert rebuilt.options() == p.options() and p.options()["embed_dim"] == 4


# --- passes --------------------------------------------------------------------------------------

def test_pass_provides_calibration_set():
    sampler = qc.DDPM(steps=5, cfg_scale=1.5)
    cm = qc.compile(make_tiny(), passes=[TAPCalibration(clusters=5, size=20, pool_labels=8), RecordCalibrationSet()],
                    sampler=sampler)
    (chosen, pool_size), = SEEN
    assert len(chosen) == 20 and pool_size == 40 and chosen.cfg
    assert chosen.x.shape == (20, 1, 16, 16) and set(chosen.step.tolist()) <= set(range(5))
    assert "tap: 20 of 40 candidates, 5 clusters" in cm.report()


def test_pass_order_is_checked_before_anything_runs():
    with pytest.raises(qc.PassOrderError, match="calibration_set.*tap_calibration"):
        qc.compile(make_tiny(), passes=[RecordCalibrationSet()], sampler=qc.DDPM(steps=5))


def test_pool_is_collected_over_the_cached_graph():
    sampler = qc.DDPM(steps=5)
    everything = RandomCalibration(size=1000, pool_labels=3)  # selects the whole pool, in pool order
    qc.compile(make_tiny(), passes=[everything, RecordCalibrationSet()], sampler=sampler)
    qc.compile(make_tiny(), passes=[StepCache(interval=2), everything, RecordCalibrationSet()], sampler=sampler)
    (plain, _), (cached, _) = SEEN
    assert torch.equal(plain.step, cached.step) and len(plain) == 15
    for step in range(5):
        a, b = plain.x[plain.step == step], cached.x[cached.step == step]
        # steps 0 and 1 see the same input; step 1 reuses the cache, so every later input differs
        assert torch.equal(a, b) if step < 2 else not torch.equal(a, b), step


def test_saved_model_restores_the_set_without_collecting(tmp_path, monkeypatch):
    sampler = qc.DDPM(steps=4, cfg_scale=1.5)
    cm = qc.compile(make_tiny(), passes=[KMeansCalibration(clusters=4, size=12, pool_labels=5), RecordCalibrationSet()],
                    sampler=sampler)
    cm.save(tmp_path / "m")

    def no_collect(*a, **k):
        raise AssertionError("a loaded model must not collect a pool again")

    monkeypatch.setattr(PassContext, "collect", no_collect)
    qc.load_compiled(tmp_path / "m")
    (first, n1), (restored, n2) = SEEN
    assert n1 == n2 == 20 and len(restored) == 12
    for field in ("x", "t", "step", "y"):
        assert torch.equal(getattr(first, field), getattr(restored, field)), field
    assert (restored.null_label, restored.cfg) == (first.null_label, first.cfg)


def test_a_set_fitted_by_another_selector_is_not_reused():
    sampler = qc.DDPM(steps=4)
    first = qc.compile(make_tiny(), passes=[RandomCalibration(size=6, pool_labels=3)], sampler=sampler)
    fitted = first.build["fitted"]
    assert fitted["calibration.set.info"] == {"selector": "random_calibration", "pool_size": 12}
    # fits are tied to the schedule they were fitted with: another selector, other options, another
    # sampler, seed or weights cannot reuse them
    for passes, sampler_, model, seed in [
            ([UniformCalibration(size=4, pool_labels=3, num_steps=4)], sampler, make_tiny(), 0),
            ([RandomCalibration(size=5, pool_labels=3)], sampler, make_tiny(), 0),
            ([RandomCalibration(size=6, pool_labels=3)], qc.DDPM(steps=5), make_tiny(), 0),
            ([RandomCalibration(size=6, pool_labels=3)], sampler, make_tiny(seed=1), 0),
            ([RandomCalibration(size=6, pool_labels=3)], sampler, make_tiny(), 1)]:
        with pytest.raises(qc.ArtifactError, match="schedule.digest"):
            qc.compile(model, passes=passes, sampler=sampler_, fitted=fitted, seed=seed)
    again = qc.compile(make_tiny(), passes=[RandomCalibration(size=6, pool_labels=3)], sampler=sampler, fitted=fitted)
    assert "(restored)" in again.report()
