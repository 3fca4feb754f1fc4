"""Helpers of the tests that start real servers and workers (test_flows.py, test_lab.py,
test_security.py): free ports, waiting for a health URL, stopping process groups, reading Prefect's
view, and a lab of scripts/lab.sh: its lab.env, its credentials, a watch on every process's
command line."""

from __future__ import annotations

import base64
import glob
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen | None, log: Path, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} not up after {seconds} s: {log.read_text()[-2000:]}")


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGINT to each process group first (Prefect workers ignore SIGTERM for a long time), then
    SIGKILL what is left after 20 s."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
    deadline = time.time() + 20
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def cli(env: dict, *args, cwd: Path = ROOT, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def prefect_headers(env: dict) -> dict:
    """JSON, and the auth string of a lab's Prefect server where ``env`` has one."""
    headers = {"Content-Type": "application/json"}
    if env.get("PREFECT_API_AUTH_STRING"):
        headers["Authorization"] = "Basic " + base64.b64encode(env["PREFECT_API_AUTH_STRING"].encode()).decode()
    return headers


def prefect_api(env: dict, path: str, body: dict) -> list | dict:
    """POST ``body`` to the Prefect server's ``path`` (``env``'s URL, credentials and CA), its JSON
    answer. Read from this process over HTTP: a poll costs no new Python process."""
    context = None
    if env.get("PREFECT_API_SSL_CERT_FILE"):
        context = ssl.create_default_context(cafile=env["PREFECT_API_SSL_CERT_FILE"])
    req = urllib.request.Request(f"{env['PREFECT_API_URL']}{path}", method="POST",
                                 headers=prefect_headers(env), data=json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=30, context=context) as r:
        return json.loads(r.read())


def prefect_logs(env: dict, flow_run_id: str) -> list[str]:
    rows = prefect_api(env, "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200})
    return [row["message"] for row in rows]


def _state(row: dict, key: str) -> str | None:
    return (row.get("state") or {}).get(key)


def prefect_view(env: dict) -> dict:
    """What the Prefect server shows: flow runs (name, state, parent task run, parameters), task
    runs by flow run, and the texq artifacts (their data as the flows wrote it)."""
    runs = prefect_api(env, "/flow_runs/filter", {"limit": 200})
    tasks = prefect_api(env, "/task_runs/filter", {"limit": 200})
    arts = prefect_api(env, "/artifacts/filter", {
        "artifacts": {"key": {"any_": ["texq-grid-results", "texq-result"]}}, "limit": 200})
    return {
        "runs": [{"id": r["id"], "name": r["name"], "state": _state(r, "name"), "type": _state(r, "type"),
                  "subflow": r.get("parent_task_run_id") is not None, "deployment": str(r.get("deployment_id")),
                  "parameters": r.get("parameters"), "message": _state(r, "message")} for r in runs],
        "tasks": [{"flow_run": t["flow_run_id"], "name": t["name"], "state": _state(t, "name")} for t in tasks],
        "artifacts": [{"key": a["key"], "flow_run": a["flow_run_id"],
                       "data": json.loads(a["data"]) if isinstance(a["data"], str) else a["data"]} for a in arts]}


def pg_bin() -> Path | None:
    """PostgreSQL's server binaries (scripts/lab.sh's lab needs them), None when not installed."""
    for d in [subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()
              if shutil.which("pg_config") else "", *sorted(glob.glob("/usr/lib/postgresql/*/bin"))]:
        if d and Path(d, "initdb").exists():
            return Path(d)
    return None


def lab_env(path: Path) -> dict:
    """What ``source lab.env`` exports, read as a worker reads it (a clean bash)."""
    out = subprocess.run(["env", "-i", "bash", "-c", '. "$1" && env -0', "_", str(path)],
                         capture_output=True, check=True).stdout.decode()
    env = dict(item.split("=", 1) for item in out.split("\0") if "=" in item)
    return {k: v for k, v in env.items() if k not in ("PWD", "SHLVL", "_")}


def lab_secrets(server_dir: Path) -> dict[str, bytes]:
    """The lab's credentials by file name (scripts/lab.sh's secrets/ folder; PEM keys left out):
    the database password, Prefect's auth string (and its password part), the MLflow users'
    passwords and the Flask secret key."""
    found: dict[str, bytes] = {}
    folder = server_dir / "secrets"
    for f in sorted(folder.rglob("*")) if folder.is_dir() else ():
        if f.is_file() and f.name not in ("pgpass", "mlflow-auth.ini", "adopt") and f.suffix != ".key":
            value = f.read_bytes().strip()
            if len(value) >= 12:
                found[str(f.relative_to(folder))] = value
    if b":" in found.get("prefect-auth", b""):
        found["prefect-auth (its password)"] = found["prefect-auth"].split(b":", 1)[1]
    return found


class CommandLines(threading.Thread):
    """Every process's command line (/proc/*/cmdline), read every ``every`` s until stopped, and
    which of them held a credential of the lab in ``server_dir`` (reread each time: they are
    made while the lab starts)."""

    def __init__(self, server_dir: Path, every: float = 2.0):
        super().__init__(daemon=True)
        self.server_dir, self.every = server_dir, every
        self.scans, self.pids, self.hits = 0, set(), {}
        self.done = threading.Event()

    def scan(self) -> None:
        secrets = lab_secrets(self.server_dir)
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            self.pids.add(proc.name)
            for name, value in secrets.items():
                if value in cmd:
                    self.hits[(name, proc.name)] = cmd.replace(value, f"<{name}>".encode())[:200]
        self.scans += 1

    def run(self) -> None:
        while not self.done.wait(self.every):
            self.scan()

    def stop(self) -> None:
        self.done.set()
        self.join(10)
