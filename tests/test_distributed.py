import json
import os
import subprocess
import sys

import pytest
import torch

from qc_compiler.cli import main
from qc_compiler.io import load_tensors
from qc_compiler.models.dit import DiT_models
from qc_compiler.models.zoo import save_model_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = DiT_models["DiT-T/4"](input_size=32, in_channels=1, num_classes=10)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_model_weights(model, path)
    return str(path)


def args(weights, out_dir, *extra):
    return ["sample-ddp", "--model", weights, "--num-samples", "10", "--shard-size", "3", "--steps", "3", "--cfg", "1.5",
            "--out-dir", str(out_dir), "--threads", "1", *extra]


def torchrun(nproc, argv):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "qc_compiler", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def merged(out_dir):
    return load_tensors(out_dir / "samples.safetensors")[0]


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_bit_for_bit(weights, tmp_path):
    assert main(args(weights, tmp_path / "one")) == 0
    proc = torchrun(2, args(weights, tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rank 1/2: wrote 2 shard(s)" in proc.stdout and "rank 0/2: wrote 2 shard(s)" in proc.stdout
    one, two = merged(tmp_path / "one"), merged(tmp_path / "two")
    assert one["images"].shape == (10, 1, 32, 32)
    assert torch.equal(one["images"], two["images"]) and torch.equal(one["labels"], two["labels"])


def test_a_rerun_resumes_without_losing_or_duplicating(weights, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(weights, out)) == 0
    full = merged(out)
    shards = sorted(out.glob("shard_*.safetensors"))
    assert len(shards) == 4
    kept = shards[0].stat().st_mtime_ns
    shards[2].unlink()  # the job was killed before these were written ...
    shards[3].unlink()
    shards[1].write_bytes(shards[1].read_bytes()[:100])  # ... and this one is damaged
    capsys.readouterr()
    assert main(args(weights, out)) == 0
    assert "wrote 3 shard(s)" in capsys.readouterr().out
    assert shards[0].stat().st_mtime_ns == kept  # done work is not redone
    again = merged(out)
    assert torch.equal(again["images"], full["images"]) and torch.equal(again["labels"], full["labels"])
    assert main(args(weights, out, "--seed", "1")) == 0  # another run's shards are never reused
    assert "wrote 4 shard(s)" in capsys.readouterr().out


def test_shards_follow_the_models_content_and_the_sampler_not_the_path(weights, tmp_path, capsys):
    import shutil

    path, out = tmp_path / "model.safetensors", tmp_path / "run"
    shutil.copy(weights, path)
    assert main(args(str(path), out)) == 0 and "wrote 4 shard(s)" in capsys.readouterr().out
    assert main(args(str(path), out)) == 0 and "wrote 0 shard(s)" in capsys.readouterr().out  # all reused
    torch.manual_seed(1)  # retrained or recompiled at the same path: another model, its own shards
    save_model_weights(DiT_models["DiT-T/4"](input_size=32, in_channels=1, num_classes=10), path)
    assert main(args(str(path), out)) == 0 and "wrote 4 shard(s)" in capsys.readouterr().out
    assert main(args(str(path), out, "--sampler", "ddim")) == 0 and "wrote 4 shard(s)" in capsys.readouterr().out


@pytest.mark.slow
def test_eval_nproc_launches_torchrun_and_scores_once(weights, tmp_path):
    out = tmp_path / "metrics.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "qc_compiler", "eval", "--model", weights, "--n", "6", "--steps", "2",
                           "--batch-size", "3", "--nproc", "2", "--shard-dir", str(tmp_path / "shards"),
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads(out.read_text())
    assert {"fid", "sfid", "is", "precision", "recall", "class_acc"} <= metrics.keys()
    assert proc.stdout.count('"fid"') == 1  # computed on rank 0 only


@pytest.mark.slow
def test_calibration_pool_collection_shards_over_ranks(weights, tmp_path):
    compile_args = ["compile", "--model", weights, "--steps", "3", "--cfg", "1.5", "--threads", "1",
                    "--pass", "uniform_calibration:size=12,pool_labels=6,batch=2,num_steps=3", "--pass", "quantize"]
    assert main([*compile_args, "--out", str(tmp_path / "one")]) == 0
    proc = torchrun(2, [*compile_args, "--out", str(tmp_path / "two")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = load_tensors(tmp_path / "one" / "fitted.safetensors")[0], load_tensors(tmp_path / "two" / "fitted.safetensors")[0]
    assert one.keys() == two.keys() and "calibration.set.x" in one
    for key in one:
        assert torch.equal(one[key], two[key]), key  # same pool, same selection, same ranges
