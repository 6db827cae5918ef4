#!/usr/bin/env bash
# Plugin cost: requests/s through Legate with no plugins, with the first-party
# ratelimit plugin, and with auth (API key) + ratelimit chained — and, with
# REDIS=1, ratelimit over a Redis KV backend (a local redis-server, loopback).
# HTTP/1.1 keep-alive load from wrk; pinned as bench/README.md describes: wrk
# and the upstream on core 0, Legate alone on core 1 with one worker.
#
#   bench/plugins.sh                         # defaults: 3 rounds of 10s per setup
#   ROUNDS=1 DURATION=5 bench/plugins.sh     # a short run
#   REDIS=1 bench/plugins.sh                 # also ratelimit over Redis
#
# The limit is set so high that it never refuses: what is measured is the cost
# of checking it (two KV calls per request: get + CAS set). Prints one table:
# best-of-ROUNDS req/s, p50/p99 of that round, and the loss against no plugins.
# Loopback only; every process is this script's child and is stopped on exit.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10} # seconds per measurement
CONNS=${CONNS:-64}
THREADS=${THREADS:-1}    # wrk threads (on core 0 with the upstream)
LOAD_CPU=${LOAD_CPU:-0}
PROXY_CPU=${PROXY_CPU:-1}
REDIS=${REDIS:-0}

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${REPO_ROOT}"
log() { printf '[plugins] %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

if [[ -z ${SKIP_SETUP:-} ]]; then
    bash scripts/setup.sh bench wasm
fi
command -v wrk >/dev/null 2>&1 || die "'wrk' not found: run scripts/setup.sh bench"
command -v taskset >/dev/null 2>&1 || die "'taskset' not found (util-linux)"
if [[ ${REDIS} == 1 ]]; then
    command -v redis-server >/dev/null 2>&1 || die "'redis-server' not found: run scripts/setup.sh test"
fi

lock=()
[[ -f Cargo.lock ]] && lock=(--locked)
log "building legate and the demo upstream (release)"
cargo build --release "${lock[@]}" -p legate-demo-upstream -p legate-host
UPSTREAM_BIN="${REPO_ROOT}/target/release/legate-demo-upstream"
LEGATE_BIN="${REPO_ROOT}/target/release/legate"

WORK="$(mktemp -d -t legate-plugins.XXXXXX)"
pids=()
cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    for p in "${pids[@]}"; do kill "${p}" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "${p}" 2>/dev/null || true; done
    [[ ${rc} -ne 0 ]] && tail -n 20 "${WORK}"/*.log >&2 2>/dev/null
    rm -rf "${WORK}"
    exit "${rc}"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for plugin in auth ratelimit; do
    log "building plugins/${plugin}"
    "${LEGATE_BIN}" plugin build "plugins/${plugin}" --out "${WORK}/${plugin}.wasm" >/dev/null
done

port_open() { (: >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
    local i
    for ((i = 0; i < 100; i++)); do port_open "$1" && return 0; sleep 0.1; done
    die "nothing listens on port $1 (logs in ${WORK})"
}

UPSTREAM=18281
LISTEN=18280
ADMIN=18289
REDIS_PORT=18279
taskset -c "${LOAD_CPU}" "${UPSTREAM_BIN}" --listen "127.0.0.1:${UPSTREAM}" --name bench \
    --threads 1 >"${WORK}/upstream.log" 2>&1 &
pids+=($!)
wait_port "${UPSTREAM}"
if [[ ${REDIS} == 1 ]]; then
    taskset -c "${LOAD_CPU}" redis-server --port "${REDIS_PORT}" --bind 127.0.0.1 \
        --save '' --appendonly no --dir "${WORK}" >"${WORK}/redis.log" 2>&1 &
    pids+=($!)
    wait_port "${REDIS_PORT}"
fi

# The config of setup $1: none | ratelimit | auth+ratelimit | ratelimit-redis.
config() {
    local filters=() kv=""
    case "$1" in
        none) ;;
        ratelimit | ratelimit-redis) filters=(ratelimit) ;;
        auth+ratelimit) filters=(auth ratelimit) ;;
        *) die "unknown setup $1" ;;
    esac
    if [[ $1 == ratelimit-redis ]]; then
        kv=$'kv:\n  backend: redis\n  url: redis://127.0.0.1:'"${REDIS_PORT}"$'/0\n  timeout: 50ms\n'
    fi
    local chain=""
    for f in "${filters[@]}"; do chain+="{ plugin: ${f} }, "; done
    cat <<EOF
version: 1
admin: { address: 127.0.0.1:${ADMIN} }
${kv}listeners:
  - name: web
    address: 127.0.0.1:${LISTEN}
    http:
      routes: main
      filters: [${chain%, }]
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - name: all
            match: { prefix: / }
            cluster: up
clusters:
  - name: up
    endpoints: [{ address: 127.0.0.1:${UPSTREAM} }]
plugins:
  - name: auth
    module: ${WORK}/auth.wasm
    limits: { cpu: 50ms }
    config:
      api_keys:
        # sha256("bench-key")
        - name: keys
          keys: [{ id: bench, sha256: $(printf %s bench-key | sha256sum | cut -d' ' -f1) }]
      rules: [{ match: { prefix: / }, requires: { any: [keys] } }]
  - name: ratelimit
    module: ${WORK}/ratelimit.wasm
    limits: { cpu: 250ms }
    capabilities: { kv: [ratelimit] }
    config:
      limits:
        - name: per-ip
          key: [client_ip]
          rate: 100000000/s
EOF
}

# One wrk run against Legate; prints "rps p50_ms p99_ms".
measure() {
    local out="${WORK}/wrk.txt"
    taskset -c "${LOAD_CPU}" wrk -t"${THREADS}" -c"${CONNS}" -d"${DURATION}s" --latency \
        -H 'x-api-key: bench-key' "http://127.0.0.1:${LISTEN}/" >"${out}" 2>&1 ||
        die "wrk failed: $(cat "${out}")"
    if grep -q 'Non-2xx' "${out}"; then
        die "non-2xx answers during the run: $(grep 'Non-2xx' "${out}")"
    fi
    awk '
        function ms(v) {
            if (v ~ /us$/) return v / 1000
            if (v ~ /ms$/) return v + 0
            if (v ~ /s$/) return v * 1000
            return v
        }
        /Requests\/sec:/ { rps = $2 }
        $1 == "50%" { p50 = ms($2) }
        $1 == "99%" { p99 = ms($2) }
        END { printf "%.0f %.2f %.2f\n", rps, p50, p99 }
    ' "${out}"
}

SETUPS=(none ratelimit auth+ratelimit)
[[ ${REDIS} == 1 ]] && SETUPS+=(ratelimit-redis)
declare -A best_rps best_p50 best_p99
for setup in "${SETUPS[@]}"; do
    config "${setup}" >"${WORK}/legate.yaml"
    taskset -c "${PROXY_CPU}" "${LEGATE_BIN}" run -c "${WORK}/legate.yaml" --concurrency 1 \
        >"${WORK}/legate-${setup}.log" 2>&1 &
    lpid=$!
    pids+=("${lpid}")
    wait_port "${LISTEN}"
    code=$(curl -s -o /dev/null -w '%{http_code}' -H 'x-api-key: bench-key' "http://127.0.0.1:${LISTEN}/")
    [[ ${code} == 200 ]] || die "${setup}: Legate answered ${code}, not 200"
    best_rps[${setup}]=0
    for ((r = 1; r <= ROUNDS; r++)); do
        read -r rps p50 p99 < <(measure)
        log "${setup} round ${r}: ${rps} req/s (p50 ${p50}ms, p99 ${p99}ms)"
        if ((rps > best_rps[${setup}])); then
            best_rps[${setup}]=${rps}
            best_p50[${setup}]=${p50}
            best_p99[${setup}]=${p99}
        fi
    done
    kill "${lpid}"
    wait "${lpid}" 2>/dev/null || true
    while port_open "${LISTEN}"; do sleep 0.1; done
done

base=${best_rps[none]}
printf '\n| setup | req/s | p50 ms | p99 ms | vs none |\n|---|---|---|---|---|\n'
for setup in "${SETUPS[@]}"; do
    rps=${best_rps[${setup}]}
    loss=$(awk -v a="${rps}" -v b="${base}" 'BEGIN { printf "%+.1f%%", (a - b) * 100 / b }')
    printf '| %s | %s | %s | %s | %s |\n' "${setup}" "${rps}" "${best_p50[${setup}]}" \
        "${best_p99[${setup}]}" "${loss}"
done
printf '\n%s rounds of %ss, %s connections, wrk on core %s, Legate (1 worker) on core %s\n' \
    "${ROUNDS}" "${DURATION}" "${CONNS}" "${LOAD_CPU}" "${PROXY_CPU}"
