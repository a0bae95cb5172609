"""Channel-wise salience balancing: move quantization difficulty between a layer's input and weight.

For a linear y = x W^T and any positive per-input-channel vector s, y = (x / s) (W s)^T exactly. A
channel whose activations are large (salient) but whose weights are small gets s > 1: its activations
shrink, so the per-tensor activation range no longer has to stretch for it, and its weights grow
into their per-row grid. With 4-bit activations that is the difference between a usable layer and a
broken one; with 8-bit activations there is little to win (measured in docs/RESULTS.md).

Three ways to choose s from the salience (absolute maximum) of each input channel, sX over the
calibration inputs and sW over the weight's column:
- ``smoothquant``: s = sX^alpha / sW^(1 - alpha), SmoothQuant's migration strength ``alpha``.
- ``ptq4dit``: PTQ4DiT's channel-wise salience balancing with Spearman-rho-guided salience
  calibration. sX is taken per sampling step t and combined as sum_t eta_t sX_t, with
  eta = softmax(-rho_t), rho_t the Spearman rank correlation of sX_t with sW: the steps whose
  activation salience is least aligned with the weight's get the most say, because there one scale
  must serve both. Then s = sqrt(sX / sW) (``alpha`` applies as in smoothquant; PTQ4DiT's is 0.5).
- ``search``: the smoothquant form with ``alpha`` searched on a grid per layer, keeping the alpha whose
  quantized output error on the calibration rows is least; s = 1 (no balancing) is a candidate, so the
  search never chooses worse than none on its own measure.

Where s goes: the weight side folds into the weights (W s is what gets quantized). The input side
folds into the quantizer the layer already runs on its input: codes = round(x / (s * a)) + z instead of
round(x / a) + z, one elementwise pass either way (measured: the same time). What it does cost on the
torch INT8 backend is the fc1 -> fc2 requantization fusion, whose oneDNN output scale is a scalar:
fc1 then writes float and fc2 quantizes it (+57% per forward on the embedded model, docs/RESULTS.md).
Backends whose INT8 op takes one scalar scale (onnx, inductor) refuse
it; folding s into the producing op (a LayerNorm affine, adaLN's scale and shift) would serve them
and is open.

Example:
    >>> _ = torch.manual_seed(0); w = torch.randn(8, 16); x = torch.randn(512, 16) * torch.logspace(-1, 1, 16)
    >>> stats = ChannelStats(16); stats.update(x, step=0)
    >>> s = balance_scales(stats, w, BalanceConfig(method="smoothquant", alpha=0.5), act_bits=4, weight_bits=4)
    >>> bool(torch.allclose((x / s) @ (w * s).T, x @ w.T, rtol=1e-4, atol=1e-4))
    True
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass
from typing import Dict, Tuple

import torch

from ..errors import CalibrationError
from ..options import check_float, check_int
from .observers import make_observer
from .qparams import fake_quantize, fake_quantize_per_token, qparams_from_range

__all__ = ["BalanceConfig", "ChannelStats", "balance_scales", "quantized_output_error", "spearman", "METHODS"]

METHODS = ("smoothquant", "ptq4dit", "search")
_FLOOR = 1e-5  # salience floor: a channel never seen non-zero must not give s = 0 or inf


@dataclass(frozen=True)
class BalanceConfig:
    """How to balance (see the module docstring). Checked when built."""

    method: str = "search"
    alpha: float = 0.5  # smoothquant/ptq4dit: the migration strength; search: ignored
    grid: int = 11  # search: alphas 0, 1/(grid-1), ..., 1
    max_rows: int = 2048  # search: input rows kept to measure each candidate's error
    # glob patterns of layer paths left unbalanced: "*.fc2" keeps the torch backend's fc1 -> fc2
    # requantization fusion, which a balanced fc2 (a vector input scale) turns off
    exclude: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"balance method must be one of {list(METHODS)}, got {self.method!r}")
        check_float("alpha", self.alpha, lo=0.0, hi=1.0)
        check_int("grid", self.grid, lo=2)
        check_int("max_rows", self.max_rows, lo=16)
        if isinstance(self.exclude, str) or not all(isinstance(p, str) and p for p in self.exclude):
            raise ValueError(f"exclude must be a list of glob patterns of layer paths, got {self.exclude!r}")
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def applies_to(self, path: str) -> bool:
        """Whether the layer at ``path`` is balanced (not matched by ``exclude``)."""
        return not any(fnmatch.fnmatchcase(path, p) for p in self.exclude)

    def options(self) -> Dict[str, object]:
        """JSON-able fields; ``exclude`` only when set, so artefacts saved before it existed read the same."""
        d = asdict(self)
        if not self.exclude:
            del d["exclude"]
        else:
            d["exclude"] = list(self.exclude)
        return d


class ChannelStats:
    """Per-input-channel absolute maxima, per sampling step, and an evenly strided sample of rows."""

    def __init__(self, in_features: int, max_rows: int = 2048):
        self.k, self.max_rows = in_features, max_rows
        self.per_step: Dict[int, torch.Tensor] = {}
        self.rows, self._kept = [], 0

    def update(self, x: torch.Tensor, step: int) -> None:
        flat = x.detach().float().reshape(-1, self.k)
        amax = flat.abs().amax(dim=0)
        self.per_step[step] = amax if step not in self.per_step else torch.maximum(self.per_step[step], amax)
        stride = max(1, flat.shape[0] // max(1, self.max_rows // 16))
        self.rows.append(flat[::stride].clone())
        self._kept += self.rows[-1].shape[0]
        if self._kept > 2 * self.max_rows:  # thin out evenly to stay bounded
            merged = torch.cat(self.rows)[::2]
            self.rows, self._kept = [merged], merged.shape[0]

    def overall(self) -> torch.Tensor:
        self._require()
        return torch.stack(list(self.per_step.values())).amax(dim=0)

    def sample(self) -> torch.Tensor:
        self._require()
        return torch.cat(self.rows)

    def _require(self) -> None:
        if not self.per_step:
            raise CalibrationError("balancing saw no calibration input: the calibration set never reached this layer")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two vectors (ties broken by position)."""
    ra = torch.argsort(torch.argsort(a)).double()
    rb = torch.argsort(torch.argsort(b)).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else 0.0


def _scales(sx: torch.Tensor, sw: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = sX^alpha / sW^(1-alpha), normalised to a geometric middle of 1 (a common factor of s
    changes nothing after quantization, but keeps the numbers tame)."""
    s = sx.clamp_min(_FLOOR).pow(alpha) / sw.clamp_min(_FLOOR).pow(1 - alpha)
    return s / (s.max() * s.min()).sqrt()


def quantized_output_error(x: torch.Tensor, weight: torch.Tensor, s: torch.Tensor, act_bits: int, weight_bits: int,
                  weight_observer: str, per_token: bool = False) -> float:
    """Relative L2 error of the balanced, fake-quantized layer on rows ``x`` (round to nearest), its
    input quantized per tensor or, with ``per_token``, per row as the layer will run."""
    xb, wb = x / s, weight * s
    if per_token:
        xq = fake_quantize_per_token(xb, act_bits)
    else:
        xq = fake_quantize(xb, qparams_from_range(xb.min(), xb.max(), act_bits, symmetric=False))
    obs = make_observer(weight_observer, weight_bits, symmetric=True, axis=0)
    obs.update(wb)
    ref = x @ weight.T
    out = xq @ fake_quantize(wb, obs.compute()).T
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))


def balance_scales(stats: ChannelStats, weight: torch.Tensor, config: BalanceConfig, *, act_bits: int,
                   weight_bits: int, weight_observer: str = "mse", per_token: bool = False) -> torch.Tensor:
    """The balancing vector s (K,) for a layer of ``weight`` (N, K) whose inputs ``stats`` saw
    (``per_token``: the search scores each candidate with the input quantized per row)."""
    w = weight.detach().float()
    sw = w.abs().amax(dim=0)
    if config.method == "smoothquant":
        return _scales(stats.overall(), sw, config.alpha)
    if config.method == "ptq4dit":
        steps = sorted(stats.per_step)
        per_step = torch.stack([stats.per_step[t] for t in steps])  # (T, K)
        rho = torch.tensor([spearman(sx_t, sw) for sx_t in per_step])
        eta = torch.softmax(-rho, dim=0)
        return _scales((eta[:, None] * per_step).sum(dim=0), sw, config.alpha)
    x, sx = stats.sample(), stats.overall()
    best = torch.ones_like(sx)
    best_err = quantized_output_error(x, w, best, act_bits, weight_bits, weight_observer, per_token)
    for i in range(config.grid):
        s = _scales(sx, sw, i / (config.grid - 1))
        err = quantized_output_error(x, w, s, act_bits, weight_bits, weight_observer, per_token)
        if err < best_err:
            best, best_err = s, err
    return best
