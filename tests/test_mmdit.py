"""mmdit-mnist: prompts and attributes, the file format, sampling by our sampler and by diffusers' pipeline."""
import json
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import qc_compiler as qc  # noqa: E402
from qc_compiler.cli import main  # noqa: E402
from qc_compiler.errors import ArtifactError  # noqa: E402
from qc_compiler.io import load_tensors, save_tensors  # noqa: E402
from qc_compiler.models.digit_text import (DIGITS, VOCAB, AttributeThresholds, DigitTextEncoder,  # noqa: E402
                                           attribute_accuracy, describe, measure_attributes, parse_prompt, tokenize)
from qc_compiler.models import mmdit_mnist as mm  # noqa: E402

# measured on the shipped weights (20 samples, 12 steps): the bounds leave a margin below those figures
ACC_BOUND, ATTR_BOUND = 0.85, 0.85  # 1.0 and 1.0 measured at 7,060 training steps
TINY = dict(sample_size=8, patch_size=2, in_channels=1, out_channels=1, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16,
            pos_embed_max_size=4, qk_norm="rms_norm")


def _bar(slope: float, width: int, size: int = 32) -> torch.Tensor:
    """A straight stroke through the centre, x = c + slope * (c - y), ``width`` pixels wide, in [-1, 1]."""
    img = -torch.ones(1, size, size)
    c = (size - 1) / 2
    for y in range(6, size - 6):
        x = c + slope * (c - y)
        for dx in range(width):
            img[0, y, math.floor(x - width / 2 + dx + 0.5)] = 1.0
    return img


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mm") / "tiny.safetensors"
    table = torch.tensor([[[0.1, 0.12, 0.14], [-0.1, 0.0, 0.1]]] * 10)
    mm.save_mmdit(mm.build_mmdit(TINY), DigitTextEncoder(width=16), AttributeThresholds(table), path, shift=3.0)
    return mm.load_mmdit(path)


def test_prompts_tokenize_parse_and_describe_agree():
    for d in range(10):
        for th in (-1, 0, 1):
            for sl in (-1, 0, 1):
                assert parse_prompt(describe(d, th, sl)) == (d, th, sl)
    assert describe(8) == "an eight" and describe(7, 1, 1) == "a thick right-slanted seven"
    ids = tokenize(["A thin, LEFT-slanted two.", ""])
    assert [VOCAB[i] for i in ids[0] if i] == ["a", "thin", "left", "slanted", "two"] and not ids[1].any()
    with pytest.raises(ValueError, match="unknown word 'purple'.*thin"):
        tokenize(["a purple seven"])
    with pytest.raises(ValueError, match="at most 8"):
        tokenize(["a thin thin thin thin thin thin thin seven"])
    with pytest.raises(ValueError, match="characters"):
        tokenize(["a seven!"])
    with pytest.raises(ValueError, match="both thin and thick"):
        parse_prompt("a thin thick seven")
    with pytest.raises(ValueError, match="more than one digit"):
        parse_prompt("a seven two")


def test_text_encoder_gives_token_states_and_the_mean_word_embedding():
    torch.manual_seed(0)
    enc = DigitTextEncoder(width=16).eval()
    with torch.no_grad():
        kw = enc.encode(["a seven", ""])
        words = enc.words.weight
        assert kw["prompt_embeds"].shape == (2, 8, 16) and kw["pooled_prompt_embeds"].shape == (2, 16)
        expected = (words[VOCAB.index("a")] + words[VOCAB.index("seven")]) / 2  # padding does not count
        assert torch.allclose(kw["pooled_prompt_embeds"][0], expected, atol=1e-6)
        assert torch.equal(kw["pooled_prompt_embeds"][1], torch.zeros(16))  # the empty prompt: unconditional
        # token states: the LayerNorm of word plus position embeddings, padding included
        assert torch.allclose(kw["prompt_embeds"][0, 1], enc.norm(words[VOCAB.index("seven")] + enc.positions[1]))


def test_attributes_measure_stroke_mass_and_shear():
    upright, right, left = _bar(0.0, 2), _bar(0.4, 2), _bar(-0.4, 2)
    ink, slant = measure_attributes(torch.stack([upright, right, left, _bar(0.0, 4)]))
    # a shear x = c + k (c - y) has -mu11/mu02 = k exactly; pixel rounding costs a little
    assert abs(float(slant[0])) < 0.02
    assert float(slant[1]) == pytest.approx(0.4, abs=0.03) and float(slant[2]) == pytest.approx(-0.4, abs=0.03)
    # ink: stroke pixels over all pixels, and twice the width is twice the ink
    assert float(ink[0]) == pytest.approx(2 * 20 / 1024, rel=1e-6) and float(ink[3]) == pytest.approx(2 * float(ink[0]), rel=1e-6)


def test_thresholds_bin_by_digit_and_judge_prompts():
    slopes, widths = torch.linspace(-0.5, 0.5, 9), [1, 2, 3]
    images = torch.stack([_bar(float(s), w) for s in slopes for w in widths] * 10)
    labels = torch.arange(10).repeat_interleave(27)
    with pytest.raises(ValueError, match="digit 9"):
        AttributeThresholds.fit(images[:27 * 9], labels[:27 * 9])
    thr = AttributeThresholds.fit(images, labels)
    th, sl = thr.bins(images, labels)
    assert [int((th == k).sum()) for k in (-1, 0, 1)] == [90, 90, 90]
    assert [int((sl == k).sum()) for k in (-1, 0, 1)] == [90, 90, 90]
    thick_right, thin_left = images[26:27], images[0:1]  # width 3 at slope 0.5; width 1 at -0.5
    good = attribute_accuracy(torch.cat([thick_right, thin_left]),
                              ["a thick right-slanted zero", "a thin left-slanted one"], thr)
    assert good["attributes"] == 1.0 and good["thickness_n"] == 2 and good["slant_n"] == 2
    bad = attribute_accuracy(torch.cat([thin_left, thick_right]),
                             ["a thick right-slanted zero", "a thin left-slanted one"], thr)
    assert bad["attributes"] == 0.0
    plain = attribute_accuracy(thin_left, ["a zero"], thr)
    assert plain["thickness_n"] == 0 and plain["attributes"] != plain["attributes"]  # NaN: nothing named
    with pytest.raises(ValueError, match="name a digit"):
        attribute_accuracy(thin_left, ["a thin"], thr)


def test_file_round_trip_and_refusals(bundle, tmp_path):
    assert type(bundle.transformer).__name__ == "SD3Transformer2DModel" and bundle.shift == 3.0
    assert bundle.transformer.config.num_layers == 2 and bundle.text_encoder.config["width"] == 16
    path = tmp_path / "m.safetensors"
    mm.save_mmdit(bundle.transformer, bundle.text_encoder, bundle.thresholds, path, shift=bundle.shift)
    again = mm.load_mmdit(path)
    tokens = tokenize(["a thin seven"])
    assert torch.equal(again.text_encoder(tokens)[0], bundle.text_encoder(tokens)[0])  # fp16 -> fp16: exact
    tensors, meta = load_tensors(path)
    save_tensors(tensors, tmp_path / "nometa.safetensors", metadata={"config": meta["config"]})
    with pytest.raises(ArtifactError, match="not an mmdit-mnist file"):
        mm.load_mmdit(tmp_path / "nometa.safetensors")
    tensors.pop("text.norm.weight")
    save_tensors(tensors, tmp_path / "short.safetensors", metadata=meta)
    with pytest.raises(ArtifactError, match="missing key 'norm.weight'"):
        mm.load_mmdit(tmp_path / "short.safetensors")
    with pytest.raises(ArtifactError, match="train_mmdit"):
        mm.load_mmdit(tmp_path / "absent.safetensors")
    assert json.loads(meta["config"])["qk_norm"] == "rms_norm"


def test_our_sampler_equals_the_diffusers_pipeline(bundle):
    prompts = ["a thin seven", "a thick left-slanted two", "a thin seven"]
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    noise[1] = noise[2] = noise[0]
    ours = mm.sample(bundle, prompts, steps=5, cfg_scale=2.5, noise=noise)
    pipe = mm.pipeline(bundle)
    theirs = pipe(**mm.pipeline_kwargs(bundle, prompts, 2.5), num_inference_steps=5, latents=noise.clone()).images
    assert ours.shape == theirs.shape == (3, 1, 8, 8)
    assert torch.allclose(ours, theirs, atol=1e-5), float((ours - theirs).abs().max())
    assert torch.allclose(ours[0], ours[2], atol=1e-6) and (ours[0] - ours[1]).abs().max() > 1e-3  # the prompt matters
    unguided = mm.sample(bundle, prompts, steps=5, cfg_scale=1.0, noise=noise)
    assert not torch.allclose(unguided, ours)


def test_cli_refuses_bad_prompts_before_work(capsys, tmp_path):
    assert main(["sample", "--model", "mmdit-mnist", "--prompt", "a purple seven", "--out", str(tmp_path / "g.png")]) == 2
    assert "unknown word 'purple'" in capsys.readouterr().err
    assert main(["sample", "--model", "dit-mnist", "--prompt", "a seven", "--out", str(tmp_path / "g.png")]) == 2
    assert "--prompt goes with a text-conditioned model" in capsys.readouterr().err
    assert main(["sample", "--model", "mmdit-mnist", "--sampler", "ddim", "--out", str(tmp_path / "g.png")]) == 2
    assert "flow-matching" in capsys.readouterr().err
    assert main(["sample", "--model", "mmdit-mnist", "--labels", "1,2", "--out", str(tmp_path / "g.png")]) == 2
    assert main(["eval", "--model", "mmdit-mnist", "--n", "10", "--out", str(tmp_path / "e.json")]) == 2
    assert "text-conditioned: qc eval takes class-conditional models" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


def test_quality_runs_sample_the_attribute_prompts_by_index():
    from qc_compiler.tools.bench import make_task, markdown

    table = mm.prompt_table()
    assert len(table) == 90 and len(set(table)) == 90
    assert [parse_prompt(table[9 * d + 3 * (th + 1) + sl + 1]) for d, th, sl in ((7, 1, -1), (0, -1, 1))] == \
        [(7, 1, -1), (0, -1, 1)]
    task = make_task("mmdit-mnist", n=40, steps=3, cfg=3.0, seed=5)
    assert task.labels == mm.evaluation_labels(40, 5) != mm.evaluation_labels(40, 6)
    assert task.classes == [i % 10 for i in range(40)]  # digit i % 10, whatever its attributes
    assert [parse_prompt(table[i])[0] for i in task.labels] == task.classes
    assert task.conditions.num_conditions == 90 and task.conditions.has_null
    row = {"variant": "fp32", "bits": "-", "steps": 3, "fid": 1.0, "sfid": 1.0, "is": 9.0, "precision": 0.9,
           "recall": 0.9, "class_acc": 0.95, "attr_attributes": 0.875, "sample_s": 1.0, "speed_vs_fp32": 1.0,
           "speed_vs_fp32_250": float("nan")}
    md = markdown([row], 40, 3.0)
    assert "attribute acc" in md and "| 0.875 |" in md


def test_shipped_model_draws_the_prompted_digits_and_attributes(tmp_path, capsys):
    from qc_compiler.eval import evaluate

    transformer = qc.load_model("mmdit-mnist")
    assert type(transformer).__name__ == "SD3Transformer2DModel" and not transformer.training
    bundle = mm.load_mmdit()
    prompts = [describe(d, th, -th) for d in range(10) for th in (-1, 1)]
    images = mm.sample(bundle, prompts, steps=12, cfg_scale=mm.DEFAULT_CFG, seed=0)
    acc = evaluate(images, torch.tensor([d for d in range(10) for _ in (0, 1)]))["class_acc"]
    attrs = attribute_accuracy(images, prompts, bundle.thresholds)
    assert acc >= ACC_BOUND and attrs["attributes"] >= ATTR_BOUND, (acc, attrs)
    out = tmp_path / "g.png"
    assert main(["sample", "--model", "mmdit-mnist", "--prompt", "a thin seven", "--steps", "3", "--per-label", "2",
                 "--out", str(out)]) == 0
    assert out.stat().st_size > 100 and "2 samples of 1 prompts" in capsys.readouterr().out


def test_cli_compiles_the_text_model_and_samples_prompts_from_the_folder(tmp_path, capsys):
    folder, grid = tmp_path / "mm_w8a8", tmp_path / "g.png"
    assert main(["compile", "--model", "mmdit-mnist", "--steps", "2", "--cfg", "2", "--pass",
                 "tap_calibration:size=8,pool_labels=4", "--pass", "quantize:preset=w8a8", "--out", str(folder)]) == 0
    report = capsys.readouterr().out
    assert "INT8 (" in report and "saved" in report
    manifest = json.loads((folder / "manifest.json").read_text())
    assert '"flow-euler"' in json.dumps(manifest) and '"sd3"' in json.dumps(manifest)
    assert main(["sample", "--compiled", str(folder), "--prompt", "a thick seven", "--out", str(grid)]) == 0
    assert grid.stat().st_size > 100 and "2 flow-matching Euler steps, guidance 2" in capsys.readouterr().out
    assert main(["sample", "--compiled", str(folder), "--sampler", "ddim", "--prompt", "a seven",
                 "--out", str(grid)]) == 2


def test_training_script_steps_checkpoints_resumes_and_writes_a_loadable_model(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    train = __import__("train_mmdit")
    argv = ["--out", str(tmp_path / "run"), "--asset", str(tmp_path / "m.safetensors"), "--log-md",
            str(tmp_path / "log.md"), "--time-budget", "600", "--warmup", "2", "--batch-size", "4", "--threads", "1"]
    train.main(train.parse_args(argv + ["--max-steps", "2"]))
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["step"] == 2
    train.main(train.parse_args(argv + ["--max-steps", "3"]))  # resumes: one more step, not three
    assert json.loads((tmp_path / "run" / "state.json").read_text())["step"] == 3
    bundle = mm.load_mmdit(tmp_path / "m.safetensors")
    assert bundle.metadata["train_steps"] == "3" and bundle.shift == 1.0
    assert "Steps so far: 3" in (tmp_path / "log.md").read_text()
    del sys.modules["train_mmdit"]
