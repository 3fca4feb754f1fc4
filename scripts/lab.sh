#!/usr/bin/env bash
# A lab's servers on one machine: PostgreSQL, Prefect's server and MLflow's tracking server on it
# (MLflow serving the artifacts itself), for workers on every GPU machine of the lab.
#
#   scripts/lab.sh start     initialise (first time) and start the three; prints the variables
#                            that workers and users export (also written to $TEXQ_LAB_DIR/lab.env)
#   scripts/lab.sh stop      stop them (data kept)
#   scripts/lab.sh status    which of them answer
#
# Settings (environment):
#   TEXQ_LAB_DIR     where the database cluster, artifacts, logs and pids live
#                    (default ~/.local/share/texq-lab; as root /var/lib/texq-lab: PostgreSQL runs as
#                    the postgres user, which must be able to reach the folder)
#   TEXQ_LAB_HOST    the address the servers bind to (default 127.0.0.1; a lab puts a proxy with
#                    authentication in front, or binds to its private network deliberately)
#   TEXQ_LAB_PG_PORT 5433   TEXQ_LAB_PREFECT_PORT 4200   TEXQ_LAB_MLFLOW_PORT 5000
#   TEXQ_LAB_ARTIFACTS   MLflow's artifact store (default $TEXQ_LAB_DIR/mlartifacts; shared storage
#                    or s3://... for a lab: the server reads and writes it, clients go through it)
#   TEXQ_VENV        the Python environment with texq[pipeline] (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TEXQ_VENV:-.venv}"
BIN="$(cd "$VENV/bin" && pwd)"
if [ "$(id -u)" = 0 ]; then default_dir=/var/lib/texq-lab; else default_dir="$HOME/.local/share/texq-lab"; fi
DIR="${TEXQ_LAB_DIR:-$default_dir}"
HOST="${TEXQ_LAB_HOST:-127.0.0.1}"
PG_PORT="${TEXQ_LAB_PG_PORT:-5433}"
PREFECT_PORT="${TEXQ_LAB_PREFECT_PORT:-4200}"
MLFLOW_PORT="${TEXQ_LAB_MLFLOW_PORT:-5000}"
ARTIFACTS="${TEXQ_LAB_ARTIFACTS:-$DIR/mlartifacts}"
PG_USER=texq

die() { echo "lab: error: $*" >&2; exit 2; }

pg_bin() {  # the PostgreSQL server's binaries (Debian: /usr/lib/postgresql/N/bin)
    local d
    for d in "$(pg_config --bindir 2>/dev/null || true)" /usr/lib/postgresql/*/bin; do
        [ -x "$d/initdb" ] && { echo "$d"; return; }
    done
    die "PostgreSQL's server is not installed (Debian: apt-get install postgresql)"
}

as_pg() {  # PostgreSQL refuses to run as root: as root, run its commands as the postgres user
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

wait_http() {  # URL NAME LOG PIDNAME
    for _ in $(seq 1 180); do
        if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
        alive "$4" || die "$2 exited; see $3"
        sleep 1
    done
    die "$2 did not answer at $1 within 180 s; see $3"
}

alive() { [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

start() {
    local pgbin pw
    pgbin="$(pg_bin)"
    mkdir -p "$DIR/logs" "$DIR/sock"
    if [ "$(id -u)" = 0 ]; then
        id postgres >/dev/null 2>&1 || die "no postgres user (apt-get install postgresql creates it)"
        chown postgres "$DIR/sock"
        runuser -u postgres -- test -x "$DIR" || die "$DIR: the postgres user cannot reach it (set TEXQ_LAB_DIR)"
    fi
    if [ ! -f "$DIR/pg-password" ]; then
        (umask 077; "$BIN/python" -c 'import secrets; print(secrets.token_urlsafe(24))' > "$DIR/pg-password")
    fi
    pw="$(cat "$DIR/pg-password")"
    if [ ! -f "$DIR/pg/PG_VERSION" ]; then
        mkdir -p "$DIR/pg"
        local pwfile="$DIR/sock/pwfile"
        (umask 077; echo "$pw" > "$pwfile")
        if [ "$(id -u)" = 0 ]; then chown postgres "$DIR/pg" "$pwfile"; fi
        as_pg "$pgbin/initdb" -D "$DIR/pg" -U "$PG_USER" --pwfile="$pwfile" --auth-local=trust \
            --auth-host=scram-sha-256 >"$DIR/logs/initdb.log" 2>&1 || die "initdb failed; see $DIR/logs/initdb.log"
        rm -f "$pwfile"
    fi
    if ! as_pg "$pgbin/pg_ctl" -D "$DIR/pg" status >/dev/null 2>&1; then
        touch "$DIR/logs/postgres.log"
        if [ "$(id -u)" = 0 ]; then chown postgres "$DIR/logs/postgres.log"; fi
        as_pg "$pgbin/pg_ctl" -D "$DIR/pg" -w -t 120 -l "$DIR/logs/postgres.log" \
            -o "-p $PG_PORT -k $DIR/sock -c listen_addresses=$HOST" start >/dev/null \
            || die "PostgreSQL did not start; see $DIR/logs/postgres.log"
    fi
    for db in prefect mlflow; do
        if ! as_pg "$pgbin/psql" -h "$DIR/sock" -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc \
                "select 1 from pg_database where datname = '$db'" | grep -q 1; then
            as_pg "$pgbin/createdb" -h "$DIR/sock" -p "$PG_PORT" -U "$PG_USER" "$db"
        fi
    done
    local pg="$PG_USER:$pw@$HOST:$PG_PORT"
    if ! alive prefect; then
        # the UI calls the API at PREFECT_UI_API_URL (Prefect's default: port 4200, whatever --port says);
        # behind a proxy, set it to the address users' browsers reach
        PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://$pg/prefect" \
        PREFECT_UI_API_URL="${PREFECT_UI_API_URL:-http://$HOST:$PREFECT_PORT/api}" \
        PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_HOME="$DIR/prefect-home" \
            nohup "$BIN/prefect" server start --host "$HOST" --port "$PREFECT_PORT" \
            >"$DIR/logs/prefect.log" 2>&1 &
        echo $! > "$DIR/prefect.pid"
    fi
    if ! alive mlflow; then
        # no job runner: its consumers serve GenAI evaluation jobs, which texq never submits
        MLFLOW_DISABLE_TELEMETRY=true MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false nohup "$BIN/mlflow" server --host "$HOST" --port "$MLFLOW_PORT" \
            --backend-store-uri "postgresql+psycopg://$pg/mlflow" --serve-artifacts \
            --artifacts-destination "$ARTIFACTS" --workers 2 >"$DIR/logs/mlflow.log" 2>&1 &
        echo $! > "$DIR/mlflow.pid"
    fi
    wait_http "http://$HOST:$PREFECT_PORT/api/health" Prefect "$DIR/logs/prefect.log" prefect
    wait_http "http://$HOST:$MLFLOW_PORT/health" MLflow "$DIR/logs/mlflow.log" mlflow
    # flow runs send a heartbeat every 180 s (Prefect's default); the zombie automation marks one
    # silent for 540 s Crashed (flows/zombies.py). Clients wait out a server restart: Prefect's up to
    # 7 retries (2^n s backoff), MLflow's texq defaults (flows/store.py)
    cat > "$DIR/lab.env" <<EOF
export PREFECT_API_URL=http://$HOST:$PREFECT_PORT/api
export MLFLOW_TRACKING_URI=http://$HOST:$MLFLOW_PORT
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_LOGGING_EXTRA_LOGGERS=texq MLFLOW_DISABLE_TELEMETRY=true
export PREFECT_CLIENT_MAX_RETRIES=7
EOF
    (. "$DIR/lab.env"; "$BIN/python" -m flows.zombies >"$DIR/logs/zombies.log" 2>&1) \
        || die "the zombie-flow automation could not be created; see $DIR/logs/zombies.log"
    # runs left RUNNING by a lab that went down with work in flight: their Prefect state decides
    (. "$DIR/lab.env"; "$BIN/texq" track reconcile >"$DIR/logs/reconcile.log" 2>&1) \
        || echo "lab: texq track reconcile failed; see $DIR/logs/reconcile.log" >&2
    echo "lab: PostgreSQL on $HOST:$PG_PORT, Prefect UI http://$HOST:$PREFECT_PORT, MLflow UI http://$HOST:$MLFLOW_PORT" >&2
    cat "$DIR/lab.env"
}

stop() {
    local name pid
    for name in mlflow prefect; do
        if alive "$name"; then
            pid="$(cat "$DIR/$name.pid")"
            pkill -INT -P "$pid" 2>/dev/null || true   # its uvicorn/gunicorn workers
            kill -INT "$pid" 2>/dev/null || true
            for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
            kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$DIR/$name.pid"
    done
    if [ -f "$DIR/pg/PG_VERSION" ]; then
        as_pg "$(pg_bin)/pg_ctl" -D "$DIR/pg" -m fast -w stop >/dev/null 2>&1 || true
    fi
    echo "lab: stopped (data kept in $DIR)" >&2
}

status() {
    local ok=0
    as_pg "$(pg_bin)/pg_ctl" -D "$DIR/pg" status >/dev/null 2>&1 && echo "postgresql: running" || { echo "postgresql: down"; ok=1; }
    curl -fsS -o /dev/null "http://$HOST:$PREFECT_PORT/api/health" 2>/dev/null && echo "prefect: up" || { echo "prefect: down"; ok=1; }
    curl -fsS -o /dev/null "http://$HOST:$MLFLOW_PORT/health" 2>/dev/null && echo "mlflow: up" || { echo "mlflow: down"; ok=1; }
    return $ok
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: scripts/lab.sh start|stop|status" >&2; exit 2 ;;
esac
