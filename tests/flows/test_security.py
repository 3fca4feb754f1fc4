"""A lab server that refuses the client is one line (flows.credentials): `texq compare` and `texq track`
against an MLflow server answering 401 or 403 or presenting a certificate the client cannot verify,
and Prefect's client errors for the same (fake servers on 127.0.0.1: fast); scripts/lab.sh's own
refusals. Integration: a TLS lab on 127.0.0.1 made from a lab without authentication (migrated);
the main lab's credentials, database and files are probed in test_lab.py."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                                reason="the pipeline extra is not installed")

NOT_AUTHENTICATED = ("You are not authenticated. Please see https://www.mlflow.org/docs/latest/auth/"
                     "index.html#authenticating-to-mlflow on how to authenticate.")


@contextmanager
def _server(status: int, body: str, cert: tuple[Path, Path] | None = None):
    """A server on 127.0.0.1 answering every request with ``status`` and ``body`` (over TLS with
    ``cert``, a certificate no client trusts); yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            if "Content-Length" in self.headers:
                self.rfile.read(int(self.headers["Content-Length"]))
            data = body.encode()
            self.send_response(status)
            if status == 401:
                self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_DELETE = _answer

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    scheme = "http"
    if cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*cert)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        scheme = "https"
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"{scheme}://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture()
def client_env(monkeypatch):
    """A client set up as lab.env sets one (wrong credentials), no retries."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "texq")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # reconcile asks Prefect only with one


def _texq(monkeypatch, capsys, uri: str, *argv: str) -> list[str]:
    """``texq ARGV`` against ``uri``: its exit status must be 2; its stderr lines."""
    from texq.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(list(argv)) == 2
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize("argv", [("compare",), ("track", "reconcile")])
def test_wrong_mlflow_credentials_are_one_line(argv, client_env, monkeypatch, capsys):
    with _server(401, NOT_AUTHENTICATED) as uri:
        err = _texq(monkeypatch, capsys, uri, *argv)
        assert err == [f"texq: error: the MLflow server at {uri} refused the credentials (HTTP 401): set "
                       "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (scripts/lab.sh writes them to "
                       "lab.env)"], err


def test_a_refused_permission_is_one_line(client_env, monkeypatch, capsys):
    with _server(403, "Permission denied") as uri:
        err = _texq(monkeypatch, capsys, uri, "compare")
        assert err == [f"texq: error: the MLflow server at {uri} denied user 'texq' this request (HTTP 403, "
                       "permission denied): the lab's MLflow admin grants EDIT or MANAGE on an experiment or "
                       "model"], err


@pytest.fixture()
def untrusted_cert(tmp_path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def test_an_unverifiable_certificate_is_one_line(client_env, untrusted_cert, monkeypatch, capsys):
    with _server(200, "{}", cert=untrusted_cert) as uri:
        err = _texq(monkeypatch, capsys, uri, "compare")
        assert len(err) == 1 and err[0].startswith(
            f"texq: error: the MLflow server at {uri} presented a certificate this client cannot verify ("), err
        assert err[0].endswith("): set MLFLOW_TRACKING_SERVER_CERT_PATH to the lab's CA certificate "
                               "(scripts/lab.sh writes it to lab.env)"), err


def test_prefect_refusals_are_one_line(monkeypatch):
    """Prefect's client raises httpx's errors (PrefectHTTPStatusError is one): the auth string
    refused, the certificate unverified."""
    httpx = pytest.importorskip("httpx")
    from flows.credentials import refusal

    monkeypatch.setenv("PREFECT_API_URL", "https://lab.example:4200/api")
    monkeypatch.delenv("PREFECT_API_KEY", raising=False)
    request = httpx.Request("POST", "https://lab.example:4200/api/flow_runs/filter")
    refused = httpx.HTTPStatusError("401", request=request, response=httpx.Response(401, request=request))
    assert refusal(refused) == ("the Prefect server at https://lab.example:4200/api refused the credentials "
                                "(HTTP 401): set PREFECT_API_AUTH_STRING (scripts/lab.sh writes it to lab.env)")
    monkeypatch.setenv("PREFECT_API_KEY", "pnu_cloud")
    assert "and unset PREFECT_API_KEY" in refusal(refused)
    try:  # raised from another error, as Prefect's client re-raises
        try:
            raise httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
                                     "unable to get local issuer certificate (_ssl.c:1006)")
        except httpx.ConnectError as exc:
            raise RuntimeError("the request failed") from exc
    except RuntimeError as exc:
        assert refusal(exc) == ("the Prefect server at https://lab.example:4200/api presented a certificate "
                                "this client cannot verify (unable to get local issuer certificate): set "
                                "PREFECT_API_SSL_CERT_FILE to the lab's CA certificate (scripts/lab.sh writes "
                                "it to lab.env)")
    assert refusal(httpx.ConnectError("[Errno 111] Connection refused")) is None  # down, not refused
    assert refusal(ValueError("no")) is None


def test_reconcile_says_a_refused_prefect_string_instead_of_leaving_runs_silently(tmp_path):
    """texq track reconcile asks Prefect for each flow run's state: a refused auth string is one
    line and exit 2, not "nothing tells" (which left every run RUNNING without a word). In its own
    process: Prefect keeps the settings it read first."""
    import uuid

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    run = c.create_run(c.create_experiment("texq"), tags={"prefect_flow_run_id": str(uuid.uuid4())}).info.run_id
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    with _server(401, '{"detail": "Unauthorized"}') as url:
        proc = subprocess.run([sys.executable, "-m", "texq.cli", "track", "reconcile"], capture_output=True,
                              text=True, timeout=120, cwd=tmp_path,
                              env=dict(env, MLFLOW_TRACKING_URI=uri, PREFECT_API_URL=f"{url}/api"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [(
        f"texq: error: the Prefect server at {url}/api refused the credentials (HTTP 401): set "
        "PREFECT_API_AUTH_STRING (scripts/lab.sh writes it to lab.env)")], proc.stderr
    assert c.get_run(run).info.status == "RUNNING"


def _lab_sh(tmp_path, *args, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("TEXQ_LAB_")}
    full.update(TEXQ_LAB_DIR=str(tmp_path / "lab"), TEXQ_VENV=sys.prefix, **env)
    return subprocess.run([str(ROOT / "scripts/lab.sh"), *args], env=full, capture_output=True, text=True,
                          timeout=60)


def test_lab_sh_refuses_in_one_line(tmp_path):
    p = _lab_sh(tmp_path, "status", TEXQ_LAB_TLS="maybe")
    assert (p.returncode, p.stderr) == (2, "lab: error: TEXQ_LAB_TLS=maybe: expected auto, on or off\n")
    p = _lab_sh(tmp_path, "status", TEXQ_LAB_TLS="on", TEXQ_LAB_CERT="/etc/ssl/lab.crt")
    assert (p.returncode, p.stderr) == (2, "lab: error: TEXQ_LAB_CERT needs TEXQ_LAB_KEY (its private key)\n")
    p = _lab_sh(tmp_path, "add-user", "alice")
    assert (p.returncode, p.stderr) == (2, f"lab: error: no lab in {tmp_path / 'lab'}: scripts/lab.sh start first\n")
    p = _lab_sh(tmp_path, "add-user")
    assert (p.returncode, p.stderr) == (2, "lab: error: usage: scripts/lab.sh add-user NAME [--password-stdin]\n")


def _lab_required(what: str) -> None:
    if os.environ.get("TEXQ_REQUIRE_LAB") == "1":
        pytest.fail(f"{what} is required (TEXQ_REQUIRE_LAB=1) but not installed")
    pytest.skip(f"{what} is not installed")


def _old_lab(server_dir: Path, pg: Path) -> None:
    """A lab folder as the earlier scripts/lab.sh left it: a cluster trusting local connections,
    the texq role's password in pg-password beside it, no other credential."""
    import secrets as tokens

    for sub in ("sock", "logs", "pg"):
        (server_dir / sub).mkdir(parents=True)
    pw = tokens.token_urlsafe(24)
    (server_dir / "pg-password").write_text(pw + "\n")
    (server_dir / "pg-password").chmod(0o600)
    pwfile = server_dir / "sock/pwfile"
    pwfile.write_text(pw + "\n")
    as_pg: list[str] = []
    if os.geteuid() == 0:
        for path in (server_dir / "sock", server_dir / "pg", pwfile):
            shutil.chown(path, "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_pg, str(pg / "initdb"), "-D", str(server_dir / "pg"), "-U", "texq", f"--pwfile={pwfile}",
                    "--auth-local=trust", "--auth-host=scram-sha-256"], check=True, capture_output=True, timeout=120)
    pwfile.unlink()


@pytest.mark.integration
def test_tls_lab_verified_clients_only_and_a_lab_without_authentication_migrated():
    """scripts/lab.sh start with TEXQ_LAB_TLS=on on 127.0.0.1 (what a lab off loopback gets), on the
    folder of a lab made before authentication: migrated (scram-sha-256, credentials made, what MLflow
    held is the texq user's), Caddy in front with the lab's CA; a client verifying against that CA
    works, one that does not fails, plain HTTP to the TLS ports fails."""
    import tempfile
    import urllib.error
    import urllib.request

    from servers import BIN, cli, free_port, lab_env, pg_bin, prefect_headers

    pg = pg_bin()
    if pg is None:
        _lab_required("PostgreSQL's server")
    if shutil.which("caddy") is None:
        _lab_required("Caddy (apt-get install caddy)")
    base = Path(tempfile.mkdtemp(prefix="texq-tls-", dir="/tmp"))
    base.chmod(0o755)  # PostgreSQL runs as its own user when the tests run as root
    server_dir = base / "servers"
    ports = {k: str(free_port()) for k in ("TEXQ_LAB_PG_PORT", "TEXQ_LAB_PREFECT_PORT", "TEXQ_LAB_MLFLOW_PORT",
                                           "TEXQ_LAB_PREFECT_BACKEND_PORT", "TEXQ_LAB_MLFLOW_BACKEND_PORT")}
    server_env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "TEXQ_LAB_"))}
    server_env.update(ports, TEXQ_LAB_DIR=str(server_dir), TEXQ_VENV=str(BIN.parent), TEXQ_LAB_TLS="on")
    rows: list[tuple[str, str, str, bool]] = []
    try:
        _old_lab(server_dir, pg)
        started = cli(server_env, ROOT / "scripts/lab.sh", "start", timeout=400)
        rows.append(("scripts/lab.sh start on a lab without authentication", "migrated",
                     "migrated" if f"lab: {server_dir} migrated" in started.stderr else started.stderr[-200:],
                     f"lab: {server_dir} migrated" in started.stderr))
        hba = [x.split()[-1] for x in (server_dir / "pg/pg_hba.conf").read_text().splitlines()
               if x.strip() and not x.startswith("#")]
        rows.append(("its pg_hba.conf's methods", "scram-sha-256 only", ", ".join(sorted(set(hba))),
                     set(hba) == {"scram-sha-256"}))
        adopted = "adopted by texq: " in (server_dir / "logs/lab_auth.log").read_text()
        rows.append(("what MLflow held before", "the texq user's", "adopted" if adopted else "not adopted", adopted))
        env = lab_env(server_dir / "lab.env")
        ca = env["MLFLOW_TRACKING_SERVER_CERT_PATH"]
        prefect, mlflow = env["PREFECT_API_URL"], env["MLFLOW_TRACKING_URI"]
        ok = ca == env["PREFECT_API_SSL_CERT_FILE"] and prefect.startswith("https://") and mlflow.startswith("https://")
        rows.append(("lab.env: URLs, CA for both clients", "https, the lab's CA", f"{prefect.split(':')[0]}, "
                     f"{'the lab CA' if ca == str(server_dir / 'tls/ca.crt') else ca}", ok))
        texq = "Basic " + base64.b64encode(f"texq:{env['MLFLOW_TRACKING_PASSWORD']}".encode()).decode()
        requests = {"Prefect": urllib.request.Request(f"{prefect}/flow_runs/filter", method="POST", data=b"{}",
                                                      headers=prefect_headers(env)),
                    "MLflow": urllib.request.Request(f"{mlflow}/api/2.0/mlflow/experiments/search", method="POST",
                                                     data=b'{"max_results": 5}', headers={
                                                         "Content-Type": "application/json", "Authorization": texq})}
        for name, req in requests.items():
            with urllib.request.urlopen(req, timeout=60, context=ssl.create_default_context(cafile=ca)) as r:
                rows.append((f"{name}: a client verifying against the lab's CA", "200", str(r.status), r.status == 200))
            try:
                urllib.request.urlopen(req, timeout=60, context=ssl.create_default_context())
                seen = "answered"
            except urllib.error.URLError as exc:
                seen = type(exc.reason).__name__
            rows.append((f"{name}: a client with the system's CAs only", "SSLCertVerificationError", seen,
                         seen == "SSLCertVerificationError"))
            plain = req.full_url.replace("https://", "http://")
            try:
                urllib.request.urlopen(urllib.request.Request(plain, method="POST", data=req.data,
                                                              headers=dict(req.header_items())), timeout=60)
                seen = "answered"
            except urllib.error.HTTPError as exc:
                seen = f"{exc.code} {exc.read().decode().strip()}"
            rows.append((f"{name}: plain HTTP to the TLS port", "400", seen, seen.startswith("400 Client sent an HTTP")))
        zombies = json.loads((server_dir / "logs/zombies.log").read_text())  # Prefect's client, at the start
        rows.append(("Prefect's client through lab.env (flows.zombies at the start)", "created",
                     "created" if zombies["created"] else "not created", zombies["created"] is True))
        client = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "TEXQ_"))}
        client.update(env, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
        p = cli(client, BIN / "texq", "compare", check=False)
        rows.append(("texq compare through lab.env", "exit 0", f"exit {p.returncode}", p.returncode == 0))
        client.pop("MLFLOW_TRACKING_SERVER_CERT_PATH")
        p = cli(client, BIN / "texq", "compare", check=False)
        line = p.stderr.strip()
        rows.append(("texq compare without the CA", "exit 2, one line", f"exit {p.returncode}, "
                     f"{len(line.splitlines())} line", p.returncode == 2 and line.startswith(
                         f"texq: error: the MLflow server at {mlflow} presented a certificate this client cannot "
                         "verify (") and "MLFLOW_TRACKING_SERVER_CERT_PATH" in line and "\n" not in line))
    finally:
        print("\n\n| probe (TEXQ_LAB_TLS=on, 127.0.0.1) | expected | seen |\n| --- | --- | --- |")
        for probe, expected, seen, ok in rows:
            print(f"| {probe} | {expected} | {seen}{'' if ok else '  <-- FAILED'} |")
        cli(server_env, ROOT / "scripts/lab.sh", "stop", check=False, timeout=120)
        shutil.rmtree(base, ignore_errors=True)
    failed = [r for r in rows if not r[3]]
    assert not failed, f"{len(failed)} of {len(rows)} probes failed: {failed}"
