import json

import pytest
from PIL import Image

from qc_compiler.cli import main

pytestmark = pytest.mark.slow  # whole-program runs


def test_demo_writes_grids_onnx_and_a_measured_table(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--out-dir", str(out), "--n", "10", "--steps", "3", "--text-steps", "3", "--rows", "1",
                 "--threads", "1"]) == 0
    grid = Image.open(out / "grid.png")
    assert grid.size[0] == (10 * 34 + 2) * 2  # one column per digit: 32 px + 2 px border, x2
    assert (out / "grid_fp32_vs_qandc.png").is_file() and (out / "dit_int8.onnx").stat().st_size > 100_000
    rows = json.loads((out / "demo.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["FP32 eager", "W8A8 INT8 (TAP)", "Q&C W8A8 (i2+TAP+VC)"]
    assert all(r["sec_per_sample"] > 0 and r["fid"] == r["fid"] for r in rows)
    printed = capsys.readouterr().out
    assert "W8A8 INT8 (TAP)" in printed and "Q&C W8A8" in printed
    # the text-conditioned model: FP32 beside Q&C on a prompt grid, and its rows with attribute accuracy
    assert Image.open(out / "mmdit_fp32_vs_qandc.png").size[1] == (3 * 34 + 2) * 2  # three prompt rows
    text_rows = json.loads((out / "demo_mmdit.json").read_text())["rows"]
    assert [r["variant"] for r in text_rows] == ["FP32 eager", "Q&C W8A8 (i2+TAP+VC)"]
    assert all(0 <= r["attr_attributes"] <= 1 and r["class_acc"] == r["class_acc"] for r in text_rows)
    assert "attr" in printed and "mmdit_fp32_vs_qandc.png" in printed
