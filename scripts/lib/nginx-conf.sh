# scripts/lib/nginx-conf.sh — sourced by scripts/cluster and run by the tests that start or
# check nginx (tests/common, tests/deploy_files): the one place nginx/cluster.conf.template is
# filled in, so the config the tests prove is the config `scripts/cluster up` runs.

# render_nginx_conf STATE_DIR LISTEN NOFILE WORKER_CONNECTIONS UPSTREAM... — prints the config.
#   STATE_DIR           absolute directory for nginx's pid file, logs and temp files
#   LISTEN              address:port nginx listens on, e.g. 127.0.0.1:8080
#   NOFILE              workers' open-file limit (worker_rlimit_nofile)
#   WORKER_CONNECTIONS  connections per worker; leave room under NOFILE for logs and listeners
#   UPSTREAM            host:port of each node
render_nginx_conf() {
    if (($# < 5)); then
        echo "usage: render_nginx_conf STATE_DIR LISTEN NOFILE WORKER_CONNECTIONS UPSTREAM..." >&2
        return 2
    fi
    local state_dir=$1 listen=$2 nofile=$3 worker_connections=$4
    shift 4
    [[ $state_dir == /* ]] || { echo "render_nginx_conf: STATE_DIR must be absolute: $state_dir" >&2; return 2; }
    [[ $nofile =~ ^[0-9]+$ && $worker_connections =~ ^[0-9]+$ ]] \
        || { echo "render_nginx_conf: NOFILE and WORKER_CONNECTIONS must be numbers" >&2; return 2; }
    local template conf upstream servers=""
    template="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/nginx/cluster.conf.template"
    conf=$(<"$template") || return 1
    for upstream in "$@"; do
        servers+="${servers:+$'\n'}        server $upstream max_fails=3 fail_timeout=10s;"
    done
    # bash 5.2 expands `&` in ${var//pattern/replacement}; the values are paths and addresses.
    local restore
    restore=$(shopt -p patsub_replacement 2>/dev/null) || true
    shopt -u patsub_replacement 2>/dev/null || true
    conf=${conf//@STATE_DIR@/$state_dir}
    conf=${conf//@LISTEN@/$listen}
    conf=${conf//@UPSTREAM_SERVERS@/$servers}
    conf=${conf//@RLIMIT_NOFILE@/$nofile}
    conf=${conf//@WORKER_CONNECTIONS@/$worker_connections}
    eval "$restore"
    # A placeholder is `@NAME@` in capitals; the template's comments say `@ signs` in lower case.
    if [[ $conf == *@[A-Z]*@* ]]; then
        echo "render_nginx_conf: unfilled placeholder left in $template" >&2
        return 1
    fi
    printf '%s\n' "$conf"
}

# render_nginx_tls_conf LISTEN CERT KEY — prints nginx/tls.conf.template filled in: the TLS +
# HTTP/2 listener the server block includes from STATE_DIR/tls/*.conf.
#   LISTEN  address:port of the TLS listener, e.g. 127.0.0.1:8443
#   CERT    absolute path of the certificate chain (PEM)
#   KEY     absolute path of its private key (PEM)
render_nginx_tls_conf() {
    if (($# != 3)); then
        echo "usage: render_nginx_tls_conf LISTEN CERT KEY" >&2
        return 2
    fi
    local listen=$1 cert=$2 key=$3 template conf
    [[ $cert == /* && $key == /* ]] || { echo "render_nginx_tls_conf: CERT and KEY must be absolute" >&2; return 2; }
    template="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/nginx/tls.conf.template"
    conf=$(<"$template") || return 1
    local restore
    restore=$(shopt -p patsub_replacement 2>/dev/null) || true
    shopt -u patsub_replacement 2>/dev/null || true
    conf=${conf//@TLS_LISTEN@/$listen}
    conf=${conf//@TLS_CERT@/$cert}
    conf=${conf//@TLS_KEY@/$key}
    eval "$restore"
    if [[ $conf == *@[A-Z]*@* ]]; then
        echo "render_nginx_tls_conf: unfilled placeholder left in $template" >&2
        return 1
    fi
    printf '%s\n' "$conf"
}

# make_self_signed_cert DIR — writes DIR/tls.crt and DIR/tls.key: a self-signed P-256
# certificate for localhost and 127.0.0.1, valid for 30 days, made on the spot with openssl.
# For local clusters and tests only: browsers and `sse-fanout doctor` must be told to trust it
# (`doctor --ca-file DIR/tls.crt`).
make_self_signed_cert() {
    local dir=${1:?usage: make_self_signed_cert DIR}
    mkdir -p "$dir" || return 1
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
        -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        -addext "basicConstraints=critical,CA:FALSE" \
        -keyout "$dir/tls.key" -out "$dir/tls.crt" 2>/dev/null \
        || { echo "make_self_signed_cert: openssl failed" >&2; return 1; }
    chmod 600 "$dir/tls.key"
}
