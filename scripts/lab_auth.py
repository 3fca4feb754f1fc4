"""The lab's MLflow users (scripts/lab.sh), written into the user store of MLflow's basic-auth app
(the database named in ``$MLFLOW_AUTH_CONFIG_PATH``, its password from ``$PGPASSFILE``): no
password on a command line, none over the network.

    lab_auth.py ensure SECRETS TRACKING_DB SERVER_URL
        the admin's and the workers' (``texq``) passwords as the files in SECRETS say (a changed
        file rotates the password); after a migration of a lab made before authentication
        (SECRETS/adopt), what MLflow holds becomes texq's (MANAGE); the ``texq`` experiment made
        by texq through the server at SERVER_URL (its creator manages it)
    lab_auth.py add-user SECRETS NAME [--password-stdin]
        a user with the lab's default permission (READ everything; MANAGE what it creates); its
        password generated into SECRETS/users/NAME (0600) or read from stdin's first line
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import secrets
import sys
import warnings
from pathlib import Path

WORKERS = "texq"  # the user the workers, flows and texq's commands record as (lab.env)


def fail(message: str) -> None:
    print(f"lab: error: {message}", file=sys.stderr)
    sys.exit(2)


def store():
    from mlflow.server.auth.config import read_auth_config
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    s = SqlAlchemyStore()
    s.init_db(read_auth_config().database_uri)
    return s


def set_password(s, name: str, password: str, admin: bool = False) -> str:
    if not s.has_user(name):
        s.create_user(name, password, is_admin=admin)
        return "created"
    if not s.authenticate_user(name, password):
        s.update_user(name, password=password)
        return "password updated"
    return "unchanged"


def grant(s, kind: str, resource: str, name: str, permission: str = "MANAGE") -> bool:
    """``permission`` on an experiment (by id) or a registered model (by name) unless ``name`` has one."""
    from mlflow.exceptions import MlflowException

    get, create = {"experiment": (s.get_experiment_permission, s.create_experiment_permission),
                   "model": (s.get_registered_model_permission, s.create_registered_model_permission)}[kind]
    try:
        get(resource, name)
        return False
    except MlflowException:
        create(resource, name, permission)
        return True


def ensure(secrets_dir: Path, tracking_db: str, server_url: str) -> None:
    s = store()
    read = lambda f: (secrets_dir / f).read_text().strip()  # noqa: E731
    print("admin:", set_password(s, "admin", read("mlflow-admin-password"), admin=True))
    print(f"{WORKERS}:", set_password(s, WORKERS, read(f"mlflow-{WORKERS}-password")))
    adopt = secrets_dir / "adopt"
    if adopt.exists():  # made without authentication: nobody's, so far; the workers' from now on
        from sqlalchemy import create_engine, text

        with create_engine(tracking_db).connect() as conn:
            experiments = [str(r[0]) for r in conn.execute(text("select experiment_id from experiments"))]
            models = [r[0] for r in conn.execute(text("select name from registered_models"))]
        n = sum(grant(s, "experiment", e, WORKERS) for e in experiments)
        m = sum(grant(s, "model", name, WORKERS) for name in models)
        print(f"adopted by {WORKERS}: {n} experiments, {m} registered models")
        adopt.unlink()
    os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
    os.environ.update(MLFLOW_TRACKING_URI=server_url, MLFLOW_TRACKING_USERNAME=WORKERS,
                      MLFLOW_TRACKING_PASSWORD=read(f"mlflow-{WORKERS}-password"))
    from flows.bookkeeping.store import EXPERIMENT, client, experiment_id

    eid = experiment_id(client(), EXPERIMENT)  # through the server: its creator manages it
    if grant(s, "experiment", eid, WORKERS):  # one a user made before the workers did
        print(f"experiment {EXPERIMENT} ({eid}): MANAGE granted to {WORKERS}")
    print(f"experiment {EXPERIMENT}: {eid}")


def add_user(secrets_dir: Path, name: str, from_stdin: bool) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}", name):
        fail(f"{name!r}: a user name is letters, digits and _ . @ - (64 at most)")
    s = store()
    if s.has_user(name):
        fail(f"MLflow user {name!r} exists (its password: MLflow's update-password API, or the admin's UI)")
    out = secrets_dir / "users" / name
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if len(password) < 12:
            fail("the password read from stdin is shorter than 12 characters (MLflow's minimum)")
    else:
        password = secrets.token_hex(16)
        out.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
    s.create_user(name, password)
    where = "read from stdin" if from_stdin else f"in {out} (0600): hand it over privately, then delete the file"
    print(f"lab: MLflow user {name} created: reads every experiment and model, manages what it creates; "
          f"password {where}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/lab_auth.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("ensure")
    e.add_argument("secrets", type=Path)
    e.add_argument("tracking_db")
    e.add_argument("server_url")
    a = sub.add_parser("add-user")
    a.add_argument("secrets", type=Path)
    a.add_argument("name")
    a.add_argument("--password-stdin", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore", DeprecationWarning)  # MLflow's server modules on Starlette's
    if args.command == "ensure":
        ensure(args.secrets, args.tracking_db, args.server_url)
    else:
        add_user(args.secrets, args.name, args.password_stdin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
