"""The paper's quantizer (Eq. 1-2), fake-quantized layers and the ``quantize`` API."""

from texq.quant.api import (
    BITS,
    FULL_PRECISION,
    QuantConfig,
    QuantOptions,
    act_quantizers,
    calibrate,
    check_bits,
    quantizable_layers,
    quantize,
    set_observing,
    unquantized_layers,
)
from texq.quant.functional import (
    dequantize_eq2,
    fake_quantize,
    quantize_eq1,
    reference_fake_quantize,
    scale_and_zero_point,
)
from texq.quant.modules import ActQuantizer, QuantConv2d, QuantLinear, WeightQuantizer

__all__ = [
    "BITS", "FULL_PRECISION", "QuantConfig", "QuantOptions", "act_quantizers", "calibrate", "check_bits",
    "quantizable_layers", "quantize", "set_observing", "unquantized_layers", "dequantize_eq2",
    "fake_quantize", "quantize_eq1", "reference_fake_quantize", "scale_and_zero_point", "ActQuantizer",
    "QuantConv2d", "QuantLinear", "WeightQuantizer",
]
