"""params.yaml -> PipelineConfig, and the pipeline's stages against ``texq run``."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from texq.pipeline import load_params, pipeline_config, read_config, run_stage
from texq.pipeline.params import NOT_IN_FILE
from texq.run.config import RunConfig, fingerprint
from texq.run.layout import Layout
from texq.run.teacher import teacher_top1
from texq.util.errors import ConfigError
from texq.util.keys import flatten, leaves

ROOT = Path(__file__).resolve().parents[2]


def test_params_yaml_has_the_config_structure():
    """Every setting of RunConfig, under its dotted name, and nothing else (but the pipeline's
    evaluate section): one name per setting in the file, --set, grids and MLflow."""
    params = load_params(ROOT / "params.yaml")
    in_file = set(leaves({k: v for k, v in params.items() if k != "evaluate"}))
    settings = set(flatten(RunConfig(checkpoint="x")))
    assert in_file == settings - set(NOT_IN_FILE)
    assert {"device", "quant.w_bits"} <= set(NOT_IN_FILE) and "finetune.alpha6" in in_file
    assert "quant.w_bits" not in settings  # the bits have one home: the top-level w_bits/a_bits


def _run_config(params: dict):
    return pipeline_config(params).run


def test_auto_takes_the_profile_value_and_values_override():
    params = load_params(ROOT / "params.yaml")
    for profile in ("paper", "quick", "tiny"):
        cfg = _run_config({**params, "profile": profile})
        ref = RunConfig.for_profile(profile, model=cfg.model, pretrained=True, data=cfg.data)
        assert fingerprint(cfg) == fingerprint(ref), profile  # params.yaml holds the defaults
    params["finetune"]["alpha6"] = 10
    params["calibration"]["iters"] = 7
    params["calibration"]["warmup_iters"] = 7  # no more than iters
    params["calibration"]["laws"]["theta_u"] = 0.25
    cfg = _run_config(params)
    assert (cfg.finetune.alpha6, cfg.calibration.iters, cfg.calibration.laws.theta_u) == (10.0, 7, 0.25)
    assert cfg.finetune.epochs == 8  # still the quick profile's
    # keys valid only together are checked together (not one at a time, in file order)
    paper = {**params, "profile": "paper"}
    paper["finetune"].update(act_calib_epochs=1, warmup_epochs=2)
    cfg = _run_config(paper)
    assert (cfg.finetune.warmup_epochs, cfg.finetune.act_calib_epochs) == (2, 1)


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["finetune"].update(alpha7=1), "unknown config key 'finetune.alpha7'"),
    (lambda p: p["calibration"].update(iters="many"), "calibration.iters='many': expected an integer"),
    (lambda p: p.update(w_bits=9), "w_bits"),
    (lambda p: p.update(profile="fast"), "profile='fast'"),
    (lambda p: p.update(stages={}), "unknown config key 'stages'"),
    (lambda p: p.update(gpu=1), "unknown config key 'gpu'"),
    (lambda p: p.update(device="cuda"), "device: not a params.yaml key"),
    (lambda p: p["quant"].update(w_bits=3), "quant.w_bits: not a params.yaml key"),
    (lambda p: p.update(finetune=3), "config key 'finetune' is a section"),
    (lambda p: p["finetune"].update(mixup_p=True), "mixup_p=True: expected a number"),
    (lambda p: p["evaluate"].update(batch_sise=64), "unknown config key 'evaluate.batch_sise'"),
    (lambda p: p["evaluate"].update(batch_size=0), "evaluate.batch_size=0: expected an integer >= 1"),
    (lambda p: p["evaluate"].update(batch_size="big"), "evaluate.batch_size='big'"),
    (lambda p: p["evaluate"].update(register_model="yes"), "register_model='yes': expected one of auto, true, false"),
    # every setting's domain, declared beside its field (texq.util.domains)
    (lambda p: p["finetune"].update(lr=-0.1), "finetune.lr=-0.1: expected a positive number"),
    (lambda p: p["finetune"].update(lr=float("nan")), "finetune.lr=nan: expected a finite number"),
    (lambda p: p["finetune"].update(alpha6=float("inf")), "finetune.alpha6=inf: expected a finite number"),
    (lambda p: p["finetune"].update(epochs=0), "finetune.epochs=0: expected an integer >= 1"),
    (lambda p: p["finetune"].update(kd_temperature=0), "finetune.kd_temperature=0.0: expected a positive number"),
    (lambda p: p["finetune"].update(mixup_p=2), "finetune.mixup_p=2.0: expected a number in [0, 1]"),
    (lambda p: p["finetune"].update(calib_crop_scale=[0.0, 1.0]),
     "finetune.calib_crop_scale=(0.0, 1.0): expected a number in (0, 1] (each)"),
    (lambda p: p["calibration"].update(iters=-5), "calibration.iters=-5: expected an integer >= 1"),
    (lambda p: p["calibration"]["laws"].update(theta_u=1.5), "calibration.laws.theta_u=1.5: expected a number in [0, 1]"),
    (lambda p: p["generator"].update(beta2=1), "generator.beta2=1.0: expected a number in [0, 1)"),
    (lambda p: p["distill"].update(batch_size=0), "distill.batch_size=0: expected an integer >= 1"),
    (lambda p: p["quant"].update(act_momentum=-0.1), "quant.act_momentum=-0.1: expected a number in [0, 1)"),
    (lambda p: p.update(seed=-1), "seed=-1: expected an integer >= 0"),
])
def test_bad_params_name_the_file_and_key(edit, message):
    params = load_params(ROOT / "params.yaml")
    edit(params)
    with pytest.raises(ConfigError, match="params.yaml") as exc:
        pipeline_config(params, "params.yaml")
    assert message in str(exc.value)


@pytest.mark.parametrize("profile, flag, registered", [
    ("paper", "auto", True), ("quick", "auto", False), ("tiny", "auto", False),
    ("tiny", True, True), ("paper", False, False)])
def test_registering_the_model_is_a_choice_auto_for_paper_runs_only(profile, flag, registered):
    params = load_params(ROOT / "params.yaml")
    params["profile"], params["evaluate"]["register_model"] = profile, flag
    assert pipeline_config(params).registers_model is registered
    del params["evaluate"]["register_model"]  # absent: auto
    assert pipeline_config(params).registers_model is (profile == "paper")


def test_missing_or_broken_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("run: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")
    (tmp_path / "twice.yaml").write_text("seed: 0\nfinetune:\n  lr: 0.1\n  alpha6: 5\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: key 'lr' given twice \(lines 3 and 5\)"):
        load_params(tmp_path / "twice.yaml")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="binary.yaml: not valid YAML"):
        load_params(tmp_path / "binary.yaml")


@pytest.fixture(scope="module")
def staged(tiny_params, tmp_path_factory) -> Path:
    """The four stages run one by one on tiny_params (read it; copy it to change it)."""
    out = tmp_path_factory.mktemp("staged") / "pipe"
    for name in ("teacher", "synthesize", "train", "evaluate"):
        run_stage(name, read_config(tiny_params, "cpu"), out, progress=False)
    return out


def test_stages_give_the_result_of_texq_run(staged, tiny_params, tiny_run):
    out = staged
    metrics = json.loads((out / "metrics.json").read_text())
    teacher = json.loads((out / "teacher.json").read_text())
    assert not (out / ".work").exists()
    assert {p.name for p in (out / "train").iterdir()} == {"qmodel.pt", "generator.pt",
                                                           "history.jsonl", "summary.json"}
    # tiny_run: texq run of the same configuration (params.yaml at the tiny profile holds the defaults)
    cfg = read_config(tiny_params, "cpu").run
    assert json.loads((tiny_run / "config.json").read_text())["fingerprint"] == fingerprint(cfg)
    ref = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["correct"] == ref["correct"] and metrics["top1"] == ref["top1"]
    assert metrics["fp_top1"] == teacher["top1"] == ref["fp_top1"]
    assert len(metrics["per_class_top1"]) == 10 and "texture" in metrics
    a = torch.load(out / "train" / "qmodel.pt", weights_only=True)["state_dict"]
    b = torch.load(tiny_run / "train" / "qmodel.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # one run path: every score and statistic is the same (the timings aside)
    assert {k: v for k, v in metrics.items() if k != "train_seconds"} == \
        {k: v for k, v in ref.items() if k != "train_seconds"}


def test_evaluate_reuses_the_teacher_score_only_for_the_same_model_and_data(staged, tiny_params, tmp_path):
    out = tmp_path / "pipe"
    shutil.copytree(staged, out)
    teacher = json.loads((out / "teacher.json").read_text())
    real_fp = json.loads((out / "metrics.json").read_text())["fp_top1"]
    assert real_fp == teacher["top1"]
    config = read_config(tiny_params, "cpu")
    # a marked score in teacher.json shows whether evaluate took it or scored F itself
    (out / "teacher.json").write_text(json.dumps({**teacher, "top1": 12.5}))
    assert run_stage("evaluate", config, out, progress=False)["fp_top1"] == 12.5
    # the stage's choice (teacher_top1): another model, data or size, or no teacher.json, is scored again
    layout, n = Layout(out), teacher["n"]
    assert teacher_top1(layout, config.run, n) == 12.5  # as the stage chose above
    for key, value in (("data", "other.npz"), ("checkpoint", "other.pt"), ("n", 7)):
        (out / "teacher.json").write_text(json.dumps({**teacher, "top1": 12.5, key: value}))
        assert teacher_top1(layout, config.run, n) is None
    (out / "teacher.json").unlink()
    assert teacher_top1(layout, config.run, n) is None
    assert run_stage("evaluate", config, out, progress=False)["fp_top1"] == real_fp


def _dvc(args: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _ran(output: str) -> set[str]:
    return {s for s in ("teacher", "synthesize", "train", "evaluate") if f"Running stage '{s}'" in output}


BIN = Path(sys.executable).parent


def _pipeline_repo(tiny_params, tmp_path, edit=None) -> tuple[Path, dict, callable]:
    """A git + DVC repository holding texq's pipeline, tiny profile, MLflow in a temp sqlite."""
    repo = tmp_path / "repo"
    for name in ("texq", "flows"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    params = yaml.safe_load(Path(tiny_params).read_text())
    if edit:
        edit(params)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1",
               OMP_NUM_THREADS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t", MLFLOW_DISABLE_TELEMETRY="true",
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, env=env, check=True, capture_output=True)
    git("init", "-q")
    _dvc(["init", "-q"], repo, env)
    git("add", "-A")
    git("commit", "-qm", "pipeline")
    return repo, env, git


def _mlflow_runs(env: dict):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name("texq")
    return c, (c.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"]) if exp else [])


NEEDS_PIPELINE = pytest.mark.skipif(
    not (BIN / "dvc").exists() or importlib.util.find_spec("mlflow") is None,
    reason="the pipeline extra (dvc, mlflow) is not installed beside this Python")


@pytest.mark.integration
@NEEDS_PIPELINE
def test_dvc_repro_runs_all_then_nothing_then_only_what_changed(tiny_params, tmp_path):
    repo, env, git = _pipeline_repo(tiny_params, tmp_path)
    assert _ran(_dvc(["repro"], repo, env)) == {"teacher", "synthesize", "train", "evaluate"}
    metrics = json.loads((repo / "out" / "pipeline" / "metrics.json").read_text())
    assert metrics["n"] == 40 and metrics["method"] == "texq"
    artifact = yaml.safe_load((repo / "dvc.yaml").read_text())["artifacts"]["quantized-model"]
    assert artifact["type"] == "model" and (repo / artifact["path"]).is_file()  # DVC took the schema
    assert _ran(_dvc(["repro"], repo, env)) == set()  # nothing changed: nothing runs
    c, runs = _mlflow_runs(env)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert {"calibration.alpha1", "generator.alpha5", "finetune.alpha6"} <= set(run.data.params)
    assert "alpha6" not in run.data.params  # one name per setting
    assert run.data.params["finetune.alpha6"] == "20.0" and run.data.params["profile"] == "tiny"
    assert run.data.metrics["top1"] == metrics["top1"] and "quantized/kd_loss" in run.data.metrics
    history = c.get_metric_history(run.info.run_id, "generator/ce_loss")  # one point per epoch (1 + 2)
    assert sorted(m.step for m in history) == [1, 2, 3]  # epochs from 1: step 0 holds the scores alone
    assert "quant.w_bits" not in run.data.params and run.data.params["w_bits"] == "4"  # one home for the bits
    assert "dvc_exp_name" not in run.data.tags  # plain dvc repro: no experiment name, no empty tag
    assert run.data.tags["texq.gpu"] == "cpu" and run.data.tags["texq.host"]
    assert {a.path for a in c.list_artifacts(run.info.run_id)} >= {"metrics.json", "teacher.json", "train",
                                                                   "figures"}
    pictures = {"calibration_images.png", "generator_samples.png", "texture_histograms.png",
                "per_class_top1.png"}
    assert {a.path.split("/")[-1] for a in c.list_artifacts(run.info.run_id, "figures")} == pictures
    assert {p.name for p in (repo / "out" / "pipeline" / "figures").iterdir()} == pictures
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40  # the UI's commit column
    # the quantized model as an MLflow model: loads and scores the run's top-1; a registered version
    import mlflow.pytorch

    from texq.data import load_eval_data
    from texq.eval import evaluate

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    loaded = mlflow.pytorch.load_model(run.data.tags["texq.model_uri"])
    res = evaluate(loaded, load_eval_data(metrics["data"], loaded.texq_info), progress=False)
    assert res.correct == metrics["correct"]
    assert c.search_model_versions("name='texq-resnet8_cifar10-w4a4'") == []  # auto: tiny runs register nothing
    (logged,) = [c.get_logged_model(o.model_id) for o in run.outputs.model_outputs]
    assert {m.key: m.value for m in logged.metrics}["top1"] == metrics["top1"]  # the model page's scores
    keys = [m.key for m in logged.metrics]
    assert len(keys) == len(set(keys)) and "fp_top1" in keys  # each score listed once
    assert not any(m.key.startswith(("generator/", "quantized/")) for m in logged.metrics)
    assert run.info.run_name == "texq-w4a4-s0-tiny"
    assert run.data.metrics["top1_ci95_low"] <= run.data.metrics["top1"] <= run.data.metrics["top1_ci95_high"]
    (ds,) = run.inputs.dataset_inputs  # the evaluation set, in the runs table's Dataset column
    assert ds.dataset.source == metrics["data"] and ds.tags[0].value == "evaluation"
    assert (tmp_path / "mlartifacts").is_dir() and not (repo / "mlruns").exists()  # beside the db
    # the loss curves and per-class top-1 as DVC plots: data for `dvc plots show/diff`, and HTML
    shown = subprocess.run([str(BIN / "dvc"), "plots", "show", "--json"], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=300)
    plots = json.loads(shown.stdout)
    assert "errors" not in plots, plots.get("errors")
    assert all(plots["data"][k][0]["content"]["data"]["values"] for k in ("loss_curves", "per_class_top1"))
    history = json.loads((repo / "out" / "pipeline" / "history.json").read_text())
    assert [r["epoch"] for r in history] == [0, 1, 2] and "quantized/kd_loss" in history[-1]
    from flows.plots import (
        write_template,  # the page scripts/setup.sh configures: no CDN
    )

    template = write_template(tmp_path / "offline.html")
    _dvc(["plots", "show", "--html-template", str(template), "-o", str(tmp_path / "plots")], repo, env)
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "loss_curves" in html and "per_class_top1" in html
    assert "<script src" not in html and "cdn.jsdelivr" not in html  # nothing fetched: the libraries are inline
    assert "window.vegaEmbed=" in html and html.count("vegaEmbed(") >= 2  # each plot embeds itself
    git("add", "-A")
    git("commit", "-qm", "lock")
    out = _dvc(["exp", "run", "-S", "finetune.alpha6=10"], repo, env)  # texq run's --set key
    assert _ran(out) == {"train", "evaluate"}
    assert yaml.safe_load((repo / "params.yaml").read_text())["finetune"]["alpha6"] == 10
    _, runs = _mlflow_runs(env)
    assert len(runs) == 2 and runs[1].data.params["finetune.alpha6"] == "10.0"
    assert runs[1].info.status == "FINISHED" and runs[1].data.tags["dvc_exp_name"]
    out = _dvc(["exp", "run", "-S", "evaluate.batch_size=8"], repo, env)
    assert _ran(out) == {"teacher", "evaluate"}
    proc = subprocess.run([str(BIN / "texq"), "compare", "--by", "finetune.alpha6", "--out", str(tmp_path / "cmp")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # the last experiment re-scored the alpha6=10 model: one result per trained model
    assert result["rows"] == 2 and [r["n"] for r in result["table"]] == [1, 1]
    assert (tmp_path / "cmp" / "compare.csv").exists() and "| texq | W4A4 |" in proc.stdout


@pytest.mark.integration
@NEEDS_PIPELINE
def test_failed_stage_fails_repro_and_its_mlflow_run(tiny_params, tmp_path):
    def real_without_data(p):
        p.update(method="real", train_data=str(tmp_path / "missing.npz"))

    repo, env, _ = _pipeline_repo(tiny_params, tmp_path, real_without_data)
    proc = subprocess.run([str(BIN / "dvc"), "repro"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode != 0
    assert "missing.npz" in proc.stdout + proc.stderr
    out = repo / "out" / "pipeline"
    assert (out / "step1.pt").exists() and not (out / "train").exists()  # nothing half-written
    assert not (out / "metrics.json").exists()
    _, runs = _mlflow_runs(env)
    assert [r.info.status for r in runs] == ["FAILED"]


def test_compare_table_groups_seeds_against_statistics():
    import statistics

    import pandas as pd

    from flows.compare import GROUP, compare_table, to_markdown

    base = {"method": "texq", "w_bits": "4", "a_bits": "4", "laws": "True", "layered_bns": "True",
            "mkd": "True", "profile": "quick", "finetune.alpha6": "20.0"}
    rows = [{**base, "seed": str(s), "top1": t, "run_id": str(s)} for s, t in enumerate([91.2, 91.5, 91.6])]
    rows.append({**base, "mkd": "False", "seed": "0", "top1": 90.0, "run_id": "x"})
    rows.append({**base, "finetune.alpha6": "10.0", "seed": "0", "top1": 89.0, "run_id": "y"})
    table = compare_table(pd.DataFrame(rows))
    assert len(table) == 2  # alpha6 is not a grouping key unless asked
    full = table[table.mkd == "True"].iloc[0]
    assert full.n == 4 and full.top1_mean == pytest.approx(statistics.mean([91.2, 91.5, 91.6, 89.0]))
    by = compare_table(pd.DataFrame(rows), ("finetune.alpha6",))
    row = by[(by.mkd == "True") & (by["finetune.alpha6"] == "20.0")].iloc[0]
    assert row.n == 3 and row.seeds == "0 1 2"
    assert row.top1_std == pytest.approx(statistics.stdev([91.2, 91.5, 91.6]))
    md = to_markdown(by, ("finetune.alpha6",))
    assert "| texq | W4A4 | True | True | True | quick | 20.0 | 91.43 +- 0.21 | 3 | 0 1 2 |" in md
    assert md.count("\n") == 1 + len(by) and set(GROUP) <= set(by.columns)
    gdfq = {**base, "method": "gdfq", "laws": "None", "layered_bns": "None", "mkd": "False"}
    md = to_markdown(compare_table(pd.DataFrame([{**gdfq, "seed": "0", "top1": 80.0, "run_id": "g"}])))
    assert "| gdfq | W4A4 | n/a | n/a | False | quick | 80.00 | 1 | 0 |" in md  # switches as applied


def test_a_train_stage_rerun_before_evaluate_trains_nothing_again(staged, tiny_params, tmp_path, monkeypatch):
    """DVC removes a stage's outputs before it reruns one (e.g. after its recording failed): the
    final checkpoint, kept until evaluate has scored train/, gives the same outputs back without
    a single training step; evaluate then removes it."""
    from texq.method.finetune import Finetuner
    from texq.models import load_quantized

    out = tmp_path / "pipe"
    out.mkdir()
    for name in ("teacher.json", "step1.pt"):
        shutil.copy2(staged / name, out / name)
    config = read_config(tiny_params, "cpu")
    run_stage("train", config, out, progress=False)
    first = {k: v.clone() for k, v in load_quantized(out / "train" / "qmodel.pt").state_dict().items()}
    history = (out / "train" / "history.jsonl").read_text()
    assert list(out.glob(".work/train-*/checkpoint.pt")), "the final checkpoint is kept until evaluate"
    shutil.rmtree(out / "train")  # as dvc repro does before it reruns a stage

    def no_training(self, *args, **kwargs):
        raise AssertionError("an epoch was trained again")

    monkeypatch.setattr(Finetuner, "run_epoch", no_training)
    run_stage("train", config, out, progress=False)
    again = load_quantized(out / "train" / "qmodel.pt").state_dict()
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert (out / "train" / "history.jsonl").read_text() == history  # each epoch once
    assert (out / "train" / "generator.pt").read_bytes() == (staged / "train" / "generator.pt").read_bytes()
    run_stage("evaluate", config, out, progress=False)
    assert not (out / ".work").exists()
    assert json.loads((out / "metrics.json").read_text())["correct"] == \
        json.loads((staged / "metrics.json").read_text())["correct"]
