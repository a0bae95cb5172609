import argparse
import subprocess
import sys

import pytest
import torch
from PIL import Image

from qc_compiler.cli import build_parser, main

TINY = ["--model", "DiT-T/4", "--input-size", "16", "--in-channels", "1", "--num-classes", "10", "--threads", "1"]


def test_sample_writes_a_png_grid(tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", *TINY, "--steps", "3", "--labels", "0,1,2", "--per-label", "2", "--out", str(out)]) == 0
    img = Image.open(out)
    # 3 rows of 2 images of 16 px, 2 px borders, scaled x2
    assert img.size == ((2 * 18 + 2) * 2, (3 * 18 + 2) * 2)


def test_compile_with_passes_then_export_onnx(tmp_path, capsys):
    folder = tmp_path / "w8a8"
    assert main(["compile", *TINY, "--steps", "3", "--pass", "uniform_calibration:size=12,pool_labels=4,num_steps=3",
                 "--pass", "quantize:preset=w8a8", "--out", str(folder)]) == 0
    assert main(["export", "--compiled", str(folder), "--out", str(tmp_path / "m.onnx"), "--threads", "1"]) == 0
    assert (tmp_path / "m.onnx").stat().st_size > 10_000 and "wrote" in capsys.readouterr().out


def test_compile_zero_passes_round_trips(tmp_path, capsys):
    folder = tmp_path / "compiled"
    assert main(["compile", *TINY, "--steps", "4", "--cfg", "1.0", "--out", str(folder)]) == 0
    assert (folder / "manifest.json").is_file()
    out = tmp_path / "from_compiled.png"
    assert main(["sample", "--compiled", str(folder), "--labels", "1,2", "--out", str(out)]) == 0
    assert out.is_file()
    # nothing in it depends on the step: another step count is served as it is
    assert main(["sample", "--compiled", str(folder), "--steps", "7", "--labels", "1", "--out", str(out)]) == 0
    cached = tmp_path / "cached"
    assert main(["compile", *TINY, "--steps", "4", "--cfg", "1.0", "--pass", "step_cache:interval=2", "--out", str(cached)]) == 0
    capsys.readouterr()
    # a cache reads the step: a sampler that does not match its schedule is a one-line error, exit 2
    assert main(["sample", "--compiled", str(cached), "--steps", "7", "--labels", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("qc ")]  # the rest is the progress bar
    assert len(errors) == 1 and "was compiled for ddpm with 4 steps" in errors[0] and "Traceback" not in err


def test_compile_several_step_counts_into_one_model(tmp_path, capsys):
    folder, out = tmp_path / "two", tmp_path / "g.png"
    assert main(["compile", *TINY, "--steps", "4,6", "--cfg", "1.0", "--pass", "step_cache:interval=2",
                 "--out", str(folder)]) == 0
    assert "CompiledSchedules: 2 step tables" in capsys.readouterr().out
    for steps in ("6", "4"):
        assert main(["sample", "--compiled", str(folder), "--steps", steps, "--labels", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["sample", "--compiled", str(folder), "--steps", "5", "--labels", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "StepTable(5 steps" in err and "is not one this model was compiled for" in err and "--steps" in err
    assert main(["export", "--compiled", str(folder), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "holds one step table" in capsys.readouterr().err
    assert main(["compile", *TINY, "--steps", "4,4", "--out", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("argv, needle", [
    (["sample", "--model", "nope"], "unknown model 'nope'"),
    (["compile", "--pass", "nope", "--out", "x"], "unknown pass 'nope'"),
    (["sample", *TINY, "--labels", "12", "--steps", "2"], "out of range"),
])
def test_bad_arguments_get_one_line_errors(argv, needle, capsys, tmp_path):
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("qc ")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in err


def test_help_is_clean_for_every_command(capsys):
    proc = subprocess.run([sys.executable, "-m", "qc_compiler", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "" and "usage: qc" in proc.stdout
    for cmd in ("sample", "compile", "export", "eval", "sample-ddp", "bench", "demo"):
        with pytest.raises(SystemExit) as info:
            main([cmd, "--help"])
        out = capsys.readouterr()
        assert info.value.code == 0 and out.err == "" and f"usage: qc {cmd}" in out.out


def test_every_flag_has_help_and_pass_help_lists_every_pass_with_its_options():
    from qc_compiler.pipeline import PASS_REGISTRY

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"sample", "compile", "tune", "export", "eval", "sample-ddp", "bench", "demo"} <= set(commands)

    def walk(prog, p):  # every flag and positional of every (sub)command, nested ones (qc bench quality) too
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(f"{prog} {name}", sub)
            elif not isinstance(action, argparse._HelpAction):
                yield prog, action

    flags = list(walk("qc", parser))
    assert len(flags) > 50
    for prog, action in flags:
        assert action.help and action.help.strip(), f"{prog} {action.option_strings or action.dest}: no help"
    pass_help = next(a for a in commands["compile"]._actions if a.dest == "passes").help
    for name in PASS_REGISTRY:
        assert f"; {name}" in pass_help or f"Passes: {name}" in pass_help, name
    # each pass with its options: the ones a user types most
    for option in ("quantize[:", "preset", "weight_bits", "step_cache[:", "interval", "threshold",
                   "variance_compensation[:", "placement", "tap_calibration[:", "alpha"):
        assert option in pass_help, option


def test_argparse_rejects_bad_numbers(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["sample", "--steps", "0"])
    assert info.value.code == 2 and "must be >= 1" in capsys.readouterr().err


def test_eval_without_inception_weights_says_so(tmp_path, capsys, monkeypatch):
    import qc_compiler.cli as cli

    monkeypatch.setattr("qc_compiler.eval.evaluate", lambda images, labels: {"fid": 1.0})
    assert cli._inception_fid(None, None) is None
    assert "no local Inception weights" in capsys.readouterr().err
    import qc_compiler as qc

    with pytest.raises(qc.ArtifactError):
        cli._inception_fid(torch.zeros(2, 1, 32, 32), tmp_path / "missing.pt")


def test_bad_outputs_and_options_fail_before_any_work(tmp_path, capsys, monkeypatch):
    """One line, exit 2, and nothing compiled: the checks run before the expensive part."""
    import qc_compiler.api as api

    monkeypatch.setattr(api, "capture", lambda *a, **k: (_ for _ in ()).throw(AssertionError("compiled anyway")))
    a_file = tmp_path / "taken.txt"
    a_file.write_text("x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.md").write_text("mine")
    cases = [
        (["compile", *TINY, "--out", str(a_file)], "is not a folder"),
        (["compile", *TINY, "--out", str(tmp_path / "busy")], "is not empty"),
        (["compile", *TINY, "--pass", "step_cache:interval=2.7", "--out", str(tmp_path / "n")], "interval must be an integer"),
        (["compile", *TINY, "--pass", "quantize:preset=", "--out", str(tmp_path / "n")], "unknown preset ''"),
        (["compile", *TINY, "--pass", "quantize:preset=w8a8,weight_bits=4", "--out", str(tmp_path / "n")],
         "one of bits, preset or config"),
        (["compile", *TINY, "--backend", "onnx", "--pass", "step_cache:policy=adaptive", "--out", str(tmp_path / "n")],
         "adaptive cache policy"),
        (["export", "--compiled", str(tmp_path / "nothing"), "--out", str(tmp_path), "--threads", "1"], "is a folder"),
        (["export", "--compiled", str(tmp_path / "nothing"), "--out", str(tmp_path / "m.onnx"), "--opset", "9"],
         "opset must be in 13..20"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "n").exists()
