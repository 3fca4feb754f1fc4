"""Model registry, architectures, checkpoints (good and bad) and the pretrained-weights path."""

from __future__ import annotations

import hashlib
import re
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from texq.models import create_model, get_info, list_models, model_info
from texq.models import weights as weights_mod
from texq.models.weights import WeightsFile
from texq.quant import QuantConfig, calibrate, quantize
from texq.util.errors import CheckpointError, ConfigError

CIFAR_NAMES = [n for n in list_models() if "cifar" in n]
IMAGENET_NAMES = [n for n in list_models() if "cifar" not in n]


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_cifar_models_build_and_run(name):
    model = create_model(name)
    info = get_info(model)
    assert info.num_classes == (100 if name.endswith("100") else 10)
    assert info.input_size == 32 and len(info.mean) == len(info.std) == 3
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, info.num_classes)
    # BN-equipped, as zero-shot quantization needs
    depth = int(name.split("_")[0][len("resnet"):].rstrip("a"))
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == depth - 1 + (
        0 if "a_cifar" in name else 2)


@pytest.mark.parametrize("name", IMAGENET_NAMES)
def test_imagenet_models_build_quantize_and_run(name):
    torch.manual_seed(0)
    model = create_model(name)
    info = get_info(model)
    assert (info.num_classes, info.input_size, info.dataset) == (1000, 224, "imagenet")
    qmodel = quantize(model, QuantConfig(w_bits=4, a_bits=4))
    x = torch.randn(2, 3, 64, 64)  # any size runs; 64 keeps the CPU test short
    calibrate(qmodel, [x])
    with torch.no_grad():
        assert qmodel(x).shape == (2, 1000)


def test_parameter_counts_match_published_models():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(create_model("resnet20a_cifar10")) == 269_722  # akamaster's ResNet-20
    assert count(create_model("resnet20_cifar10")) == 272_474  # pytorchcv's metainfo
    assert count(create_model("resnet56_cifar100")) == 861_620
    assert count(create_model("resnet110_cifar10")) == 1_730_714


def test_any_depth_6n_plus_2_and_nothing_else():
    assert model_info("resnet8_cifar10").num_classes == 10
    model = create_model("resnet14a_cifar100")
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 100)
    for bad in ["resnet21_cifar10", "resnet2_cifar10", "resnet20_cifar20", "vgg16", "resnet20b_cifar10"]:
        with pytest.raises(ConfigError):
            model_info(bad)


def test_option_a_shortcut_is_subsample_and_zero_pad():
    model = create_model("resnet20a_cifar10")
    block = model.layer2[0]
    x = torch.randn(2, 16, 32, 32)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 16, 16)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


def test_pytorchcv_state_dict_loads_with_identical_outputs(tmp_path):
    pytorchcv = pytest.importorskip("pytorchcv.model_provider")
    torch.manual_seed(0)
    theirs = pytorchcv.get_model("resnet20_cifar10", pretrained=False).eval()
    # non-trivial BN statistics, so a wrong mapping could not hide behind identity BNs
    gen = torch.Generator().manual_seed(3)
    for m in theirs.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    path = tmp_path / "pytorchcv_resnet20.pth"
    torch.save(theirs.state_dict(), path)
    ours = create_model("resnet20_cifar10", checkpoint=path)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


# ---------------------------------------------------------------------------------- checkpoints


def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def test_checkpoint_layouts_are_accepted(tmp_path):
    ref = create_model("resnet20a_cifar10")
    sd = ref.state_dict()
    x = torch.randn(2, 3, 32, 32)
    layouts = {
        "bare": sd,
        "wrapped": {"state_dict": sd, "epoch": 3},
        "dataparallel": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        "model_key": {"model": sd},
        "no_bn_counters": {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")},
    }
    for name, obj in layouts.items():
        model = create_model("resnet20a_cifar10", checkpoint=_save(tmp_path / f"{name}.pt", obj))
        with torch.no_grad():
            assert torch.equal(model(x), ref(x)), name


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*nope.th"):
        create_model("resnet20a_cifar10", checkpoint=tmp_path / "nope.th")


def test_truncated_checkpoint(tmp_path):
    good = _save(tmp_path / "good.pt", create_model("resnet20a_cifar10").state_dict())
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt.*truncated or not a PyTorch file"):
        create_model("resnet20a_cifar10", checkpoint=bad)


def test_text_file_as_checkpoint(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="notes.txt"):
        create_model("resnet20a_cifar10", checkpoint=bad)


def test_checkpoint_of_another_architecture_names_keys(tmp_path):
    path = _save(tmp_path / "a.pt", create_model("resnet20a_cifar10").state_dict())
    with pytest.raises(CheckpointError) as err:
        create_model("resnet20_cifar10", checkpoint=path)
    msg = str(err.value)
    assert "a.pt" in msg and "resnet20_cifar10" in msg
    assert "missing keys: features.init_block.conv.weight" in msg
    assert "unexpected keys: conv1.weight" in msg


def test_checkpoint_of_another_depth(tmp_path):
    path = _save(tmp_path / "r32.pt", create_model("resnet32a_cifar10").state_dict())
    with pytest.raises(CheckpointError, match="unexpected keys: layer1.3"):
        create_model("resnet20a_cifar10", checkpoint=path)


def test_checkpoint_with_wrong_class_count(tmp_path):
    path = _save(tmp_path / "c10.pt", create_model("resnet20a_cifar10").state_dict())
    with pytest.raises(CheckpointError,
                       match="linear.weight.*wrong class count: the checkpoint has 10 classes, the model 100"):
        create_model("resnet20a_cifar100", checkpoint=path)


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    path = _save(tmp_path / "pickled.pt", {"state_dict": create_model("resnet20a_cifar10")})
    with pytest.raises(CheckpointError, match="pickled.pt"):
        create_model("resnet20a_cifar10", checkpoint=path)


# ------------------------------------------------------------------- pretrained weights, offline


def _publish_zip(tmp_path: Path, name: str, state) -> WeightsFile:
    """Publish a state dict the way pytorchcv does (zipped .pth, sha1 in the name) at a file:// URL."""
    pth = tmp_path / "publish" / "weights.pth"
    pth.parent.mkdir()
    torch.save(state, pth)
    sha1 = hashlib.sha1(pth.read_bytes()).hexdigest()
    file_name = f"{name}-0000-{sha1[:8]}.pth"
    zpath = tmp_path / "publish" / f"{file_name}.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.write(pth, arcname=file_name)
    return WeightsFile(file_name, zpath.as_uri(), "sha1", sha1, "cifar10", zipped=True)


def test_pretrained_download_path(tmp_path, monkeypatch):
    reference = create_model("resnet20_cifar10")
    wf = _publish_zip(tmp_path, "resnet20_cifar10", reference.state_dict())
    monkeypatch.setitem(weights_mod.PRETRAINED, "resnet20_cifar10", wf)
    monkeypatch.setenv("TEXQ_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TEXQ_ASSETS", raising=False)
    model = create_model("resnet20_cifar10", pretrained=True)
    cached = tmp_path / "home" / "weights" / wf.file_name
    assert cached.is_file()
    assert sorted(p.name for p in cached.parent.iterdir()) == [wf.file_name]  # no temp files left
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))

    # second time: served from the cache, no download
    def no_network(url, dest):
        raise AssertionError("downloaded although cached")

    monkeypatch.setattr(weights_mod, "_download", no_network)
    create_model("resnet20_cifar10", pretrained=True)


def test_pretrained_hash_mismatch_keeps_nothing(tmp_path, monkeypatch):
    wf = _publish_zip(tmp_path, "resnet20_cifar10", create_model("resnet20_cifar10").state_dict())
    bad = WeightsFile(wf.file_name, wf.url, "sha1", "deadbeef", "cifar10", zipped=True)
    monkeypatch.setitem(weights_mod.PRETRAINED, "resnet20_cifar10", bad)
    monkeypatch.setenv("TEXQ_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TEXQ_ASSETS", raising=False)
    with pytest.raises(CheckpointError, match="does not match its published sha1"):
        create_model("resnet20_cifar10", pretrained=True)
    assert list((tmp_path / "home" / "weights").iterdir()) == []


def test_pretrained_unreachable_url_is_a_clear_error(tmp_path, monkeypatch):
    wf = WeightsFile("resnet20-12fca82f.th", (tmp_path / "missing.th").as_uri(), "sha256",
                     "12fca82f", "cifar10")
    monkeypatch.setitem(weights_mod.PRETRAINED, "resnet20a_cifar10", wf)
    monkeypatch.setenv("TEXQ_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TEXQ_ASSETS", raising=False)
    with pytest.raises(CheckpointError, match="cannot download.*TEXQ_ASSETS"):
        create_model("resnet20a_cifar10", pretrained=True)


def test_no_published_weights(monkeypatch):
    with pytest.raises(ConfigError, match="no published weights"):
        create_model("resnet32_cifar10", pretrained=True)


@pytest.mark.assets
def test_pretrained_from_texq_assets(assets, monkeypatch, tmp_path):
    monkeypatch.setenv("TEXQ_ASSETS", str(assets))
    monkeypatch.setenv("TEXQ_HOME", str(tmp_path))
    model = create_model("resnet20a_cifar10", pretrained=True)
    ref = create_model("resnet20a_cifar10", checkpoint=assets / "cifar10" / "resnet20-12fca82f.th")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    assert not (tmp_path / "weights").exists()  # nothing downloaded or copied


def test_one_refusal_of_impossible_weights_everywhere(capsys):
    """Published weights for a model of one's own, or no weights for a registry model: the same
    one-line refusal from check_weights, a RunConfig and texq eval."""
    from texq.cli import main
    from texq.models import check_weights
    from texq.run.config import RunConfig

    own = "published weights exist for registry models only, not for 'my_models:build'"
    none = re.escape("give the model's weights: a checkpoint (--checkpoint PATH) or the published ones")
    with pytest.raises(ConfigError, match=own):
        check_weights("my_models:build", pretrained=True, checkpoint=None)
    with pytest.raises(ConfigError, match="not for 'resnet20_cifar10'"):  # a module given, named so
        check_weights("resnet20_cifar10", pretrained=True, checkpoint=None, own_module=True)
    with pytest.raises(ConfigError, match=none):
        check_weights("resnet20_cifar10", pretrained=False, checkpoint=None)
    check_weights("resnet20_cifar10", pretrained=False, checkpoint="w.pt")  # fine
    check_weights("my_models:build", pretrained=False, checkpoint=None)  # a factory has its own
    with pytest.raises(ConfigError, match=own):
        RunConfig(model="my_models:build", pretrained=True)
    with pytest.raises(ConfigError, match=none):
        RunConfig(model="resnet20_cifar10")
    assert main(["eval", "--model", "resnet20_cifar10", "--data", "x.npz"]) == 2
    assert re.search(none, capsys.readouterr().err)
