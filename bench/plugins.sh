#!/usr/bin/env bash
# Plugin cost: requests/s through Legate with no plugins and with each
# first-party plugin (the `builtin:` ones of the release binary), one at a time
# and chained as issue 4 asks: grpc-web + auth (JWT, RS256) + ratelimit, on
# plain requests. gRPC-Web conversion itself is measured separately: gRPC-Web
# POSTs to an HTTP/2 upstream, converted by the plugin, against the same POSTs
# through no plugin; REST/JSON transcoding (grpc-json) likewise, with GETs. With REDIS=1, also ratelimit over a Redis KV backend (a
# local redis-server). HTTP/1.1 keep-alive load from wrk; pinned as
# bench/README.md describes: wrk and the upstream on core 0, Legate alone on
# core 1 with one worker.
#
#   bench/plugins.sh                         # defaults: 3 rounds of 10s per setup
#   ROUNDS=1 DURATION=5 bench/plugins.sh     # a short run
#   REDIS=1 bench/plugins.sh                 # also ratelimit over Redis
#   SETUPS="none chain" bench/plugins.sh     # only some setups
#   SKIP_BUILD=1 bench/plugins.sh            # the release binaries as they are
#   RATELIMIT_MODULE=/path/rl.wasm bench/plugins.sh  # ratelimit from a file, not builtin:
#
# The limit is set so high that it never refuses: what is measured is the cost
# of checking it (two KV calls per request: get + CAS set). Prints one table:
# best-of-ROUNDS req/s, p50/p99 of that round, and the change against the
# setup's baseline (no plugins, same requests).
# Loopback only; every process is this script's child and is stopped on exit.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10} # seconds per measurement
CONNS=${CONNS:-64}
THREADS=${THREADS:-1}    # wrk threads (on core 0 with the upstream)
LOAD_CPU=${LOAD_CPU:-0}
PROXY_CPU=${PROXY_CPU:-1}
REDIS=${REDIS:-0}

BENCH_NAME=plugins
# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_setup bench wasm
bench_need wrk taskset openssl
if [[ ${REDIS} == 1 ]]; then
    command -v redis-server >/dev/null 2>&1 || die "'redis-server' not found: run scripts/setup.sh test"
fi
bench_build
bench_workdir


bench_jwt

# One gRPC-Web unary call (legate.demo.v1.Echo/Say, a 7-byte message) for wrk.
printf '%s\n' \
    'wrk.method = "POST"' \
    'wrk.path = "/legate.demo.v1.Echo/Say"' \
    'wrk.headers["content-type"] = "application/grpc-web+proto"' \
    'wrk.headers["x-grpc-web"] = "1"' \
    'wrk.body = "\0\0\0\0\7\10\5hello"' >"${WORK}/grpc-web.lua"


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

# The filter chain of setup $1.
chain_of() {
    case "$1" in
        none | grpc-web-none | grpc-json-none) ;;
        grpc-web | grpc-web-convert) echo grpc-web ;;
        grpc-json-convert) echo grpc-json ;;
        auth-key) echo auth-key ;;
        auth-jwt) echo auth-jwt ;;
        ratelimit | ratelimit-redis) echo ratelimit ;;
        chain) echo grpc-web auth-jwt ratelimit ;;
        *) die "unknown setup $1" ;;
    esac
}

# The config of setup $1: every plugin is loaded, the setup's are in the chain.
config() {
    local kv="" chain="" f
    if [[ $1 == ratelimit-redis ]]; then
        kv=$'kv:\n  backend: redis\n  url: redis://127.0.0.1:'"${REDIS_PORT}"$'/0\n  timeout: 50ms\n'
    fi
    for f in $(chain_of "$1"); do chain+="{ plugin: ${f} }, "; done
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
          - name: grpc
            match: { prefix: /legate.demo.v1.Echo/ }
            cluster: grpc
          - name: all
            match: { prefix: / }
            cluster: up
clusters:
  - name: up
    endpoints: [{ address: 127.0.0.1:${UPSTREAM} }]
  - name: grpc
    protocol: h2
    endpoints: [{ address: 127.0.0.1:${UPSTREAM} }]
plugins:
  - name: grpc-web
    module: builtin:grpc-web
  - name: grpc-json
    module: builtin:grpc-json
    files: { descriptors: ${REPO_ROOT}/examples/demo-upstream/echo.pb }
    config: { services: [legate.demo.v1.Echo] }
$(bench_auth_plugins)
  - name: ratelimit
    module: ${RATELIMIT_MODULE:-builtin:ratelimit}
    limits: { cpu: 250ms }
    capabilities: { kv: [ratelimit] }
    config:
      limits:
        - name: per-ip
          key: [client_ip]
          rate: 100000000/s
EOF
}

# The wrk arguments of setup $1's requests (after the common ones).
requests_of() {
    case "$1" in
        grpc-web-none | grpc-web-convert) echo "-s ${WORK}/grpc-web.lua" ;;
        *) echo "" ;;
    esac
}

# The URL setup $1 loads: REST/JSON for the transcoder, else the root.
url_of() {
    case "$1" in
        grpc-json-*) echo "http://127.0.0.1:${LISTEN}/v1/echo/hello" ;;
        *) echo "http://127.0.0.1:${LISTEN}/" ;;
    esac
}

# The setup $1 is compared with.
baseline_of() {
    case "$1" in
        grpc-web-convert) echo grpc-web-none ;;
        grpc-json-convert) echo grpc-json-none ;;
        *) echo none ;;
    esac
}

# One wrk run against Legate for setup $1; prints "rps p50_ms p99_ms".
measure() {
    local out="${WORK}/wrk.txt"
    # shellcheck disable=SC2046 # the extra arguments are words
    taskset -c "${LOAD_CPU}" wrk -t"${THREADS}" -c"${CONNS}" -d"${DURATION}s" --latency \
        -H 'x-api-key: bench-key' -H "authorization: Bearer ${TOKEN}" \
        $(requests_of "$1") "$(url_of "$1")" >"${out}" 2>&1 ||
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

# Checks that setup $1 answers as it should before it is measured.
check() {
    local hdrs="${WORK}/check.headers" code
    if [[ $1 == grpc-web-* ]]; then
        code=$(printf '\0\0\0\0\7\n\5hello' | curl -s -o /dev/null -D "${hdrs}" \
            -w '%{http_code}' -H 'content-type: application/grpc-web+proto' \
            -H 'x-grpc-web: 1' --data-binary @- \
            "http://127.0.0.1:${LISTEN}/legate.demo.v1.Echo/Say")
        if [[ $1 == grpc-web-convert ]] &&
            ! grep -qi '^content-type: application/grpc-web' "${hdrs}"; then
            die "$1: the answer was not converted to gRPC-Web: $(cat "${hdrs}")"
        fi
    elif [[ $1 == grpc-json-convert ]]; then
        code=$(curl -s -o "${WORK}/check.body" -w '%{http_code}' "$(url_of "$1")")
        grep -q '"message":"hello"' "${WORK}/check.body" ||
            die "$1: not transcoded: $(cat "${WORK}/check.body")"
    else
        code=$(curl -s -o /dev/null -w '%{http_code}' -H 'x-api-key: bench-key' \
            -H "authorization: Bearer ${TOKEN}" "$(url_of "$1")")
    fi
    [[ ${code} == 200 ]] || die "$1: Legate answered ${code}, not 200"
}

if [[ -z ${SETUPS:-} ]]; then
    SETUPS="none grpc-web auth-key auth-jwt ratelimit chain grpc-web-none grpc-web-convert"
    SETUPS+=" grpc-json-none grpc-json-convert"
    [[ ${REDIS} == 1 ]] && SETUPS+=" ratelimit-redis"
fi
read -r -a SETUPS <<<"${SETUPS}"
declare -A best_rps best_p50 best_p99
for setup in "${SETUPS[@]}"; do
    config "${setup}" >"${WORK}/legate.yaml"
    taskset -c "${PROXY_CPU}" "${LEGATE_BIN}" run -c "${WORK}/legate.yaml" --concurrency 1 \
        >"${WORK}/legate-${setup}.log" 2>&1 &
    lpid=$!
    pids+=("${lpid}")
    wait_port "${LISTEN}"
    check "${setup}"
    best_rps[${setup}]=0
    for ((r = 1; r <= ROUNDS; r++)); do
        read -r rps p50 p99 < <(measure "${setup}")
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

printf '\n| setup | chain | req/s | p50 ms | p99 ms | vs baseline |\n|---|---|---|---|---|---|\n'
for setup in "${SETUPS[@]}"; do
    rps=${best_rps[${setup}]}
    base_setup=$(baseline_of "${setup}")
    base=${best_rps[${base_setup}]:-}
    if [[ -z ${base} || ${setup} == "${base_setup}" || ${setup} == *-none ]]; then
        change="(baseline)"
    else
        change=$(awk -v a="${rps}" -v b="${base}" -v n="${base_setup}" \
            'BEGIN { printf "%+.1f%% vs %s", (a - b) * 100 / b, n }')
    fi
    chain=$(chain_of "${setup}")
    printf '| %s | %s | %s | %s | %s | %s |\n' "${setup}" "${chain:-none}" "${rps}" \
        "${best_p50[${setup}]}" "${best_p99[${setup}]}" "${change}"
done
printf '\n%s rounds of %ss, %s connections, wrk on core %s, Legate (1 worker) on core %s\n' \
    "${ROUNDS}" "${DURATION}" "${CONNS}" "${LOAD_CPU}" "${PROXY_CPU}"
