#!/usr/bin/env bash
# Hot operations under steady load: config reloads, plugin reloads and hot restarts
# of the real `legate` binary while HTTP/1.1 and HTTP/2 clients (keep-alive and a new
# connection per request) send requests; prints failed requests (target 0) and reload
# latencies (target <= 50 ms for a plugin whose module is in the compile cache).
#
# It runs the ignored test `reload_bench` in tests/tests/reload.rs (the load
# generator and the process handling are the integration harness's).
#
# Environment (defaults): CONFIG_RELOADS=100 PLUGIN_RELOADS=100 RESTARTS=10
# PROFILE=release (the `legate` under test is a release build; `debug` runs the
# test suite's build, whose latencies are upper bounds).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export CONFIG_RELOADS="${CONFIG_RELOADS:-100}"
export PLUGIN_RELOADS="${PLUGIN_RELOADS:-100}"
export RESTARTS="${RESTARTS:-10}"
PROFILE="${PROFILE:-release}"
if [[ ${PROFILE} == release ]]; then
    cargo build --release --locked -p legate-host --bin legate
    LEGATE_BIN_DIR="$(cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release"
    export LEGATE_BIN_DIR
fi
exec cargo test -p legate-tests --test reload -- \
    --ignored --exact reload_bench --nocapture
