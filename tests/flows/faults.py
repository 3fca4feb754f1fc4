"""Faults injected into real pipeline runs (``dvc repro`` of texq's dvc.yaml on the tiny profile,
each stage its own process, MLflow in a SQLite store or behind a real ``mlflow server``), and what
each leaves behind: the rows of the reliability table of docs/reliability.md. Used by test_faults.py (a subset,
asserted) and bench/faults.py (every scenario, printed).

A scenario runs the pipeline once with its fault, then does what a user is told to do (free the
disk and rerun, ``texq track sync``, ``texq track reconcile``, ``dvc repro`` again) and reports:
whether the finished work was kept, which epochs were trained more than once, the MLflow runs'
final states, how many stay RUNNING, and whether the final metrics equal a run without faults.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
EPOCH = re.compile(r"^epoch (\d+)/(\d+) ", re.M)


@dataclass
class Outcome:
    fault: str
    moment: str
    kept: bool = False  # every stage that finished kept its outputs (no finished stage lost)
    recomputed: list[int] = field(default_factory=list)  # epochs trained more than once
    states: list[str] = field(default_factory=list)  # the MLflow runs' final states
    same_metrics: bool = False  # metrics.json (train_seconds aside) equals the run without faults
    seconds: float = 0.0
    notes: str = ""
    unfinished: list[int] = field(default_factory=list)  # epochs in flight when killed (may rerun)

    @property
    def running(self) -> int:
        return self.states.count("RUNNING")

    def row(self) -> str:
        return (f"| {self.fault} | {self.moment} | {'yes' if self.kept else 'NO'} | "
                f"{len(self.recomputed)}{' ' + str(self.recomputed) if self.recomputed else ''} | "
                f"{', '.join(self.states) or '-'} | {self.running} | {'yes' if self.same_metrics else 'NO'} | "
                f"{self.seconds:.0f} | {self.notes} |")


HEADER = ("| fault | moment | finished work kept | epochs recomputed | MLflow final states | left RUNNING "
          "| metrics as without faults | wall s | what the user did |\n|---|---|---|---|---|---|---|---|---|")


def write_params(params_file: Path, epochs: int, dest: Path) -> Path:
    """``params_file`` with ``epochs`` epochs of step 3, written to ``dest``."""
    params = yaml.safe_load(Path(params_file).read_text())
    params["finetune"]["epochs"] = epochs
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(yaml.safe_dump(params))
    return dest


def stages_in_process(params_file: Path, epochs: int, root: Path) -> dict:
    """The metrics (train_seconds aside) of the pipeline without faults, its four stages run one after
    another in this process on one thread, as each stage process runs them (OMP_NUM_THREADS=1): no
    dvc, no MLflow, no process start-up. That ``dvc repro`` runs these same stages is
    tests/pipeline/test_pipeline.py's to check."""
    import torch

    from texq.pipeline import read_config, run_stage
    from texq.pipeline.stages import STAGES

    config = read_config(write_params(params_file, epochs, root / "params.yaml"), "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in STAGES:  # in the pipeline's order
            run_stage(name, config, root / "out", progress=False)
    finally:
        torch.set_num_threads(threads)
    metrics = json.loads((root / "out" / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if k != "train_seconds"}


class Project:
    """A git + DVC repository holding texq's pipeline at the tiny profile with ``epochs`` epochs."""

    def __init__(self, root: Path, params_file: Path, epochs: int, store_uri: str | None = None):
        self.root, self.repo = root, root / "repo"
        for name in ("texq", "flows"):
            shutil.copytree(ROOT / name, self.repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "dvc.yaml", self.repo / "dvc.yaml")
        write_params(params_file, epochs, self.repo / "params.yaml")
        self.uri = store_uri or f"sqlite:///{root / 'mlflow.db'}"
        self.env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1",
                        OMP_NUM_THREADS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
                        GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t", MLFLOW_DISABLE_TELEMETRY="true",
                        MLFLOW_TRACKING_URI=self.uri, TEXQ_TRACKING_WAIT="2",
                        MLFLOW_HTTP_REQUEST_MAX_RETRIES="2", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
        self.env["MLFLOW_EXPERIMENT_NAME"] = self.experiment = f"texq-{root.name}"  # its runs alone
        self.log: list[str] = []
        for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"], ["git", "add", "-A"],
                    ["git", "commit", "-qm", "pipeline"]):
            subprocess.run(cmd, cwd=self.repo, env=self.env, check=True, capture_output=True)

    @property
    def out(self) -> Path:
        return self.repo / "out" / "pipeline"

    def start(self, *args: str) -> subprocess.Popen:
        """``dvc repro`` (or another command) in the background, its output gathered in self.log."""
        proc = subprocess.Popen(list(args) or [str(BIN / "dvc"), "repro"], cwd=self.repo, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

        def read() -> None:
            for line in proc.stdout:
                self.log.append(line)

        proc.reader = threading.Thread(target=read, daemon=True)
        proc.reader.start()
        return proc

    def run(self, *args: str, timeout: float = 900) -> int:
        proc = self.start(*args)
        proc.wait(timeout)
        proc.reader.join(10)
        return proc.returncode

    def texq(self, *args: str) -> int:
        return self.run(str(BIN / "texq"), *args)

    def wait_for(self, pattern: str, proc: subprocess.Popen, timeout: float = 600) -> None:
        deadline = time.time() + timeout
        while not any(re.search(pattern, line) for line in self.log):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"never saw {pattern!r}:\n{''.join(self.log)[-3000:]}")
            time.sleep(0.05)

    def wait_checkpoint(self, epoch: int, proc: subprocess.Popen, timeout: float = 600) -> None:
        """Until train's checkpoint after ``epoch`` is written (the epoch is finished work)."""
        import torch

        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            for ckpt in self.out.glob(".work/train-*/checkpoint.pt"):
                try:
                    if torch.load(ckpt, weights_only=True)["epoch"] >= epoch:
                        return
                except Exception:  # being renamed into place
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"no checkpoint after epoch {epoch}:\n{''.join(self.log)[-3000:]}")

    def epochs_trained(self) -> list[int]:
        return [int(m.group(1)) for m in EPOCH.finditer("".join(self.log))]

    def total_epochs(self) -> int:
        """The train stage's epochs, G's warm-up included (its log's ``epoch k/N``)."""
        return max((int(m.group(2)) for m in EPOCH.finditer("".join(self.log))), default=0)

    def states(self) -> list[str]:
        from mlflow.tracking import MlflowClient

        c = MlflowClient(self.uri)
        exp = c.get_experiment_by_name(self.experiment)
        return [r.info.status for r in c.search_runs([exp.experiment_id])] if exp else []

    def metrics(self) -> dict:
        path = self.out / "metrics.json"
        if not path.is_file():
            return {}
        return {k: v for k, v in json.loads(path.read_text()).items() if k != "train_seconds"}

    def up_to_date(self) -> bool:
        proc = subprocess.run([str(BIN / "dvc"), "status"], cwd=self.repo, env=self.env,
                              capture_output=True, text=True, timeout=300)
        return "up to date" in proc.stdout + proc.stderr


def outcome(p: Project, fault: str, moment: str, reference: dict, t0: float, notes: str,
            epochs: int) -> Outcome:
    trained, total = p.epochs_trained(), p.total_epochs()
    return Outcome(fault, moment, kept=p.up_to_date() and sorted(set(trained)) == list(range(1, total + 1)),
                   recomputed=sorted({e for e in trained if trained.count(e) > 1}),
                   states=p.states(), same_metrics=bool(reference) and p.metrics() == reference,
                   seconds=time.perf_counter() - t0, notes=notes)


# ---- the scenarios: each takes a fresh Project and the reference metrics ----

def no_fault(p: Project, reference: dict, epochs: int) -> Outcome:
    t0 = time.perf_counter()
    assert p.run() == 0, "".join(p.log)[-3000:]
    return outcome(p, "none", "-", reference or p.metrics(), t0, "dvc repro", epochs)


def sqlite_locked(p: Project, reference: dict, epochs: int, moment: str) -> Outcome:
    """Another process holds a long write on mlflow.db: from before the pipeline starts until
    train's second epoch (``start``), or from train's second epoch until the pipeline has ended
    (``middle to end``: the case of the issue that asked for this)."""
    t0 = time.perf_counter()
    db = Path(p.uri[len("sqlite:///"):])
    if not db.exists():  # the store exists (made by an earlier run of the lab)
        from mlflow.tracking import MlflowClient

        MlflowClient(p.uri).search_experiments()
    lock = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    if moment == "start":
        lock.execute("BEGIN EXCLUSIVE")
    proc = p.start()
    p.wait_checkpoint(2, proc)
    if moment == "start":
        lock.execute("ROLLBACK")
    else:
        lock.execute("BEGIN EXCLUSIVE")
    proc.wait(900)
    proc.reader.join(10)
    code = proc.returncode
    if moment != "start":
        lock.execute("ROLLBACK")
    lock.close()
    assert code == 0, "".join(p.log)[-3000:]
    assert p.texq("track", "sync", "out/pipeline") == 0, "".join(p.log)[-3000:]
    return outcome(p, "SQLite store locked", moment, reference, t0,
                   "dvc repro (exit 0), then texq track sync", epochs)


def server_down(p: Project, reference: dict, epochs: int, moment: str, server) -> Outcome:
    """The MLflow tracking server stopped at the pipeline's start and started again at train's
    second epoch (``start``), or stopped at train's second epoch and started again after the
    pipeline ended (``middle to end``)."""
    t0 = time.perf_counter()
    if moment == "start":
        server.stop()
    proc = p.start()
    p.wait_checkpoint(2, proc)
    if moment == "start":
        server.start()
    else:
        server.stop()
    proc.wait(900)
    proc.reader.join(10)
    assert proc.returncode == 0, "".join(p.log)[-3000:]
    if moment != "start":
        server.start()
    assert p.texq("track", "sync", "out/pipeline") == 0, "".join(p.log)[-3000:]
    return outcome(p, "MLflow server stopped", moment, reference, t0,
                   "dvc repro (exit 0), then texq track sync", epochs)


def killed(p: Project, reference: dict, epochs: int) -> Outcome:
    """``dvc repro`` and its stage SIGKILLed (a lost machine, the OOM killer) right after train's
    second epoch was checkpointed."""
    import torch

    t0 = time.perf_counter()
    proc = p.start()
    p.wait_checkpoint(2, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(60)
    proc.reader.join(10)
    (ckpt,) = p.out.glob(".work/train-*/checkpoint.pt")
    saved = torch.load(ckpt, weights_only=True)["epoch"]
    unfinished = [e for e in p.epochs_trained() if e > saved]  # logged, not yet checkpointed: not finished work
    left = p.states()
    assert p.texq("track", "reconcile") == 0, "".join(p.log)[-3000:]
    ended = p.states()
    assert p.run() == 0, "".join(p.log)[-3000:]
    result = outcome(p, "dvc repro SIGKILLed", "middle (train)", reference, t0,
                     f"texq track reconcile ({'/'.join(left)} -> {'/'.join(ended)}), then dvc repro", epochs)
    result.unfinished = unfinished
    if unfinished:
        result.notes += f"; epoch(s) {unfinished} were in flight (not checkpointed) when killed"
    return result


def disk_full(p: Project, reference: dict, epochs: int) -> Outcome:
    """The out folder's disk (a tmpfs) filled by another writer after train's second epoch and
    freed after the stage failed."""
    t0 = time.perf_counter()
    out = p.repo / "out"
    out.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(out)], check=True)
    try:
        proc = p.start()
        p.wait_checkpoint(2, proc)
        filler = out / "filler"
        with open(filler, "wb") as fh:  # every byte left
            try:
                while True:
                    fh.write(b"\0" * (1 << 20))
                    fh.flush()
            except OSError:
                pass
        proc.wait(900)
        proc.reader.join(10)
        failed = proc.returncode
        message = [line.strip() for line in p.log if line.startswith("texq: error:")]
        import torch

        (ckpt,) = p.out.glob(".work/train-*/checkpoint.pt")
        saved = torch.load(ckpt, weights_only=True)["epoch"]
        unfinished = [e for e in p.epochs_trained() if e > saved]  # trained, its checkpoint not written
        filler.unlink()
        assert failed != 0 and message and "No space left" in message[0], "".join(p.log)[-3000:]
        assert p.run() == 0, "".join(p.log)[-3000:]
        history = (p.out / "train" / "history.jsonl").read_text().splitlines()
        epochs_once = [json.loads(line)["epoch"] for line in history] == list(range(p.total_epochs()))
        result = outcome(p, "disk full (tmpfs)", "middle (train)", reference, t0,
                         f"one line ({message[0][:60]}...), freed the disk, dvc repro", epochs)
        result.kept = result.kept and epochs_once
        result.unfinished = unfinished
        if unfinished:
            result.notes += f"; epoch(s) {unfinished} trained but their checkpoint could not be written"
        return result
    finally:
        subprocess.run(["umount", "-l", str(out)], check=False)


class MlflowServer:
    """A real ``mlflow server`` on a SQLite store, stopped and started at will."""

    def __init__(self, root: Path, port: int):
        self.root, self.port, self.proc = root, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        from servers import wait_http

        log = self.root / "mlflow-server.log"
        env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "server-artifacts")],
            env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(f"{self.uri}/health", self.proc, log)

    def stop(self) -> None:
        from servers import stop

        if self.proc is not None:
            stop([self.proc])
            self.proc = None


def can_mount_tmpfs(where: Path) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                        capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(where)], check=False)
    return ok
