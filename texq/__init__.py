"""texq: zero-shot network quantization with texture feature distribution calibration (TexQ).

Core API (no pipeline dependencies)::

    import texq
    model = texq.create_model("resnet20_cifar10", pretrained=True)
    qmodel = texq.quantize(model, texq.QuantConfig(w_bits=4, a_bits=4))
    texq.calibrate(qmodel, batches)
"""

from texq.errors import TexqError
from texq.eval import EvalResult, evaluate
from texq.models import ModelInfo, create_model, get_info, list_models
from texq.quant import QuantConfig, calibrate, quantize

__version__ = "0.1.0"

__all__ = ["EvalResult", "ModelInfo", "QuantConfig", "TexqError", "calibrate", "create_model",
           "evaluate", "get_info", "list_models", "quantize", "__version__"]
