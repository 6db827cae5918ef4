#!/usr/bin/env bash
# Filter-cost benchmark: Legate with no filters vs the same Legate with 1 and 5
# native no-op filters, 1 and 5 no-op Wasm filters (bench/noop-filter, built with
# `legate plugin build`), 1 Wasm filter that reads a request header, 1 no-op Wasm
# filter declaring the phases the proxy-wasm one is called in, and 1 no-op
# proxy-wasm filter (Envoy's ABI, the upstream Rust SDK), all in one
# run of bench/run.sh (same pinning, interleaved rounds, best of ROUNDS). Prints
# each chain's req/s as a ratio of plain Legate's and its cost in percent.
#
#   bench/filters.sh                     # ROUNDS=3 DURATION=10s, h1 + h2c
#   ROUNDS=5 DURATION=20s bench/filters.sh
#
# Every bench/run.sh variable applies; CONTENDERS defaults to the filter set.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CONTENDERS="${CONTENDERS:-legate native1 native5 wasm1 wasm5 wasmhdr wasmall pwnoop}"
exec bash bench/run.sh "$@"
