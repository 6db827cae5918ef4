#!/usr/bin/env bash
# The one demo command: builds Legate (with the first-party plugins embedded,
# `module: builtin:NAME` in plugins.yaml) and the demo upstream, starts two
# upstreams (app-v1 on 127.0.0.1:8081, app-v2 on 127.0.0.1:8082, a gRPC echo on 127.0.0.1:8083), then runs
# Legate with plugins.yaml until Ctrl-C. Everything it started is stopped on
# exit.
#
# Usage: scripts/demo.sh [CONFIG]      (default: plugins.yaml at the repo root)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

CONFIG="${1:-plugins.yaml}"
ADMIN="127.0.0.1:9901"
UPSTREAMS=("app-v1=127.0.0.1:8081" "app-v2=127.0.0.1:8082" "grpc=127.0.0.1:8083")

die() {
    printf 'demo: error: %s\n' "$*" >&2
    exit 1
}

[[ -f ${CONFIG} ]] || die "config '${CONFIG}' not found (run from a checkout that has it)"

bash scripts/setup.sh demo wasm

lock=()
if [[ -f Cargo.lock ]]; then
    lock=(--locked)
fi
echo "demo: building (release)..."
cargo build --release "${lock[@]}" -p legate-host -p legate-demo-upstream
# Where cargo put them: CARGO_TARGET_DIR if set, as cargo itself reads it.
BIN="${CARGO_TARGET_DIR:-target}/release"
# The host's build script builds plugins/* into Wasm components and embeds them
# (it needs the wasm32-wasip2 target: setup's `wasm` group, above).

LOGS="$(mktemp -d -t legate-demo.XXXXXX)"
pids=()

# Stop what we started (Legate first, so it does not log upstream errors),
# wait for it, and keep the logs only if something went wrong.
cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill "${pids[i]}" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "${pid}" 2>/dev/null || true
    done
    if [[ ${rc} -eq 0 || ${rc} -eq 130 || ${rc} -eq 143 ]]; then
        rm -rf "${LOGS}"
    else
        echo "demo: upstream logs kept in ${LOGS}" >&2
    fi
    exit "${rc}"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Wait until a started process prints its "listening on" line; fail with its
# log if it dies or takes too long (typically: the port is already taken).
wait_listening() {
    local name=$1 pid=$2 log=$3 deadline=$((SECONDS + 10))
    until grep -q '^listening on' "${log}" 2>/dev/null; do
        if ! kill -0 "${pid}" 2>/dev/null; then
            cat "${log}" >&2
            die "${name} exited before listening (port in use?)"
        fi
        ((SECONDS < deadline)) || die "${name} did not start listening within 10s"
        sleep 0.1
    done
}

for entry in "${UPSTREAMS[@]}"; do
    name=${entry%%=*}
    addr=${entry#*=}
    "${BIN}/legate-demo-upstream" --listen "${addr}" --name "${name}" \
        >"${LOGS}/${name}.log" 2>&1 &
    pids+=($!)
    wait_listening "${name}" "$!" "${LOGS}/${name}.log"
    echo "demo: upstream ${name} on http://${addr}"
done

# Legate runs as a background job that we `wait` for, rather than via `exec`:
# exec would drop the trap above and leak the upstreams, and a foreground child
# would delay the trap on SIGTERM until it exited by itself.
"${BIN}/legate" run -c "${CONFIG}" &
legate_pid=$!
pids+=("${legate_pid}")

# Print the hints once the admin port answers (best effort: Legate's own log
# says what went wrong if it does not come up).
for _ in $(seq 50); do
    kill -0 "${legate_pid}" 2>/dev/null || break
    curl -fs -o /dev/null "http://${ADMIN}/ready" && break
    sleep 0.2
done
if ! kill -0 "${legate_pid}" 2>/dev/null; then
    rc=0
    wait "${legate_pid}" || rc=$?
    die "legate exited (status ${rc}) before it was ready; see its log above"
fi

cat <<EOF

demo: Legate is running with ${CONFIG}. Try, in another terminal:

  curl -i http://127.0.0.1:8080/hello            # canary: 90% app-v1, 10% app-v2 (x-upstream)
  curl -i http://127.0.0.1:8080/api/users         # 401: /api/ needs a credential
  curl -i -H 'x-api-key: demo-key' http://127.0.0.1:8080/api/users     # 200, RateLimit-* headers
  curl -i --http2-prior-knowledge -H 'x-api-key: demo-key' http://127.0.0.1:8080/api/users   # h2c
  for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{http_code}\n' \
      -H 'x-api-key: demo-key' http://127.0.0.1:8080/api/users; done     # 5 a minute, then 429
  curl -i -H 'x-api-key: demo-key' http://127.0.0.1:8080/api/status/503    # retried twice, passed through
  curl -i http://127.0.0.1:8080/healthz           # direct response
  curl -i http://127.0.0.1:8080/old/page?x=1      # 302 redirect
  printf '\\0\\0\\0\\0\\7\\n\\5hello' | curl -s --data-binary @- \\
      -H 'content-type: application/grpc-web+proto' \\
      http://127.0.0.1:8080/legate.demo.v1.Echo/Say | od -c   # gRPC-Web: message + trailer frame

  admin:
  curl -s http://${ADMIN}/ready
  curl -s http://${ADMIN}/stats
  curl -s http://${ADMIN}/clusters
  curl -s http://${ADMIN}/config_dump

  upstreams directly: curl -i http://127.0.0.1:8081/   curl -i http://127.0.0.1:8082/

Press Ctrl-C to stop.
EOF

wait "${legate_pid}"
