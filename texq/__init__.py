"""texq: zero-shot network quantization with texture feature distribution calibration (TexQ).

Core API (no pipeline dependencies)::

    import texq
    model = texq.create_model("resnet20_cifar10", pretrained=True)
    qmodel = texq.quantize(model, texq.QuantConfig(w_bits=4, a_bits=4))
    texq.calibrate(qmodel, batches)           # range calibration: activation ranges from batches

    from texq.run import RunConfig, run       # a whole TexQ run: steps 1-3 and the final scores
    run(RunConfig.for_profile("quick", model="resnet20_cifar10", pretrained=True, data="cifar10"),
        "runs/r20")

Layers, from the ground up: ``texq.util`` (errors, files, dotted keys, devices, progress),
``texq.quant`` (the quantizer, Eq. 1-2), ``texq.models`` and ``texq.data``, ``texq.eval``;
``texq.method`` (the paper's method: texture, BNS, calibration set, generator, mixup,
fine-tuning, and ZeroQ's distillation); ``texq.run`` (a run's config, method table, file layout,
steps, figures); ``texq.pipeline`` (params.yaml and the DVC stages); ``texq.cli``.
"""

from texq.eval import EvalResult, evaluate
from texq.models import ModelInfo, create_model, get_info, list_models
from texq.quant import QuantConfig, calibrate, quantize
from texq.util.errors import TexqError

__version__ = "0.1.0"

__all__ = ["EvalResult", "ModelInfo", "QuantConfig", "TexqError", "calibrate", "create_model",
           "evaluate", "get_info", "list_models", "quantize", "__version__"]

