#!/usr/bin/env bash
# A lab's servers on one machine: PostgreSQL, Prefect's server and MLflow's tracking server on it
# (MLflow serving the artifacts itself), for workers on every GPU machine of the lab. Every API and
# UI asks for credentials; off loopback the servers are reached over TLS (docs/security.md).
#
#   scripts/lab.sh start     initialise (first time: database cluster, credentials, certificates)
#                            and start them; writes $TEXQ_LAB_DIR/lab.env (mode 0600: the URLs and
#                            credentials that workers and users export) and prints its path and the URLs
#   scripts/lab.sh add-user NAME [--password-stdin]
#                            an MLflow user (reads every run, changes what it creates); its password
#                            generated into $TEXQ_LAB_DIR/secrets/users/NAME (0600), or read from stdin
#   scripts/lab.sh stop      stop them (data kept)
#   scripts/lab.sh status    which of them answer
#
# Settings (environment):
#   TEXQ_LAB_DIR     where the database cluster, credentials, artifacts, logs and pids live
#                    (default ~/.local/share/texq-lab; as root /var/lib/texq-lab: PostgreSQL runs as
#                    the postgres user, which must be able to reach the folder)
#   TEXQ_LAB_HOST    the address workers and users reach Prefect and MLflow at (default 127.0.0.1)
#   TEXQ_LAB_TLS     auto (default: on unless TEXQ_LAB_HOST is a loopback address), on or off. On:
#                    Prefect and MLflow listen on 127.0.0.1 (TEXQ_LAB_PREFECT_BACKEND_PORT and
#                    TEXQ_LAB_MLFLOW_BACKEND_PORT, default their port + 10000) behind Caddy, which
#                    serves them over HTTPS on TEXQ_LAB_HOST with a certificate of the lab's own CA
#                    (made at first start), or TEXQ_LAB_CERT / TEXQ_LAB_KEY (with TEXQ_LAB_CA, the CA
#                    that clients verify it with, unless the system trusts its issuer)
#   TEXQ_LAB_PG_PORT 5433 (127.0.0.1 and its socket only)   TEXQ_LAB_PREFECT_PORT 4200   TEXQ_LAB_MLFLOW_PORT 5000
#   TEXQ_LAB_ARTIFACTS   MLflow's artifact store (default $TEXQ_LAB_DIR/mlartifacts; shared storage
#                    or s3://... for a lab: the server reads and writes it, clients go through it)
#   TEXQ_VENV        the Python environment with texq[pipeline] (default .venv)
set -euo pipefail
umask 077  # whatever the lab writes (credentials, logs, artifacts, certificates) is its owner's only
cd "$(dirname "$0")/.."
VENV="${TEXQ_VENV:-.venv}"
BIN="$(cd "$VENV/bin" && pwd)"
if [ "$(id -u)" = 0 ]; then ROOT=1 default_dir=/var/lib/texq-lab; else ROOT=0 default_dir="$HOME/.local/share/texq-lab"; fi
DIR="${TEXQ_LAB_DIR:-$default_dir}"
HOST="${TEXQ_LAB_HOST:-127.0.0.1}"
PG_PORT="${TEXQ_LAB_PG_PORT:-5433}"
PREFECT_PORT="${TEXQ_LAB_PREFECT_PORT:-4200}"
MLFLOW_PORT="${TEXQ_LAB_MLFLOW_PORT:-5000}"
ARTIFACTS="${TEXQ_LAB_ARTIFACTS:-$DIR/mlartifacts}"
PG_USER=texq
SECRETS="$DIR/secrets"    # 0700, each file 0600: passwords, keys, MLflow's auth config
PGPASS="$SECRETS/pgpass"  # libpq's password file: psql, createdb and both servers read it
DB_URL="postgresql+psycopg://$PG_USER@127.0.0.1:$PG_PORT"  # no password: PGPASSFILE gives it

die() { echo "lab: error: $*" >&2; exit 2; }

case "${TEXQ_LAB_TLS:-auto}" in
    on) TLS=1 ;;
    off) TLS=0 ;;
    auto) case "$HOST" in 127.*|::1|localhost) TLS=0 ;; *) TLS=1 ;; esac ;;
    *) die "TEXQ_LAB_TLS=${TEXQ_LAB_TLS}: expected auto, on or off" ;;
esac
if [ "$TLS" = 1 ]; then  # Caddy on HOST:PORT, the servers on 127.0.0.1:BACKEND_PORT
    SCHEME=https BIND=127.0.0.1
    PREFECT_BIND_PORT="${TEXQ_LAB_PREFECT_BACKEND_PORT:-$((PREFECT_PORT + 10000))}"
    MLFLOW_BIND_PORT="${TEXQ_LAB_MLFLOW_BACKEND_PORT:-$((MLFLOW_PORT + 10000))}"
    if [ -n "${TEXQ_LAB_CERT:-}" ]; then
        [ -n "${TEXQ_LAB_KEY:-}" ] || die "TEXQ_LAB_CERT needs TEXQ_LAB_KEY (its private key)"
        CERT="$TEXQ_LAB_CERT" KEY="$TEXQ_LAB_KEY" CA="${TEXQ_LAB_CA:-}"
    else
        CERT="$DIR/tls/server.crt" KEY="$SECRETS/server.key" CA="$DIR/tls/ca.crt"
    fi
else
    SCHEME=http BIND="$HOST" PREFECT_BIND_PORT="$PREFECT_PORT" MLFLOW_BIND_PORT="$MLFLOW_PORT" CA=
fi
PREFECT_URL="$SCHEME://$HOST:$PREFECT_PORT" MLFLOW_URL="$SCHEME://$HOST:$MLFLOW_PORT"
CURL=(curl -fsS -o /dev/null)  # health URLs only: they need no credentials
if [ -n "$CA" ]; then CURL+=(--cacert "$CA"); fi

pg_bin() {  # the PostgreSQL server's binaries (Debian: /usr/lib/postgresql/N/bin)
    local d
    for d in "$(pg_config --bindir 2>/dev/null || true)" /usr/lib/postgresql/*/bin; do
        [ -x "$d/initdb" ] && { echo "$d"; return; }
    done
    die "PostgreSQL's server is not installed (Debian: apt-get install postgresql)"
}

as_pg() {  # PostgreSQL refuses to run as root: as root, run its commands as the postgres user
    if [ "$ROOT" = 1 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_running() { [ -f "$DIR/pg/PG_VERSION" ] && as_pg "$(pg_bin)/pg_ctl" -D "$DIR/pg" status >/dev/null 2>&1; }

psql_lab() {  # ARGS...: psql as the texq role over the socket, its password from $PGPASS
    PGPASSFILE="$PGPASS" "$(pg_bin)/psql" -w -h "$DIR/sock" -p "$PG_PORT" -U "$PG_USER" "$@"
}

wait_http() {  # URL NAME LOG PIDNAME: poll until it answers, 180 s at most
    local deadline=$((SECONDS + 180))
    until "${CURL[@]}" "$1" 2>/dev/null; do
        alive "$4" || die "$2 exited; see $3"
        [ "$SECONDS" -lt "$deadline" ] || die "$2 did not answer at $1 within 180 s; see $3"
        sleep 1
    done
}

alive() { [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

. scripts/lab_tls.sh  # certificates, start_caddy

folders() {  # the owner's alone; as root the postgres user may pass through $DIR and append its log
    mkdir -p "$DIR" "$SECRETS/users" "$DIR/logs" "$DIR/sock" "$DIR/tls"
    chmod 700 "$DIR" "$SECRETS" "$SECRETS/users" "$DIR/logs" "$DIR/sock" "$DIR/tls"
    if [ "$ROOT" = 1 ]; then
        id postgres >/dev/null 2>&1 || die "no postgres user (apt-get install postgresql creates it)"
        chgrp postgres "$DIR" "$DIR/logs" && chmod 710 "$DIR" "$DIR/logs"
        chown postgres "$DIR/sock"
        runuser -u postgres -- test -x "$DIR" || die "$DIR: the postgres user cannot reach it (set TEXQ_LAB_DIR)"
    fi
}

migrate() {  # a lab of the earlier lab.sh (local connections trusted, no credentials): migrated
    grep -Eq '^[[:space:]]*(local|host)[^#]*[[:space:]]trust([[:space:]]|$)' "$DIR/pg/pg_hba.conf" 2>/dev/null || return 0
    if pg_running || alive prefect || alive mlflow; then
        die "$DIR is a lab without authentication that is still running: scripts/lab.sh stop, then scripts/lab.sh start (it migrates the lab)"
    fi
    [ -s "$DIR/pg-password" ] || die "$DIR/pg trusts local connections and has no pg-password beside it: not a lab of scripts/lab.sh"
    mv "$DIR/pg-password" "$SECRETS/pg-password"
    as_pg sed -i -E '/^[[:space:]]*(local|host)/ s/[[:space:]]trust([[:space:]]|$)/ scram-sha-256\1/' "$DIR/pg/pg_hba.conf"
    touch "$SECRETS/adopt"  # lab_auth.py ensure: what MLflow holds becomes the texq user's
    echo "lab: $DIR migrated: PostgreSQL asks for passwords, the servers for credentials ($SECRETS)" >&2
}

credentials() {  # made once; handed to workers and users through lab.env only
    local s
    for s in pg-password mlflow-admin-password mlflow-texq-password mlflow-flask-secret; do
        [ -s "$SECRETS/$s" ] || openssl rand -hex 24 > "$SECRETS/$s"
    done
    [ -s "$SECRETS/prefect-auth" ] || echo "texq:$(openssl rand -hex 24)" > "$SECRETS/prefect-auth"
    printf '*:*:*:%s:%s\n' "$PG_USER" "$(<"$SECRETS/pg-password")" > "$PGPASS"
    # READ by default: every user sees every run; each changes what it created (MANAGE) or was
    # granted. The workers' user, texq, creates (so manages) the texq experiment and the models.
    # A password checked once a minute per server worker, not on every request (MLflow's hash
    # check takes ~0.1-0.5 s: the workers' many small requests); a changed one applies within 60 s
    cat > "$SECRETS/mlflow-auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = $DB_URL/mlflow_auth
admin_username = admin
admin_password = $(<"$SECRETS/mlflow-admin-password")
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
grant_default_workspace_access = false
auth_cache_ttl_seconds = 60
EOF
    find "$SECRETS" -type f -exec chmod 600 {} +
}

start_postgres() {
    local pgbin pwfile="$DIR/sock/pwfile"
    pgbin="$(pg_bin)"
    if [ ! -f "$DIR/pg/PG_VERSION" ]; then
        mkdir -p "$DIR/pg"
        printf '%s\n' "$(<"$SECRETS/pg-password")" > "$pwfile"  # in the postgres user's own folder
        if [ "$ROOT" = 1 ]; then chown postgres "$DIR/pg" "$pwfile"; fi
        # UTF-8 whatever the caller's locale (without LANG, initdb picks SQL_ASCII, which psycopg
        # returns as bytes: MLflow's server fails)
        as_pg "$pgbin/initdb" -D "$DIR/pg" -U "$PG_USER" --pwfile="$pwfile" --encoding=UTF8 --locale=C \
            --auth-local=scram-sha-256 --auth-host=scram-sha-256 >"$DIR/logs/initdb.log" 2>&1 \
            || { rm -f "$pwfile"; die "initdb failed; see $DIR/logs/initdb.log"; }
        rm -f "$pwfile"
    fi
    if ! pg_running; then
        touch "$DIR/logs/postgres.log"
        if [ "$ROOT" = 1 ]; then chown postgres "$DIR/logs/postgres.log"; fi
        as_pg "$pgbin/pg_ctl" -D "$DIR/pg" -w -t 120 -l "$DIR/logs/postgres.log" -o "-p $PG_PORT -k $DIR/sock \
            -c listen_addresses=127.0.0.1 -c unix_socket_permissions=0700" start >/dev/null \
            || die "PostgreSQL did not start; see $DIR/logs/postgres.log"
    fi
    for db in prefect mlflow mlflow_auth; do
        if ! psql_lab -d postgres -tAc "select 1 from pg_database where datname = '$db'" | grep -q 1; then
            PGPASSFILE="$PGPASS" "$pgbin/createdb" -w -h "$DIR/sock" -p "$PG_PORT" -U "$PG_USER" "$db" \
                || die "createdb $db failed (is $PGPASS's password the texq role's?)"
        fi
    done
}

start_servers() {  # credentials and the database's URL through the environment, never argv
    if ! alive prefect; then
        # the UI calls the API at PREFECT_UI_API_URL (Prefect's default: port 4200, whatever --port says);
        # behind a proxy of the lab's own, set it to the address users' browsers reach. The UI's
        # files are copied into the lab's folder, not into the Python environment
        PGPASSFILE="$PGPASS" PREFECT_API_DATABASE_CONNECTION_URL="${DB_URL/psycopg/asyncpg}/prefect" \
        PREFECT_SERVER_API_AUTH_STRING="$(<"$SECRETS/prefect-auth")" \
        PREFECT_UI_API_URL="${PREFECT_UI_API_URL:-$PREFECT_URL/api}" \
        PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_HOME="$DIR/prefect-home" \
        PREFECT_UI_STATIC_DIRECTORY="$DIR/prefect-ui" \
            nohup "$BIN/prefect" server start --host "$BIND" --port "$PREFECT_BIND_PORT" \
            >"$DIR/logs/prefect.log" 2>&1 &
        echo $! > "$DIR/prefect.pid"
    fi
    if ! alive mlflow; then
        # no job runner: its consumers serve GenAI evaluation jobs, which texq never submits. The
        # UI's own origin may POST (MLflow refuses other origins than localhost's by default)
        PGPASSFILE="$PGPASS" MLFLOW_BACKEND_STORE_URI="$DB_URL/mlflow" \
        MLFLOW_AUTH_CONFIG_PATH="$SECRETS/mlflow-auth.ini" \
        MLFLOW_FLASK_SERVER_SECRET_KEY="$(<"$SECRETS/mlflow-flask-secret")" \
        MLFLOW_SERVER_ALLOWED_HOSTS="${MLFLOW_SERVER_ALLOWED_HOSTS:-localhost,localhost:*,127.0.0.1,127.0.0.1:*,$HOST,$HOST:*}" \
        MLFLOW_SERVER_CORS_ALLOWED_ORIGINS="${MLFLOW_SERVER_CORS_ALLOWED_ORIGINS:-$MLFLOW_URL}" \
        MLFLOW_DISABLE_TELEMETRY=true MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
            nohup "$BIN/mlflow" server --app-name basic-auth --host "$BIND" --port "$MLFLOW_BIND_PORT" \
            --serve-artifacts --artifacts-destination "$ARTIFACTS" --workers 2 >"$DIR/logs/mlflow.log" 2>&1 &
        echo $! > "$DIR/mlflow.pid"
    fi
    wait_http "http://$BIND:$PREFECT_BIND_PORT/api/health" Prefect "$DIR/logs/prefect.log" prefect
    wait_http "http://$BIND:$MLFLOW_BIND_PORT/health" MLflow "$DIR/logs/mlflow.log" mlflow
}

write_env() {  # lab.env, 0600: the URLs and the credentials workers and users export
    local ca='' tmp="$DIR/lab.env.tmp"
    if [ -n "$CA" ]; then ca="\${TEXQ_LAB_CA:-$CA}"; fi  # where a worker keeps its copy of the CA
    {
        echo "# scripts/lab.sh start: the lab's URLs and credentials; keep it 0600, hand it over privately"
        echo "export PREFECT_API_URL=$PREFECT_URL/api"
        echo "export MLFLOW_TRACKING_URI=$MLFLOW_URL"
        echo "export PREFECT_API_AUTH_STRING=$(<"$SECRETS/prefect-auth")"
        echo "export MLFLOW_TRACKING_USERNAME=texq MLFLOW_TRACKING_PASSWORD=$(<"$SECRETS/mlflow-texq-password")"
        if [ -n "$ca" ]; then echo "export PREFECT_API_SSL_CERT_FILE=\"$ca\" MLFLOW_TRACKING_SERVER_CERT_PATH=\"$ca\""; fi
        echo "export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_LOGGING_EXTRA_LOGGERS=texq MLFLOW_DISABLE_TELEMETRY=true"
        # flow runs send a heartbeat every 180 s (Prefect's default); the zombie automation marks one
        # silent for 540 s Crashed (flows/zombies.py). Clients wait out a server restart: Prefect's up
        # to 7 retries (2^n s backoff), MLflow's texq defaults (flows/bookkeeping/store.py)
        echo "export PREFECT_CLIENT_MAX_RETRIES=7"
    } > "$tmp"
    mv "$tmp" "$DIR/lab.env"
}

start() {
    [ "$TLS" = 0 ] || command -v caddy >/dev/null || die "TLS (TEXQ_LAB_HOST=$HOST, TEXQ_LAB_TLS=${TEXQ_LAB_TLS:-auto}) needs Caddy: apt-get install caddy"
    command -v openssl >/dev/null || die "openssl is not installed (apt-get install openssl)"
    pg_bin >/dev/null
    folders
    migrate
    credentials
    if [ "$TLS" = 1 ]; then certificates; fi
    start_postgres
    start_servers
    # the workers' MLflow user, texq: its password as in $SECRETS, the texq experiment its own
    PGPASSFILE="$PGPASS" MLFLOW_AUTH_CONFIG_PATH="$SECRETS/mlflow-auth.ini" "$BIN/python" scripts/lab_auth.py \
        ensure "$SECRETS" "$DB_URL/mlflow" "http://$BIND:$MLFLOW_BIND_PORT" >"$DIR/logs/lab_auth.log" 2>&1 \
        || die "the MLflow users could not be set up; see $DIR/logs/lab_auth.log"
    if [ "$TLS" = 1 ]; then start_caddy; fi
    write_env
    (. "$DIR/lab.env"; "$BIN/python" -m flows.zombies >"$DIR/logs/zombies.log" 2>&1) \
        || die "the zombie-flow automation could not be created; see $DIR/logs/zombies.log"
    # runs left RUNNING by a lab that went down with work in flight: their Prefect state decides
    (. "$DIR/lab.env"; "$BIN/texq" track reconcile >"$DIR/logs/reconcile.log" 2>&1) \
        || echo "lab: texq track reconcile failed; see $DIR/logs/reconcile.log" >&2
    echo "lab: PostgreSQL on 127.0.0.1:$PG_PORT, Prefect UI $PREFECT_URL, MLflow UI $MLFLOW_URL" >&2
    echo "lab: workers and users: source $DIR/lab.env (0600: it holds the credentials)" >&2
    echo "TEXQ_LAB_ENV=$DIR/lab.env"
    echo "PREFECT_API_URL=$PREFECT_URL/api"
    echo "MLFLOW_TRACKING_URI=$MLFLOW_URL"
    if [ -n "$CA" ]; then echo "TEXQ_LAB_CA=$CA"; fi
}

add_user() {  # NAME [--password-stdin]
    [ -n "${1:-}" ] || die "usage: scripts/lab.sh add-user NAME [--password-stdin]"
    [ -f "$SECRETS/mlflow-auth.ini" ] || die "no lab in $DIR: scripts/lab.sh start first"
    pg_running || die "the lab's PostgreSQL is not running: scripts/lab.sh start first"
    PGPASSFILE="$PGPASS" MLFLOW_AUTH_CONFIG_PATH="$SECRETS/mlflow-auth.ini" \
        "$BIN/python" scripts/lab_auth.py add-user "$SECRETS" "$@"
}

stop() {
    local name pid
    for name in caddy mlflow prefect; do
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
    pg_running && echo "postgresql: running" || { echo "postgresql: down"; ok=1; }
    "${CURL[@]}" "$PREFECT_URL/api/health" 2>/dev/null && echo "prefect: up" || { echo "prefect: down"; ok=1; }
    "${CURL[@]}" "$MLFLOW_URL/health" 2>/dev/null && echo "mlflow: up" || { echo "mlflow: down"; ok=1; }
    return $ok
}

case "${1:-}" in
    start) start ;;
    add-user) shift; add_user "$@" ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: scripts/lab.sh start|add-user NAME [--password-stdin]|stop|status" >&2; exit 2 ;;
esac
