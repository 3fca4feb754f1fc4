"""texq.run / texq run end to end on the tiny profile: artifacts, resume, baselines, errors."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from texq.cli import main
from texq.eval import evaluate
from texq.method.bns import layer_weights
from texq.models import create_model, load_quantized
from texq.run.config import RunConfig
from texq.run.layout import Layout
from texq.run.runner import run
from texq.util.errors import ConfigError
from texq.util.keys import flatten, with_overrides


def tiny(tiny_setup, **kw) -> RunConfig:
    ckpt, data, _ = tiny_setup
    return RunConfig.for_profile("tiny", model="resnet8_cifar10", checkpoint=str(ckpt),
                                 data=str(data), device="cpu", **kw)


def test_texq_run_writes_every_artifact(tiny_setup, tiny_run):
    tmp_path = tiny_run  # a finished run of tiny(tiny_setup)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # the pipeline's layout (texq.run.layout): the same files as out/pipeline, plus config.json
    for name in ("config.json", "teacher.json", "step1.pt", "train/qmodel.pt", "train/generator.pt",
                 "train/history.jsonl", "train/summary.json", "history.json", "metrics.json",
                 "per_class.json"):
        assert (tmp_path / name).is_file(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    if importlib.util.find_spec("matplotlib") is not None:  # the pictures, drawn without a tracker
        assert {p.name for p in (tmp_path / "figures").iterdir()} >= {
            "calibration_images.png", "generator_samples.png", "per_class_top1.png"}
    for key in ("top1", "n", "method", "w_bits", "a_bits", "seed", "train_seconds", "fp_top1",
                "texture", "texture_generated", "class_names", "per_class_top1"):
        assert key in metrics
    assert metrics["n"] == 40 and metrics["method"] == "texq"
    cfg = tiny(tiny_setup)
    epochs = cfg.finetune.warmup_epochs + cfg.finetune.epochs
    rows = [json.loads(l) for l in (tmp_path / "train" / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(epochs))
    assert rows[0]["phase"] == "warmup" and "quantized/kd_loss" in rows[-1]
    # the saved quantized model reproduces the reported accuracy
    from texq.data import load_eval_data

    qmodel = load_quantized(tmp_path / "train" / "qmodel.pt")
    res = evaluate(qmodel, load_eval_data(cfg.data, qmodel.texq_info), progress=False)
    assert res.correct == metrics["correct"]
    # a second run on the same folder returns the finished result without recomputing
    mtime = (tmp_path / "train" / "qmodel.pt").stat().st_mtime_ns
    assert run(cfg, tmp_path, progress=False) == metrics
    assert (tmp_path / "train" / "qmodel.pt").stat().st_mtime_ns == mtime


def test_rerun_with_other_config_is_refused(tiny_setup, tmp_path):
    run(tiny(tiny_setup, method="zeroq"), tmp_path, progress=False)
    with pytest.raises(ConfigError, match=r"another configuration \(seed 0 vs 1\)"):
        run(tiny(tiny_setup, method="zeroq", seed=1), tmp_path, progress=False)
    with pytest.raises(ConfigError, match=r"\(distill.lr 0.5 vs 0.25, seed 0 vs 2\)"):
        run(tiny(tiny_setup, method="zeroq", seed=2, overrides={"distill.lr": 0.25}), tmp_path, progress=False)


@pytest.mark.parametrize("method", ["gdfq", "zeroq", "real"])
def test_baselines_run(tiny_setup, tmp_path, method):
    extra = {"train_data": str(tiny_setup[2])} if method == "real" else {}
    metrics = run(tiny(tiny_setup, method=method, **extra), tmp_path, progress=False)
    assert metrics["method"] == method and metrics["n"] == 40
    step1 = torch.load(tmp_path / "step1.pt", weights_only=True)  # distilled images, or nothing
    assert (step1["images"] is not None) == (method == "zeroq") and "center_mean" not in step1
    assert (tmp_path / "train" / "generator.pt").exists() == (method == "gdfq")
    assert (tmp_path / "train" / "history.jsonl").exists() == (method != "zeroq")  # ZeroQ trains nothing
    # what the run records is what it did: switches the method has no module for are None
    applied = {"gdfq": (None, None, False), "zeroq": (None, None, None), "real": (None, None, True)}
    assert (metrics["laws"], metrics["layered_bns"], metrics["mkd"]) == applied[method]
    effective = json.loads((tmp_path / "config.json").read_text())["effective"]
    assert effective["mkd"] == applied[method][2]
    if method == "gdfq":  # GDFQ's own generator weights, plain KD: no mixed sample ever
        assert (effective["generator.alpha3"], effective["generator.alpha5"]) == (0.1, 0.0)
        assert not any(k.startswith(("calibration.", "distill.")) for k in effective)
        rows = [json.loads(l) for l in (tmp_path / "train" / "history.jsonl").read_text().splitlines()]
        assert all(r.get("quantized/mixed_per_step", 0) == 0 for r in rows) and "generator/layered_bns_loss" not in rows[-1]
    if method == "real":  # mixup KD on real batches
        rows = [json.loads(l) for l in (tmp_path / "train" / "history.jsonl").read_text().splitlines()]
        assert sum(r.get("quantized/mixed_per_step", 0) for r in rows) > 0


@pytest.mark.parametrize("method, switch", [("gdfq", "laws"), ("gdfq", "layered_bns"),
                                            ("zeroq", "mkd"), ("zeroq", "laws"), ("real", "laws")])
def test_a_switch_the_method_ignores_is_refused(method, switch):
    with pytest.raises(ConfigError, match=f"{switch}=false with method '{method}'"):
        RunConfig(method=method, checkpoint="x", train_data="t.npz", **{switch: False})
    # what the method does anyway is no conflict: GDFQ's KD is plain, the real-data run has MKD
    assert RunConfig(method="gdfq", checkpoint="x", mkd=False).mkd is False
    assert RunConfig(method="real", checkpoint="x", train_data="t.npz", mkd=False).mkd is False


def test_same_seed_same_result_and_switches(tiny_setup, tiny_run, tmp_path):
    a = json.loads((tiny_run / "metrics.json").read_text())  # tiny(tiny_setup), run once
    b = run(tiny(tiny_setup), tmp_path / "b", progress=False)
    assert a["correct"] == b["correct"]
    qa = torch.load(tiny_run / "train" / "qmodel.pt", weights_only=True)["state_dict"]
    qb = torch.load(tmp_path / "b" / "train" / "qmodel.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(qa[k], qb[k]) for k in qa)
    c = run(tiny(tiny_setup, laws=False, layered_bns=False, mkd=False), tmp_path / "c", progress=False)
    assert (c["laws"], c["layered_bns"], c["mkd"]) == (False, False, False)
    # each switch does what it says: L_LAWS enters step 1 after its warm-up only when on ...
    hist_a = Layout(tiny_run).calibration_set().history
    hist_c = Layout(tmp_path / "c").calibration_set().history
    assert "laws" not in hist_a[0] and "laws" in hist_a[-1] and all("laws" not in h for h in hist_c)
    # ... step 1's BNS term weighs layers by Eq. 7's w_l, or all by 1 (Eq. 3) without layered BNS
    fp = create_model("resnet8_cifar10", checkpoint=str(tiny_setup[0])).eval()
    x0 = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # step 1's start
    per_layer = _class_bns_per_layer(fp, x0)
    w = layer_weights(len(per_layer), 0.2, 1.1)
    layered = sum(wl * d for wl, d in zip(w, per_layer)) / len(per_layer)
    plain = sum(per_layer) / len(per_layer)
    assert hist_a[0]["bns"] == pytest.approx(layered, rel=1e-4)
    assert hist_c[0]["bns"] == pytest.approx(plain, rel=1e-4) and abs(layered - plain) > 1e-3 * plain
    # ... and without MKD no sample is ever mixed (the KD term is on the batch itself)
    mixed = [[json.loads(l).get("quantized/mixed_per_step", 0) for l in (r / "train" / "history.jsonl").read_text().splitlines()]
             for r in (tiny_run, tmp_path / "c")]
    assert sum(mixed[0]) > 0 and sum(mixed[1]) == 0


def _class_bns_per_layer(fp, x) -> list[float]:
    """Per layer, Eq. 3's mean-square distance of each image's (one image per class) BN-input
    mean and variance to F's running statistics, averaged over the images."""
    from texq.method.bns import bn_layers

    inputs = []
    hooks = [bn.register_forward_pre_hook(lambda m, i: inputs.append(i[0])) for bn in bn_layers(fp)]
    with torch.no_grad():
        fp(x)
    for h in hooks:
        h.remove()
    out = []
    for a, bn in zip(inputs, bn_layers(fp)):
        mean, var = a.mean((2, 3)), a.var((2, 3), unbiased=False)
        d = ((mean - bn.running_mean) ** 2).mean(1) + ((var - bn.running_var) ** 2).mean(1)
        out.append(float(d.mean()))
    return out


def test_overrides_and_flatten():
    cfg = RunConfig.for_profile("quick", checkpoint="x.pt")
    cfg2 = with_overrides(cfg, {"finetune.alpha6": 10.0, "w_bits": 3, "calibration.laws.k": 7})
    flat = flatten(cfg2)
    assert flat["finetune.alpha6"] == 10.0 and flat["w_bits"] == 3 and flat["calibration.laws.k"] == 7
    assert flat["calibration.alpha1"] == 2.0 and flat["generator.alpha5"] == 1.8
    with pytest.raises(ConfigError, match="unknown config key 'finetune.alpha7'"):
        with_overrides(cfg, {"finetune.alpha7": 1})
    with pytest.raises(ConfigError, match="method"):
        RunConfig(method="intraq", checkpoint="x")
    with pytest.raises(ConfigError, match="train_data"):
        RunConfig(method="real", checkpoint="x")
    with pytest.raises(ConfigError, match="finetune.warmup_epochs=0: expected an integer >= 1"):
        with_overrides(cfg, {"finetune.warmup_epochs": 0})
    with pytest.raises(ConfigError, match="act_calib_epochs=3 with warmup_epochs=2"):
        with_overrides(cfg, {"finetune.warmup_epochs": 2, "finetune.act_calib_epochs": 3})
    with pytest.raises(ConfigError, match="kd_reduction"):
        with_overrides(cfg, {"finetune.kd_reduction": "sum"})
    with pytest.raises(ConfigError, match="evaluation images"):
        RunConfig(method="real", checkpoint="x", data="a/../e.npz", train_data="e.npz")
    # a named set's training split is another set of images than its test split
    assert RunConfig(method="real", checkpoint="x", data="cifar10", train_data="cifar10").train_data
    paper = RunConfig.for_profile("paper", checkpoint="x")
    assert paper.finetune.kd_reduction == "mean" and cfg.finetune.kd_reduction == "batchmean"
    assert (paper.finetune.warmup_epochs, paper.finetune.epochs, paper.finetune.batch_size) == (50, 450, 128)
    imagenet = RunConfig.for_profile("paper", model="resnet18", pretrained=True)
    assert imagenet.finetune.batch_size == 16 and imagenet.calibration.classes_per_step == 100
    assert paper.calibration.classes_per_step == 0


def test_overrides_are_validated_once_whatever_their_order():
    """act_calib_epochs <= warmup_epochs is checked after every override is applied: the same two
    keys are accepted in either order, and a bad pair is refused in either order."""
    cfg = RunConfig.for_profile("paper", checkpoint="x.pt")  # warmup 50, act_calib 4
    pair = [("finetune.warmup_epochs", 2), ("finetune.act_calib_epochs", 1)]
    for order in (pair, pair[::-1]):
        got = with_overrides(cfg, dict(order)).finetune
        assert (got.warmup_epochs, got.act_calib_epochs) == (2, 1)
    bad = [("finetune.warmup_epochs", 2), ("finetune.act_calib_epochs", 3)]
    for order in (bad, bad[::-1]):
        with pytest.raises(ConfigError, match="act_calib_epochs=3 with warmup_epochs=2"):
            with_overrides(cfg, dict(order))


@pytest.mark.parametrize("key, value, message", [
    ("finetune.alpha6", "abc", "finetune.alpha6='abc': expected a number"),
    ("finetune.warmup_epochs", 2.5, "finetune.warmup_epochs=2.5: expected an integer"),
    ("mkd", "yes", "mkd='yes': expected true or false"),
    ("finetune.calib_crop_scale", [0.5], "expected a list of 2 a number"),
    ("quant.first_layer_bits", "8", "expected an integer or null"),
    ("finetune", 1, "is a section"),
])
def test_override_types_are_checked_up_front(key, value, message):
    cfg = RunConfig.for_profile("quick", checkpoint="x.pt")
    with pytest.raises(ConfigError) as exc:
        with_overrides(cfg, {key: value})
    assert message in str(exc.value)
    # ints pass as floats, lists as tuples, null where the setting allows it
    ok = with_overrides(cfg, {"finetune.alpha6": 7, "finetune.calib_crop_scale": [0.3, 1],
                              "quant.first_layer_bits": None, "finetune.lr": "1e-5"})
    assert ok.finetune.alpha6 == 7.0 and isinstance(ok.finetune.alpha6, float)
    assert ok.finetune.lr == 1e-5  # what YAML makes of --set finetune.lr=1e-5
    assert ok.finetune.calib_crop_scale == (0.3, 1.0)


def test_cli_rejects_a_bad_override_before_any_work(tiny_setup, tmp_path, capsys):
    ckpt, data, _ = tiny_setup
    base = ["run", "--model", "resnet8_cifar10", "--checkpoint", str(ckpt), "--data", str(data),
            "--profile", "paper", "--device", "cpu", "--no-progress"]
    rc = main(base + ["--out", str(tmp_path / "a"), "--set", "finetune.alpha6=abc"])
    err = capsys.readouterr().err
    assert rc == 2 and "finetune.alpha6='abc': expected a number" in err and "Traceback" not in err
    assert not (tmp_path / "a").exists()  # refused before the run folder is made
    # both orders of a pair that is valid only together are accepted (dry: a bad seed stops it
    # after the config is built, before any work)
    for order in (["finetune.warmup_epochs=2", "finetune.act_calib_epochs=1"],
                  ["finetune.act_calib_epochs=1", "finetune.warmup_epochs=2"]):
        sets = [a for kv in order for a in ("--set", kv)]
        rc = main(base + ["--out", str(tmp_path / "b"), *sets, "--set", "seed=x"])
        err = capsys.readouterr().err
        assert rc == 2 and "seed='x': expected an integer" in err and "act_calib" not in err


def test_cli_run_prints_json_last(tiny_setup, tmp_path, capsys):
    ckpt, data, _ = tiny_setup
    rc = main(["run", "--model", "resnet8_cifar10", "--checkpoint", str(ckpt), "--data", str(data),
               "--profile", "tiny", "--method", "zeroq", "--w-bits", "3", "--a-bits", "3",
               "--seed", "2", "--out", str(tmp_path / "r"), "--no-progress", "--device", "cpu",
               "--set", "distill.iters=2"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    for key in ("top1", "n", "method", "w_bits", "a_bits", "seed", "train_seconds"):
        assert key in res
    assert (res["method"], res["w_bits"], res["a_bits"], res["seed"]) == ("zeroq", 3, 3, 2)
    rc = main(["run", "--model", "resnet8_cifar10", "--checkpoint", str(ckpt), "--data", str(data),
               "--out", str(tmp_path / "bad"), "--set", "finetune.nope=1"])
    assert rc == 2 and "unknown config key" in capsys.readouterr().err


@pytest.mark.integration  # three texq run processes, one SIGKILLed
def test_killed_run_resumes_and_finishes_identically(tiny_setup, tmp_path):
    """Kill a run during fine-tuning, rerun it with the same --out: it resumes from its last
    completed epoch and ends exactly where an uninterrupted run ends."""
    ckpt, data, _ = tiny_setup
    argv = [sys.executable, "-m", "texq.cli", "run", "--model", "resnet8_cifar10", "--checkpoint",
            str(ckpt), "--data", str(data), "--profile", "tiny", "--device", "cpu", "--no-progress",
            "--set", "finetune.epochs=8", "--set", "finetune.iters_per_epoch=4"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # the uninterrupted run, beside the one to kill (one thread each: the second core is used)
    whole = subprocess.Popen(argv + ["--out", str(tmp_path / "whole")], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        out = tmp_path / "killed"
        proc = subprocess.Popen(argv + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240
        while not list(out.glob(".work/train-*/checkpoint.pt")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (out / "metrics.json").exists(), "the run finished before it could be killed"
        ckpt_path = next(out.glob(".work/train-*/checkpoint.pt"))  # the training's checkpoint
        done = torch.load(ckpt_path, weights_only=True)["epoch"]
        resumed = subprocess.run(argv + ["--out", str(out)], capture_output=True, text=True, env=env,
                                 timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        assert f"resuming from {ckpt_path} after epoch {done}" in resumed.stderr
        whole_out, whole_err = whole.communicate(timeout=300)
        assert whole.returncode == 0, whole_err
        a = json.loads(whole_out.strip().splitlines()[-1])
        b = json.loads(resumed.stdout.strip().splitlines()[-1])
        assert a["correct"] == b["correct"] and a["top1"] == b["top1"]
        qa = torch.load(tmp_path / "whole" / "train" / "qmodel.pt", weights_only=True)["state_dict"]
        qb = torch.load(out / "train" / "qmodel.pt", weights_only=True)["state_dict"]
        assert all(torch.equal(qa[k], qb[k]) for k in qa)
    finally:
        if whole.poll() is None:  # a failure above: no run left behind
            whole.kill()
            whole.wait()


def test_a_saved_artifact_has_the_same_bytes_every_time(tmp_path):
    """DVC hashes the files: the same content saved twice (another temporary name each time) must
    give the same bytes, or an unchanged stage looks changed and its run cache never matches."""
    import hashlib

    import torch

    from texq.util.io import save_torch

    obj = {"images": torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)), "labels": [1, 2]}
    digests = set()
    for name in ("a.pt", "b.pt", "a.pt"):
        save_torch(tmp_path / name, obj)
        digests.add(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert len(digests) == 1
    assert torch.equal(torch.load(tmp_path / "b.pt", weights_only=True)["images"], obj["images"])
