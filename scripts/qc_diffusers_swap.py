"""A pytest plugin for running diffusers' own pipeline tests with our compiled transformer swapped in.

Every ``DiTPipeline`` those tests build gets, right after it is built, the transformer
``qc.compile_pipeline`` makes of its own (a ``QCTransformer``), exactly as docs/diffusers.md says.
Nothing of diffusers' test code is copied: this runs their suite, from a snapshot of their
repository, against us.

    QC_SWAP_PASSES="step_cache:interval=1" QC_SWAP_STEPS=2 PYTHONPATH=<qc-compiler>/scripts \\
        python -m pytest -p qc_diffusers_swap tests/pipelines/dit/test_dit.py -k "not Integration"

``QC_SWAP_PASSES``: ``;``-separated passes in the ``qc compile --pass`` spelling (empty: no passes).
``QC_SWAP_STEPS``: the step count the compiled step table follows (the tests' dummy inputs use 2).
"""
import functools
import os

import diffusers

import qc_compiler as qc
from qc_compiler.cli import parse_pass_spec

SWAPPED = {"pipelines": 0}


def _passes():
    return [parse_pass_spec(spec) for spec in os.environ.get("QC_SWAP_PASSES", "").split(";") if spec.strip()]


def _swap(init):
    @functools.wraps(init)  # diffusers reads the pipeline's components off __init__'s signature
    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if type(self.transformer).__name__ == "DiTTransformer2DModel":
            qc.compile_pipeline(self, passes=_passes(), num_inference_steps=int(os.environ.get("QC_SWAP_STEPS", "2")))
            SWAPPED["pipelines"] += 1

    return wrapped


def pytest_configure(config):
    diffusers.DiTPipeline.__init__ = _swap(diffusers.DiTPipeline.__init__)


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"qc_diffusers_swap: {SWAPPED['pipelines']} DiTPipelines got a compiled transformer "
                                f"(passes: {os.environ.get('QC_SWAP_PASSES') or 'none'})")
