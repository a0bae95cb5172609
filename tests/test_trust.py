"""Trust: every artefact byte is checked, errors come before work, nothing is silently coerced."""
import json

import pytest
import torch

import qc_compiler as qc
from qc_compiler.cli import main
from qc_compiler.passes import Quantize, StepCache, TAPCalibration, UniformCalibration, VarianceCompensation
from conftest import make_tiny

SAMPLER = qc.DDPM(steps=4, cfg_scale=1.5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("artefact") / "m"
    passes = [StepCache(interval=2), UniformCalibration(size=16, pool_labels=4), Quantize(preset="w8a8"),
              VarianceCompensation(batch=4)]
    qc.compile(make_tiny(), passes=passes, sampler=SAMPLER).save(folder)
    return folder


def edit_manifest(folder, change):
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _pass(manifest, name):
    return next(p for p in manifest["passes"] if p["name"] == name)["options"]


# The audit's probes: each edit loaded with exit code 0 and changed the output before.
MANIFEST_EDITS = {
    "cache interval 2 -> 5": lambda m: _pass(m, "step_cache").update(interval=5),
    "weight_bits 8 -> 4": lambda m: _pass(m, "quantize")["config"]["default"].update(weight_bits=4),
    "num_heads": lambda m: m["model_config"].update(num_heads=4),
    "cfg": lambda m: m["sampler"].update(cfg_scale=4.0),
    "backend": lambda m: m.update(backend="fakequant"),
    "VC form": lambda m: _pass(m, "variance_compensation").update(form="exact"),
    "VC pass removed": lambda m: m["passes"].pop(),
    "a key deleted": lambda m: m.pop("seed"),
}


@pytest.mark.parametrize("edit", sorted(MANIFEST_EDITS))
def test_an_edited_manifest_is_refused(edit, saved, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(saved, folder)
    qc.load_compiled(folder)  # the untouched copy loads
    edit_manifest(folder, MANIFEST_EDITS[edit])
    with pytest.raises(qc.ArtifactError, match="manifest.json does not match its digest"):
        qc.load_compiled(folder)


def test_added_removed_and_edited_files_are_named(saved, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(saved, folder)
    (folder / "extra.bin").write_bytes(b"x")
    with pytest.raises(qc.ArtifactError, match=r"does not list: \['extra.bin'\]"):
        qc.load_compiled(folder)
    (folder / "extra.bin").unlink()
    (folder / "fitted.safetensors").unlink()
    with pytest.raises(qc.ArtifactError, match="fitted.safetensors is missing"):
        qc.load_compiled(folder)


def test_saving_over_a_folder_that_holds_other_files_is_refused_before_writing(tmp_path):
    cm = qc.compile(make_tiny(), sampler=SAMPLER)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(qc.ArtifactError, match="is not empty"):
        cm.save(tmp_path / "mine")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    cm.save(tmp_path / "m")
    cm.save(tmp_path / "m")  # an earlier artefact is replaced
    qc.load_compiled(tmp_path / "m")


def test_the_onnx_cache_schedule_is_covered_by_the_digest(tmp_path):
    import onnx

    cm = qc.compile(make_tiny(), passes=[StepCache(interval=2), UniformCalibration(size=16, pool_labels=4),
                                         Quantize(preset="w8a8")], sampler=SAMPLER)
    model = onnx.load(str(cm.export_onnx(tmp_path / "m.onnx")))
    entry = next(p for p in model.metadata_props if p.key == "qc.cache")
    schedule = json.loads(entry.value)
    schedule["interval"] = 5
    entry.value = json.dumps(schedule)
    (tmp_path / "edited.onnx").write_bytes(model.SerializeToString())
    from qc_compiler.backends.onnx import OrtDenoiser

    with pytest.raises(qc.ArtifactError, match="qc.digest"):
        OrtDenoiser(tmp_path / "edited.onnx")


def test_shards_belong_to_the_model_content_and_the_whole_label_list():
    from qc_compiler.distributed import run_identity
    from qc_compiler.io import tensor_digest

    a, b = qc.compile(make_tiny(), sampler=SAMPLER), qc.compile(make_tiny(seed=1), sampler=SAMPLER)
    assert a.content_digest() == qc.compile(make_tiny(), sampler=SAMPLER).content_digest()
    assert a.content_digest() != b.content_digest()  # a recompile at the same path is another model
    ident = lambda labels, model=a: run_identity(SAMPLER, labels, seed=0, shard_size=2, model_id=model.content_digest())  # noqa: E731
    assert ident([1, 2, 3]) == ident([1, 2, 3])
    assert ident([1, 2, 3]) != ident([3, 2, 1])  # same sum, other order: another run
    assert ident([1, 2, 3]) != ident([1, 2, 3], b)
    assert tensor_digest({"w": torch.ones(2)}) != tensor_digest({"w": torch.ones(2, dtype=torch.float64)})


# --- no silent coercion --------------------------------------------------------------------------
def test_labels_out_of_range_raise_in_python():
    cm = qc.compile(make_tiny(), sampler=SAMPLER)
    for labels in ([10], [-1], [0, 11]):
        with pytest.raises(ValueError, match="out of range for a model with 10 classes"):
            SAMPLER.sample(cm, labels, seed=0)
    with pytest.raises(ValueError, match="integers"):
        SAMPLER.sample(cm, [1.5], seed=0)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.5])
def test_non_finite_or_small_cfg_is_refused(value):
    with pytest.raises(ValueError, match="cfg_scale"):
        qc.DDPM(steps=4, cfg_scale=value)
    with pytest.raises(ValueError, match="steps must be an integer"):
        qc.DDPM(steps=4.5)


def test_non_finite_weights_are_refused_before_compiling():
    model = make_tiny()
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(qc.ArtifactError, match="blocks.1.mlp.fc1.weight holds NaN"):
        qc.compile(model, sampler=SAMPLER)


@pytest.mark.parametrize("backend", ["torch", "fakequant", "onnx"])
def test_nan_input_is_refused_by_every_backend(backend):
    cm = qc.compile(make_tiny(), passes=[UniformCalibration(size=16, pool_labels=4), Quantize(preset="w8a8")],
                    sampler=SAMPLER, backend=backend)
    x = torch.randn(2, 1, 16, 16)
    x[1, 0, 3, 3] = float("nan")
    with pytest.raises(qc.QCError, match="NaN"):
        cm(x, torch.full((2,), 999), torch.tensor([1, 2]))
    eager = make_tiny()(x, torch.full((2,), 999), torch.tensor([1, 2]))
    assert torch.isnan(eager).any()  # what FP32 does: a compiled model never hides it as finite numbers


# --- errors before work, one line each -----------------------------------------------------------
def one_line_error(argv, capsys):
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("qc ") or "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_checkpoint_problems_name_the_key_and_shapes(tmp_path, capsys):
    from qc_compiler.models.zoo import save_model_weights

    model = make_tiny()
    save_model_weights(model, tmp_path / "ok.safetensors")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "ok.safetensors"))
    meta = {"config": json.dumps({k: v for k, v in model.config.items() if k != "fused_attn"})}
    missing = {k: v for k, v in tensors.items() if k != "blocks.1.attn.qkv.bias"}
    save_file(missing, str(tmp_path / "missing.safetensors"), metadata=meta)
    assert "missing key 'blocks.1.attn.qkv.bias'" in one_line_error(
        ["sample", "--model", str(tmp_path / "missing.safetensors"), "--steps", "2", "--out", str(tmp_path / "g.png")], capsys)
    deeper = dict(json.loads(meta["config"]), depth=3)
    save_file(tensors, str(tmp_path / "depth.safetensors"), metadata={"config": json.dumps(deeper)})
    assert "missing key 'blocks.2." in one_line_error(
        ["sample", "--model", str(tmp_path / "depth.safetensors"), "--steps", "2", "--out", str(tmp_path / "g.png")], capsys)
    wrong = dict(tensors, **{"blocks.0.mlp.fc1.weight": torch.zeros(3, 3, dtype=torch.float16)})
    save_file(wrong, str(tmp_path / "shape.safetensors"), metadata=meta)
    assert "'blocks.0.mlp.fc1.weight' has shape (3, 3), the model's is (256, 64)" in one_line_error(
        ["sample", "--model", str(tmp_path / "shape.safetensors"), "--steps", "2", "--out", str(tmp_path / "g.png")], capsys)
    nan = dict(tensors, **{"final_layer.linear.bias": torch.full_like(tensors["final_layer.linear.bias"], float("nan"))})
    save_file(nan, str(tmp_path / "nan.safetensors"), metadata=meta)
    assert "final_layer.linear.bias holds NaN" in one_line_error(
        ["sample", "--model", str(tmp_path / "nan.safetensors"), "--steps", "2", "--out", str(tmp_path / "g.png")], capsys)
    assert not (tmp_path / "g.png").exists()


def test_a_truncated_checkpoint_is_called_truncated(tmp_path):
    torch.save(make_tiny().state_dict(), tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(qc.ArtifactError, match="truncated or corrupt"):
        qc.load_model(str(tmp_path / "cut.pt"))


def test_the_pickled_payload_never_runs(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(qc.ArtifactError, match="needs pickled code"):
        qc.load_model(str(tmp_path / "evil.pt"))
    assert not marker.exists()


@pytest.mark.parametrize("argv, needle", [
    (["sample", "--model", "DiT-MNIST"], "did you mean 'dit-mnist'"),
    (["sample", "--model", "DiT-T/4", "--cfg", "nan"], "must be a finite number"),
    (["sample", "--model", "DiT-T/4", "--cfg", "inf"], "must be a finite number"),
    (["sample", "--model", "DiT-T/4", "--steps", "2.5"], "must be a whole number"),
])
def test_names_and_numbers_are_exact(argv, needle, capsys):
    assert needle in one_line_error(argv, capsys)


def test_sample_and_eval_check_their_outputs_first(tmp_path, capsys, monkeypatch):
    import qc_compiler.models.zoo as zoo

    monkeypatch.setattr(zoo, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded anyway")))
    (tmp_path / "file").write_text("x")
    tiny = ["--model", "DiT-T/4", "--steps", "2"]
    assert "is a folder" in one_line_error(["sample", *tiny, "--out", str(tmp_path)], capsys)
    assert "path is empty" in one_line_error(["sample", *tiny, "--out", ""], capsys)
    assert "is a file" in one_line_error(["sample", *tiny, "--out", str(tmp_path / "file" / "g.png")], capsys)
    assert "is a folder" in one_line_error(["eval", *tiny, "--out", str(tmp_path)], capsys)
    assert "is a folder" in one_line_error(["bench", "quality", "--variants", "fp32", "--out", str(tmp_path)], capsys)
    bad = one_line_error(["bench", "quality", "--variants", "fp3"], capsys)
    assert "unknown variants ['fp3']" in bad and "did you mean fp32?" in bad and len(bad) < 300  # not 441 names


def test_compile_shows_progress(tmp_path, capsys):
    argv = ["compile", "--model", "DiT-T/4", "--input-size", "16", "--in-channels", "1", "--num-classes", "10",
            "--steps", "3", "--pass", "uniform_calibration:size=8,pool_labels=4,num_steps=3", "--pass", "quantize",
            "--out", str(tmp_path / "m"), "--threads", "1"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "[1/2] uniform_calibration ..." in err and "[2/2] quantize done in" in err


@pytest.mark.parametrize("selector", [UniformCalibration, TAPCalibration])
def test_asking_for_more_calibration_items_than_the_pool_holds_warns_once(caplog, selector):
    import logging

    with caplog.at_level(logging.WARNING, logger="qc_compiler.passes.calibrate"):
        qc.compile(make_tiny(), passes=[selector(size=800, pool_labels=4)], sampler=SAMPLER)
    warnings = [r.getMessage() for r in caplog.records if "calibration items" in r.getMessage()]
    assert len(warnings) == 1 and "asked for 800" in warnings[0] and "holds 16" in warnings[0]


@pytest.mark.parametrize("command", [["sample", "--out", "g.png"], ["eval", "--n", "2", "--out", "m.json"],
                                     ["compile", "--pass", "uniform_calibration", "--pass", "quantize", "--out", "model"],
                                     ["bench", "quality", "--variants", "fp32", "--out", "b.json"]])
def test_a_read_only_output_folder_is_refused_before_work(tmp_path, capsys, monkeypatch, command):
    """Root can write anywhere, so the check is what is tested: os.access says no, nothing runs."""
    import os

    import qc_compiler.io as qio
    import qc_compiler.models.zoo as zoo

    real_access = os.access
    monkeypatch.setattr(qio.os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    monkeypatch.setattr(zoo, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded anyway")))
    *argv, flag, out = command
    model = [] if command[0] == "bench" else ["--model", "DiT-T/4", "--steps", "2"]
    assert "is not writable" in one_line_error([*argv, *model, flag, str(tmp_path / out)], capsys)
