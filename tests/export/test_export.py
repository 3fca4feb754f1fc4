"""``texq export --small``: ONNX QDQ graphs, checked against texq's fake-quantized model under ONNX Runtime
and against hand-worked and independently computed values."""

from __future__ import annotations

import contextlib
import io
import json
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch.utils.data import DataLoader

import texq
from texq.cli import main
from texq.data import gaussian_batches, load_eval_data
from texq.export import export_onnx, load_run, to_onnx
from texq.export.graph import OPSET, act_nodes, float_graph, match_layers
from texq.export.qparams import (
    CLIPPED_ACT_TYPES,
    WEIGHT_TYPES,
    act_qdq,
    float_model,
    integer_type,
    quantized_layers,
)
from texq.export.runtime import check_agreement, session
from texq.models import create_model
from texq.quant import (
    ActQuantizer,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    calibrate,
    quantize,
)
from texq.quant.functional import static_fake_quantize, static_qparams
from texq.run.config import RunConfig
from texq.run.runner import run
from texq.util.errors import ExportError


def calibrated(model, **cfg):
    q = quantize(model, QuantConfig(**cfg))
    calibrate(q, gaussian_batches(model.texq_info, n_batches=2, batch_size=32))
    return q


def layers_of(qmodel):
    return [(n, m) for n, m in qmodel.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))]


def check_on_test1000(path, qmodel, data, record_property) -> None:
    """The acceptance bar: >= 99.5% same predictions, top-1 within 0.2 points; the figures are
    printed (pytest -s) and recorded as the test's properties (--junitxml)."""
    res = check_agreement(session(path), qmodel, DataLoader(data, batch_size=500))
    print(f"\n{path.name}: {res}")
    for key, value in res.to_dict().items():
        record_property(key, value)
    assert res.n == 1000 and res.agreement >= 99.5
    assert abs(res.onnx_top1 - res.texq_top1) <= 0.2
    assert np.isfinite(res.max_abs_logit_diff) and res.mean_abs_logit_diff < 0.05


# --- runs: texq run (tiny profile) -> texq export -----------------------------------------------

@pytest.fixture(scope="module", params=[(4, "texq"), (3, "zeroq")], ids=["W4A4", "W3A3"])
def tiny_export(request, tiny_setup, tmp_path_factory):
    """A tiny-profile run of the random-init ResNet-8 (TexQ at W4A4; ZeroQ, the fastest, at W3A3)
    exported by the CLI: (run dir, .onnx file, bits, the CLI's JSON line)."""
    ckpt, data, _ = tiny_setup
    bits, method = request.param
    root = tmp_path_factory.mktemp(f"run-w{bits}")
    cfg = RunConfig.for_profile("tiny", model="resnet8_cifar10", checkpoint=str(ckpt),
                                data=str(data), device="cpu", w_bits=bits, a_bits=bits,
                                method=method)
    run(cfg, root / "run", progress=False)
    dest = root / "out" / "model.onnx"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["export", str(root / "run"), "--onnx", str(dest), "--check-data", str(data), "--small"])
    assert rc == 0
    return root / "run", dest, bits, json.loads(stdout.getvalue().strip().splitlines()[-1])


@pytest.mark.integration
def test_cli_exports_a_run(tiny_export):
    run_dir, dest, bits, res = tiny_export
    assert not [p for p in dest.parent.iterdir() if p.name != dest.name]  # no temp file left
    proto = onnx.load(dest)
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert (meta["texq.w_bits"], meta["texq.a_bits"], meta["texq.model"]) == (
        str(bits), str(bits), "resnet8_cifar10")
    ops = [n.op_type for n in proto.graph.node]
    n_layers = len(layers_of(load_run(run_dir)))
    assert ops.count("Conv") + ops.count("Gemm") == n_layers == 10
    assert ops.count("QuantizeLinear") == n_layers - 1  # the raw image is not quantized
    assert ops.count("DequantizeLinear") == 2 * n_layers - 1
    assert ops.count("BatchNormalization") == 9  # BN left unfolded
    assert ops.count("Clip") == n_layers - 1  # b < 8: codes clipped at 2^b - 1 before UINT8
    assert {o.domain: o.version for o in proto.opset_import}[""] == OPSET
    # the JSON line
    assert (res["command"], res["w_bits"], res["a_bits"], res["layers"]) == ("export", bits, bits, 10)
    assert res["bytes"] == dest.stat().st_size and res["onnx"] == str(dest)
    assert res["weight_types"] == {"UINT4": 10}
    assert res["input_types"] == {"UINT8+Clip": 9}
    check = res["check"]
    assert check["n"] == 40 and check["agreement"] >= 97.5
    assert check["onnx_top1"] == pytest.approx(check["texq_top1"], abs=2.5)
    assert check["max_abs_logit_diff"] < 0.5


@pytest.mark.integration
@pytest.mark.assets
def test_exported_run_agrees_on_test1000(tiny_export, test1000, record_property):
    run_dir, dest, _, _ = tiny_export
    qmodel = load_run(run_dir)
    check_on_test1000(dest, qmodel, load_eval_data(str(test1000), qmodel.texq_info),
                      record_property)


@pytest.mark.integration
@pytest.mark.assets
@pytest.mark.parametrize("bits", [4, 3], ids=["W4A4", "W3A3"])
def test_shared_resnet20_run_agrees_on_test1000(shared_checkpoint, test1000, test1000_data,
                                                tmp_path, bits, record_property):
    """A TexQ run (tiny profile) of the pretrained ResNet-20, exported and checked."""
    cfg = RunConfig.for_profile("tiny", model="resnet20a_cifar10", checkpoint=str(shared_checkpoint),
                                data=str(test1000), device="cpu", w_bits=bits, a_bits=bits)
    run(cfg, tmp_path / "run", progress=False)
    qmodel = load_run(tmp_path / "run")
    summary = export_onnx(qmodel, tmp_path / "r20.onnx", "small")
    assert summary.layers == 20 and summary.weight_types == {"UINT4": 20}
    check_on_test1000(tmp_path / "r20.onnx", qmodel, test1000_data, record_property)
    fast = export_onnx(qmodel, tmp_path / "r20-fast.onnx")
    assert fast.ops == {"QLinearConv": 9, "Conv": 10, "MatMulInteger": 1}, fast.ops
    check_on_test1000(tmp_path / "r20-fast.onnx", qmodel, test1000_data, record_property)


# --- unit checks against independent computations ------------------------------------------------

@pytest.fixture(scope="module")
def r8_mixed():
    """A random-init ResNet-8 quantized W3A3 with an 8-bit first and last layer, and its ONNX.
    One output channel of the first conv is all positive and one all negative, and so is one of
    the next conv's: their zero points lie outside 0..2^b - 1."""
    torch.manual_seed(0)
    model = create_model("resnet8_cifar10")
    with torch.no_grad():
        for conv in (model.features.init_block.conv, model.features.stage1.unit1.body.conv1.conv):
            conv.weight[0] = conv.weight[0].abs() + 0.05
            conv.weight[1] = -conv.weight[1].abs() - 0.05
    qmodel = calibrated(model, w_bits=3, a_bits=3, first_layer_bits=8, last_layer_bits=8)
    proto = to_onnx(qmodel, "small")[0]
    return qmodel, proto


def _weights_under_ort(proto, names):
    """The DequantizeLinear outputs of ``names``' weights, computed by ONNX Runtime."""
    g = helper.make_graph([n for n in proto.graph.node if n.name in
                           {f"{k}.weight_dequantize" for k in names}], "weights", [],
                          [helper.make_tensor_value_info(f"{k}.weight", onnx.TensorProto.FLOAT, None)
                           for k in names], list(proto.graph.initializer))
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    return dict(zip(names, session(model.SerializeToString()).run(None, {})))


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_weight_codes_dequantize_to_texq_weights_exactly(per_channel, r8_mixed):
    qmodel, proto = r8_mixed
    if not per_channel:
        qmodel = calibrated(create_model("resnet8_cifar10"), w_bits=4, a_bits=4, per_channel=False)
        proto = to_onnx(qmodel, "small")[0]
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    layers = layers_of(qmodel)
    under_ort = _weights_under_ort(proto, [n for n, _ in layers])
    for name, layer in layers:
        codes = inits[f"{name}.weight_codes"].astype(np.int64)
        scale, zp = inits[f"{name}.weight_scale"], inits[f"{name}.weight_zero_point"].astype(np.int64)
        bits = layer.weight_quant.bits
        # Eq. 1 computed here from the raw weights: S = (2^b - 1) / (max - min), ZP = round(min*S)
        # (in float32 as torch evaluates ``int / tensor``: tensor.reciprocal() * int)
        w = layer.weight.detach().numpy()
        flat = w.reshape(len(w), -1) if per_channel else w.reshape(1, -1)
        lo, hi = flat.min(1), flat.max(1)
        s = (np.float32(1) / (hi - lo)) * np.float32(2 ** bits - 1)
        expect_zp = -np.round(lo * s).astype(np.int64)
        assert np.array_equal(zp.reshape(-1), expect_zp) and np.array_equal(
            scale.reshape(-1), np.float32(1) / s)
        assert codes.min() >= 0 and codes.max() <= 2 ** bits - 1 and codes.shape == w.shape
        shape = (-1, 1, 1, 1)[:w.ndim] if per_channel else ()
        w_onnx = (codes - zp.reshape(shape)).astype(np.float32) * scale.reshape(shape)
        with torch.no_grad():
            w_texq = layer.weight_quant(layer.weight).numpy()
        assert np.array_equal(w_onnx, w_texq), name  # bit for bit
        assert np.array_equal(under_ort[name], w_texq), name  # and so under ONNX Runtime
    types = {n.name: n for n in proto.graph.initializer}
    if per_channel:  # one-signed channels: zero points below 0 and above 2^b - 1
        assert types["features.init_block.conv.weight_codes"].data_type == onnx.TensorProto.INT16
        assert types["features.stage1.unit1.body.conv1.conv.weight_codes"].data_type == \
            onnx.TensorProto.INT8
        assert types["features.stage1.unit1.body.conv2.conv.weight_codes"].data_type == \
            onnx.TensorProto.UINT4
        assert types["output.weight_codes"].data_type == onnx.TensorProto.UINT8  # 8-bit last layer
    else:
        assert all(types[f"{n}.weight_scale"].dims == [] for n, _ in layers)


def test_metadata_and_layer_types(r8_mixed):
    qmodel, proto = r8_mixed
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["texq.version"] == texq.__version__ and meta["texq.model"] == "resnet8_cifar10"
    assert (meta["texq.w_bits"], meta["texq.a_bits"]) == ("3", "3")
    assert (meta["texq.first_layer_bits"], meta["texq.last_layer_bits"]) == ("8", "8")
    assert meta["texq.per_channel"] == "True" and meta["texq.quantize_input"] == "False"
    assert json.loads(meta["texq.input"])["mean"] == list(qmodel.texq_info.mean)
    rows = {r["layer"]: r for r in json.loads(meta["texq.layers"])}
    assert list(rows) == [n for n, _ in layers_of(qmodel)]
    first, last = rows["features.init_block.conv"], rows["output"]
    assert (first["w_bits"], first["a_bits"], first["input_type"], first["weight_type"]) == (
        8, 32, "FLOAT", "INT16")
    assert (last["w_bits"], last["a_bits"], last["input_type"], last["input_clip"]) == (
        8, 8, "UINT8", False)  # 8-bit codes: UINT8's saturation is Eq. 1's clip
    middle = rows["features.stage2.unit1.body.conv1.conv"]
    assert (middle["a_bits"], middle["input_type"], middle["input_clip"]) == (3, "UINT8", True)
    assert proto.producer_name == "texq"


def _act_under_ort(aq: ActQuantizer, x: np.ndarray) -> tuple[np.ndarray, object]:
    plan = act_qdq("layer", aq)
    nodes, inits, out = act_nodes("layer", plan, "x")
    g = helper.make_graph(nodes, "act", [helper.make_tensor_value_info(
        "x", onnx.TensorProto.FLOAT, list(x.shape))], [helper.make_tensor_value_info(
            out, onnx.TensorProto.FLOAT, list(x.shape))], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model, full_check=True)
    return session(model.SerializeToString()).run(None, {"x": x})[0], plan


@pytest.mark.parametrize("bits, lo, hi, x, expected, dtype, clip", [
    # S = 255 / 31.875 = 8, ZP = 0: UINT8's saturation at 255 is Eq. 1's clip, no Clip node
    (8, 0.0, 31.875, [-1, 0, 0.06, 0.07, 31.875, 40], [0, 0, 0, 0.125, 31.875, 31.875],
     "UINT8", None),
    # S = 15 / 1.875 = 8, ZP = round(-8) = -8: x_q = clip(round(8x + 8), 0, 15), x_d = (x_q - 8) / 8
    (4, -1.0, 0.875, [-2, -1, -0.3, 0, 0.1, 0.4, 0.875, 0.9, 3],
     [-1, -1, -0.25, 0, 0.125, 0.375, 0.875, 0.875, 0.875], "UINT8", (-1.0, 0.875)),
    # S = 7 / 0.875 = 8, ZP = -4: codes clip at 2^3 - 1 = 7, so 1.0 -> round(12) -> 7 -> 0.375
    # (an 8-bit QuantizeLinear alone would keep code 12 and return 1.0)
    (3, -0.5, 0.375, [-1, -0.5, -0.2, 0, 0.2, 0.375, 0.4, 1],
     [-0.5, -0.5, -0.25, 0, 0.25, 0.375, 0.375, 0.375], "UINT8", (-0.5, 0.375)),
    # a range without 0: S = 8, ZP = round(4) = 4, ONNX zero point -4 (outside UINT8)
    (4, 0.5, 2.375, [0, 0.5, 1, 1.3, 2.375, 2.5, 10],
     [0.5, 0.5, 1, 1.25, 2.375, 2.375, 2.375], "INT8", (0.5, 2.375)),
])
def test_activation_qdq_reproduces_eq1_by_hand(bits, lo, hi, x, expected, dtype, clip):
    aq = ActQuantizer(bits)
    aq.x_min.fill_(lo), aq.x_max.fill_(hi), aq.initialized.fill_(True)
    x = np.array(x, np.float32)
    texq_out = static_fake_quantize(torch.from_numpy(x), static_qparams(aq.x_min, aq.x_max, bits))
    assert texq_out.tolist() == expected
    ort_out, plan = _act_under_ort(aq, x)
    assert ort_out.tolist() == expected
    assert plan.dtype == dtype and plan.clip == clip and plan.scale == np.float32(0.125)


def test_integer_types():
    assert integer_type(np.array([0, 7, 15]), 15, WEIGHT_TYPES) == "UINT4"
    assert integer_type(np.array([3, 20]), 15, WEIGHT_TYPES) == "UINT8"  # an all-negative channel
    assert integer_type(np.array([-2, 3]), 15, WEIGHT_TYPES) == "INT8"  # an all-positive one
    assert integer_type(np.array([-2, 200]), 15, WEIGHT_TYPES) == "INT16"
    assert integer_type(np.array([-3]), 255, CLIPPED_ACT_TYPES) == "INT16"
    assert integer_type(np.array([-40000]), 255, CLIPPED_ACT_TYPES) is None


@pytest.mark.integration
def test_a_bn_folded_model_keeps_texq_arithmetic_under_default_ort(tmp_path):
    """With fold_bn the convs have a bias: it becomes an Add after the Conv, or ONNX Runtime's
    default session requantizes it to int32 (its WeightBiasQuantization) and drifts from texq."""
    torch.manual_seed(0)
    model = create_model("resnet8_cifar10")
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.normal_(0, 0.2), bn.bias.data.normal_(0, 0.2)  # folded biases != 0
    qmodel = calibrated(model, w_bits=4, a_bits=4, fold_bn=True)
    export_onnx(qmodel, tmp_path / "f.onnx", "small")
    proto = onnx.load(tmp_path / "f.onnx")
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert all(len(n.input) == 2 for n in convs)
    assert sum(n.name.endswith(".bias_add") for n in proto.graph.node) == len(convs)
    assert sum(n.op_type == "BatchNormalization" for n in proto.graph.node) == 0
    x = next(gaussian_batches(qmodel.texq_info, 1, 64, seed=1))
    res = check_agreement(session(tmp_path / "f.onnx"), qmodel, [(x, None)])
    assert res.agreement == 100.0 and res.mean_abs_logit_diff < 1e-4, res


@pytest.mark.integration
def test_a_relu6_model_loads_and_agrees_under_default_ort(tmp_path):
    """ReLU6 exports as a Clip right before the next layer's QuantizeLinear (MobileNetV2's case),
    which ONNX Runtime 1.32 cannot load when that QuantizeLinear is UINT4."""
    from torch import nn

    from texq.models import ModelInfo

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    model.texq_info = ModelInfo("relu6_net", 10, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "cifar10")
    qmodel = calibrated(model, w_bits=4, a_bits=4)
    export_onnx(qmodel, tmp_path / "r6.onnx", "small")
    x = next(gaussian_batches(model.texq_info, 1, 32, seed=1))
    res = check_agreement(session(tmp_path / "r6.onnx"), qmodel, [(x, None)])
    assert res.agreement == 100.0 and res.max_abs_logit_diff < 1e-4, res


# --- errors ----------------------------------------------------------------------------------------

def _cli_error(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("texq: error: ")
    return err[0]


def test_missing_run_dir_or_qmodel_is_one_line(tmp_path, capsys):
    err = _cli_error(capsys, "export", str(tmp_path / "nope"), "--onnx", str(tmp_path / "m.onnx"))
    assert "run folder not found" in err and "nope" in err
    err = _cli_error(capsys, "export", str(tmp_path), "--onnx", str(tmp_path / "m.onnx"))
    assert "qmodel.pt not found" in err and str(tmp_path) in err
    assert not (tmp_path / "m.onnx").exists()


def test_missing_onnx_package_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    err = _cli_error(capsys, "export", str(tmp_path), "--onnx", str(tmp_path / "m.onnx"))
    assert "onnx package" in err and "pip install 'texq[export]'" in err
    with pytest.raises(ExportError, match=r"texq\[export\]"):
        to_onnx(calibrated(create_model("resnet8_cifar10"), w_bits=4, a_bits=4))


def test_fractional_zero_point_and_uncalibrated_ranges_are_refused(tmp_path):
    model = create_model("resnet8_cifar10")
    with pytest.raises(ExportError, match="integer_zero_point=False gives fractional zero points"):
        export_onnx(calibrated(model, integer_zero_point=False), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="activation range is not calibrated"):
        export_onnx(quantize(model, QuantConfig()), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="not quantized"):
        export_onnx(model, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_a_layer_missing_from_the_graph_is_an_error_naming_it():
    qmodel = calibrated(create_model("resnet8_cifar10"), w_bits=4, a_bits=4)
    layers = quantized_layers(qmodel)
    proto = float_graph(float_model(qmodel), 32)
    assert len(match_layers(proto, layers)) == len(layers)
    target = next(t for t in proto.graph.initializer if t.name == "features.stage2.unit1.body.conv1.conv.weight")
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * 2, target.name))  # as if folded
    with pytest.raises(ExportError, match="'features.stage2.unit1.body.conv1.conv': no Conv/Gemm"):
        match_layers(proto, layers)
