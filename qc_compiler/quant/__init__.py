"""Quantizer core: affine quantization math, observers, configs and fake-quant modules."""
from .config import PRESETS, LayerQuant, QuantConfig
from .fake_quant import ActQuant, QuantLinear
from .observers import OBSERVERS, MinMaxObserver, MSEObserver, Observer, PercentileObserver, make_observer, register_observer
from .qparams import QParams, check_bits, dequantize, fake_quantize, qparams_from_range, qrange, quantize

__all__ = [
    "PRESETS", "LayerQuant", "QuantConfig", "ActQuant", "QuantLinear", "OBSERVERS", "MinMaxObserver", "MSEObserver",
    "Observer", "PercentileObserver", "make_observer", "register_observer", "QParams", "check_bits", "dequantize",
    "fake_quantize", "qparams_from_range", "qrange", "quantize",
]
