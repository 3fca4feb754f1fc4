"""The fast export (``texq export``'s default): integer kernels that keep texq's codes, checked
against a brute-force enumeration, ONNX Runtime itself and texq's fake-quantized model."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from texq.cli import main
from texq.data import gaussian_batches
from texq.export import export_onnx, to_onnx
from texq.export.qparams import ActQDQ
from texq.export.requant import fit_channel, fit_layer, ort_codes, target_codes
from texq.export.runtime import check_agreement, session
from texq.models import ModelInfo, create_model, save_quantized
from texq.quant import QuantConfig, calibrate, quantize


def calibrated(model, **cfg):
    q = quantize(model, QuantConfig(**cfg))
    calibrate(q, gaussian_batches(model.texq_info, n_batches=2, batch_size=32))
    return q


# --- the requantization fit, against every accumulator --------------------------------------------

def test_a_rounded_bias_flips_codes_that_the_fit_keeps():
    """By hand: K = 0.25, beta = 0.3. At acc = 1 texq's code is round(0.55) = 1; the plain
    int32 bias round(0.3 / 0.25) = 1 gives round((1 + 1) * 0.25) = round(0.5) = 0 (half to even)."""
    acc = np.arange(0, 61)
    want = target_codes(acc, 0.25, 0.3, 0, 0, 15)
    assert want[1] == 1
    plain = ort_codes(acc, 1, 1, np.float32(0.25), np.float32(1), np.float32(1), 0, 0, 15)
    assert plain[1] == 0 and not np.array_equal(plain, want)
    fit = fit_channel(0.25, 0.3, 0, 0, 15, 0, 60, 8, np.float32(1), np.float32(1))
    assert fit is not None
    assert np.array_equal(ort_codes(acc, fit.multiplier, fit.bias, fit.scale, np.float32(1),
                                    np.float32(1), 0, 0, 15), want)


def test_fitted_channels_equal_texq_on_every_accumulator():
    rng = np.random.default_rng(0)
    found, low_bits = 0, 0
    for _ in range(300):
        k = float(np.exp(rng.uniform(np.log(0.003), np.log(1.5))))
        beta = float(rng.uniform(-20, 20))
        zp, bits = int(rng.integers(0, 4)), int(rng.choice([3, 4, 8]))
        lo, hi = int(rng.choice([0, zp])), 2 ** bits - 1
        x_scale, y_scale = np.float32(rng.uniform(0.01, 1)), np.float32(rng.uniform(0.01, 1))
        acc_lo, acc_hi = -int(rng.integers(0, 4000)), int(rng.integers(1, 4000))
        fit = fit_channel(k, beta, zp, lo, hi, acc_lo, acc_hi, int(rng.integers(1, 17)), x_scale, y_scale)
        low_bits += bits <= 4
        if fit is None:
            continue
        found += bits <= 4
        acc = np.arange(acc_lo, acc_hi + 1)  # every reachable accumulator, not only the steps
        got = ort_codes(acc, fit.multiplier, fit.bias, fit.scale, x_scale, y_scale, zp, lo, hi)
        assert np.array_equal(got, target_codes(acc, k, beta, zp, lo, hi)), (k, beta, zp, lo, hi)
    # a channel without a fit makes its layer a float Conv, never a wrong one; at 3-4 bits (at most
    # 15 steps) nearly all fit, at 8 bits (255 steps) fewer
    assert found >= 0.9 * low_bits


def _qlinearconv_under_ort(x, w, fits, a, nxt, lo, hi, group=1):
    inits = [numpy_helper.from_array(v, n) for n, v in [
        ("xs", np.float32(a.scale)), ("xz", np.uint8(a.zero_point)),
        ("w", (w * np.array([f.multiplier for f in fits]).reshape(-1, 1, 1, 1)).astype(np.int8)),
        ("ws", np.array([f.scale for f in fits], np.float32)), ("wz", np.zeros(len(fits), np.int8)),
        ("ys", np.float32(nxt.scale)), ("yz", np.uint8(nxt.zero_point)),
        ("b", np.array([f.bias for f in fits], np.int32))]]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"],
                            pads=[1, 1, 1, 1], group=group)
    g = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.UINT8, None)],
                          [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    y = session(m.SerializeToString()).run(None, {"x": x})[0].astype(np.int64)
    return np.clip(y, lo, hi)


@pytest.mark.parametrize("group, zp_in, zp_out, relu", [(1, 0, 0, True), (4, 0, 0, False), (1, 3, 2, True),
                                                        (4, 5, 6, False)],
                         ids=["dense", "grouped", "zero-points+relu", "grouped+zero-points"])
def test_onnx_runtime_qlinearconv_gives_the_codes_the_fit_promises(group, zp_in, zp_out, relu):
    """Real ONNX Runtime, not the emulation: random 4-bit codes and weights, a BN-like affine with
    a negative channel, zero points in and out, the exact accumulator computed here in float64."""
    rng = np.random.default_rng(1)
    a = ActQDQ(np.float32(0.37), zp_in, 4, "UINT8", None)
    nxt = ActQDQ(np.float32(0.21), zp_out, 4, "UINT8", None)
    w = rng.integers(-7, 8, (8, 8 // group, 3, 3)).astype(np.int8)
    scale = rng.uniform(0.002, 0.02, 8) * np.where(np.arange(8) == 3, -1, 1)  # s_x s_w a, a < 0 once
    bias = rng.uniform(-1, 1, 8)
    lo, hi = (zp_out if relu else 0), 15  # relu: quant(relu(y)) = max(quant(y), zero point)
    fits = fit_layer(w, scale, bias, a, nxt, lo, hi)
    assert not isinstance(fits, str), fits
    x = rng.integers(0, 16, (4, 8, 10, 10)).astype(np.uint8)
    sign = np.where(scale < 0, -1, 1)
    got = _qlinearconv_under_ort(x, (w * sign.reshape(-1, 1, 1, 1)).astype(np.int8), fits, a, nxt, lo, hi, group)
    acc = torch.nn.functional.conv2d(torch.from_numpy(x.astype(np.float64) - zp_in), torch.from_numpy(
        w.astype(np.float64)), padding=1, groups=group).numpy()  # padding reads the code zp_in: 0
    ys = float(nxt.scale)
    y = acc * (scale / ys).reshape(1, -1, 1, 1) + (bias / ys).reshape(1, -1, 1, 1)
    want = np.clip(np.rint(np.maximum(y, 0) if relu else y) + zp_out, lo, hi)
    assert np.array_equal(got, want)


def test_weights_the_int8_kernel_cannot_hold_make_a_float_layer():
    """8-bit weight codes: c - z = -128 cannot be negated in INT8 (a negative BN scale), and
    8-bit inputs times large weights could saturate AVX2's int16 pair sums."""
    a4 = ActQDQ(np.float32(0.1), 0, 4, "UINT8", None)
    a8 = ActQDQ(np.float32(0.1), 0, 8, "UINT8", None)
    w = np.full((1, 2, 1, 1), 5, np.int8)
    w[0, 0] = -128
    assert "do not fit the int8 kernel" in fit_layer(w, np.array([-0.01]), np.zeros(1), a4, a4, 0, 15)
    w = np.full((1, 2, 1, 1), 70, np.int8)
    assert "do not fit the int8 kernel" in fit_layer(w, np.array([0.01]), np.zeros(1), a8, a4, 0, 15)
    fits = fit_layer(np.full((1, 2, 1, 1), 7, np.int8), np.array([-0.01]), np.zeros(1), a4, a4, 0, 15)
    assert [f.multiplier for f in fits] == [127 // 7]


# --- whole models ---------------------------------------------------------------------------------

def _optimized_ops(path, tmp_path) -> list[str]:
    """The node types ONNX Runtime's default CPU session actually runs."""
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]


def _agree(path, qmodel, seed=1, n=64):
    x = next(gaussian_batches(qmodel.texq_info, 1, n, seed=seed))
    return check_agreement(session(path), qmodel, [(x, None)])


@pytest.mark.parametrize("form", ["qlinear", "conv_integer"])
def test_resnet8_fast_export_keeps_texq_codes_and_runs_integer_nodes(tmp_path, form):
    torch.manual_seed(0)
    model = create_model("resnet8_cifar10")
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:  # trained-like statistics, and a negative scale in every other channel
            bn.running_mean.normal_(0, 0.2), bn.bias.normal_(0, 0.2)
            bn.weight[::2] *= -1
    qmodel = calibrated(model, w_bits=4, a_bits=4)
    summary = export_onnx(qmodel, tmp_path / "fast.onnx", conv_form=form)
    proto = onnx.load(tmp_path / "fast.onnx")
    ops = [n.op_type for n in proto.graph.node]
    assert "BatchNormalization" not in ops  # all folded
    integer = {"qlinear": "QLinearConv", "conv_integer": "ConvInteger"}[form]
    assert summary.ops[integer] >= 3 and summary.ops["MatMulInteger"] == 1
    assert summary.ops.get("Conv", 0) == len(summary.float_layers)
    assert summary.float_layers["features.init_block.conv"].startswith("input kept in float")
    assert all(why.startswith("output read in float") for name, why in summary.float_layers.items()
               if name != "features.init_block.conv")
    assert summary.weight_types == {"INT8": summary.layers - len(summary.float_layers),
                                    "FLOAT": len(summary.float_layers)}
    optimized = _optimized_ops(tmp_path / "fast.onnx", tmp_path)
    assert sum(op.endswith(integer) for op in optimized) == summary.ops[integer], optimized
    assert "MatMulInteger" in optimized or "MatMulIntegerToFloat" in optimized
    res = _agree(tmp_path / "fast.onnx", qmodel)
    assert res.agreement == 100.0 and res.mean_abs_logit_diff < 1e-3, res
    meta = {p.key: p.value for p in proto.metadata_props}
    rows = {r["layer"]: r for r in json.loads(meta["texq.layers"])}
    assert meta["texq.variant"] == "fast"
    assert rows["features.stage1.unit1.body.conv1.conv"]["op"] == integer


def test_relu6_and_a_grouped_conv_fold_into_qlinearconv(tmp_path):
    """MobileNetV2-like: ReLU6 (a Clip) between BN and the next quantizer, a depthwise conv."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
                          nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU6(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_var.uniform_(0.01, 0.05)  # large outputs: ReLU6's upper bound clips
    model.texq_info = ModelInfo("relu6_net", 10, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "cifar10")
    qmodel = calibrated(model, w_bits=4, a_bits=4)
    summary = export_onnx(qmodel, tmp_path / "r6.onnx")
    # the depthwise conv's output reaches only the 1x1 conv's quantizer (through ReLU6): QLinearConv;
    # the first conv reads the image in float, the 1x1 conv's output goes to the pooling
    assert summary.ops == {"QLinearConv": 1, "Conv": 2, "MatMulInteger": 1}, summary
    assert summary.float_layers["6"].startswith("output read in float")
    clips = [n.name for n in onnx.load(tmp_path / "r6.onnx").graph.node if n.op_type == "Clip"]
    # UINT8 codes: the depthwise conv's input, its output (ReLU6's bounds as codes), the Linear's
    # input; in float: the ReLU6 after the first and after the 1x1 conv
    assert sorted(c.endswith(".codes_clip") for c in clips) == [False, False, True, True, True], clips
    res = _agree(tmp_path / "r6.onnx", qmodel)
    assert res.agreement == 100.0 and res.max_abs_logit_diff < 1e-4, res


@pytest.mark.parametrize("args, variant", [([], "fast"), (["--small"], "small")])
def test_cli_writes_the_fast_file_by_default(tmp_path, args, variant):
    torch.manual_seed(0)
    qmodel = calibrated(create_model("resnet8_cifar10"), w_bits=3, a_bits=3)
    (tmp_path / "run" / "train").mkdir(parents=True)
    save_quantized(tmp_path / "run" / "train" / "qmodel.pt", qmodel)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["export", str(tmp_path / "run"), "--onnx", str(tmp_path / "m.onnx"), *args]) == 0
    res = json.loads(out.getvalue().strip().splitlines()[-1])
    assert res["variant"] == variant and res["check"]["agreement"] == 100.0
    assert ("QLinearConv" in res["ops"]) == (variant == "fast")
    meta = {p.key: p.value for p in to_onnx(qmodel, variant)[0].metadata_props}
    assert meta["texq.variant"] == variant  # the API takes the same names
