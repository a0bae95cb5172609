import numpy as np
import pytest
import torch

import qc_compiler as qc
from qc_compiler.graph import find_branch_regions, find_linears, graph_flavour
from qc_compiler.passes import Quantize, StepCache, TAPCalibration, VarianceCompensation
from qc_compiler.passes.cache import CacheLookup
from qc_compiler.quant import QuantLinear

diffusers = pytest.importorskip("diffusers")
from qc_compiler.models.adapters.diffusers_dit import (DIFFUSERS_DIT, DiffusersDiT,  # noqa: E402
                                                       load_diffusers_transformer, pipeline_transformer,
                                                       sampler_for_scheduler)


def tiny_transformer(sample_size=8):
    torch.manual_seed(0)
    t = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=sample_size, patch_size=2, num_embeds_ada_norm=1000)
    with torch.no_grad():  # adaLN-Zero init would make every block an identity
        for name, p in t.named_parameters():
            if "norm1.linear" in name or "proj_out" in name:
                p.normal_(0, 0.05)
    return t.eval()


def test_capture_falls_back_to_export_and_finds_blocks():
    model = DiffusersDiT(tiny_transformer())
    gm = qc.capture(model, example_inputs=DIFFUSERS_DIT.example_inputs(DIFFUSERS_DIT.info(model)))
    assert graph_flavour(gm) == "export"
    x, t, y = torch.randn(3, 4, 8, 8), torch.full((3,), 500.0), torch.tensor([1, 2, 1000])  # float t, as captured
    assert torch.equal(gm(x, t, y), model(x, t, y))
    names = [r.qualname for r in find_branch_regions(gm, DIFFUSERS_DIT.blocks)]
    assert names == [f"transformer.transformer_blocks.{i}.{b}" for i in range(2) for b in ("attn", "mlp")]
    assert any(s.path.endswith("attn1.to_q") for s in find_linears(gm))


def test_qandc_passes_compile_a_diffusers_dit():
    model, sampler = DiffusersDiT(tiny_transformer()), qc.DDPM(steps=6, cfg_scale=1.5)
    ref = sampler.sample(model, [1, 2, 3], seed=0)
    exact = qc.compile(model, passes=[StepCache(interval=1)], sampler=sampler)
    assert torch.equal(sampler.sample(exact, [1, 2, 3], seed=0), ref)
    cm = qc.compile(model, passes=[StepCache(interval=2), TAPCalibration(clusters=5, size=20, pool_labels=4),
                                   Quantize(weight_bits=8, act_bits=8), VarianceCompensation(batch=4)], sampler=sampler, backend="fakequant")
    assert sum(isinstance(m, CacheLookup) for m in cm.graph_module.modules()) == 4
    quantized = {m.path: m for m in cm.graph_module.modules() if isinstance(m, QuantLinear)}
    assert len(quantized) >= 16
    # diffusers' conditioning linears (AdaLayerNormZero, its embedder, proj_out_1) are weight-only
    conditioning = {p for p in quantized if ".norm1." in p or p.endswith("proj_out_1")}
    assert any(p.endswith("proj_out_1") for p in conditioning)
    assert conditioning and all(quantized[p].weight_only == (p in conditioning) for p in quantized)
    out = sampler.sample(cm, [1, 2, 3], seed=0)
    assert 0.002 < float((out - ref).norm() / ref.norm()) < 0.016  # measured 0.0079; 2x margin


def test_int8_onnx_export_of_a_cached_diffusers_dit(tmp_path):
    from qc_compiler.backends.onnx import OrtDenoiser, optimized_op_counts

    model, sampler = DiffusersDiT(tiny_transformer()), qc.DDPM(steps=4, cfg_scale=1.5)
    cm = qc.compile(model, passes=[StepCache(interval=2), TAPCalibration(clusters=5, size=20, pool_labels=4),
                                   Quantize(weight_bits=8, act_bits=8)], sampler=sampler)
    path = cm.export_onnx(tmp_path / "dit.onnx")
    ort = OrtDenoiser(path, threads=1)
    a, b = sampler.sample(cm, [1, 2, 3], seed=0), sampler.sample(ort, [1, 2, 3], seed=0)  # batch 6 != traced 2
    assert float((a - b).norm() / a.norm()) < 1e-4
    assert optimized_op_counts(path).get("MatMulIntegerToFloat", 0) >= 12


def tiny_pipeline():
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  norm_num_groups=32, sample_size=16).eval()
    return diffusers.DiTPipeline(transformer=tiny_transformer(), vae=vae, scheduler=diffusers.DDIMScheduler())


def run(pipe):
    return pipe(class_labels=[1, 2], num_inference_steps=5, guidance_scale=2.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def test_compiled_transformer_plugs_back_into_the_pipeline():
    pipe = tiny_pipeline()
    ref = run(pipe)
    original = pipe.transformer
    sampler = sampler_for_scheduler(pipe.scheduler, 5, 2.0)
    assert sampler.timesteps == [int(t) for t in pipe.scheduler.timesteps]
    compiled = qc.compile(DiffusersDiT(original), passes=[StepCache(interval=1)], sampler=sampler)
    pipe.transformer = pipeline_transformer(compiled, original)
    np.testing.assert_array_equal(run(pipe), ref)  # same call signature, same output type, same images
    assert compiled.step_state.step == 4  # the step context followed the scheduler's 5 timesteps
    cached = qc.compile(DiffusersDiT(original), passes=[StepCache(interval=2)], sampler=sampler)
    pipe.transformer = pipeline_transformer(cached, original)
    run(pipe)
    assert cached.step_state.store("cache")["computed"].keys() == {0, 2, 4}


def test_local_folder_loading(tmp_path):
    t = tiny_transformer()
    t.save_pretrained(tmp_path / "pipe" / "transformer", safe_serialization=True)
    loaded = load_diffusers_transformer(tmp_path / "pipe")
    x, ts, y = torch.randn(2, 4, 8, 8), torch.full((2,), 10), torch.tensor([0, 1])
    assert torch.equal(loaded(x, ts, y), DiffusersDiT(t)(x, ts, y))
    with pytest.raises(qc.ArtifactError, match="not a diffusers transformer folder"):
        load_diffusers_transformer(tmp_path)


def test_a_raw_diffusers_dit_compiles_saves_and_reloads_without_a_wrapper(tmp_path):
    transformer, sampler = tiny_transformer(), qc.DDPM(steps=4, cfg_scale=1.5)
    assert qc.adapter_for(transformer) is DIFFUSERS_DIT
    exact = qc.compile(transformer, passes=[StepCache(interval=1)], sampler=sampler)
    ref = sampler.sample(DiffusersDiT(transformer), [1, 2], seed=0)
    assert torch.equal(sampler.sample(exact, [1, 2], seed=0), ref)
    cm = qc.compile(transformer, passes=[StepCache(interval=2), TAPCalibration(clusters=4, size=12, pool_labels=4),
                                         Quantize(preset="w8a8")], sampler=sampler)
    assert cm.build["adapter"] == "diffusers-dit" and cm.build["model_config"]["num_layers"] == 2
    cm.save(tmp_path / "m")
    again = qc.load_compiled(tmp_path / "m")
    assert torch.equal(sampler.sample(again, [3], seed=1), sampler.sample(cm, [3], seed=1))
    # the cache report counts the diffusers blocks' FLOPs (the block pattern is the adapter's)
    from qc_compiler.passes.cache import skipped_flops_fraction

    sampler.sample(cm, [3], seed=1)
    assert 0.3 < skipped_flops_fraction(cm) < 0.5 and "block FLOPs skipped: " in cm.report()


def test_compile_pipeline_puts_the_compiled_transformer_back():
    pipe = tiny_pipeline()
    ref = run(pipe)
    compiled = qc.compile_pipeline(pipe, passes=[StepCache(interval=1)], num_inference_steps=5, guidance_scale=2.0)
    np.testing.assert_array_equal(run(pipe), ref)
    assert compiled.step_state.step == 4 and pipe.transformer.compiled is compiled
