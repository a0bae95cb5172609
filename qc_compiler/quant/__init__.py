"""Quantizer core: affine quantization math, observers, configs, fake-quant modules and the specs backends lower."""
from .balance import BalanceConfig
from .brecq import BRECQConfig
from .config import PRESETS, LayerQuant, QuantConfig
from .gptq import GPTQConfig
from .fake_quant import ActQuant, QuantLinear, set_mode
from .observers import OBSERVERS, MinMaxObserver, MSEObserver, Observer, PercentileObserver, make_observer, register_observer
from .qparams import QParams, check_bits, dequantize, fake_quantize, qparams_from_range, qrange, quantize
from .spec import QuantizedActSpec, QuantizedLinearSpec, step_group

__all__ = [
    "BalanceConfig", "BRECQConfig", "GPTQConfig", "PRESETS", "LayerQuant", "QuantConfig", "ActQuant", "QuantLinear", "set_mode", "OBSERVERS", "MinMaxObserver",
    "MSEObserver", "Observer", "PercentileObserver", "make_observer", "register_observer", "QParams", "check_bits",
    "dequantize", "fake_quantize", "qparams_from_range", "qrange", "quantize", "QuantizedActSpec",
    "QuantizedLinearSpec", "step_group",
]
