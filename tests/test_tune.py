"""qc tune: the search, its budget, its log (resume), its outputs and the recipe replay."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import qc_compiler as qc
from qc_compiler.cli import main
from qc_compiler.errors import QCError
from qc_compiler.imaging import scatter_png
from qc_compiler.specs import StepCacheConfig
from qc_compiler.tune import (REFERENCE, Candidate, QuantChoice, TuneSpace, _choose, check_tune_folder, compile_recipe,
                              load_recipe, pareto_front, parse_duration, parse_fraction, tune)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
STEPS = 4  # the quick space calibrates on 8 items: 2 labels x 4 steps


@pytest.fixture(scope="module")
def mnist():
    return qc.load_model("dit-mnist")


def _tiny(model, log, **kw):
    opts = dict(max_fid_increase=10.0, space=TuneSpace.quick(), n_proxy=6, n=16, batch=8, log=log, progress=False)
    opts.update(kw)
    return tune(model, qc.DDPM(steps=STEPS, cfg_scale=1.5), **opts)


@pytest.mark.slow
def test_tune_end_to_end_resumes_and_the_recipe_replays_bit_for_bit(mnist, tmp_path, capsys):
    folder = tmp_path / "tune"
    log = folder / "log.json"
    first = _tiny(mnist, log)
    proxy, suite = first.proxy_rows(), first.suite_rows()
    assert len(proxy) == 4 and first.evaluated["new"] == len(first.rows) and first.evaluated["resumed"] == 0
    assert {r["stage"] for r in proxy} == {"quant", "cache"}
    assert first.fp32 is not None and first.reference is not None and first.reference["stage"] == "reference"
    for r in proxy:  # against FP32's outputs on the same noise, never zero for a quantized model
        assert r["step_err"] > 1e-3 and r["final_err"] > 1e-3
        assert r["proxy"] == pytest.approx(r["step_err"] + r["final_err"])
        assert r["speed"] == pytest.approx(r["fp32_sample_s"] / r["sample_s"])
    for r in suite:  # speed and FID are ratios of this run's own FP32 measurements
        assert r["speed"] == pytest.approx(first.fp32["sample_s"] / r["sample_s"])
        assert r["fid_increase"] == pytest.approx(r["fid"] / first.fp32["fid"] - 1)
    # the chosen is the fastest within the bound
    ok = [r for r in suite if r["fid_increase"] <= 10.0]
    assert first.chosen is not None and first.chosen["speed"] == max(r["speed"] for r in ok)
    saved = json.loads(log.read_text())
    assert len(saved["rows"]) == len(first.rows) and saved["settings"]["n"] == 16

    with pytest.raises(QCError, match="other settings .*seed"):
        _tiny(mnist, log, seed=1)
    # the CLI on the same folder resumes: it measures nothing again, and writes the outputs
    capsys.readouterr()
    assert main(["tune", "--steps", str(STEPS), "--space", "quick", "--n", "16", "--n-proxy", "6", "--batch", "8",
                 "--max-fid-increase", "1000%", "--out", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"resumed {len(first.rows)}, measured 0" in out and "chosen" in out
    assert {p.name for p in folder.iterdir()} == {"log.json", "pareto.md", "front.png", "recipe.json", "compiled"}
    assert "chosen" in (folder / "pareto.md").read_text()
    recipe = load_recipe(folder / "recipe.json")
    assert recipe["candidate"] == first.chosen["candidate"] and recipe["model"]["model"] == "dit-mnist"
    assert main(["compile", "--recipe", str(folder / "recipe.json"), "--out", str(tmp_path / "replayed")]) == 0
    assert qc.load_compiled(tmp_path / "replayed").content_digest() == recipe["compiled_digest"]
    assert qc.load_compiled(folder / "compiled").content_digest() == recipe["compiled_digest"]
    # an edited recipe is caught, and --no-verify accepts it on purpose
    edited = dict(recipe, passes=recipe["passes"][:-1])  # a pass dropped
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    capsys.readouterr()
    assert main(["compile", "--recipe", str(tmp_path / "edited.json"), "--out", str(tmp_path / "e")]) == 2
    assert "differs from the tuned model" in capsys.readouterr().err
    assert main(["compile", "--recipe", str(tmp_path / "edited.json"), "--no-verify", "--out", str(tmp_path / "e")]) == 0

    # the confirmation script: FP32, the reference and the tuned row, sampled from the same noise
    spec = importlib.util.spec_from_file_location("tune_confirm", BENCHMARKS / "tune_confirm.py")
    confirm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(confirm)
    threads = torch.get_num_threads()
    try:
        confirm.main([str(folder / "recipe.json"), "--n", "16", "--batch", "8", "--threads", str(threads),
                      "--json", str(tmp_path / "confirm.json")])
    finally:
        torch.set_num_threads(threads)
    rows = json.loads((tmp_path / "confirm.json").read_text())["rows"]
    tuned = Candidate.from_json(recipe["candidate"])
    assert [r["variant"] for r in rows] == ["fp32", "reference qandc(w8a8, interval 2): " + REFERENCE.label(),
                                            "tuned: " + tuned.label()]
    assert rows[2]["bits"] == tuned.quant.label() and rows[2]["backend"] == recipe["backend"]
    assert rows[0]["speed_vs_fp32"] == 1.0 and rows[1]["speed_vs_fp32"] == pytest.approx(
        rows[0]["sample_s"] / rows[1]["sample_s"])


def test_an_exhausted_budget_measures_fp32_only_and_chooses_nothing(mnist, tmp_path):
    result = _tiny(mnist, None, time_budget=1e-3)
    assert result.chosen is None and result.proxy_rows() == [] and result.suite_rows() == []
    assert result.evaluated["skipped_for_time"] == 2  # the quantization row (so no cache rows follow) and the reference
    assert "no schedule met" in result.summary()
    with pytest.raises(QCError, match="no schedule met"):
        result.recipe()


def test_recipe_refuses_other_weights(mnist, tmp_path):
    other = qc.load_model("DiT-T/4", input_size=32, in_channels=1, num_classes=10)
    recipe = {"weights_digest": "0" * 64, "passes": [], "sampler": qc.DDPM(steps=2).spec(), "seed": 0,
              "backend": "torch", "compiled_digest": "", "threads": 1}
    with pytest.raises(QCError, match="other weights"):
        compile_recipe(recipe, other)
    (tmp_path / "r.json").write_text(json.dumps({"format": "qc-recipe", "version": 1}))
    with pytest.raises(QCError, match="lacks"):
        load_recipe(tmp_path / "r.json")


@pytest.mark.parametrize("kwargs, match", [
    ({}, "give a bound"),
    ({"min_speedup": 0}, "min_speedup"),
    ({"min_speedup": float("nan")}, "min_speedup"),
    ({"max_fid_increase": -0.1}, "max_fid_increase"),
    ({"max_fid_increase": 0.05, "n": 1}, "n must be"),
    ({"max_fid_increase": 0.05, "time_budget": 0}, "time_budget"),
    ({"max_fid_increase": 0.05, "space": "quick"}, "TuneSpace"),
])
def test_tune_checks_its_options_before_any_work(mnist, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tune(mnist, qc.DDPM(steps=2), progress=False, **kwargs)


def test_tune_refuses_models_the_suite_cannot_score():
    model = qc.load_model("DiT-T/4", input_size=16, in_channels=1, num_classes=10)
    with pytest.raises(QCError, match="1x32x32"):
        tune(model, qc.DDPM(steps=2), max_fid_increase=0.05, progress=False)


def test_space_and_candidate_options_are_checked():
    with pytest.raises(ValueError, match="keep8"):
        QuantChoice("w8a8", keep8=2)
    with pytest.raises(ValueError, match="selector"):
        Candidate(selector="nearest")
    with pytest.raises(ValueError, match="backend"):
        Candidate(backend="tensorrt")
    with pytest.raises(ValueError, match="torch backend first"):
        TuneSpace(backends=("inductor", "torch"))
    with pytest.raises(ValueError, match="non-empty"):
        TuneSpace(caches=())
    c = Candidate(quant=QuantChoice("w4a8", "gptq", 4), cache=StepCacheConfig(policy="adaptive", threshold=0.1))
    assert Candidate.from_json(json.loads(json.dumps(c.to_json()))) == c
    assert REFERENCE.label() == "w8a8 tap800, interval 2, vc variance, torch"
    assert TuneSpace.default().size() == 4 * 2 * 9 * 2
    with pytest.raises(ValueError, match="fp32 quantizes nothing"):
        QuantChoice("fp32", "gptq")


def test_fp32_candidates_are_a_cache_alone(mnist):
    from qc_compiler.tune import candidate_passes

    sampler, fp = qc.DDPM(steps=2), QuantChoice("fp32")
    assert candidate_passes(Candidate(quant=fp), mnist, sampler, pool_labels=2) == []
    names = [p.name for p in candidate_passes(Candidate(quant=fp, cache=StepCacheConfig(interval=2), vc="variance"),
                                              mnist, sampler, pool_labels=2)]
    assert names == ["step_cache", "tap_calibration", "variance_compensation"]  # VC needs its calibration set


def test_pareto_front_and_choice():
    rows = [{"key": "a", "fid_increase": 0.01, "speed": 2.0}, {"key": "b", "fid_increase": 0.04, "speed": 3.0},
            {"key": "c", "fid_increase": 0.20, "speed": 4.0}, {"key": "d", "fid_increase": 0.05, "speed": 2.5},
            {"key": "e", "fid_increase": float("nan"), "speed": 9.0}]
    assert [r["key"] for r in pareto_front(rows[:4], "fid_increase", "speed")] == ["c", "b", "a"]
    assert [r["key"] for r in pareto_front(rows, "fid_increase", "speed")] == ["c", "b", "a"]  # NaN is not a point
    assert _choose(rows[:4], None, 0.05)["key"] == "b"  # the fastest within +5%
    assert _choose(rows[:4], 2.5, 0.05)["key"] == "b"
    assert _choose(rows[:4], 2.5, None)["key"] == "b"  # a speed floor only: the best FID that fast
    assert _choose(rows[:4], 5.0, None) is None


def test_the_plotted_front_runs_through_its_chosen_member(tmp_path, monkeypatch):
    """The front's line joins every front member, the chosen one included (it is drawn in its own colour)."""
    import qc_compiler.imaging as imaging
    from qc_compiler.tune import TuneResult

    drawn = {}
    monkeypatch.setattr(imaging, "scatter_png", lambda points, path, **kw: drawn.update(points=points, **kw))
    rows = [{"key": k, "rung": "suite", "stage": "front", "fid_increase": f, "speed": v}
            for k, f, v in (("a", 0.01, 2.0), ("b", 0.04, 3.0), ("c", 0.20, 4.0), ("d", 0.05, 2.5))]
    result = TuneResult(rows=rows, chosen=rows[1], reference=None, fp32={"key": "fp32"}, agreement={},
                        settings={"n": 16}, bounds={"min_speedup": None, "max_fid_increase": 0.05})
    result.plot(tmp_path / "front.png")
    assert sorted(drawn["line"]) == [(2.0, 1.0), (3.0, 4.0), (4.0, 20.0)]
    assert (3.0, 4.0, "chosen") in drawn["points"] and (2.5, 5.0, "point") in drawn["points"]


def test_durations_and_fractions():
    assert parse_duration("45m") == 2700 and parse_duration("2h") == 7200 and parse_duration("90s") == 90
    assert parse_fraction("5%") == pytest.approx(0.05) and parse_fraction("0.1") == 0.1
    for bad in ("soon", "-5m", "nanm", "0"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    for bad in ("five", "-1%", "nan"):
        with pytest.raises(ValueError):
            parse_fraction(bad)


def test_tune_folder_is_checked_before_work(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(QCError, match="not a tune's outputs"):
        check_tune_folder(tmp_path)
    (tmp_path / "file").write_text("x")
    assert main(["tune", "--max-fid-increase", "5%", "--out", str(tmp_path / "file")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["tune", "--out", str(tmp_path / "new")]) == 2
    assert "give a bound" in capsys.readouterr().err
    assert main(["tune", "--max-fid-increase", "lots", "--out", str(tmp_path / "new")]) == 2
    assert "a fraction is 5% or 0.05" in capsys.readouterr().err
    assert main(["tune", "--min-speedup", "3", "--backends", "torch,tensorrt", "--out", str(tmp_path / "n")]) == 2
    assert not (tmp_path / "new").exists() and not (tmp_path / "n").exists()


def test_scatter_png_draws_points_and_refuses_nothing(tmp_path):
    from PIL import Image

    points = [(1.0, 0.0, "point"), (2.0, 3.0, "front"), (3.0, 5.0, "front"), (2.5, 1.0, "chosen")]
    for name, line in (("p.png", [(2.0, 3.0), (2.5, 1.0), (3.0, 5.0)]), ("noline.png", [])):
        scatter_png(points, tmp_path / name, xlabel="speed", ylabel="FID %", hline=4.0, vline=2.0, line=line)
    img = Image.open(tmp_path / "p.png").convert("RGB")
    assert img.size == (720, 460)
    colours = {c: n for n, c in img.getcolors(1 << 16)}
    assert (214, 39, 40) in colours  # the chosen point is drawn
    # the front's line runs through the chosen point too (it is a member, though drawn in its own colour)
    without = {c: n for n, c in Image.open(tmp_path / "noline.png").convert("RGB").getcolors(1 << 16)}
    blue = (31, 119, 180)
    assert colours[blue] > without.get(blue, 0) + 100
    with pytest.raises(ValueError, match="no finite points"):
        scatter_png([(math.nan, 1.0, "point")], tmp_path / "q.png", xlabel="x", ylabel="y")
