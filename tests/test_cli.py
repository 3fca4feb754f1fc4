"""``texq eval``: the acceptance figures on real data, and one clear error per bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from texq.cli import main
from texq.models import create_model


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.assets
def test_fp_eval_of_shared_model_is_915_of_1000(capsys, shared_checkpoint, test1000, tmp_path):
    rc, out, err = run_cli(capsys, "eval", "--model", "resnet20a_cifar10", "--checkpoint",
                           str(shared_checkpoint), "--data", str(test1000), "--no-progress",
                           "--out", str(tmp_path / "r.json"))
    assert rc == 0, err
    res = last_json(out)
    assert (res["correct"], res["n"], res["top1"]) == (915, 1000, 91.5)
    assert (res["w_bits"], res["a_bits"]) == (32, 32)
    lo, hi = res["top1_ci95"]
    assert lo < 91.5 < hi and hi - lo == pytest.approx(3.46, abs=0.1)
    assert json.loads((tmp_path / "r.json").read_text()) == res


@pytest.mark.assets
def test_quantized_eval_reports_bits(capsys, shared_checkpoint, test1000):
    rc, out, err = run_cli(capsys, "eval", "--model", "resnet20a_cifar10", "--checkpoint",
                           str(shared_checkpoint), "--data", str(test1000), "--w-bits", "8",
                           "--a-bits", "8", "--calib-batches", "2", "--no-progress")
    assert rc == 0, err
    res = last_json(out)
    assert (res["w_bits"], res["a_bits"], res["calib"], res["n"]) == (8, 8, "noise", 1000)
    assert abs(res["top1"] - 91.5) <= 1.0


@pytest.fixture
def small_npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "small.npz"
    np.savez(path, x=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), y=np.arange(8) % 10)
    return path


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "r20a.pt"
    torch.save(create_model("resnet20a_cifar10").state_dict(), path)
    return path


def bad_inputs(tmp_path, ckpt, small_npz, monkeypatch):
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(ckpt.read_bytes()[:1000])
    other = tmp_path / "other.pt"
    torch.save(create_model("resnet20_cifar10").state_dict(), other)
    wrong_shape = tmp_path / "shape.npz"
    np.savez(wrong_shape, x=np.zeros((4, 32, 32), np.uint8), y=np.zeros(4, int))
    wrong_labels = tmp_path / "labels.npz"
    np.savez(wrong_labels, x=np.zeros((4, 32, 32, 3), np.uint8), y=np.array([0, 1, 12, 3]))
    nan = tmp_path / "nan.pt"
    state = create_model("resnet20a_cifar10").state_dict()
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, nan)
    neg_var = tmp_path / "negvar.pt"
    state = create_model("resnet20a_cifar10").state_dict()
    state["bn1.running_var"][3] = -1.0
    torch.save(state, neg_var)
    photos = tmp_path / "photos"  # an image folder of 10 classes, one image not an image
    for k in range(10):
        (photos / f"c{k}").mkdir(parents=True)
        Image.fromarray(np.full((32, 32, 3), 20 * k, np.uint8)).save(photos / f"c{k}" / "a.png")
    (photos / "c4" / "b.png").write_bytes(b"not an image")
    factories = tmp_path / "factories"
    factories.mkdir()
    (factories / "syntax_error.py").write_text("def build(:\n    pass\n")
    (factories / "bad_import.py").write_text("import no_such_package_xyz\ndef build():\n    pass\n")
    (factories / "raises.py").write_text("def build():\n    raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(factories))
    info = ["--num-classes", "10", "--input-size", "32", "--mean", "0", "0", "0", "--std", "1", "1", "1"]
    base = ["eval", "--model", "resnet20a_cifar10", "--no-progress"]
    good = base + ["--checkpoint", str(ckpt), "--data", str(small_npz)]
    return {
        "missing checkpoint": (base + ["--checkpoint", str(tmp_path / "gone.th"), "--data", str(small_npz)],
                               "not found"),
        "truncated checkpoint": (base + ["--checkpoint", str(truncated), "--data", str(small_npz)],
                                 "truncated"),
        "other architecture": (base + ["--checkpoint", str(other), "--data", str(small_npz)],
                               "missing keys"),
        "bits 9": (base + ["--checkpoint", str(ckpt), "--data", str(small_npz), "--w-bits", "9"],
                   "w_bits=9"),
        "bits 1": (base + ["--checkpoint", str(ckpt), "--data", str(small_npz), "--a-bits", "1"],
                   "a_bits=1"),
        "wrong data shape": (base + ["--checkpoint", str(ckpt), "--data", str(wrong_shape)],
                             "expected (N, H, W, 3)"),
        "labels out of range": (base + ["--checkpoint", str(ckpt), "--data", str(wrong_labels)],
                                "label 12 at index 2"),
        "missing data": (base + ["--checkpoint", str(ckpt), "--data", str(tmp_path / "none.npz")],
                         "not found"),
        "no weights": (base + ["--data", str(small_npz)], "a checkpoint (--checkpoint PATH) or the published ones (--pretrained)"),
        "unknown model": (["eval", "--model", "resnet21_cifar10", "--checkpoint", str(ckpt),
                           "--data", str(small_npz)], "6n+2"),
        "NaN weight": (base + ["--checkpoint", str(nan), "--data", str(small_npz)],
                       "tensor layer1.0.conv1.weight holds 1 non-finite value(s)"),
        "negative running variance": (base + ["--checkpoint", str(neg_var), "--data", str(small_npz)],
                                      "tensor bn1.running_var holds a negative running variance"),
        "corrupt image in a folder": (base + ["--checkpoint", str(ckpt), "--data", str(photos)],
                                      "b.png: not a readable image"),
        "factory with a syntax error": (["eval", "--model", "syntax_error:build", *info, "--data",
                                         str(small_npz)], "SyntaxError: invalid syntax (" + str(factories)),
        "factory with a missing import": (["eval", "--model", "bad_import:build", *info, "--data", str(small_npz)],
                                          "ModuleNotFoundError: No module named 'no_such_package_xyz'"),
        "factory that raises": (["eval", "--model", "raises:build", *info, "--data", str(small_npz)],
                                "failed calling it: RuntimeError: boom (" + str(factories / "raises.py") + ", line 2)"),
        "batch size 0": (good + ["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
        "negative workers": (good + ["--workers", "-1"], "argument --workers: expected an integer >= 0, got -1"),
        "calibration batches not a number": (good + ["--calib-batches", "x"], "expected an integer >= 1, got 'x'"),
        "out is a folder": (good + ["--out", str(tmp_path)], f"{tmp_path} is a folder: expected a file"),
        "out under a file": (good + ["--out", str(small_npz / "r.json")], f"{small_npz} is a file, not a folder"),
    }


def test_bad_inputs_give_one_clear_line_and_write_nothing(capsys, tmp_path, ckpt, small_npz, monkeypatch):
    for case, (argv, needle) in bad_inputs(tmp_path, ckpt, small_npz, monkeypatch).items():
        out_file = tmp_path / f"{case}.json"
        if "--out" not in argv:
            argv = [*argv, "--out", str(out_file)]
        try:
            rc, out, err = run_cli(capsys, *argv)
        except SystemExit as exc:  # argparse's own checks
            rc, (out, err) = exc.code, capsys.readouterr()
        lines = [ln for ln in err.strip().splitlines() if ln.startswith("texq: error:")]
        assert rc == 2, case
        assert len(lines) == 1 and needle in lines[0], (case, err)
        assert "Traceback" not in err, case
        assert out == "", case
        assert not out_file.exists(), case
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_console_script_exit_status(tmp_path, small_npz):
    """The installed entry point: non-zero exit and a single error line, no traceback."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "texq.cli", "eval", "--model", "resnet20a_cifar10", "--checkpoint",
         str(tmp_path / "missing.th"), "--data", str(small_npz)],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("texq: error: checkpoint not found")
    assert "Traceback" not in proc.stderr


def test_models_command(capsys):
    rc, out, err = run_cli(capsys, "models")
    assert rc == 0
    names = last_json(out)["models"]
    assert "resnet20_cifar10" in names and "resnet20a_cifar10" in names and "mobilenet_v2" in names


def test_set_values_are_checked_one_by_one():
    """Every --set is read: a key given twice, bytes that are not UTF-8 (as argv hands them to
    Python) and a value YAML cannot read are one-line errors naming the key."""
    from texq.cli import parse_overrides
    from texq.util.errors import TexqError

    assert parse_overrides(["finetune.lr=0.001", "seed=3", "finetune.calib_crop_scale=[0.5, 1]"]) == {
        "finetune.lr": 0.001, "seed": 3, "finetune.calib_crop_scale": [0.5, 1]}
    with pytest.raises(TexqError, match=r"finetune.lr given twice \('abc' and '0.001'\)"):
        parse_overrides(["finetune.lr=abc", "finetune.lr=0.001"])
    with pytest.raises(TexqError, match=r"finetune.lr=\\xff: not UTF-8 text"):
        parse_overrides([os.fsdecode(b"finetune.lr=\xff")])
    with pytest.raises(TexqError, match=r"calib_crop_scale='\[0.5, 1': not a value"):
        parse_overrides(["finetune.calib_crop_scale=[0.5, 1"])


def test_an_option_given_twice_with_two_values_is_refused_and_with_one_value_accepted(capsys):
    """argparse keeps the last of two values silently; texq refuses them in one line naming the
    option and both values, and accepts a repeat of the same value."""
    from texq.cli import build_parser

    base = ["eval", "--model", "resnet8_cifar10", "--data", "d.npz"]
    for extra, shown in ((["--w-bits", "4", "--w-bits", "3"], "--w-bits given twice (4 and 3)"),
                         (["--seed=1", "--seed", "2"], "--seed given twice (1 and 2)"),
                         (["--mean", "0", "0", "0", "--mean", "0", "0", "1"],
                          "--mean given twice ([0.0, 0.0, 0.0] and [0.0, 0.0, 1.0])")):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args([*base, *extra])
        assert exc.value.code == 2
        assert f"texq eval: {shown}: give it once" in capsys.readouterr().err
    args = build_parser().parse_args([*base, "--w-bits", "4", "--w-bits", "4"])
    assert args.w_bits == 4 and args.model == "resnet8_cifar10"


def test_an_option_given_twice_is_one_error_line(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--model", "resnet8_cifar10", "--data", "d.npz", "--out", "o", "--seed", "1",
              "--seed", "2"])
    err = capsys.readouterr().err
    assert err.strip() == ("texq: error: texq run: --seed given twice (1 and 2): give it once "
                           "(see texq run --help)")


def test_run_flags_are_spellings_of_config_keys_with_their_defaults():
    """texq run's --w-bits, --seed, --no-mkd, ... set their key only when given (an absent flag
    leaves the key's own default, or --set's value), and a flag against a --set of the same key
    with another value is one line naming both."""
    from texq.cli import build_parser, run_flags
    from texq.run.config import RunConfig
    from texq.util.errors import TexqError

    base = ["run", "--model", "resnet8_cifar10", "--data", "d.npz", "--out", "o"]
    assert run_flags(build_parser().parse_args(base), {}) == {}
    args = build_parser().parse_args([*base, "--w-bits", "3", "--no-mkd", "--seed", "2"])
    assert run_flags(args, {"seed": 2, "finetune.lr": 0.1}) == {"w_bits": 3, "mkd": False, "seed": 2}
    with pytest.raises(TexqError, match=r"^--w-bits 3 and --set w_bits=4 set one key twice: give it once$"):
        run_flags(args, {"w_bits": 4})
    with pytest.raises(TexqError, match=r"^--no-mkd and --set mkd=True set one key twice"):
        run_flags(args, {"mkd": True})
    # the flags' defaults are the config's: nothing given, the dataclass decides
    cfg = RunConfig.for_profile("tiny", model="resnet8_cifar10", checkpoint="c.pt", overrides={"w_bits": 3},
                                **run_flags(build_parser().parse_args(base), {"w_bits": 3}))
    assert (cfg.w_bits, cfg.a_bits, cfg.seed, cfg.mkd, cfg.method) == (3, 4, 0, True, "texq")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_writes_nothing(capsys, tmp_path):
    torch.save(create_model("resnet8_cifar10").state_dict(), tmp_path / "r8.pt")
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 32, 32, 3), np.uint8), y=np.arange(4))
    rc, _, err = run_cli(capsys, "run", "--model", "resnet8_cifar10", "--checkpoint", str(tmp_path / "r8.pt"),
                         "--data", str(tmp_path / "d.npz"), "--device", "cuda", "--profile", "tiny",
                         "--out", str(tmp_path / "run"))
    assert rc == 2 and err.strip().splitlines() == ["texq: error: device cuda: no CUDA device is available"]
    assert not (tmp_path / "run").exists()
