"""A lab server that refuses this client, in one line: scripts/lab.sh's Prefect and MLflow servers
ask for credentials (HTTP 401 without them, 403 for what a user may not do) and, off loopback,
speak TLS with the lab's own CA. :func:`refusal` names the server, what it refused and the
variables that fix it (lab.env sets them all); None for any other error."""

from __future__ import annotations

import os
import sys

LAB_ENV = "scripts/lab.sh writes {} to lab.env"


def _chain(exc: BaseException | None):
    """``exc`` and the exceptions it was raised from or during."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _unverified(exc: BaseException) -> str | None:
    """The certificate check's reason when ``exc`` is a failed TLS verification."""
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" not in text:
        return None
    reason = text.split("certificate verify failed:", 1)[-1].split("(_ssl", 1)[0]
    return " ".join(reason.strip(" '\")").split()) or "certificate verify failed"


def _mlflow(exc: BaseException) -> str | None:
    mlflow_exceptions = sys.modules.get("mlflow.exceptions")
    requests = sys.modules.get("requests")
    kinds = tuple(k for k in (getattr(mlflow_exceptions, "MlflowException", None),
                              getattr(requests, "RequestException", None)) if k)
    if not kinds or not isinstance(exc, kinds):
        return None
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")  # a server's is always set there (a local store asks nothing)
    if not uri.startswith(("http://", "https://")):
        return None
    reason = _unverified(exc)
    if reason:
        return (f"the MLflow server at {uri} presented a certificate this client cannot verify ({reason}): "
                f"set MLFLOW_TRACKING_SERVER_CERT_PATH to the lab's CA certificate ({LAB_ENV.format('it')})")
    status = exc.get_http_status_code() if hasattr(exc, "get_http_status_code") else None
    if status == 401:
        return (f"the MLflow server at {uri} refused the credentials (HTTP 401): set MLFLOW_TRACKING_USERNAME "
                f"and MLFLOW_TRACKING_PASSWORD ({LAB_ENV.format('them')})")
    if status == 403:
        user = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
        return (f"the MLflow server at {uri} denied user {user!r} this request (HTTP 403, permission denied): "
                "the lab's MLflow admin grants EDIT or MANAGE on an experiment or model")
    return None


def _prefect(exc: BaseException) -> str | None:
    httpx = sys.modules.get("httpx")
    if httpx is None or not isinstance(exc, (httpx.HTTPStatusError, httpx.TransportError)):
        return None
    try:
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value() or os.environ.get("PREFECT_API_URL", "")
    except Exception:
        url = os.environ.get("PREFECT_API_URL", "")
    reason = _unverified(exc)
    if reason:
        return (f"the Prefect server at {url} presented a certificate this client cannot verify ({reason}): "
                f"set PREFECT_API_SSL_CERT_FILE to the lab's CA certificate ({LAB_ENV.format('it')})")
    status = exc.response.status_code if isinstance(exc, httpx.HTTPStatusError) else None
    if status in (401, 403):
        also = (" and unset PREFECT_API_KEY (Prefect Cloud's key: sent instead of the string)"
                if os.environ.get("PREFECT_API_KEY") else "")
        return (f"the Prefect server at {url} refused the credentials (HTTP {status}): set "
                f"PREFECT_API_AUTH_STRING{also} ({LAB_ENV.format('it')})")
    return None


def refusal(exc: BaseException) -> str | None:
    """One line for a refused credential or an unverifiable certificate anywhere in ``exc``'s
    chain; None for anything else."""
    for e in _chain(exc):
        line = _mlflow(e) or _prefect(e)
        if line:
            return line
    return None
