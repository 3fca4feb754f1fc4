"""texq export's input: a run folder's quantized model, found through the run's Layout whether the
run folder or its train/ folder is given (no ONNX needed: the fast loop)."""

from __future__ import annotations

import pytest
import torch

from texq.export import load_run
from texq.models import create_model, save_quantized
from texq.quant import QuantConfig, calibrate, quantize
from texq.util.errors import CheckpointError


def test_the_run_folder_or_its_train_folder_gives_the_same_model(tmp_path):
    torch.manual_seed(0)
    qmodel = quantize(create_model("resnet8_cifar10"), QuantConfig(w_bits=4, a_bits=4))
    calibrate(qmodel, [torch.randn(8, 3, 32, 32)], progress=False)
    (tmp_path / "run" / "train").mkdir(parents=True)
    save_quantized(tmp_path / "run" / "train" / "qmodel.pt", qmodel)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = load_run(tmp_path / "run")(x)
        b = load_run(tmp_path / "run" / "train")(x)
    assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="train/qmodel.pt not found"):
        load_run(tmp_path)
