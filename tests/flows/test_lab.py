"""A lab on one machine: PostgreSQL, Prefect's and MLflow's servers on it (scripts/lab.sh), a DVC
directory remote, two GPU "hosts" that share no files (each its own checkout, HOME, caches, DVC
cache, assets and worker, and its own CUDA_VISIBLE_DEVICES) and a control host that runs the grid
flows. A 2x2 grid submitted from a fourth folder runs on both hosts; one host's worker is SIGKILLed
while its run trains (that run ends Crashed / FAILED, the others complete); the same grid
submitted again recomputes nothing that had finished. Everything is read back through the
servers (MLflow's REST API, Prefect's client) and the DVC remote, never from a host's files.

Every client reaches the servers with lab.env's credentials; then the same lab is probed for what
it refuses (test_the_lab_refuses_what_has_no_credentials): both APIs and UIs without or with wrong
credentials, PostgreSQL and the credential files for another local user, every process's command
line and every file for a secret. The printed table is the "Security" table of docs/security.md.

Needs PostgreSQL's server binaries (.ci/run installs Debian's postgresql) and the shared assets
(the hosts run the real ResNet-20 by name, so that their params, and DVC's run-cache keys, match).
About 8 minutes on 2 cores.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from servers import (BIN, ROOT, CommandLines, cli, free_port, lab_env, lab_secrets, pg_bin, prefect_view, stop)

pytestmark = pytest.mark.integration

# two runs, one per host: what the lab adds (hosts, a killed worker, the shared remote and
# servers) needs no more; a grid's naming and fan-out are test_grid_logic's and test_flows'
GRID = {"w_bits,a_bits": [[3, 3], [4, 4]]}
NAMES = {"W3A3", "W4A4"}


def _checkout(dest: Path) -> Path:
    """A copy of the project's files (tracked and new, not ignored): a host's own checkout."""
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def lab(assets):
    if pg_bin() is None:
        if os.environ.get("TEXQ_REQUIRE_LAB") == "1":
            pytest.fail("PostgreSQL's server is required (TEXQ_REQUIRE_LAB=1) but not installed")
        pytest.skip("PostgreSQL's server is not installed (Debian: apt-get install postgresql)")
    base = Path(tempfile.mkdtemp(prefix="texq-lab-", dir="/tmp"))
    base.chmod(0o755)  # PostgreSQL runs as its own user when the tests run as root
    ports = {"TEXQ_LAB_PG_PORT": free_port(), "TEXQ_LAB_PREFECT_PORT": free_port(),
             "TEXQ_LAB_MLFLOW_PORT": free_port()}
    server_dir = base / "servers"
    server_env = dict(os.environ, TEXQ_LAB_DIR=str(server_dir), TEXQ_VENV=str(BIN.parent),
                      **{k: str(v) for k, v in ports.items()})
    procs: list[subprocess.Popen] = []
    watch = CommandLines(server_dir)  # from before the start: no credential on any command line
    watch.start()
    try:
        started = cli(server_env, ROOT / "scripts/lab.sh", "start", timeout=400)
        printed = dict(line.split("=", 1) for line in started.stdout.split() if "=" in line)
        exported = lab_env(Path(printed["TEXQ_LAB_ENV"]))  # the URLs and credentials, as workers source them
        assert {k: exported[k] for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")} == {
            k: printed[k] for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
        common = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "TEXQ_"))}
        common.update(exported, DO_NOT_TRACK="1", DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1",
                      PREFECT_WORKER_QUERY_SECONDS="2",  # a scheduled run is picked up in 2 s, not 10
                      PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
        remote = base / "dvc-remote"  # the lab's shared storage: a DVC directory remote
        remote.mkdir()

        def host(name: str, gpu: str | None = None) -> dict:
            """A machine of the lab: its checkout, HOME, caches and assets, nothing shared."""
            h = base / name
            code = _checkout(h / "checkout")
            (h / "assets" / "cifar10").mkdir(parents=True)
            for f in ("resnet20-12fca82f.th", "test_first1000.npz"):
                shutil.copy2(assets / "cifar10" / f, h / "assets" / "cifar10" / f)
            env = dict(common, HOME=str(h / "home"), XDG_CACHE_HOME=str(h / "cache"),
                       TEXQ_HOME=str(h / "texq-home"), PREFECT_HOME=str(h / "prefect-home"),
                       TEXQ_ASSETS=str(h / "assets"), PYTHONPATH=str(code), TEXQ_DVC_REMOTE=str(remote),
                       PWD=str(code))  # as a shell in the checkout records it (flows.steps reads it)
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            return {"name": name, "dir": h, "code": code, "env": env}

        def start(h: dict, pool: str) -> subprocess.Popen:
            log = h["dir"] / f"worker-{len(procs)}.log"
            p = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--limit", "1",
                                  "--name", h["name"]], cwd=h["code"], env=h["env"], stdout=open(log, "w"),
                                 stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(p)
            return p

        yield {"base": base, "remote": remote, "host": host, "start": start, "common": common, "env": exported,
               "dir": server_dir, "server_env": server_env, "ports": ports, "watch": watch, "started": started}
    finally:
        watch.stop()
        stop(procs)
        if os.environ.get("TEXQ_LAB_KEEP") == "1":  # look at the UIs afterwards; scripts/lab.sh stop ends it
            print(f"\nlab kept: TEXQ_LAB_DIR={base / 'servers'} {ports}")
        else:
            cli(server_env, ROOT / "scripts/lab.sh", "stop", check=False, timeout=120)
            shutil.rmtree(base, ignore_errors=True)


def _submit(sub: dict, timeout: float = 900) -> tuple[str, dict]:
    """``prefect deployment run texq-grid/texq-grid`` from the submitter's folder, then wait for
    the grid run to be final; returns its id and Prefect's view."""
    out = cli(sub["env"], BIN / "prefect", "deployment", "run", "texq-grid/texq-grid", "--param",
              f"grid={json.dumps(GRID)}", "--param", "base_params=lab-params.yaml",
              cwd=sub["code"]).stdout
    fid = next(w for w in out.replace("'", " ").split() if w.count("-") == 4 and len(w) == 36)
    deadline = time.time() + timeout
    while time.time() < deadline:
        view = prefect_view(sub["env"])
        grid = next(r for r in view["runs"] if r["id"] == fid)
        if grid["type"] in ("COMPLETED", "FAILED", "CANCELLED", "CRASHED"):
            return fid, view
        time.sleep(1)
    raise TimeoutError(f"grid {fid} not final after {timeout} s")


def test_a_grid_on_two_hosts_through_the_servers_then_nothing_finished_recomputed(lab, monkeypatch):
    from mlflow.tracking import MlflowClient

    for key, value in lab["env"].items():  # this process reads MLflow as a user: lab.env's credentials
        if key.startswith("MLFLOW_"):
            monkeypatch.setenv(key, value)
    t0 = time.time()
    # scripts/lab.sh start made Prefect's zombie-flow automation (missing heartbeats -> Crashed), once
    again = json.loads(cli(lab["common"], BIN / "python", "-m", "flows.zombies").stdout)
    assert again["created"] is False and again["within_s"] == 540
    a, b = lab["host"]("host-a", "0"), lab["host"]("host-b", "1")
    control, sub = lab["host"]("control"), lab["host"]("submitter")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update(profile="tiny")  # the named model and data: the same params on every host
    params["evaluate"]["register_model"] = True
    (control["code"] / "lab-params.yaml").write_text(yaml.safe_dump(params))
    for pool in ("texq", "texq-control"):
        cli(sub["env"], BIN / "prefect", "work-pool", "create", pool, "--type", "process", cwd=sub["code"])
    cli(sub["env"], BIN / "prefect", "--no-prompt", "deploy", "--all", cwd=sub["code"])
    lab["start"](control, "texq-control")
    worker_a = lab["start"](a, "texq")
    worker_b = lab["start"](b, "texq")

    c = MlflowClient(sub["env"]["MLFLOW_TRACKING_URI"])
    # the first grid, waited for in a thread; host A's worker SIGKILLed while A trains
    first: dict = {}

    def submit_first():
        try:
            first.update(zip(("id", "view"), _submit(sub)))
        except BaseException as exc:  # re-raised below, in the test's thread
            first["error"] = exc

    th = threading.Thread(target=submit_first)
    th.start()
    killed = None
    deadline = time.time() + 600
    while killed is None and time.time() < deadline and th.is_alive():
        exp = c.get_experiment_by_name("texq")
        on_a = exp and c.search_runs([exp.experiment_id], "attributes.status = 'RUNNING' and "
                                     "tags.`texq.cuda_visible_devices` = '0'")
        if on_a:
            fid = on_a[0].data.tags["prefect_flow_run_id"]
            if any(t["flow_run"] == fid and t["name"] == "train" and t["state"] == "Running"
                   for t in prefect_view(sub["env"])["tasks"]):
                killed = on_a[0]
                os.kill(worker_a.pid, signal.SIGKILL)  # the worker process alone, mid-stage
        time.sleep(1)
    th.join()
    if "error" in first:
        raise first["error"]
    assert killed is not None, "host A never trained"
    assert worker_a.wait(5) == -signal.SIGKILL
    t_first = time.time() - t0
    crashed = killed.data.tags["prefect_flow_run_id"]

    # where the killed worker's run ends up: Crashed in Prefect, FAILED in MLflow; the rest complete
    view = first["view"]
    grid = next(r for r in view["runs"] if r["id"] == first["id"])
    assert grid["type"] == "FAILED" and "1 of 2 grid runs did not complete: 1 crashed" in grid["message"], grid
    children = {r["id"]: r for r in view["runs"] if r["subflow"] and r["name"] in NAMES}
    assert {r["name"] for r in children.values()} == NAMES
    assert {k: r["type"] for k, r in children.items() if r["type"] != "COMPLETED"} == {crashed: "CRASHED"}
    done_before = {t["name"] for t in view["tasks"] if t["flow_run"] == crashed and t["state"] == "Completed"}
    assert done_before == {"teacher", "synthesize"}  # killed in train
    assert c.get_run(killed.info.run_id).info.status == "FAILED"  # not left RUNNING

    exp = c.get_experiment_by_name("texq")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on its runs
    runs = c.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "texq.grid" in r.data.tags]
    assert parent.info.status == "FAILED" and "w_bits,a_bits, 2 runs" in parent.info.run_name
    assert parent.data.tags["texq.end"] == "failed: 1 of 2 runs completed"
    assert parent.data.metrics["runs_failed"] == 1 and parent.data.metrics["runs_completed"] == 1
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {r.info.run_name for r in kids} == NAMES  # named by what differs, whatever order PostgreSQL keeps
    assert sorted(r.info.status for r in kids) == ["FAILED", "FINISHED"]
    # the remote holds every finished stage's outs and run-cache entries, the crashed run's too
    entries = list((lab["remote"] / "runs").glob("*/*/*"))
    assert len(entries) >= 1 + 1 + 1 + 1, entries  # teacher, synthesize (shared), B's train and evaluate

    # the same grid again, host A's worker back and host B's gone: what B computed comes to A from
    # the remote, the crashed run resumes after its finished stages; nothing else is computed
    stop([worker_b])
    lab["start"](a, "texq")
    t1 = time.time()
    second_id, view = _submit(sub)
    t_second = time.time() - t1
    grid2 = next(r for r in view["runs"] if r["id"] == second_id)
    assert grid2["type"] == "COMPLETED", grid2
    kids2 = {r["id"]: r["name"] for r in view["runs"]
             if r["subflow"] and r["name"] in NAMES and r["id"] not in children}
    assert len(kids2) == 2
    ran = {kids2[x["flow_run"]]: row["stages_run"] for x in view["artifacts"]
           if x["key"] == "texq-result" and x["flow_run"] in kids2 for row in x["data"]}
    resumed = set(ran.pop(killed.info.run_name).split(","))  # train too, unless its orphaned
    assert "evaluate" in resumed and not resumed & done_before  # process finished it after the kill
    assert ran == {name: "none" for name in NAMES - {killed.info.run_name}}
    table = next(x["data"] for x in view["artifacts"] if x["key"] == "texq-grid-results"
                 and x["flow_run"] == second_id)
    runs = c.search_runs([exp.experiment_id])
    results = [r for r in runs if "top1" in r.data.metrics]  # one result per combination, no more
    assert sorted(r.info.run_name for r in results) == sorted(NAMES)
    assert {row["mlflow_run"].split("?")[0].rsplit("/", 1)[-1] for row in table} == {r.info.run_id for r in results}
    assert not [r for r in runs if r.info.status == "RUNNING"]  # nothing left RUNNING
    # where each result was computed: both hosts' GPUs and checkouts
    assert {r.data.tags["texq.cuda_visible_devices"] for r in results} == {"0", "1"}
    assert {r.data.tags["texq.checkout"] for r in results} == {str(a["code"]), str(b["code"])}
    for r in results:  # scores, pictures and logged model, through the server
        assert r.info.status == "FINISHED" and {"top1", "fp_top1", "top1_ci95_low"} <= set(r.data.metrics)
        assert {f.path.rsplit("/", 1)[-1] for f in c.list_artifacts(r.info.run_id, "figures")} >= {
            "per_class_top1.png", "calibration_images.png"}
        (model,) = [c.get_logged_model(o.model_id) for o in r.outputs.model_outputs]
        assert {m.key: m.value for m in model.metrics}["top1"] == r.data.metrics["top1"]
    by_run = {r.info.run_id: r for r in results}
    for bits in (3, 4):  # registered versions, with the run's figures as tags
        versions = c.search_model_versions(f"name='texq-resnet20a_cifar10-w{bits}a{bits}'")
        assert len(versions) == 1 and all(v.run_id in by_run for v in versions)
        for v in versions:
            assert float(v.tags["top1"]) == pytest.approx(by_run[v.run_id].data.metrics["top1"], abs=0.005)
            assert v.tags["profile"] == "tiny" and "top-1" in v.description
    print(f"\nlab: first grid {t_first:.0f} s (A's worker killed in train), second {t_second:.0f} s, "
          f"whole test {time.time() - t0:.0f} s")


def _http(url: str, method: str = "GET", auth: str | None = None, body: dict | None = None) -> tuple[int, str]:
    """(status, body) of one request; ``auth`` is sent as HTTP Basic credentials."""
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    req = urllib.request.Request(url, method=method, headers=headers,
                                 data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _listening(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on ``port`` (/proc/net/tcp, tcp6)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:
                raw = bytes.fromhex(addr)
                if width == 8:
                    found.add(".".join(str(b) for b in raw[::-1]))
                else:
                    words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]
                    found.add(socket.inet_ntop(socket.AF_INET6, b"".join(words)))
    return found


@contextmanager
def _another_user():
    """A second local user (made with useradd, removed afterwards), or None when not root."""
    if os.geteuid() != 0 or not shutil.which("useradd"):
        yield None
        return
    name = f"texqprobe{os.getpid() % 100000}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True,
                   capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def _as(user: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """ARGS run as ``user`` with a clean environment (no password file; ``env`` added)."""
    clean = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/nonexistent", "PGPASSFILE": "/nonexistent/pgpass",
             "LC_ALL": "C", **(env or {})}
    return subprocess.run(["runuser", "-u", user, "--", *map(str, args)], env=clean, capture_output=True,
                          text=True, timeout=60)


def _refused(p: subprocess.CompletedProcess) -> str:
    """Why psql or cat failed, in a few words ("succeeded" when it did not fail)."""
    if p.returncode == 0:
        return "succeeded"
    lines = p.stderr.strip().splitlines() or [f"exit {p.returncode}"]
    first = next((x for x in lines if "failed: " in x), lines[0])
    return " ".join(first.rsplit("failed: ", 1)[-1].rsplit(": ", 1)[-1].split())[:80]


def test_the_lab_refuses_what_has_no_credentials(lab):
    """Probes of the running lab: expected and seen, printed as the "Security" table of docs/security.md."""
    env, d = lab["env"], lab["dir"]
    prefect, mlflow = env["PREFECT_API_URL"], env["MLFLOW_TRACKING_URI"]
    ui = prefect.removesuffix("/api")
    auth, texq = env["PREFECT_API_AUTH_STRING"], f"texq:{env['MLFLOW_TRACKING_PASSWORD']}"
    rows: list[tuple[str, str, str, bool]] = []

    def row(probe: str, expected: str, seen: str, ok: bool) -> None:
        rows.append((probe, expected, seen, ok))

    def status(probe: str, expected: int, *request, note: str = "") -> tuple[int, str]:
        code, text = _http(*request)
        row(probe, str(expected), f"{code}{note}", code == expected)
        return code, text

    flow_runs = f"{prefect}/flow_runs/filter"
    status("Prefect API: POST /api/flow_runs/filter, no credentials", 401, flow_runs, "POST", None, {})
    status("Prefect API: the same, a wrong auth string", 401, flow_runs, "POST", "texq:wrong", {})
    status("Prefect API: the same, lab.env's auth string", 200, flow_runs, "POST", auth, {})
    status("Prefect API: GET /api/health, no credentials (public: health probes)", 200, f"{prefect}/health")
    code, text = _http(f"{ui}/")
    row("Prefect UI: GET / , no credentials (its static page)", "200, HTML only",
        f"{code}, {'HTML' if '<html' in text.lower() else text[:30]}", code == 200 and "<html" in text.lower())
    code, text = _http(f"{ui}/ui-settings")
    row("Prefect UI: GET /ui-settings (the page asks for the string)", '200, "auth": "BASIC"',
        f'{code}, "auth": {json.loads(text).get("auth") if code == 200 else None!r}',
        code == 200 and json.loads(text).get("auth") == "BASIC")
    status("Prefect UI's data: POST /api/flows/filter, no credentials", 401, f"{prefect}/flows/filter", "POST", None, {})

    delete = f"{mlflow}/api/2.0/mlflow/experiments/delete"
    status("MLflow API: POST .../experiments/delete, no credentials", 401, delete, "POST", None, {"experiment_id": "0"})
    status("MLflow API: the same, a wrong password", 401, delete, "POST", "texq:wrong-password-1", {"experiment_id": "0"})
    status("MLflow API: POST .../experiments/search, lab.env's texq user", 200,
           f"{mlflow}/api/2.0/mlflow/experiments/search", "POST", texq, {"max_results": 5})
    status("MLflow API: texq deletes experiment 0 (nobody's; default READ)", 403, delete, "POST", texq,
           {"experiment_id": "0"})
    status("MLflow API: texq creates a user (the admin's alone)", 403, f"{mlflow}/api/2.0/mlflow/users/create",
           "POST", texq, {"username": "mallory", "password": "a-password-of-mallory"})
    added = cli(lab["server_env"], ROOT / "scripts/lab.sh", "add-user", "alice", timeout=120)
    alice_file = d / "secrets/users/alice"
    row("scripts/lab.sh add-user alice: its password file", "0600, not printed",
        f"{stat.filemode(alice_file.stat().st_mode)}, {'printed' if alice_file.read_text().strip() in added.stderr + added.stdout else 'not printed'}",
        stat.S_IMODE(alice_file.stat().st_mode) == 0o600 and alice_file.read_text().strip() not in added.stderr + added.stdout)
    alice = f"alice:{alice_file.read_text().strip()}"
    status("MLflow API: alice searches experiments", 200, f"{mlflow}/api/2.0/mlflow/experiments/search", "POST",
           alice, {"max_results": 5})
    texq_exp = json.loads(_http(f"{mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name=texq",
                                "GET", texq)[1] or "{}").get("experiment", {}).get("experiment_id", "1")
    status("MLflow API: alice deletes texq's experiment", 403, delete, "POST", alice, {"experiment_id": texq_exp})
    status("MLflow UI: GET / , no credentials", 401, f"{mlflow}/")
    status("MLflow UI: GET / , a wrong password", 401, f"{mlflow}/", "GET", "texq:wrong-password-1")
    status("MLflow UI: GET / , lab.env's texq user", 200, f"{mlflow}/", "GET", texq)
    status("MLflow UI: GET /static-files/index.html, no credentials (static bundle)", 200,
           f"{mlflow}/static-files/index.html")
    status("MLflow UI's data: POST /ajax-api/.../experiments/search, no credentials", 401,
           f"{mlflow}/ajax-api/2.0/mlflow/experiments/search", "POST", None, {"max_results": 5})
    status("MLflow: GET /health, no credentials (public)", 200, f"{mlflow}/health")
    status("MLflow: GET /api/3.0/mlflow/server-info, no credentials (public: its configuration)", 200,
           f"{mlflow}/api/3.0/mlflow/server-info")

    wrong = dict(lab["common"], MLFLOW_TRACKING_PASSWORD="wrong-password-1", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    p = cli(wrong, BIN / "texq", "compare", check=False)
    expected = (f"texq: error: the MLflow server at {mlflow} refused the credentials (HTTP 401): set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (scripts/lab.sh writes them to lab.env)")
    row("texq compare, a wrong MLflow password", "exit 2, one line", f"exit {p.returncode}, "
        f"{len(p.stderr.splitlines())} line", p.returncode == 2 and p.stderr.strip() == expected)
    p = cli(dict(lab["common"], PREFECT_API_AUTH_STRING="texq:wrong"), BIN / "python", "-m", "flows.zombies",
            check=False)
    row("python -m flows.zombies, a wrong Prefect auth string", "exit 2, one line",
        f"exit {p.returncode}, {len(p.stderr.splitlines())} line",
        p.returncode == 2 and p.stderr.strip().endswith("refused the credentials (HTTP 401): set "
                                                        "PREFECT_API_AUTH_STRING (scripts/lab.sh writes it to lab.env)"))

    pg = pg_bin()
    port = lab["ports"]["TEXQ_LAB_PG_PORT"]
    where = _listening(port)
    row("PostgreSQL: TCP listeners on its port", "127.0.0.1 only", ", ".join(sorted(where)), where == {"127.0.0.1"})
    sock = ["-h", str(d / "sock"), "-p", str(port), "-U", "texq", "-d", "postgres", "-c", "select 1"]
    tcp = ["-h", "127.0.0.1", "-p", str(port), "-U", "texq", "-d", "postgres", "-c", "select 1"]
    p = subprocess.run([pg / "psql", "-w", *sock], env=dict(os.environ, PGPASSFILE="/nonexistent/pgpass"),
                       capture_output=True, text=True, timeout=60)
    row("PostgreSQL: the lab's owner, socket, no password", "refused", _refused(p), p.returncode != 0)
    hba = [x for x in (d / "pg/pg_hba.conf").read_text().splitlines() if x.strip() and not x.startswith("#")]
    methods = {x.split()[-1] for x in hba}
    row("PostgreSQL: pg_hba.conf's methods (local and host lines)", "scram-sha-256 only", ", ".join(sorted(methods)),
        methods == {"scram-sha-256"})
    secret_files = [f for f in sorted((d / "secrets").rglob("*")) if f.is_file()]
    modes = {f: stat.S_IMODE(f.stat().st_mode) for f in [d / "lab.env", *secret_files]}
    row("modes: secrets/ and users/; lab.env and every file in secrets/", "0700; 0600",
        f"{stat.S_IMODE((d / 'secrets').stat().st_mode):o}, {stat.S_IMODE((d / 'secrets/users').stat().st_mode):o}; "
        f"{', '.join(sorted({format(m, 'o') for m in modes.values()}))} ({len(modes)} files)",
        stat.S_IMODE((d / "secrets").stat().st_mode) == 0o700 and set(modes.values()) == {0o600})

    with _another_user() as other:
        if other is None:
            row("another local user (PostgreSQL, files, /proc)", "refused", "not run: needs root (useradd)", True)
        else:
            p = _as(other, pg / "psql", "-w", *sock)
            row("another user: PostgreSQL over the socket", "refused", _refused(p), p.returncode != 0)
            p = _as(other, pg / "psql", "-w", *tcp)
            row("another user: PostgreSQL over TCP, no password", "refused", _refused(p), p.returncode != 0)
            p = _as(other, pg / "psql", "-w", *tcp, env={"PGPASSWORD": "guessed-password"})
            row("another user: PostgreSQL over TCP, a guessed password", "refused", _refused(p), p.returncode != 0)
            readable = [f for f in modes if _as(other, "cat", f).returncode == 0]
            row(f"another user: cat lab.env and each file in secrets/ ({len(modes)} files)", "all denied",
                f"{len(modes) - len(readable)} denied ({_refused(_as(other, 'cat', d / 'lab.env'))})" +
                (f", read: {readable}" if readable else ""), not readable)
            logs = [f for f in sorted((d / "logs").iterdir())]
            readable = [f for f in logs if _as(other, "cat", f).returncode == 0]
            row(f"another user: cat logs/* ({len(logs)} files)", "all denied",
                f"{len(logs) - len(readable)} denied", not readable)
            pids = [int((d / f"{n}.pid").read_text()) for n in ("prefect", "mlflow")]
            readable = [pid for pid in pids if _as(other, "cat", f"/proc/{pid}/environ").returncode == 0]
            row("another user: /proc/PID/environ of Prefect's and MLflow's servers", "denied",
                f"{len(pids) - len(readable)} of {len(pids)} denied", not readable)
            readable = [f for f in modes if _as("postgres", "cat", f).returncode == 0]
            row("the postgres user (PostgreSQL's server): cat lab.env and each file in secrets/", "all denied",
                f"{len(modes) - len(readable)} denied" + (f", read: {readable}" if readable else ""), not readable)

    watch: CommandLines = lab["watch"]
    watch.scan()
    row(f"/proc/*/cmdline of every process, every 2 s since before the start ({watch.scans} scans, "
        f"{len(watch.pids)} processes)", "no credential", f"{len(watch.hits)} found" +
        (f": {sorted(watch.hits.items())[:3]}" if watch.hits else ""), not watch.hits)
    secrets = lab_secrets(d)
    scanned, size, leaks = 0, 0, []
    for f in lab["base"].rglob("*"):  # the servers' folder (logs, database, artifacts) and the hosts'
        if (not f.is_file() or f.is_symlink() or d / "secrets" in f.parents or f == d / "lab.env"
                or f.stat().st_size > 500_000_000):
            continue
        data = f.read_bytes()
        scanned, size = scanned + 1, size + len(data)
        leaks += [(str(f.relative_to(lab["base"])), n) for n, v in secrets.items() if v in data]
    row(f"files under the lab's folders but secrets/ and lab.env: logs, database, artifacts, the hosts' "
        f"checkouts and worker logs ({scanned} files, {size / 1e6:.0f} MB)", "no credential",
        f"{len(leaks)} found" + (f": {leaks[:5]}" if leaks else ""), not leaks)
    started = lab["started"].stdout + lab["started"].stderr
    shown = [n for n, v in secrets.items() if v.decode() in started]
    row("scripts/lab.sh start's output", "no credential", f"{len(shown)} found", not shown)

    print("\n\n| probe | expected | seen |\n| --- | --- | --- |")
    for probe, expected, seen, ok in rows:
        print(f"| {probe} | {expected} | {seen}{'' if ok else '  <-- FAILED'} |")
    failed = [r for r in rows if not r[3]]
    assert not failed, f"{len(failed)} of {len(rows)} probes failed: {failed}"
