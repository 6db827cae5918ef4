#!/usr/bin/env bash
# Instructions per request: Legate (release, one worker) under valgrind's
# callgrind, with no filters and with each filter setup, counting every
# instruction the process executes (all threads, kernel time excluded). Unlike
# req/s this does not move with the machine's load, so it resolves per-request
# costs of a few hundred instructions and shows which change bought what.
#
# Each setup runs twice: WARMUP requests only, then WARMUP + N requests; the
# difference divided by N is the cost of one request (start-up, compilation and
# warm-up cancel out). HTTP/1.1 keep-alive requests from h2load, 16 connections,
# to the demo upstream. Loopback only.
#
#   bench/instructions.sh                       # all setups, N=10000
#   SETUPS="none wasm1" N=5000 bench/instructions.sh
#   SKIP_BUILD=1 bench/instructions.sh          # the release binaries as they are
#   LEGATE_BIN=/tmp/legate-old SKIP_BUILD=1 bench/instructions.sh   # another build of legate
#   KEEP=/tmp/cg SETUPS="wasm1 pwnoop" bench/instructions.sh       # keep the callgrind files
#   BUILTINS=/tmp/named KEEP=/tmp/cg SETUPS="none auth-jwt" bench/instructions.sh
#   RATELIMIT_MODULE=/path/rl.wasm SETUPS="ratelimit" bench/instructions.sh  # ratelimit from a file
#     (compiled at load: the two runs may differ by a compilation, so read req/s instead)
#       # /tmp/named/auth.wasm replaces builtin:auth (e.g. built with its symbols)
#
# With KEEP, each run's callgrind file stays as KEEP/SETUP-REQUESTS.out (and
# wasmtime's map of the guests' functions as KEEP/SETUP-REQUESTS.map); where a
# setup's cost goes, function by function, is then
#   bench/callgrind-diff.py KEEP/pwnoop-500.out KEEP/pwnoop-10500.out 10000
#
# Setups: none, native1 (one native no-op filter, `native:noop`: what the filter
# chain itself costs), wasm1 (bench/noop-filter: one no-op component filter),
# wasmhdr (the same reading one header), wasmall (the same declaring every phase
# pwnoop is called in: request and response headers, response body, log),
# grpc-web (builtin, plain requests), auth-key (builtin auth, API key), ratelimit
# (builtin, in-memory KV), pwnoop (one no-op proxy-wasm filter:
# bench/pw-noop-filter, the upstream Rust SDK), and, not in
# the default set: auth-jwt (builtin auth, an RS256 JWT), chain (grpc-web +
# auth-key + ratelimit, in that order) and chain-jwt (grpc-web + auth-jwt +
# ratelimit: issue 4's chain).
set -euo pipefail

N=${N:-10000}
WARMUP=${WARMUP:-500}
BENCH_NAME=instructions
# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_setup bench wasm
bench_need valgrind callgrind_annotate h2load curl openssl
bench_build
bench_workdir

log "building bench/noop-filter (legate plugin build)"
"${LEGATE_BIN}" plugin build bench/noop-filter --out "${WORK}/noop.wasm" >"${WORK}/plugin-build.log" 2>&1 ||
    die "building bench/noop-filter failed: $(tail -n 20 "${WORK}/plugin-build.log")"

bench_build_pwnoop
bench_jwt

UPSTREAM=18481
LISTEN=18480
ADMIN=18489
"${UPSTREAM_BIN}" --listen "127.0.0.1:${UPSTREAM}" --name bench --threads 1 >"${WORK}/upstream.log" 2>&1 &
pids+=($!)
wait_port "${UPSTREAM}"

chain_of() {
    case "$1" in
        none) ;;
        native1) echo native-noop ;;
        wasm1) echo noop ;;
        wasmhdr) echo noop-hdr ;;
        wasmall) echo noop-all ;;
        grpc-web) echo grpc-web ;;
        auth-key) echo auth-key ;;
        ratelimit) echo ratelimit ;;
        pwnoop) echo pwnoop ;;
        chain) echo grpc-web auth-key ratelimit ;;
        auth-jwt) echo auth-jwt ;;
        chain-jwt) echo grpc-web auth-jwt ratelimit ;;
        *) die "unknown setup $1" ;;
    esac
}

config() {
    local chain="" f
    for f in $(chain_of "$1"); do chain+="{ plugin: ${f} }, "; done
    cat <<EOF
version: 1
admin: { address: 127.0.0.1:${ADMIN} }
listeners:
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
  - name: native-noop
    module: native:noop
  - name: noop
    module: ${WORK}/noop.wasm
  - name: noop-hdr
    module: ${WORK}/noop.wasm
    config: { read_header: user-agent }
  - name: noop-all
    module: ${WORK}/noop.wasm
    config: { all_phases: true }
  - name: pwnoop
    module: ${WORK}/pwnoop.wasm
  - name: grpc-web
    module: builtin:grpc-web
$(bench_auth_plugins)
  - name: ratelimit
    module: ${RATELIMIT_MODULE:-builtin:ratelimit}
    capabilities: { kv: [ratelimit] }
    config:
      limits:
        - name: per-ip
          key: [client_ip]
          rate: 100000000/s
EOF
}

# The config on stdin with `builtin:NAME` replaced by BUILTINS/NAME.wasm, for
# each such file (BUILTINS unset: unchanged).
builtins() {
    local args=() f
    for f in "${BUILTINS:-/nonexistent}"/*.wasm; do
        [[ -f ${f} ]] && args+=(-e "s#module: builtin:$(basename "${f}" .wasm)\$#module: ${f}#")
    done
    if ((${#args[@]})); then sed "${args[@]}"; else cat; fi
}

# Total instructions of one Legate run of setup $1 serving WARMUP + $2 requests.
instructions() {
    local setup=$1 n=$2 out="${WORK}/cg.out" lpid i jwt=()
    # The token only where it is checked: other setups keep the same requests
    # as before the JWT setups existed, so their counts stay comparable.
    [[ ${setup} == *jwt ]] && jwt=(-H "authorization: Bearer ${TOKEN}")
    config "${setup}" | builtins >"${WORK}/legate.yaml"
    rm -f "${out}"
    valgrind --tool=callgrind --smc-check=all-non-file --callgrind-out-file="${out}" \
        "${LEGATE_BIN}" run -c "${WORK}/legate.yaml" --concurrency 1 >"${WORK}/legate.log" 2>&1 &
    lpid=$!
    pids+=("${lpid}")
    # Up to 10 minutes: the first run compiles every plugin under valgrind.
    for ((i = 0; i < 3000; i++)); do
        curl -s -o /dev/null -H 'x-api-key: bench-key' "${jwt[@]}" "http://127.0.0.1:${LISTEN}/" && break
        sleep 0.2
    done
    local total=$((WARMUP + n)) codes
    codes=$(h2load --h1 -n "${total}" -c 16 -H 'x-api-key: bench-key' "${jwt[@]}" \
        "http://127.0.0.1:${LISTEN}/" | grep '^status codes')
    [[ ${codes} == "status codes: ${total} 2xx"* ]] || die "${setup}: not all 2xx: ${codes}"
    kill -INT "${lpid}"
    wait "${lpid}" 2>/dev/null || true
    while port_open "${LISTEN}"; do sleep 0.1; done
    if [[ -n ${KEEP:-} ]]; then
        mkdir -p "${KEEP}"
        cp "${out}" "${KEEP}/${setup}-${total}.out"
        # The guests' function names (LEGATE_WASM_PERFMAP, below), for
        # bench/callgrind-diff.py.
        if [[ -f /tmp/perf-${lpid}.map ]]; then
            mv "/tmp/perf-${lpid}.map" "${KEEP}/${setup}-${total}.map"
        fi
    fi
    rm -f "/tmp/perf-${lpid}.map"
    callgrind_annotate "${out}" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }'
}

# Every config loads every plugin, from a private module cache that a first,
# unmeasured run fills: no measured run pays for Cranelift.
export LEGATE_WASM_CACHE="${WORK}/cache"
# With KEEP, wasmtime names the guests' compiled code in a perf map per run.
if [[ -n ${KEEP:-} ]]; then
    export LEGATE_WASM_PERFMAP=1
fi
read -r -a SETUPS <<<"${SETUPS:-none native1 wasm1 wasmhdr wasmall pwnoop grpc-web auth-key ratelimit}"
declare -A per
# A first run fills the cache (its count includes Cranelift's work): discarded.
instructions none 0 >/dev/null
for setup in "${SETUPS[@]}"; do
    log "${setup}: ${WARMUP} requests, then ${WARMUP} + ${N}"
    a=$(instructions "${setup}" 0)
    b=$(instructions "${setup}" "${N}")
    log "${setup}: totals ${a} / ${b}"
    per[${setup}]=$(((b - a) / N))
    log "${setup}: ${per[${setup}]} instructions per request"
done

printf '\n| setup | filters | instructions/request | added vs none |\n|---|---|---:|---:|\n'
for setup in "${SETUPS[@]}"; do
    chain=$(chain_of "${setup}")
    added="—"
    if [[ -n ${per[none]:-} && ${setup} != none ]]; then
        added=$(awk -v a="${per[${setup}]}" -v b="${per[none]}" \
            'BEGIN { printf "%+d (%+.0f%%)", a - b, (a - b) * 100 / b }')
    fi
    printf '| %s | %s | %s | %s |\n' "${setup}" "${chain:-none}" "${per[${setup}]}" "${added}"
done
printf '\nN=%s requests after %s warm-up, HTTP/1.1, 16 connections, one worker\n' "${N}" "${WARMUP}"
