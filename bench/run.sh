#!/usr/bin/env bash
# Benchmarks the same upstream direct, through Legate, nginx and HAProxy, in
# one run, with wrk (HTTP/1.1 keep-alive) and h2load (h2c, prior knowledge).
#
# Pinning: the load generator and the upstream share core LOAD_CPU (default 0);
# the proxy under test runs alone on core PROXY_CPU (default 1) with ONE worker.
# Each contender/protocol is measured ROUNDS times, rounds interleaved, and the
# best round counts. See bench/README.md.
#
# Filter-cost contenders (bench/filters.sh runs them): Legate again, each with a
# filter chain on its route: native1/native5 = 1 or 5 native no-op filters,
# wasm1/wasm5 = 1 or 5 no-op Wasm filters (bench/noop-filter), wasmhdr = 1 Wasm
# filter that reads one request header, wasmall = 1 no-op Wasm filter declaring
# every phase pwnoop is called in, pwnoop = 1 no-op proxy-wasm filter (the
# upstream `proxy-wasm` Rust SDK, bench/pw-noop-filter: Envoy's ABI, called
# for request and response headers, the response body and the log). Compare
# them with `legate`.
#
# Environment (defaults):
#   ROUNDS=3 DURATION=10s CONNS=64 STREAMS=1 WARMUP=2s
#   CONTENDERS="direct legate nginx haproxy"  PROTOCOLS="h1 h2"
#   LOAD_CPU=0 PROXY_CPU=1  RESULTS_DIR=bench/results/<UTC timestamp>
#   LEGATE_FLAGS="--concurrency 1"  SKIP_SETUP=1 (skip scripts/setup.sh bench)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO_ROOT="$(pwd)"
# For bench_build_pwnoop (shared with bench/instructions.sh). This script keeps
# its own log, die, wait_port and binaries, defined below: they replace
# lib.sh's.
# shellcheck source=bench/lib.sh
. bench/lib.sh

ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-10s}"
CONNS="${CONNS:-64}"
STREAMS="${STREAMS:-1}"
WARMUP="${WARMUP:-2s}"
CONTENDERS="${CONTENDERS:-direct legate nginx haproxy}"
PROTOCOLS="${PROTOCOLS:-h1 h2}"
LOAD_CPU="${LOAD_CPU:-0}"
PROXY_CPU="${PROXY_CPU:-1}"
LEGATE_FLAGS="${LEGATE_FLAGS:---concurrency 1}"
RESULTS_DIR="${RESULTS_DIR:-bench/results/$(date -u +%Y%m%dT%H%M%SZ)}"

# Fixed loopback ports (18xxx, away from the demo's 8080/8081/8082/9901).
UPSTREAM_PORT=18081
LEGATE_PORT=18080 LEGATE_ADMIN_PORT=19901
# Filter-chain Legates (native1 native5 wasm1 wasm5 wasmhdr pwnoop wasmall):
# listeners 18086-18092, admin ports 19902-19908.
NGINX_H1_PORT=18082 NGINX_H2_PORT=18083
HAPROXY_H1_PORT=18084 HAPROXY_H2_PORT=18085
EXPECTED_BODY="hello from bench-upstream"

log() { printf 'bench: %s\n' "$*" >&2; }
die() {
    printf 'bench: error: %s\n' "$*" >&2
    exit 1
}

# ---- validate the knobs before spending minutes on setup and builds --------
[[ ${ROUNDS} =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer (got '${ROUNDS}')"
[[ ${CONNS} =~ ^[1-9][0-9]*$ ]] || die "CONNS must be a positive integer (got '${CONNS}')"
[[ ${STREAMS} =~ ^[1-9][0-9]*$ ]] || die "STREAMS must be a positive integer (got '${STREAMS}')"
# wrk and h2load both take an integer with an optional s/m/h unit.
[[ ${DURATION} =~ ^[1-9][0-9]*[smh]?$ ]] || die "DURATION must look like 10s, 2m (got '${DURATION}')"
[[ ${WARMUP} =~ ^[0-9]+[smh]?$ ]] || die "WARMUP must look like 2s, or 0 (got '${WARMUP}')"
for c in ${CONTENDERS}; do
    [[ ${c} =~ ^(direct|legate|nginx|haproxy|native1|native5|wasm1|wasm5|wasmhdr|wasmall|pwnoop)$ ]] ||
        die "unknown contender '${c}' (want: direct legate nginx haproxy native1 native5 wasm1 wasm5 wasmhdr wasmall pwnoop)"
done
for p in ${PROTOCOLS}; do
    [[ ${p} =~ ^(h1|h2)$ ]] || die "unknown protocol '${p}' (want: h1 h2)"
done
[[ ${LOAD_CPU} != "${PROXY_CPU}" ]] || die "LOAD_CPU and PROXY_CPU must differ"
wants() { [[ " ${CONTENDERS} " == *" $1 "* ]]; }
# Contenders that are a Legate process: the plain one and the filter chains.
FILTER_CONTENDERS="native1 native5 wasm1 wasm5 wasmhdr wasmall pwnoop"
wants_legate() {
    local c
    for c in legate ${FILTER_CONTENDERS}; do wants "${c}" && return 0; done
    return 1
}
wants_wasm() { wants wasm1 || wants wasm5 || wants wasmhdr || wants wasmall; }

# ---- install and build ------------------------------------------------------
if [[ -z ${SKIP_SETUP:-} ]]; then
    bash scripts/setup.sh bench
fi
for tool in wrk h2load taskset curl python3; do
    command -v "${tool}" >/dev/null 2>&1 || die "'${tool}' not found: run scripts/setup.sh bench"
done
for cpu in "${LOAD_CPU}" "${PROXY_CPU}"; do
    taskset -c "${cpu}" true 2>/dev/null ||
        die "cannot pin to CPU ${cpu} (this machine has $(nproc) usable); set LOAD_CPU/PROXY_CPU"
done

lock=()
if [[ -f Cargo.lock ]]; then
    lock=(--locked)
fi
# SKIP_BUILD=1: bench the release binaries as they are (e.g. built earlier).
if [[ -z ${SKIP_BUILD:-} ]]; then
    log "building the demo upstream (release)"
    cargo build --release "${lock[@]}" -p legate-demo-upstream
    if wants_legate; then
        log "building legate (release)"
        cargo build --release "${lock[@]}" -p legate-host ||
            die "could not build legate; to bench the others alone: CONTENDERS='direct nginx haproxy' $0"
    fi
fi
# Cargo's target directory (CARGO_TARGET_DIR if set), as bench/lib.sh.
TARGET_DIR="${CARGO_TARGET_DIR:-${REPO_ROOT}/target}"
UPSTREAM_BIN="${TARGET_DIR}/release/legate-demo-upstream"
LEGATE_BIN="${TARGET_DIR}/release/legate"

# ---- process management -----------------------------------------------------
WORK="$(mktemp -d -t legate-bench.XXXXXX)"
mkdir -p "${RESULTS_DIR}/raw"
RESULTS_DIR="$(cd "${RESULTS_DIR}" && pwd)"
pids=()
names=()

# Stop every server we started (newest first), then drop the scratch dir.
cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill "${pids[i]}" 2>/dev/null || true
    done
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        wait "${pids[i]}" 2>/dev/null || true
    done
    if [[ ${rc} -ne 0 && -d ${WORK} ]]; then
        # Keep server logs for the post-mortem next to the results.
        cp "${WORK}"/*.log "${RESULTS_DIR}/" 2>/dev/null || true
        if [[ ${rc} -eq 130 || ${rc} -eq 143 ]]; then
            log "interrupted; server logs copied to ${RESULTS_DIR}"
        else
            log "failed; server logs copied to ${RESULTS_DIR}"
        fi
    fi
    rm -rf "${WORK}"
    exit "${rc}"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_open() { (: >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# start NAME CPU CMD... : run CMD pinned to CPU in the background, log to WORK.
start() {
    local name=$1 cpu=$2
    shift 2
    taskset -c "${cpu}" "$@" >"${WORK}/${name}.log" 2>&1 &
    pids+=($!)
    names+=("${name}")
}

# Fail with the server's own log if it has exited.
check_alive() {
    local i
    for i in "${!pids[@]}"; do
        if ! kill -0 "${pids[i]}" 2>/dev/null; then
            tail -n 30 "${WORK}/${names[i]}.log" >&2 || true
            die "${names[i]} exited unexpectedly (log above)"
        fi
    done
}

# wait_port NAME PORT: wait up to 15s for a started server to accept.
wait_port() {
    local name=$1 port=$2 deadline=$((SECONDS + 15))
    until port_open "${port}"; do
        check_alive
        if ((SECONDS >= deadline)); then
            tail -n 30 "${WORK}/${name}.log" >&2 || true
            die "${name} did not listen on 127.0.0.1:${port} within 15s (log above)"
        fi
        sleep 0.1
    done
}

# A contender must really proxy GET / to the upstream before we measure it.
check_response() {
    local name=$1 proto=$2 port=$3 body flag=--http1.1
    if [[ ${proto} == h2 ]]; then
        flag=--http2-prior-knowledge
    fi
    body="$(curl -fsS --max-time 5 "${flag}" "http://127.0.0.1:${port}/" 2>&1)" ||
        die "${name} (${proto}) on port ${port}: request failed: ${body}"
    [[ ${body} == "${EXPECTED_BODY}" ]] ||
        die "${name} (${proto}) on port ${port}: unexpected body '${body:0:200}'"
}

port_for() { # CONTENDER PROTO
    case "$1-$2" in
        direct-*) echo "${UPSTREAM_PORT}" ;;
        legate-*) echo "${LEGATE_PORT}" ;;
        native1-*) echo 18086 ;;
        native5-*) echo 18087 ;;
        wasm1-*) echo 18088 ;;
        wasm5-*) echo 18089 ;;
        wasmhdr-*) echo 18090 ;;
        pwnoop-*) echo 18091 ;;
        wasmall-*) echo 18092 ;;
        nginx-h1) echo "${NGINX_H1_PORT}" ;;
        nginx-h2) echo "${NGINX_H2_PORT}" ;;
        haproxy-h1) echo "${HAPROXY_H1_PORT}" ;;
        haproxy-h2) echo "${HAPROXY_H2_PORT}" ;;
    esac
}

# ---- configs ------------------------------------------------------------------
# write_legate_config FILE PORT ADMIN_PORT [PLUGINS FILTERS]: one listener proxying
# everything to the upstream; PLUGINS is the `plugins:` list, FILTERS the
# listener's `filters:` chain (both YAML flow sequences; none by default).
write_legate_config() {
    local file=$1 port=$2 admin=$3 plugins=${4:-"[]"} filters=${5:-"[]"}
    cat >"${file}" <<EOF
version: 1
admin: { address: 127.0.0.1:${admin} }
listeners:
  - name: bench
    address: 127.0.0.1:${port}
    http: { routes: bench, filters: ${filters} }
routes:
  - name: bench
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - match: { prefix: / }
            cluster: upstream
clusters:
  - name: upstream
    endpoints: [ { address: 127.0.0.1:${UPSTREAM_PORT} } ]
plugins: ${plugins}
EOF
}

# start_filter_legate NAME PORT ADMIN MODULE N [CONFIG]: a Legate whose listener
# runs N filters of MODULE (`native:noop` or a component path), each its own
# plugin entry, so the chain really makes N filter calls per phase.
start_filter_legate() {
    local name=$1 port=$2 admin=$3 module=$4 n=$5 config=${6:-null} i
    local plugins="" filters=""
    for ((i = 1; i <= n; i++)); do
        plugins+="{ name: f${i}, module: '${module}', config: ${config} }, "
        filters+="{ plugin: f${i} }, "
    done
    write_legate_config "${WORK}/${name}.yaml" "${port}" "${admin}" \
        "[${plugins%, }]" "[${filters%, }]"
    # shellcheck disable=SC2086 # LEGATE_FLAGS is a list of flags on purpose.
    start "${name}" "${PROXY_CPU}" "${LEGATE_BIN}" run -c "${WORK}/${name}.yaml" ${LEGATE_FLAGS}
    wait_port "${name}" "${port}"
}

write_nginx_config() {
    local user=""
    # As root, nginx would switch workers to 'nobody', who cannot write WORK.
    if [[ ${EUID} -eq 0 ]]; then
        user="user root;"
    fi
    mkdir -p "${WORK}/nginx-tmp"
    cat >"${WORK}/nginx.conf" <<EOF
${user}
worker_processes 1;
pid ${WORK}/nginx.pid;
error_log ${WORK}/nginx-error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    # Everything nginx might write goes to the scratch dir, not /var/lib/nginx.
    client_body_temp_path ${WORK}/nginx-tmp/body;
    proxy_temp_path ${WORK}/nginx-tmp/proxy;
    fastcgi_temp_path ${WORK}/nginx-tmp/fastcgi;
    uwsgi_temp_path ${WORK}/nginx-tmp/uwsgi;
    scgi_temp_path ${WORK}/nginx-tmp/scgi;
    # The default (1000) would make nginx close client connections mid-run,
    # which neither HAProxy nor Legate does.
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    upstream upstream {
        server 127.0.0.1:${UPSTREAM_PORT};
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:${NGINX_H1_PORT};
        location / {
            proxy_pass http://upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
    # nginx 1.22 has no 'http2 on' (1.25.1+): a cleartext 'listen ... http2'
    # port speaks only prior-knowledge h2c, hence a second server block.
    server {
        listen 127.0.0.1:${NGINX_H2_PORT} http2;
        location / {
            proxy_pass http://upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
}

write_haproxy_config() {
    cat >"${WORK}/haproxy.cfg" <<EOF
global
    nbthread 1
    # Each client connection may hold an upstream one: 2 fds per conn.
    maxconn $((CONNS * 2 + 1024))
defaults
    mode http
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout http-keep-alive 120s
    # Share idle upstream connections across clients, like the others do.
    http-reuse always
frontend fe_h1
    bind 127.0.0.1:${HAPROXY_H1_PORT}
    default_backend upstream
frontend fe_h2
    bind 127.0.0.1:${HAPROXY_H2_PORT} proto h2
    default_backend upstream
backend upstream
    server up 127.0.0.1:${UPSTREAM_PORT}
EOF
}

# ---- start everything -------------------------------------------------------
for port in "${UPSTREAM_PORT}" "${LEGATE_PORT}" "${LEGATE_ADMIN_PORT}" 18086 18087 18088 18089 18090 \
    "${NGINX_H1_PORT}" "${NGINX_H2_PORT}" "${HAPROXY_H1_PORT}" "${HAPROXY_H2_PORT}"; do
    if port_open "${port}"; then
        die "port ${port} is already in use (leftover run? see 'ss -ltnp')"
    fi
done

# One worker thread: the upstream shares its core with the load generator.
start upstream "${LOAD_CPU}" "${UPSTREAM_BIN}" \
    --listen "127.0.0.1:${UPSTREAM_PORT}" --name bench-upstream --threads 1
wait_port upstream "${UPSTREAM_PORT}"

if wants legate; then
    write_legate_config "${WORK}/legate.yaml" "${LEGATE_PORT}" "${LEGATE_ADMIN_PORT}"
    # shellcheck disable=SC2086 # LEGATE_FLAGS is a list of flags on purpose.
    start legate "${PROXY_CPU}" "${LEGATE_BIN}" run -c "${WORK}/legate.yaml" ${LEGATE_FLAGS}
    wait_port legate "${LEGATE_PORT}"
fi
if wants_wasm; then
    log "building bench/noop-filter (legate plugin build)"
    "${LEGATE_BIN}" plugin build bench/noop-filter --out "${WORK}/noop.wasm" >"${WORK}/plugin-build.log" 2>&1 ||
        die "building bench/noop-filter failed: $(tail -n 20 "${WORK}/plugin-build.log")"
fi
if wants pwnoop; then bench_build_pwnoop; fi
if wants native1; then start_filter_legate native1 18086 19902 native:noop 1; fi
if wants native5; then start_filter_legate native5 18087 19903 native:noop 5; fi
if wants wasm1; then start_filter_legate wasm1 18088 19904 "${WORK}/noop.wasm" 1; fi
if wants wasm5; then start_filter_legate wasm5 18089 19905 "${WORK}/noop.wasm" 5; fi
if wants wasmhdr; then
    start_filter_legate wasmhdr 18090 19906 "${WORK}/noop.wasm" 1 '{ read_header: user-agent }'
fi
if wants wasmall; then
    start_filter_legate wasmall 18092 19908 "${WORK}/noop.wasm" 1 '{ all_phases: true }'
fi
if wants pwnoop; then start_filter_legate pwnoop 18091 19907 "${WORK}/pwnoop.wasm" 1; fi
if wants nginx; then
    command -v nginx >/dev/null 2>&1 || die "nginx not found: run scripts/setup.sh bench"
    write_nginx_config
    nginx -t -q -c "${WORK}/nginx.conf" -g 'daemon off;' 2>"${WORK}/nginx-t.log" ||
        die "nginx rejected its config: $(cat "${WORK}/nginx-t.log")"
    start nginx "${PROXY_CPU}" nginx -c "${WORK}/nginx.conf" -g 'daemon off;'
    wait_port nginx "${NGINX_H1_PORT}"
    wait_port nginx "${NGINX_H2_PORT}"
fi
if wants haproxy; then
    command -v haproxy >/dev/null 2>&1 || die "haproxy not found: run scripts/setup.sh bench"
    write_haproxy_config
    haproxy -c -q -f "${WORK}/haproxy.cfg" >"${WORK}/haproxy-c.log" 2>&1 ||
        die "haproxy rejected its config: $(cat "${WORK}/haproxy-c.log")"
    start haproxy "${PROXY_CPU}" haproxy -f "${WORK}/haproxy.cfg" -db
    wait_port haproxy "${HAPROXY_H1_PORT}"
    wait_port haproxy "${HAPROXY_H2_PORT}"
fi

for c in ${CONTENDERS}; do
    for p in ${PROTOCOLS}; do
        check_response "${c}" "${p}" "$(port_for "${c}" "${p}")"
    done
done

# ---- record the setup --------------------------------------------------------
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo none)$(git diff --quiet HEAD 2>/dev/null || echo ' (dirty)')"
    echo "params: ROUNDS=${ROUNDS} DURATION=${DURATION} CONNS=${CONNS} STREAMS=${STREAMS} WARMUP=${WARMUP} LOAD_CPU=${LOAD_CPU} PROXY_CPU=${PROXY_CPU}"
    echo "contenders: ${CONTENDERS}; protocols: ${PROTOCOLS}; legate flags: ${LEGATE_FLAGS}"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') ($(nproc) usable)"
    echo "kernel: $(uname -r)"
    echo "loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "wrk: $(wrk -v 2>&1 | head -n1)"
    echo "h2load: $(h2load --version 2>&1 | head -n1)"
    if wants nginx; then echo "nginx: $(nginx -v 2>&1)"; fi
    if wants haproxy; then echo "haproxy: $(haproxy -v 2>&1 | head -n1)"; fi
} >"${RESULTS_DIR}/env.txt"
cat "${RESULTS_DIR}/env.txt" >&2
load1="$(cut -d' ' -f1 /proc/loadavg)"
if awk -v l="${load1}" 'BEGIN { exit !(l > 0.5) }'; then
    log "WARNING: load average ${load1}: something else is running; numbers will be noisy"
fi

# ---- measure -------------------------------------------------------------------
# load CONTENDER PROTO DURATION OUT: one loader run pinned to LOAD_CPU.
load() {
    local c=$1 p=$2 dur=$3 out=$4 url
    url="http://127.0.0.1:$(port_for "${c}" "${p}")/"
    if [[ ${p} == h1 ]]; then
        taskset -c "${LOAD_CPU}" wrk -t1 -c"${CONNS}" -d"${dur}" --latency "${url}" >"${out}" 2>&1
    else
        # h2load prints no percentiles; its per-request log gives them.
        taskset -c "${LOAD_CPU}" h2load -t1 -c"${CONNS}" -m"${STREAMS}" -D"${dur}" \
            --log-file="${WORK}/h2load.log" "${url}" >"${out}" 2>&1
    fi
}

total=$((ROUNDS * $(wc -w <<<"${CONTENDERS}") * $(wc -w <<<"${PROTOCOLS}")))
log "measuring: ${total} runs of ${DURATION} (+ warm-up ${WARMUP} each contender)"

read -r -a contenders <<<"${CONTENDERS}"
if [[ ${WARMUP} != 0 && ${WARMUP} != 0[smh] ]]; then
    for c in "${contenders[@]}"; do
        for p in ${PROTOCOLS}; do
            load "${c}" "${p}" "${WARMUP}" "${WORK}/warmup.txt" ||
                die "warm-up ${c} ${p} failed: $(tail -n 5 "${WORK}/warmup.txt")"
            check_alive
        done
    done
fi

n=0
for ((r = 1; r <= ROUNDS; r++)); do
    # Rotate the order each round so no contender always runs first or last.
    k=${#contenders[@]}
    for ((j = 0; j < k; j++)); do
        c=${contenders[(j + r - 1) % k]}
        for p in ${PROTOCOLS}; do
            n=$((n + 1))
            out="${RESULTS_DIR}/raw/${c}-${p}-r${r}.txt"
            log "[${n}/${total}] round ${r}: ${c} ${p}"
            load "${c}" "${p}" "${DURATION}" "${out}" ||
                die "loader failed for ${c} ${p}: $(tail -n 5 "${out}")"
            check_alive
            if [[ ${p} == h2 ]]; then
                python3 bench/report.py h2log "${WORK}/h2load.log" "${out%.txt}.lat.json"
                rm -f "${WORK}/h2load.log"
            fi
        done
    done
done

# ---- report --------------------------------------------------------------------
echo
python3 bench/report.py table "${RESULTS_DIR}"
log "raw outputs, env.txt, table.md and results.json in ${RESULTS_DIR}"
