"""The ``qc`` command: sample, compile, eval and demo, from the shell.

    qc sample --model DiT-T/4 --input-size 16 --labels 0,1,2 --steps 20 --out grid.png
    qc compile --model dit-mnist --steps 50 --cfg 1.5 --pass tap_calibration --pass quantize --out dit_qc/
    qc tune --model dit-mnist --min-speedup 3.5 --max-fid-increase 5% --time-budget 45m --out tune/
    qc compile --recipe tune/recipe.json --out dit_tuned/
    qc export --compiled dit_qc/ --out dit_int8.onnx
    qc eval --model dit-mnist --n 1000 --out eval.json
    qc bench ablation --bits w8a8,w4a8 --steps 50,100 --cache interval=3 --n 2000 --out out/ablation.json
    qc demo
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from .errors import QCError

__all__ = ["main", "build_parser", "parse_pass_spec"]


def _labels(text: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"labels must be comma-separated integers, got {text!r}") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


_BACKEND_HELP = "torch (INT8 kernels), inductor (INT8 through torch.compile), onnx (onnxruntime) or fakequant"


def _step_counts(text: str) -> List[int]:
    counts = [_positive(part.strip()) for part in text.split(",")]
    if len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"repeats a step count: {text!r}")
    return counts


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


_seed = _non_negative  # seeds are whole numbers >= 0


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _speedup(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _fraction(text: str) -> float:
    from .tune import parse_fraction

    try:
        return parse_fraction(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _duration(text: str) -> float:
    from .tune import parse_duration

    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _backends(text: str):
    from .backends.registry import BACKENDS

    names = tuple(b.strip() for b in text.split(","))
    bad = [b for b in names if b not in BACKENDS]
    if bad or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"backends must be distinct names from {sorted(BACKENDS)}, got {text!r}")
    return names


def parse_pass_spec(spec: str):
    """``"name:key=value,key=value"`` -> a registered pass instance. Values are read as JSON, then the
    pass's typed config checks them (``interval=2.7`` is refused, not rounded)."""
    from .options import parse_options
    from .pipeline import PASS_REGISTRY

    name, _, rest = spec.partition(":")
    if name not in PASS_REGISTRY:
        raise QCError(f"unknown pass {name!r}; registered passes: {sorted(PASS_REGISTRY) or 'none'}")
    try:
        return PASS_REGISTRY[name](**parse_options(rest, f"pass {name!r}"))
    except (TypeError, ValueError) as e:
        raise QCError(f"bad options for pass {name!r}: {e}") from None


def _cache_config(text: str):
    """``--cache``: the step cache's options in the ``--pass step_cache:`` spelling (``interval=3``,
    ``policy=adaptive,threshold=0.1``)."""
    from .specs import StepCacheConfig

    try:
        return StepCacheConfig.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad cache options {text!r}: {e}") from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="dit-mnist",
                   help="embedded model (dit-mnist; mmdit-mnist, text-conditioned), config name (DiT-XL/2 .. DiT-S/8, DiT-T/4) or .safetensors path")
    p.add_argument("--ckpt", help="local facebookresearch/DiT checkpoint (.pt) or qc weights file")
    p.add_argument("--compiled", help="a folder written by `qc compile` (overrides --model)")
    p.add_argument("--input-size", type=_positive, help="image/latent size, for config names (default 32)")
    p.add_argument("--in-channels", type=_positive, help="input channels, for config names (default 4)")
    p.add_argument("--num-classes", type=_positive, help="classes, for config names (default 1000)")


def _add_sampler_args(p: argparse.ArgumentParser, several: bool = False) -> None:
    p.add_argument("--sampler", choices=["ddpm", "ddim"], help="default ddpm, or a compiled model's own")
    if several:
        p.add_argument("--steps", type=_step_counts, help="sampling steps (default 50); several, comma-separated "
                       "(20,50), compile a step table each, served by one model")
    else:
        p.add_argument("--steps", type=_positive, help="sampling steps (default 50, or a compiled model's own)")
    p.add_argument("--cfg", type=_finite, help="classifier-free guidance scale, 1 = off (default 1.5)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the per-sample noise streams (default 0)")


def _pass_help() -> str:
    """The registered passes and their options, for ``qc compile --help``."""
    import inspect

    from .pipeline import PASS_REGISTRY

    lines = []
    for name, cls in sorted(PASS_REGISTRY.items()):
        params = inspect.signature(cls.__init__).parameters.values()
        keys = [q.name for q in params if q.name not in ("self", "config") and q.kind is not q.VAR_KEYWORD]
        if any(q.kind is q.VAR_KEYWORD for q in params):  # the fields of its config, as keywords
            try:
                keys += [k for k in cls().options() if k not in keys]
            except Exception:
                keys.append("...")
        lines.append(f"{name}[:{','.join(keys)}]" if keys else name)
    return ("a registered pass and its options, NAME:key=value,key=value; repeat in schedule order. Passes: "
            + "; ".join(lines))


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the message and how to get help, not the whole usage block."""

    def error(self, message: str):  # noqa: D401
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qc", description="Compile Diffusion Transformers (quantization + cache + VC).")
    common = _Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log what the compiler does")
    common.add_argument("--threads", type=_positive, help="torch intra-op threads")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="sample a labelled PNG grid", parents=[common])
    _add_model_args(p)
    _add_sampler_args(p)
    p.add_argument("--labels", type=_labels, default=list(range(10)), help="comma-separated class labels")
    p.add_argument("--per-label", type=_positive, default=1, help="samples per label or prompt (one grid row each)")
    p.add_argument("--prompt", action="append", help="a prompt for a text-conditioned model (--model mmdit-mnist), "
                   "e.g. 'a thin right-slanted seven'; repeat for several (default: the ten digits)")
    p.add_argument("--out", type=Path, default=Path("out/grid.png"), help="the PNG to write (default out/grid.png)")

    p = sub.add_parser("compile", help="compile a model with passes and save it", parents=[common])
    _add_model_args(p)
    _add_sampler_args(p, several=True)
    p.add_argument("--pass", dest="passes", action="append", default=[], metavar="NAME[:k=v,...]",
                   help=_pass_help())
    p.add_argument("--backend", help=_BACKEND_HELP + " (default torch)")
    p.add_argument("--recipe", type=Path, help="replay a recipe.json written by `qc tune` (instead of --pass, "
                   "--steps, --cfg, --sampler, --backend); the result must equal the tuned model bit for bit")
    p.add_argument("--no-verify", action="store_true", help="with --recipe: accept a result that differs from the "
                   "tuned model (a recipe edited on purpose)")
    p.add_argument("--out", type=Path, required=True, help="folder to write")

    p = sub.add_parser("tune", help="search bits, cache, calibration, VC and backend for the fastest schedule that "
                       "keeps quality, within a time budget", parents=[common])
    _add_model_args(p)
    _add_sampler_args(p)
    p.add_argument("--min-speedup", type=_speedup, help="sampling at least this many times FP32's speed (e.g. 3.5)")
    p.add_argument("--max-fid-increase", type=_fraction, help="FID at most this much above FP32's (5%% or 0.05)")
    p.add_argument("--time-budget", type=_duration, default=2700.0, help="wall time for the search (45m, 1h, 900s; "
                   "default 45m)")
    p.add_argument("--space", choices=["default", "quick"], default="default",
                   help="default: W8A8/W4A8-GPTQ/mixed x TAP/uniform x 9 cache policies x VC; quick: a tiny one")
    p.add_argument("--backends", type=_backends, default=("torch",),
                   help="comma-separated backends to try, torch first (e.g. torch,inductor)")
    p.add_argument("--n", type=_positive, default=500, help="samples per schedule for the metric suite (default 500)")
    p.add_argument("--n-proxy", type=_positive, default=64, help="samples per candidate for the proxy (default 64)")
    p.add_argument("--batch", type=_positive, default=250, help="samples per sampling batch of the suite (default 250)")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for log.json (a rerun resumes from it), pareto.md, front.png, recipe.json, compiled/")

    p = sub.add_parser("export", help="write a compiled model as INT8 ONNX (QDQ) for onnxruntime", parents=[common])
    p.add_argument("--compiled", required=True, help="a folder written by `qc compile`")
    p.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 13..20 (default 17)")

    p = sub.add_parser("eval", help="sample and compute FID/sFID/IS/precision/recall/class accuracy", parents=[common])
    _add_model_args(p)
    _add_sampler_args(p)
    p.add_argument("--n", type=_positive, default=1000, help="number of samples (labels cycle 0..9)")
    p.add_argument("--batch-size", type=_positive, default=250, help="samples per sampling batch (default 250)")
    p.add_argument("--out", type=Path, help="write the metrics as JSON here")
    p.add_argument("--nproc", type=_positive, default=1, help="sample with N processes (torchrun, gloo/NCCL)")
    p.add_argument("--inception-weights", type=Path,
                   help="local TorchScript Inception-v3 file: also report Inception FID against held-out digits")
    p.add_argument("--shard-dir", type=Path, default=Path("out/eval_shards"), help="shard folder for --nproc")

    p = sub.add_parser("sample-ddp", help="sharded sampling over processes (launch with torchrun); resumable",
                       parents=[common])
    _add_model_args(p)
    _add_sampler_args(p)
    # --num-samples: torchrun's own parser would take "--n" for an abbreviation of its options
    p.add_argument("--num-samples", "--n", dest="n", type=_positive, default=1000,
                   help="number of samples (labels cycle 0..classes-1)")
    p.add_argument("--shard-size", type=_positive, default=50, help="samples per shard file (one batch)")
    p.add_argument("--out-dir", type=Path, required=True, help="folder for shard files (a rerun resumes there)")
    p.add_argument("--eval", action="store_true", help="rank 0 merges and computes the metric suite")
    p.add_argument("--out", type=Path, help="with --eval: write the metrics as JSON here")

    p = sub.add_parser("bench", help="quality and measured speed of compile variants (same seeds)", parents=[common])
    p.add_argument("suite", choices=["quality", "ablation"], help="quality: the --variants given; ablation: the Q&C rows")
    p.add_argument("--model", default="dit-mnist", help="the model every variant compiles (default dit-mnist)")
    p.add_argument("--variants", help="comma-separated variant names (see qc_compiler.tools.bench.VARIANTS)")
    p.add_argument("--bits", default="w8a8", help="comma-separated: w8a8,w4a8,w4a4")
    p.add_argument("--steps", default="50", help="comma-separated step counts")
    p.add_argument("--cfg", type=_finite, default=1.5, help="classifier-free guidance scale (default 1.5)")
    p.add_argument("--n", type=_positive, default=1000, help="samples per variant (default 1000)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the per-sample noise streams (default 0)")
    p.add_argument("--batch", type=_positive, default=250, help="samples per sampling batch (default 250)")
    p.add_argument("--cache", type=_cache_config, default="interval=2",
                   help="the step cache of the quant+cache rows, as step_cache options: interval=2 (default), "
                        "policy=adaptive,threshold=0.1, ...")
    p.add_argument("--calib-size", type=_positive, default=800, help="calibration-set size (default 800)")
    p.add_argument("--pool-labels", type=_positive, default=32, help="labels sampled for the calibration pool (default 32)")
    p.add_argument("--calib-seed", type=_seed, default=0,
                   help="seed of the calibration pool and draw (default 0); vary it for error bars over calibrations")
    p.add_argument("--vc", choices=["eps", "velocity", "sample"], default="sample", help="VC placement of the +VC rows (default sample)")
    p.add_argument("--backend", default="torch", help=_BACKEND_HELP)
    p.add_argument("--fp250", action="store_true", help="also time FP32 at 250 steps")
    p.add_argument("--out", type=Path, help="write all rows as JSON here")

    p = sub.add_parser("demo", help="the main job on the embedded models: grids, report", parents=[common])
    p.add_argument("--out-dir", type=Path, default=Path("out"), help="folder for the grids, ONNX file and JSON (default out)")
    p.add_argument("--n", type=_positive, default=200, help="samples for the quality table")
    p.add_argument("--steps", type=_positive, default=50, help="DDPM steps of dit-mnist (default 50)")
    p.add_argument("--text-steps", type=_non_negative, default=28,
                   help="flow-matching Euler steps of mmdit-mnist (default 28; 0 skips the text model)")
    p.add_argument("--rows", type=_positive, default=6, help="grid rows (samples of each digit)")
    p.add_argument("--calib-size", type=_positive, default=800, help="TAP calibration-set size")
    p.add_argument("--pool-labels", type=_positive, default=32, help="labels sampled for the calibration pool")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the per-sample noise streams (default 0)")
    return parser


def _sampler(args, model=None, steps=None):
    """The sampler the user asked for; unset options default to a compiled model's own."""
    from .diffusion import DDIM, DDPM

    own = getattr(model, "sampler_spec", None) or {"name": "ddpm", "steps": 50, "cfg_scale": 1.5}
    name = args.sampler or own["name"]
    steps = steps or args.steps or own["steps"]
    cfg = args.cfg if args.cfg is not None else own["cfg_scale"]
    return DDIM(steps=steps, cfg_scale=cfg) if name == "ddim" else DDPM(steps=steps, cfg_scale=cfg)


def _model(args):
    from .api import load_compiled, load_model

    if args.compiled:
        return load_compiled(args.compiled)
    if _text_model(args):
        raise QCError(f"{args.model} is text-conditioned: qc {args.command} takes class-conditional models; use "
                      f"`qc sample --model {args.model} --prompt ...`, `qc bench quality --model {args.model}` or the "
                      "Python API (docs/mmdit.md)")
    overrides = {k: getattr(args, a) for k, a in (("input_size", "input_size"), ("in_channels", "in_channels"),
                                                  ("num_classes", "num_classes")) if getattr(args, a) is not None}
    return load_model(args.ckpt or args.model, **overrides)


def cmd_sample(args) -> int:
    from .imaging import save_grid
    from .io import check_output_file

    check_output_file(args.out, "grid")
    if (not args.compiled and _text_model(args)) or (args.compiled and args.prompt):
        return _sample_prompts(args)
    if args.prompt:
        raise QCError("--prompt goes with a text-conditioned model (mmdit-mnist); "
                      f"{args.compiled or args.ckpt or args.model} takes --labels")
    model = _model(args)
    sampler = _sampler(args, model)
    labels = [label for label in args.labels for _ in range(args.per_label)]
    _check_labels(model, labels)
    t0 = time.perf_counter()
    images = sampler.sample(model, labels, seed=args.seed, progress=True)
    save_grid(images, args.out, nrow=args.per_label if args.per_label > 1 else min(len(labels), 10))
    print(f"wrote {args.out} ({len(labels)} samples, {sampler.steps} {sampler.name} steps, {time.perf_counter() - t0:.1f} s)")
    return 0


def _text_model(args) -> bool:
    """True when ``--model`` names an embedded text-conditioned model (and no --ckpt overrides it)."""
    from .models.zoo import EMBEDDED_TEXT

    return not args.ckpt and args.model in EMBEDDED_TEXT


def _refuse_sampler(args) -> None:
    """A text model samples by flow-matching Euler at its own shift: ``--sampler`` is refused before any work."""
    if args.sampler is not None:
        raise QCError("mmdit-mnist is a flow-matching model: it samples by Euler flow matching, not --sampler")


def _sample_prompts(args) -> int:
    """``qc sample --model mmdit-mnist --prompt ...`` (or ``--compiled`` a compiled one): flow-matching
    Euler at the model's shift, with guidance against the empty prompt; one grid row per prompt when
    ``--per-label`` > 1."""
    from .imaging import save_grid
    from .models.digit_text import DIGITS, describe, tokenize
    from .models.mmdit_mnist import DEFAULT_CFG, DEFAULT_STEPS, load_mmdit, sample

    _refuse_sampler(args)
    if args.labels != list(range(10)):
        raise QCError(f"{args.model} is text-conditioned: give --prompt, not --labels")
    prompts = args.prompt or [describe(d) for d in range(len(DIGITS))]
    tokenize(prompts)  # unknown words and long prompts are refused before any work
    bundle = load_mmdit()
    model, own = None, {"steps": DEFAULT_STEPS, "cfg_scale": DEFAULT_CFG}
    if args.compiled:  # a compiled mmdit-mnist (qc compile --model mmdit-mnist): its own steps and guidance
        from .api import load_compiled

        model = load_compiled(args.compiled)
        if model.build.get("adapter") != "sd3" or model.build.get("model_config", {}).get("sample_size") != \
                bundle.transformer.config.sample_size:
            raise QCError(f"{args.compiled} is not a compiled mmdit-mnist; --prompt goes with one")
        own = model.sampler_spec
    steps, cfg = args.steps or own["steps"], args.cfg if args.cfg is not None else own["cfg_scale"]
    batch = [p for p in prompts for _ in range(args.per_label)]
    t0 = time.perf_counter()
    images = sample(bundle, batch, steps=steps, cfg_scale=cfg, seed=args.seed, model=model, progress=True)
    save_grid(images, args.out, nrow=args.per_label if args.per_label > 1 else min(len(batch), 10))
    print(f"wrote {args.out} ({len(batch)} samples of {len(prompts)} prompts, {steps} flow-matching Euler steps, "
          f"guidance {cfg:g}, {time.perf_counter() - t0:.1f} s)")
    return 0


def _text_compile_inputs(args):
    """``qc compile --model mmdit-mnist``: the transformer, flow-matching samplers at its shift, and the
    90 evaluation prompts as the condition bank that calibration draws from."""
    from .models import mmdit_mnist as mm

    _refuse_sampler(args)
    bundle = mm.load_mmdit()
    cfg = args.cfg if args.cfg is not None else mm.DEFAULT_CFG
    samplers = [mm.flow_sampler(bundle, n or mm.DEFAULT_STEPS, cfg) for n in (args.steps or [None])]
    extra = {"conditions": mm.condition_bank(bundle.text_encoder, mm.prompt_table()),
             "geometry": mm.geometry(bundle.transformer)}
    return bundle.transformer, samplers, extra


def cmd_compile(args) -> int:
    from .api import compile as qc_compile
    from .distributed import barrier, init_distributed
    from .persist import check_output_folder

    check_output_folder(args.out)  # before the minutes of calibration, not after
    if args.recipe is not None:
        return _compile_recipe(args)
    if args.no_verify:
        raise QCError("--no-verify goes with --recipe")
    args.backend = args.backend or "torch"
    rank, _ = init_distributed()  # under torchrun, calibration pools are gathered by all ranks
    passes = [parse_pass_spec(s) for s in args.passes]
    extra = {}
    if _text_model(args):
        model, samplers, extra = _text_compile_inputs(args)
    else:
        model = _model(args)
        samplers = [_sampler(args, model, steps=n) for n in (args.steps or [None])]
    sampler = samplers if len(samplers) > 1 else samplers[0]
    compiled = qc_compile(model, passes=passes, sampler=sampler, backend=args.backend, seed=args.seed,
                          progress=rank == 0, **extra)
    if rank == 0:
        compiled.save(args.out)
        print(compiled.report())
        print(f"saved {args.out}")
    barrier()
    return 0


def _compile_recipe(args) -> int:
    """``qc compile --recipe``: the tuned schedule, replayed and checked bit for bit."""
    from .tune import compile_recipe, load_recipe

    given = [flag for flag, value in (("--pass", args.passes), ("--steps", args.steps), ("--cfg", args.cfg),
                                      ("--sampler", args.sampler), ("--backend", args.backend),
                                      ("--compiled", args.compiled), ("--seed", args.seed)) if value]
    if given:
        raise QCError(f"--recipe fixes the schedule; drop {', '.join(given)}")
    recipe = load_recipe(args.recipe)
    spec = recipe["model"] or {}
    if not spec and not args.ckpt:
        raise QCError("the recipe does not say which model it was tuned on (tuned from Python); give --ckpt")
    for key in ("model", "input_size", "in_channels", "num_classes"):
        setattr(args, key, spec.get(key, getattr(args, key)))
    args.ckpt = args.ckpt or spec.get("ckpt")
    compiled = compile_recipe(recipe, _model(args), verify=not args.no_verify)
    compiled.save(args.out)
    print(compiled.report())
    print(f"saved {args.out} (recipe {args.recipe}; content digest {compiled.content_digest()[:16]}"
          f"{', as tuned' if not args.no_verify else ''})")
    return 0


def cmd_tune(args) -> int:
    from .tune import TuneSpace, check_tune_folder, tune

    if args.compiled:
        raise QCError("qc tune compiles from the source model; give --model (and --ckpt), not --compiled")
    space = getattr(TuneSpace, args.space)(backends=args.backends)
    if args.min_speedup is None and args.max_fid_increase is None:
        raise QCError("give a bound: --min-speedup, --max-fid-increase, or both (e.g. --min-speedup 3.5 "
                      "--max-fid-increase 5%)")
    folder = check_tune_folder(args.out)
    model = _model(args)
    sampler = _sampler(args, model)
    result = tune(model, sampler, min_speedup=args.min_speedup, max_fid_increase=args.max_fid_increase,
                  time_budget=args.time_budget, space=space, n_proxy=args.n_proxy, n=args.n, batch=args.batch,
                  seed=args.seed, log=folder / "log.json")
    model_args = {"model": args.model, "ckpt": args.ckpt, "input_size": args.input_size,
                  "in_channels": args.in_channels, "num_classes": args.num_classes}
    written = result.write(folder, model=model_args, command="qc " + " ".join(sys.argv[1:]))
    print(result.summary())
    print(f"resumed {result.evaluated.get('resumed', 0)}, measured {result.evaluated.get('new', 0)}, "
          f"left out for time {result.evaluated.get('skipped_for_time', 0)}; wrote {', '.join(str(p) for p in written)}")
    return 0 if result.chosen is not None else 1


def cmd_export(args) -> int:
    from .api import load_compiled
    from .backends.onnx import check_opset, check_output_path

    check_output_path(args.out)
    check_opset(args.opset)
    path = load_compiled(args.compiled).export_onnx(args.out, opset=args.opset)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_eval(args) -> int:
    from .eval import evaluate

    from .io import check_output_file

    if args.out is not None:
        check_output_file(args.out, "metrics")
    if args.nproc > 1:
        return _launch_ddp_eval(args)
    model = _model(args)
    sampler = _sampler(args, model)
    labels = [i % model.num_classes for i in range(args.n)]
    from .tools.bench import sample_timed

    images, seconds = sample_timed(model, sampler, labels, seed=args.seed, batch=args.batch_size, progress=True)
    metrics = evaluate(images, torch.tensor(labels))
    metrics.update({"sampling_seconds": seconds, "steps": sampler.steps, "cfg": sampler.cfg_scale,
                    "sampler": sampler.name, "seed": args.seed})
    metrics["inception_fid"] = _inception_fid(images, args.inception_weights)
    print(json.dumps(metrics, indent=2))
    if args.out:
        from .io import save_json

        save_json(metrics, args.out)
    return 0


def _inception_fid(images, weights) -> Optional[float]:
    """Inception FID against the held-out digits when local Inception weights are given; else say so."""
    if weights is None:
        print("note: no local Inception weights given (--inception-weights); FID is the digit-classifier FID",
              file=sys.stderr)
        return None
    from .data.mnist import load_digits
    from .eval import inception_fid

    real, _ = load_digits("test")
    return inception_fid(images, real, weights)


def _launch_ddp_eval(args) -> int:
    """``qc eval --nproc N``: the same run as ``torchrun --nproc_per_node=N -m qc_compiler sample-ddp --eval``."""
    import subprocess

    forward = ["--model", args.model, "--num-samples", str(args.n), "--shard-size", str(args.batch_size),
               "--out-dir", str(args.shard_dir), "--eval", "--seed", str(args.seed)]
    for flag, value in (("--ckpt", args.ckpt), ("--compiled", args.compiled), ("--steps", args.steps),
                        ("--cfg", args.cfg), ("--sampler", args.sampler), ("--input-size", args.input_size),
                        ("--in-channels", args.in_channels), ("--num-classes", args.num_classes),
                        ("--out", args.out)):
        if value is not None:
            forward += [flag, str(value)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "qc_compiler", "sample-ddp", *forward]
    return subprocess.call(cmd)


def cmd_sample_ddp(args) -> int:
    from .distributed import barrier, init_distributed, merge_shards, sample_shards

    from .io import check_output_file, tensor_digest

    if args.out is not None:
        check_output_file(args.out, "metrics")
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise QCError(f"{args.out_dir} is a file; --out-dir names a folder for the shards")
    rank, world = init_distributed()
    model = _model(args)
    if torch.cuda.is_available() and world > 1:
        model = model.to(f"cuda:{torch.cuda.current_device()}")
    sampler = _sampler(args, model)
    labels = [i % model.num_classes for i in range(args.n)]
    # shards belong to the model's content, not its path: a recompile at the same path starts over
    model_id = model.content_digest() if hasattr(model, "content_digest") else tensor_digest(model.state_dict())
    written = sample_shards(model, sampler, labels, seed=args.seed, out_dir=args.out_dir, shard_size=args.shard_size,
                            rank=rank, world=world,
                            model_id=model_id, progress=rank == 0)
    print(f"rank {rank}/{world}: wrote {len(written)} shard(s) to {args.out_dir}")
    barrier()
    if rank == 0:
        images, ys = merge_shards(args.out_dir, sampler, labels, seed=args.seed, shard_size=args.shard_size,
                                  model_id=model_id)
        from .io import save_tensors

        save_tensors({"images": images, "labels": ys}, args.out_dir / "samples.safetensors")
        print(f"merged {len(images)} samples into {args.out_dir / 'samples.safetensors'}")
        if args.eval:
            from .eval import evaluate

            metrics = evaluate(images, ys)
            print(json.dumps(metrics, indent=2))
            if getattr(args, "out", None):
                from .io import save_json

                save_json(metrics, args.out)
    barrier()
    return 0


def cmd_bench(args) -> int:
    from .tools.bench import (VARIANTS, FP32Run, ablation_rows, machine, machine_line, markdown, run_variants,
                              unknown_variants)

    if args.variants:
        names = args.variants.split(",")
    elif args.suite == "ablation":
        names = ["fp32", "quant-uniform", "quant-tap", "cache"] + ablation_rows()
    else:
        names = ["fp32", "quant-uniform", "quant-tap"]
    unknown = unknown_variants(names)
    if unknown:
        raise QCError(unknown)
    if args.out is not None:
        from .io import check_output_file

        check_output_file(args.out, "results")
    print(machine_line(), flush=True)
    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        fp = FP32Run()  # FP32 and cache-only rows do not depend on the bit width: run them once per step count
        for i, bits in enumerate(args.bits.split(",")):
            todo = names if i == 0 else [n for n in names if not VARIANTS[n].bits_independent]
            new = run_variants(todo, model_name=args.model, n=args.n, steps=steps, cfg=args.cfg, seed=args.seed,
                               batch=args.batch, bits=bits, cache=args.cache, size=args.calib_size,
                               pool_labels=args.pool_labels, vc=args.vc, backend=args.backend, fp250=args.fp250,
                               on_row=lambda r: print(json.dumps(r), flush=True), fp=fp, calib_seed=args.calib_seed)
            rows += new
    print(markdown(rows, args.n, args.cfg))
    if args.out:
        from .io import save_json

        save_json({"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine(), "rows": rows}, args.out)
    return 0


def cmd_demo(args) -> int:
    from .tools.demo import run_demo

    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise QCError(f"{args.out_dir} is a file; --out-dir names a folder")

    run_demo(out_dir=args.out_dir, n_eval=args.n, seed=args.seed, steps=args.steps, rows=args.rows,
             calib_size=min(args.calib_size, args.pool_labels * args.steps), pool_labels=args.pool_labels)
    if args.text_steps:
        import importlib.util

        if importlib.util.find_spec("diffusers") is None:
            print("mmdit-mnist skipped: it is a diffusers model (pip install 'qc-compiler[diffusers]')")
            return 0
        from .tools.demo import run_text_demo

        run_text_demo(out_dir=args.out_dir, n_eval=args.n, seed=args.seed, steps=args.text_steps,
                      calib_size=min(args.calib_size, args.pool_labels * args.text_steps), pool_labels=args.pool_labels)
    return 0


def _check_labels(model, labels: Sequence[int]) -> None:
    n = getattr(model, "num_classes", None)
    bad = [label for label in labels if label < 0 or (n is not None and label >= n)]
    if bad:
        raise QCError(f"labels {bad} are out of range for a model with {n} classes")


COMMANDS = {"sample": cmd_sample, "compile": cmd_compile, "tune": cmd_tune, "export": cmd_export, "eval": cmd_eval, "sample-ddp": cmd_sample_ddp,
            "bench": cmd_bench, "demo": cmd_demo}


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help exits 0 (let it), a bad argument 2 (one line, already printed)
        if e.code in (0, None):
            raise
        return int(e.code)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return COMMANDS[args.command](args)
    except (QCError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        # One line, no traceback: these are the user's inputs, not our bugs.
        print(f"qc {args.command}: error: {e}".splitlines()[0], file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
