#!/usr/bin/env bash
# Fault benchmark: kill one of three upstreams under load and measure what the
# clients see. Legate runs with retries (connect-failure, reset, 5xx), outlier
# detection and active health checks; wrk drives HTTP/1.1 keep-alive load through it,
# and half-way through one upstream is killed (SIGKILL: no goodbye, connections reset).
#
# Prints: requests, failures (non-2xx + socket errors), success rate, p50/p99 latency,
# and Legate's counters that explain them (retries, ejections, health-check failures).
#
#   bench/fault.sh                       # defaults: 20s of load, kill at 10s
#   DURATION=30 KILL_AT=10 CONNS=32 bench/fault.sh
#
# Loopback only; every process is this script's child and is stopped on exit.
set -euo pipefail

DURATION=${DURATION:-20}  # seconds of load
KILL_AT=${KILL_AT:-10}    # seconds into the load when one upstream dies
CONNS=${CONNS:-32}        # wrk connections
THREADS=${THREADS:-2}     # wrk threads
LEGATE_FLAGS=${LEGATE_FLAGS:---concurrency 1}

BENCH_NAME=fault
# shellcheck source=bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
if ! command -v wrk >/dev/null 2>&1; then
    bench_setup bench
fi
bench_need wrk curl
bench_build
bench_workdir


PORTS=(18191 18192 18193)
LISTEN=18190
ADMIN=18199
for i in 0 1 2; do
    "${UPSTREAM_BIN}" --listen "127.0.0.1:${PORTS[i]}" --name "up$i" --threads 1 \
        >"${WORK}/up$i.log" 2>&1 &
    pids+=($!)
done
VICTIM_PID=${pids[1]}
for p in "${PORTS[@]}"; do wait_port "${p}"; done

cat >"${WORK}/legate.yaml" <<EOF
version: 1
admin: { address: "127.0.0.1:${ADMIN}" }
listeners:
  - name: web
    address: 127.0.0.1:${LISTEN}
    http: { routes: main }
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - match: { prefix: / }
            cluster: backend
            retry:
              num_retries: 2
              retry_on: [connect-failure, reset, 5xx]
              backoff_base: 1ms
clusters:
  - name: backend
    connect_timeout: 250ms
    endpoints:
      - address: 127.0.0.1:${PORTS[0]}
      - address: 127.0.0.1:${PORTS[1]}
      - address: 127.0.0.1:${PORTS[2]}
    health_check:
      tcp: {}
      interval: 500ms
      timeout: 250ms
      unhealthy_threshold: 2
    outlier_detection:
      consecutive_gateway_failure: 3
      interval: 1s
      base_ejection_time: 30s
    circuit_breakers:
      retry_budget: { percent: 100%, min_concurrency: 64 }
EOF
# shellcheck disable=SC2086 # LEGATE_FLAGS is a list of flags
"${LEGATE_BIN}" run -c "${WORK}/legate.yaml" ${LEGATE_FLAGS} >"${WORK}/legate.log" 2>&1 &
pids+=($!)
wait_port "${LISTEN}"
curl -fsS "http://127.0.0.1:${LISTEN}/" >/dev/null || die "legate does not answer"

log "load: ${DURATION}s, ${CONNS} connections; killing up1 (pid ${VICTIM_PID}) at ${KILL_AT}s"
( sleep "${KILL_AT}"; kill -9 "${VICTIM_PID}" 2>/dev/null || true ) &
wrk -t"${THREADS}" -c"${CONNS}" -d"${DURATION}s" --latency "http://127.0.0.1:${LISTEN}/" \
    >"${WORK}/wrk.txt" 2>&1 || die "wrk failed: $(cat "${WORK}/wrk.txt")"
STATS="$(curl -fsS "http://127.0.0.1:${ADMIN}/stats")"

python3 - "${WORK}/wrk.txt" <<'PY' "${STATS}"
import re, sys
wrk = open(sys.argv[1]).read()
stats = sys.argv[2]
def num(pattern, text=wrk, default=0):
    m = re.search(pattern, text)
    return float(m.group(1)) if m else default
total = num(r"(\d+) requests in")
non2xx = num(r"Non-2xx or 3xx responses: (\d+)")
errs = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", wrk))
def lat(p):
    m = re.search(r"^\s*%s%%\s+([\d.]+)(us|ms|s)\b" % p, wrk, re.M)
    if not m:
        return "?"
    v, unit = float(m.group(1)), m.group(2)
    return "%.2fms" % (v / 1000 if unit == "us" else v * 1000 if unit == "s" else v)
def stat(name):
    m = re.search(r'^legate_cluster_%s\{cluster="backend"\} (\S+)' % name, stats, re.M)
    return m.group(1) if m else "?"
failed = non2xx + errs
rate = 100.0 * (total - failed) / total if total else 0.0
print("kill one of three upstreams under load")
print(f"  requests        {int(total)}")
print(f"  failed          {int(failed)} (non-2xx {int(non2xx)}, socket errors {errs})")
print(f"  success rate    {rate:.3f}%")
print(f"  latency p50     {lat(50)}")
print(f"  latency p99     {lat(99)}")
for s in ["upstream_rq_retry", "upstream_cx_connect_fail", "outlier_detection_ejections_total",
          "health_check_failure", "membership_healthy", "lb_healthy_panic"]:
    print(f"  {s:<34} {stat(s)}")
PY
