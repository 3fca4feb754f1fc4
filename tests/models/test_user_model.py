"""A model of one's own: a torchvision model outside the registry through the full TexQ path,
a ``module:callable`` factory on the command line, what is recorded and reloaded, and the errors."""

from __future__ import annotations

import json
import logging
import sys
import textwrap

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from texq import ModelInfo
from texq.cli import main
from texq.data import load_eval_data
from texq.eval import evaluate
from texq.method.generator import Generator
from texq.models.quantized import load_quantized
from texq.quant import (
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    quantizable_layers,
    quantize,
    unquantized_layers,
)
from texq.run.config import RunConfig
from texq.run.runner import run
from texq.util.errors import CheckpointError, ConfigError
from texq.util.keys import with_overrides

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# the tiny profile shortened further: every step of the path still runs (step 1 with L_LAWS after
# its warm-up, G's warm-up epoch, one epoch of G and Q together, evaluation)
SHORT = {"calibration.iters": 2, "calibration.warmup_iters": 1, "finetune.epochs": 1,
         "finetune.iters_per_epoch": 1, "finetune.batch_size": 8, "finetune.calib_per_batch": 2}
SHORT_ARGS = [a for k, v in SHORT.items() for a in ("--set", f"{k}={v}")]

FACTORIES = '''
import torch
from torch import nn
from texq import ModelInfo


class Scale(nn.Module):
    """A custom module with a weight of its own."""

    def __init__(self, channels):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x):
        return x * self.gain


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.scale = Scale(8)
        self.up = nn.ConvTranspose2d(8, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.up(self.scale(torch.relu(self.bn(self.conv(x)))))
        x = torch.relu(self.bn2(self.dw(x)))
        return self.fc(x.mean((2, 3)))


def build():
    torch.manual_seed(0)
    net = Net()
    net.texq_info = ModelInfo("scaled_net", 4, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return net


def build_bare():
    torch.manual_seed(0)
    return Net()


def build_no_bn():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.texq_info = ModelInfo("no_bn", 4, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return net


def not_a_module():
    return 3


def needs_args(width):
    return Net()


CONST = 3
'''


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    """The module ``texq_test_factories`` on sys.path (a file written for the test)."""
    root = tmp_path_factory.mktemp("factories")
    (root / "texq_test_factories.py").write_text(textwrap.dedent(FACTORIES))
    sys.path.insert(0, str(root))
    yield "texq_test_factories"
    sys.path.remove(str(root))
    sys.modules.pop("texq_test_factories", None)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An ImageNet-style evaluation folder: 4 class subfolders of 2 random 40x40 PNGs each."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    for c in ("circle", "square", "star", "triangle"):
        (root / c).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def resnet34(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = torchvision.models.resnet34(weights=None, num_classes=4)
    net.texq_info = ModelInfo("resnet34_shapes", 4, 32, MEAN, STD)
    return net


def test_torchvision_model_through_texq(folder, tmp_path):
    net = resnet34()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = with_overrides(RunConfig.for_profile("tiny", info=net.texq_info, data=str(folder),
                                               device="cpu"), SHORT)
    assert cfg.model == "resnet34_shapes" and cfg.checkpoint is None
    metrics = run(cfg, tmp_path, progress=False, model=net)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert 0 <= metrics["top1"] <= 100 and metrics["n"] == 8
    assert metrics["top1"] == pytest.approx(100 * metrics["correct"] / 8)
    # F is the teacher: the run leaves its weights as they were
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    recorded = json.loads((tmp_path / "config.json").read_text())
    assert recorded["config"]["model"] == "resnet34_shapes"
    assert recorded["model"]["info"] == {"name": "resnet34_shapes", "num_classes": 4, "input_size": 32,
                                         "mean": list(MEAN), "std": list(STD), "dataset": "custom",
                                         "factory": None}
    assert recorded["model"]["unquantized"] == []  # every weight of a ResNet is in a Conv2d or Linear
    # qmodel.pt holds no factory: it reloads from the float module only, and says so otherwise
    with pytest.raises(CheckpointError, match=r"load_quantized\(path, model=\.\.\.\)"):
        load_quantized(tmp_path / "train" / "qmodel.pt")
    q = load_quantized(tmp_path / "train" / "qmodel.pt", model=net)
    assert q.texq_info == net.texq_info
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    data = load_eval_data(str(folder), q.texq_info)
    assert evaluate(q, data, progress=False).correct == metrics["correct"]
    # the same logits as the saved state loaded by hand into a quantized copy of F
    saved = torch.load(tmp_path / "train" / "qmodel.pt", weights_only=True)
    ref = quantize(net, QuantConfig(**saved["quant"]))
    ref.load_state_dict(saved["state_dict"])
    x = torch.stack([data[i][0] for i in range(len(data))])
    with torch.no_grad():
        assert torch.equal(q(x), ref.eval()(x)) and not torch.allclose(q(x), net.eval()(x))  # W4A4
    # a rerun resumes (here: returns the finished run); another module under the same name is refused
    assert run(cfg, tmp_path, progress=False, model=net) == metrics
    with pytest.raises(ConfigError, match=r"another model \(weights: "):
        run(cfg, tmp_path, progress=False, model=resnet34(seed=1))


def test_cli_factory_runs_records_and_reloads(factories, folder, tmp_path, capsys, caplog):
    spec = f"{factories}:build"
    with caplog.at_level(logging.WARNING, logger="texq"):
        rc = main(["run", "--model", spec, "--data", str(folder), "--profile", "tiny", "--device",
                   "cpu", "--no-progress", "--out", str(tmp_path), *SHORT_ARGS])
    out, err = capsys.readouterr()
    assert rc == 0, err
    metrics = json.loads(out.strip().splitlines()[-1])
    assert 0 <= metrics["top1"] <= 100 and metrics["model"] == spec
    # the layers left in float are logged and recorded, by name and type
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("scale (Scale)" in m and "up (ConvTranspose2d)" in m for m in warned), warned
    recorded = json.loads((tmp_path / "config.json").read_text())["model"]
    assert recorded["unquantized"] == [{"name": "scale", "type": "Scale"},
                                       {"name": "up", "type": "ConvTranspose2d"}]
    assert (recorded["info"]["name"], recorded["info"]["factory"]) == ("scaled_net", spec)
    # qmodel.pt names its factory: it reloads alone, the depthwise conv quantized, the rest in float
    q = load_quantized(tmp_path / "train" / "qmodel.pt")
    assert (type(q.conv), type(q.dw), type(q.fc)) == (QuantConv2d, QuantConv2d, QuantLinear)
    assert (type(q.up), type(q.scale).__name__) == (nn.ConvTranspose2d, "Scale")
    data = load_eval_data(str(folder), q.texq_info)
    assert evaluate(q, data, progress=False).correct == metrics["correct"]


def test_cli_factory_info_from_flags(factories, folder, tmp_path, capsys):
    spec = f"{factories}:build_bare"
    argv = ["run", "--model", spec, "--data", str(folder), "--profile", "tiny", "--method", "zeroq",
            "--device", "cpu", "--no-progress", "--out", str(tmp_path), "--set", "distill.iters=1",
            "--num-classes", "4", "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25"]
    rc = main(argv + ["--input-size", "32"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    info = json.loads((tmp_path / "config.json").read_text())["model"]["info"]
    assert info == {"name": spec, "num_classes": 4, "input_size": 32, "mean": [0.5] * 3,
                    "std": [0.25] * 3, "dataset": "custom", "factory": spec}
    q = load_quantized(tmp_path / "train" / "qmodel.pt")  # the factory's module, described by the saved info
    assert q.texq_info == ModelInfo(**info)
    # the same folder with another input size is another model's run
    rc = main(argv + ["--input-size", "64"])
    err = capsys.readouterr().err
    assert rc == 2 and "another model (info: input_size 32 vs 64)" in err


def test_cli_imports_a_factory_from_the_current_folder_and_loads_a_checkpoint(
        folder, tmp_path, capsys, monkeypatch, request):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "texq_cwd_models.py").write_text(textwrap.dedent(FACTORIES))
    monkeypatch.chdir(proj)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(proj))])
    request.addfinalizer(lambda: sys.modules.pop("texq_cwd_models", None))
    namespace: dict = {}
    exec(textwrap.dedent(FACTORIES), namespace)  # the factory's weights, each moved by 1
    state = {k: v + 1 if v.is_floating_point() else v for k, v in namespace["build"]().state_dict().items()}
    ckpt = tmp_path / "w.pt"
    torch.save(state, ckpt)
    rc = main(["run", "--model", "texq_cwd_models:build", "--checkpoint", str(ckpt), "--data",
               str(folder), "--profile", "tiny", "--method", "zeroq", "--device", "cpu",
               "--no-progress", "--out", str(tmp_path / "r"), "--set", "distill.iters=1"])
    assert rc == 0, capsys.readouterr().err
    q = load_quantized(tmp_path / "r" / "train" / "qmodel.pt")  # ZeroQ calibrates ranges only: F's weights
    assert torch.equal(q.conv.weight, state["conv.weight"]) and torch.equal(q.scale.gain, state["scale.gain"])


def test_factory_errors_are_one_line_before_any_work(factories, folder, tmp_path, capsys):
    m = factories
    cases = {
        "texq_no_such_module:build": "no module named 'texq_no_such_module'",
        f"{m}:nope": f"{m!r} has no attribute 'nope'",
        f"{m}:CONST": "'CONST' is not callable (int)",
        f"{m}:not_a_module": "returned int, expected a torch.nn.Module",
        f"{m}:needs_args": "cannot be called without arguments",
        f"{m}:build_bare": "without texq_info: set model.texq_info = texq.ModelInfo(...) in the "
                           "factory or give its num_classes, input_size, mean, std",
        f"{m}:build_no_bn": "has no BatchNorm layer",
    }
    for i, (spec, needle) in enumerate(cases.items()):
        rc = main(["run", "--model", spec, "--data", str(folder), "--out", str(tmp_path / str(i))])
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("texq: error:")]
        assert rc == 2 and len(lines) == 1 and needle in lines[0] and spec in lines[0], (spec, err)
        assert "Traceback" not in err and not (tmp_path / str(i)).exists()
    rc = main(["run", "--model", "resnet8_cifar10", "--pretrained", "--num-classes", "4",
               "--data", str(folder), "--out", str(tmp_path / "r")])
    assert rc == 2 and "describe a factory's model" in capsys.readouterr().err
    rc = main(["run", "--model", f"{m}:build", "--pretrained", "--data", str(folder),
               "--out", str(tmp_path / "p")])
    assert rc == 2 and "registry models only" in capsys.readouterr().err


def test_a_model_without_batchnorm_is_refused_up_front(folder, tmp_path):
    net = torchvision.models.squeezenet1_1(weights=None, num_classes=4)  # ReLU + conv, no BN
    net.texq_info = ModelInfo("squeezenet_shapes", 4, 32, MEAN, STD)
    cfg = RunConfig.for_profile("tiny", info=net.texq_info, data=str(folder), device="cpu")
    with pytest.raises(ConfigError, match="has no BatchNorm layer: .*Eq. 3, 7, 8, 11"):
        run(cfg, tmp_path / "out", progress=False, model=net)
    assert not (tmp_path / "out").exists()


def test_the_config_must_name_the_module(folder, tmp_path):
    with pytest.raises(ConfigError, match=r"carries no texq_info .*texq.ModelInfo"):
        run(RunConfig(model="other"), tmp_path, model=nn.Sequential(nn.Conv2d(3, 4, 1)))
    net = resnet34()
    cfg = RunConfig.for_profile("tiny", model="other", data=str(folder), info=net.texq_info)
    with pytest.raises(ConfigError, match=r"module given is 'resnet34_shapes'.*info=module.texq_info"):
        run(cfg, tmp_path, model=net)
    # a module under a registry name must be that registry model (its qmodel.pt rebuilds as it)
    net.texq_info = ModelInfo("resnet18", 4, 32, MEAN, STD)
    cfg = RunConfig.for_profile("tiny", info=net.texq_info, data=str(folder), checkpoint="x.pt")
    with pytest.raises(ConfigError, match="not that registry model's architecture"):
        run(cfg, tmp_path, model=net)
    assert not (tmp_path / "config.json").exists()


def test_profile_settings_follow_the_model_info():
    big = ModelInfo("big", 1000, 224, MEAN, STD)
    small = ModelInfo("small", 4, 64, MEAN, STD)
    paper_big = RunConfig.for_profile("paper", info=big)
    assert paper_big.calibration.classes_per_step == 100
    assert (paper_big.finetune.batch_size, paper_big.finetune.lr) == (16, 1e-6)
    paper_small = RunConfig.for_profile("paper", info=small)
    assert paper_small.calibration.classes_per_step == 0 and paper_small.finetune.batch_size == 128
    assert Generator.for_model(big).conditional_bn and not Generator.for_model(small).conditional_bn
    assert RunConfig(model="mine").checkpoint is None  # a module of one's own brings its weights
    with pytest.raises(ConfigError, match="registry models only"):
        RunConfig(model="mine", pretrained=True)
    with pytest.raises(ConfigError, match="input_size=30: expected a multiple of 4"):
        ModelInfo("odd", 4, 30, MEAN, STD)
    with pytest.raises(ConfigError, match="three RGB values"):
        ModelInfo("grey", 4, 32, (0.5,), (0.25,))


class _Scaled(nn.Conv2d):
    """A Conv2d subclass computing something else (quantizing it as a plain conv would lose that)."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_layers_texq_cannot_quantize_are_listed_not_replaced():
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(3, 4, 3))
    model.add_module("bn", nn.BatchNorm2d(4))
    model.add_module("scaled", _Scaled(4, 4, 1))
    model.add_module("conv1d", nn.Conv1d(4, 4, 1))
    model.add_module("attn", nn.MultiheadAttention(4, 2))
    model.add_module("norm", nn.LayerNorm(4))
    model.add_module("fc", nn.Linear(4, 2))
    assert [n for n, _ in quantizable_layers(model)] == ["conv", "fc"]
    assert unquantized_layers(model) == [("scaled", "_Scaled"), ("conv1d", "Conv1d"),
                                         ("attn", "MultiheadAttention"),
                                         ("attn.out_proj", "NonDynamicallyQuantizableLinear"),
                                         ("norm", "LayerNorm")]
    q = quantize(model, QuantConfig())
    assert type(q.attn.out_proj) is type(model.attn.out_proj) and type(q.scaled) is _Scaled


def test_cli_eval_scores_a_factory_model_and_refuses_pretrained(factories, folder, tmp_path, capsys):
    """texq eval takes the same factory spec as texq run: the factory's own weights, or a
    checkpoint loaded into its module; top-1 equals an independent count over the folder."""
    import texq_test_factories as f

    from texq.data import load_eval_data

    spec = f"{factories}:build"
    rc = main(["eval", "--model", spec, "--data", str(folder), "--device", "cpu", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    net = f.build().eval()
    data = load_eval_data(str(folder), net.texq_info)
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([int(data[i][1]) for i in range(len(data))])
    with torch.no_grad():
        expected = 100.0 * float((net(x).argmax(1) == y).float().mean())
    assert result["n"] == 8 and abs(result["top1"] - expected) < 1e-9
    rc = main(["eval", "--model", spec, "--pretrained", "--data", str(folder)])
    assert rc == 2 and "registry models only" in capsys.readouterr().err
