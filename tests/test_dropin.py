"""A compiled transformer is a drop-in for diffusers: eval(), dtypes, save/load through the pipeline,
outputs, batch consistency, callbacks, and the model API refusals. Written by us; offline."""
import json

import numpy as np
import pytest
import torch

import qc_compiler as qc
from qc_compiler.passes import Quantize, StepCache, UniformCalibration

diffusers = pytest.importorskip("diffusers")
from test_diffusers import run, tiny_pipeline, tiny_transformer  # noqa: E402


def compiled_pipe(passes=None, steps=5, cfg=2.0):
    pipe = tiny_pipeline()
    ref = run(pipe)
    compiled = qc.compile_pipeline(pipe, passes=[StepCache(interval=1)] if passes is None else passes,
                                   num_inference_steps=steps, guidance_scale=cfg)
    return pipe, compiled, ref


@pytest.fixture(scope="module")
def shared():
    """One compiled pipeline for the tests that leave it as they found it (each compile exports twice)."""
    return compiled_pipe()


def test_eval_is_a_no_op_and_train_is_refused(shared):
    pipe, compiled, ref = shared
    assert pipe.transformer.eval() is pipe.transformer and compiled.eval() is compiled
    assert pipe.transformer.train(False) is pipe.transformer and not pipe.transformer.training
    np.testing.assert_array_equal(run(pipe), ref)
    for module in (pipe.transformer, compiled):
        with pytest.raises(qc.QCError, match="for inference"):
            module.train()


@pytest.mark.parametrize("variant", [None, "int8"])
def test_save_pretrained_round_trips_the_compiled_transformer(variant, tmp_path):
    passes = [StepCache(interval=2), UniformCalibration(size=12, pool_labels=4), Quantize(preset="w8a8")]
    pipe, compiled, _ = compiled_pipe(passes)
    images = run(pipe)
    pipe.save_pretrained(tmp_path / "pipe", variant=variant)
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["transformer"] == ["qc_compiler.models.diffusers_model", "QCTransformer"]  # not [null, null]
    artefact = f"qc.{variant}" if variant else "qc.compiled"
    assert (tmp_path / "pipe" / "transformer" / artefact / "manifest.json").is_file()
    loaded = diffusers.DiTPipeline.from_pretrained(tmp_path / "pipe", variant=variant)
    assert type(loaded.transformer).__name__ == "QCTransformer" and loaded.transformer.config.sample_size == 8
    np.testing.assert_array_equal(run(loaded), images)  # bit-identical images after the round trip
    # every byte is still checked on the way in
    manifest = tmp_path / "pipe" / "transformer" / artefact / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"interval": 2', '"interval": 3'))
    with pytest.raises(qc.ArtifactError, match="digest"):
        diffusers.DiTPipeline.from_pretrained(tmp_path / "pipe", variant=variant)


def test_to_dtype_compiles_again_and_a_half_model_compiles():
    pipe, compiled, ref = compiled_pipe()
    pipe.to(dtype=torch.float16)
    assert pipe.transformer.dtype == torch.float16 and pipe.transformer.compiled is not compiled
    half = run(pipe)
    assert np.abs(half - ref).max() < 0.05  # float16 weights: close, not equal
    assert pipe.transformer.to("cpu") is pipe.transformer  # same device and dtype: nothing to do
    # a float16 transformer, as from_pretrained(torch_dtype=...) gives, compiles directly
    transformer, sampler = tiny_transformer().to(torch.bfloat16), qc.DDPM(steps=3, cfg_scale=1.5)
    cm = qc.compile(transformer, passes=[UniformCalibration(size=12, pool_labels=4), Quantize(preset="w8a8")],
                    sampler=sampler)
    assert cm.dtype == torch.bfloat16 and torch.isfinite(sampler.sample(cm, [1, 2], seed=0)).all()


def test_outputs_batches_and_callbacks_behave_as_diffusers(shared):
    pipe, compiled, ref = shared
    x, t, y = torch.randn(4, 4, 8, 8), torch.full((4,), int(pipe.scheduler.timesteps[0])), torch.tensor([1, 2, 3, 4])
    as_dict, as_tuple = pipe.transformer(x, timestep=t, class_labels=y), pipe.transformer(x, t, y, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_dict.sample, as_tuple[0])
    single = pipe.transformer(x[:1], timestep=t[:1], class_labels=y[:1]).sample
    assert torch.allclose(single, as_dict.sample[:1], atol=1e-5)  # batch consistency
    # DiTPipeline takes no step callbacks; a forward hook sees every call, in the scheduler's order
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(float(kwargs["timestep"].reshape(-1)[0])),
                                                        with_kwargs=True)
    images, = pipe(class_labels=[1, 2], num_inference_steps=5, guidance_scale=2.0, output_type="np", return_dict=False,
                   generator=torch.Generator().manual_seed(0))
    handle.remove()
    assert seen == [float(t) for t in pipe.scheduler.timesteps] and compiled.step_state.step == 4
    np.testing.assert_array_equal(images, ref)


def test_what_cannot_apply_is_refused_with_the_reason(shared):
    pipe, _, _ = shared
    for method, reason in [("set_attn_processor", "compile"), ("enable_cache", "StepCache"),
                           ("enable_layerwise_casting", "dtype"), ("enable_gradient_checkpointing", "inference"),
                           ("load_lora_adapter", "fused into the source model")]:
        with pytest.raises(qc.QCError, match=reason):
            getattr(pipe.transformer, method)(None)


# DPM++ (DPMSolverMultistepScheduler) runs through the PixArt and Sana pipelines in test_families.py
@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "DDPMScheduler"])
def test_any_scheduler_with_integer_or_fractional_timesteps(scheduler, tmp_path):
    def seeded_run(p):  # DiTPipeline's ancestral schedulers draw noise from the global generator
        torch.manual_seed(0)
        return run(p)

    pipe = tiny_pipeline_with(scheduler)
    ref = seeded_run(pipe)
    compiled = qc.compile_pipeline(pipe, passes=[StepCache(interval=1)], num_inference_steps=5, guidance_scale=2.0)
    assert compiled.timesteps == [t.item() for t in pipe.scheduler.timesteps]
    np.testing.assert_array_equal(seeded_run(pipe), ref)  # the table matched every call, float or int
    cached = qc.compile_pipeline(tiny_pipeline_with(scheduler), passes=[StepCache(interval=2),
                                 UniformCalibration(size=8, pool_labels=4), Quantize(preset="w8a8")],
                                 num_inference_steps=5, guidance_scale=2.0)
    cached.save(tmp_path / "m")  # the pipeline's scheduler travels in the sampler spec
    again = qc.load_compiled(tmp_path / "m")
    assert again.timesteps == cached.timesteps and again.sampler_spec["scheduler"]["class"] == scheduler


def tiny_pipeline_with(scheduler):
    pipe = tiny_pipeline()
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    return pipe


def run_steps(pipe, n):
    return pipe(class_labels=[1, 2], num_inference_steps=n, guidance_scale=2.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def test_one_compiled_transformer_serves_several_step_counts(tmp_path):
    # DPM++'s step counts all start at 999, so the transformer asks the pipeline's scheduler which
    # table a run is on (tables with distinct first timesteps: test_schedules.py)
    scheduler = "DPMSolverMultistepScheduler"

    def passes():  # the cache's schedule is per table; calibration per table: tests/test_schedules.py
        return [StepCache(interval=2)]

    pipe = tiny_pipeline_with(scheduler)
    multi = qc.compile_pipeline(pipe, passes(), num_inference_steps=[4, 5], guidance_scale=2.0)
    assert isinstance(multi, qc.CompiledSchedules)
    images = {n: run_steps(pipe, n) for n in (5, 4)}
    assert not np.array_equal(images[4][:, :, :, :1], images[5][:, :, :, :1])
    for n in (4, 5):  # each run was served by its own count's table (test_schedules: it equals a lone compile)
        multi.select(n)
        np.testing.assert_array_equal(run_steps(pipe, n), images[n])
    multi.select(None)
    with pytest.raises(qc.StepError, match="compile_pipeline\\(num_inference_steps=\\[\\.\\.\\.\\]\\)"):
        run_steps(pipe, 6)
    pipe.save_pretrained(tmp_path / "pipe")  # one artefact, both tables
    loaded = diffusers.DiTPipeline.from_pretrained(tmp_path / "pipe")
    with pytest.raises(qc.StepError, match="bind_pipeline"):
        run_steps(loaded, 4)  # 999 starts both tables, and nothing told the loaded model which
    qc.bind_pipeline(loaded)
    for n in (4, 5):
        np.testing.assert_array_equal(run_steps(loaded, n), images[n])


def test_model_cpu_offload_keeps_the_compiled_transformer():
    pytest.importorskip("accelerate")
    pipe, compiled, ref = compiled_pipe()
    # CI has no accelerator: offload to the CPU itself, which runs accelerate's hooks on every component
    pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.transformer, "_hf_hook")
    np.testing.assert_array_equal(run(pipe), ref)
    assert pipe.transformer.compiled is compiled  # the hooks' moves to the same device compile nothing


def test_a_missing_artefact_is_an_os_error_and_refused_attributes_are_absent(shared, tmp_path):
    pipe, _, _ = shared
    assert not hasattr(pipe.transformer, "attn_processors")  # diffusers code probes with hasattr
    with pytest.raises(qc.QCError, match="compiled into the graph"):
        pipe.transformer.attn_processors
    with pytest.raises(qc.QCError, match="max_shard_size"):  # refused, not silently ignored
        pipe.transformer.save_pretrained(tmp_path / "t", max_shard_size="1MB")
    pipe.transformer.save_pretrained(tmp_path / "t", safe_serialization=False)  # as some pipelines pass it
    assert {p.suffix for p in (tmp_path / "t").rglob("*") if p.is_file()} == {".json", ".safetensors"}  # no pickle
    with pytest.raises(OSError, match="qc.fp16/ is missing"):  # what diffusers' loaders raise for a missing file
        type(pipe.transformer).from_pretrained(tmp_path / "t", variant="fp16")
