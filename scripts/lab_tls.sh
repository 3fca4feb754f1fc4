# TLS for scripts/lab.sh (sourced by it; its variables): the lab's own CA and a server certificate
# made with openssl, and Caddy terminating TLS on TEXQ_LAB_HOST in front of Prefect and MLflow,
# which listen on 127.0.0.1 only.
# shellcheck shell=bash

certificates() {  # the lab's CA (once) and a certificate for HOST and this machine's name
    [ -n "${TEXQ_LAB_CERT:-}" ] && return
    local san log="$DIR/logs/openssl.log"
    if [ ! -s "$SECRETS/ca.key" ]; then
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
            -subj "/CN=texq lab CA $(hostname)" -keyout "$SECRETS/ca.key" -out "$DIR/tls/ca.crt" \
            -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
            >"$log" 2>&1 || die "openssl could not make the lab's CA; see $log"
        rm -f "$DIR/tls/server.crt"
    fi
    san="DNS:$(hostname),DNS:localhost,IP:127.0.0.1"
    if [[ "$HOST" =~ ^[0-9.]+$ || "$HOST" == *:* ]]; then san="IP:$HOST,$san"; else san="DNS:$HOST,$san"; fi
    san="$(tr , '\n' <<<"$san" | awk '!seen[$0]++' | paste -sd,)"  # each name once
    if [ ! -s "$DIR/tls/server.crt" ] || [ "$(cat "$DIR/tls/server.san" 2>/dev/null)" != "$san" ]; then
        openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$HOST" \
            -keyout "$SECRETS/server.key" -out "$DIR/tls/server.csr" >"$log" 2>&1 &&
        openssl x509 -req -in "$DIR/tls/server.csr" -CA "$DIR/tls/ca.crt" -CAkey "$SECRETS/ca.key" \
            -set_serial "0x$(openssl rand -hex 16)" -days 825 -out "$DIR/tls/server.crt" -extfile <(
            printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n' "$san") \
            >>"$log" 2>&1 || die "openssl could not make the server's certificate; see $log"
        echo "$san" > "$DIR/tls/server.san"
    fi
}

start_caddy() {  # TLS on HOST:PORT for each server; no admin endpoint, nothing installed in trust stores
    mkdir -p "$DIR/caddy"
    if ! alive caddy; then
        cat > "$DIR/caddy/Caddyfile" <<EOF
{
	admin off
	skip_install_trust
	auto_https disable_redirects
	storage file_system $DIR/caddy
	servers {
		protocols h1 h2
	}
}
https://:$PREFECT_PORT {
	bind $HOST
	tls $CERT $KEY
	reverse_proxy 127.0.0.1:$PREFECT_BIND_PORT
}
https://:$MLFLOW_PORT {
	bind $HOST
	tls $CERT $KEY
	reverse_proxy 127.0.0.1:$MLFLOW_BIND_PORT
}
EOF
        HOME="$DIR/caddy" XDG_DATA_HOME="$DIR/caddy" XDG_CONFIG_HOME="$DIR/caddy" nohup caddy run \
            --adapter caddyfile --config "$DIR/caddy/Caddyfile" >"$DIR/logs/caddy.log" 2>&1 &
        echo $! > "$DIR/caddy.pid"
    fi
    wait_http "$PREFECT_URL/api/health" "Caddy (Prefect)" "$DIR/logs/caddy.log" caddy
    wait_http "$MLFLOW_URL/health" "Caddy (MLflow)" "$DIR/logs/caddy.log" caddy
}
