#!/usr/bin/env bash
# Builds the C example filter (examples/c-filter) from source into a Legate
# HTTP filter component, and checks its shape.
#
# Usage: scripts/build-c-filter.sh [OUT.wasm]
#   OUT.wasm  where to write the component
#             (default: ${CARGO_TARGET_DIR:-target}/c-filter/c_filter.wasm)
#
# Steps (each is a plain command; see examples/c-filter/README.md):
#   1. C bindings for world http-filter from abi/wit (wit-bindgen's C generator)
#   2. compile and link a wasm32-wasi reactor module with Debian's clang + lld
#      + wasi-libc (installed by `scripts/setup.sh cguest` when missing)
#   3. encode the core module as a component (wit-component), then check that
#      it exports legate:filter/http-handler@0.1.3 and imports only
#      legate:filter/* and wasi:* interfaces
# Steps 1 and 3 use tools/componentize (`legate-componentize`), a workspace
# crate built with cargo; set LEGATE_COMPONENTIZE to a built binary to skip
# that build.
#
# Environment: CC_WASM (default clang), LEGATE_COMPONENTIZE.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="${REPO_ROOT}/examples/c-filter"
TARGET_DIR="${CARGO_TARGET_DIR:-${REPO_ROOT}/target}"
OUT="${1:-${TARGET_DIR}/c-filter/c_filter.wasm}"
CC_WASM="${CC_WASM:-clang}"
CFLAGS=(--target=wasm32-wasi -O2 -std=c11)
# Link a reactor: a library-style module (no main), initialised once through
# `_initialize`, which the component encoder wires up.
LDFLAGS=(--target=wasm32-wasi -mexec-model=reactor -Wl,--strip-debug)

log() { printf 'build-c-filter: %s\n' "$*" >&2; }
die() {
    printf 'build-c-filter: error: %s\n' "$*" >&2
    exit 1
}

[[ $# -le 1 ]] || die "usage: scripts/build-c-filter.sh [OUT.wasm]"

# A per-run scratch directory, so parallel runs (tests) do not share files.
mkdir -p "${TARGET_DIR}/c-filter"
WORK="$(mktemp -d "${TARGET_DIR}/c-filter/build.XXXXXX")"
trap 'rm -rf "${WORK}"' EXIT

# Can the C compiler build and link a wasm32-wasi reactor against wasi-libc?
can_compile() {
    command -v "${CC_WASM}" >/dev/null 2>&1 || return 1
    printf '#include <stdlib.h>\nvoid *probe(size_t n) { return malloc(n); }\n' >"${WORK}/probe.c"
    "${CC_WASM}" "${CFLAGS[@]}" -c -o "${WORK}/probe.o" "${WORK}/probe.c" >/dev/null 2>&1 &&
        "${CC_WASM}" "${LDFLAGS[@]}" -o "${WORK}/probe.wasm" "${WORK}/probe.o" >/dev/null 2>&1
}

if ! can_compile; then
    log "no working wasm32-wasi C toolchain; installing it (scripts/setup.sh cguest)"
    bash "${REPO_ROOT}/scripts/setup.sh" cguest
    can_compile || die "'${CC_WASM} --target=wasm32-wasi' still cannot link a reactor module; \
check that clang, lld, wasi-libc and libclang-rt-14-dev-wasm32 are installed"
fi

if [[ -n ${LEGATE_COMPONENTIZE:-} ]]; then
    tool="${LEGATE_COMPONENTIZE}"
    [[ -x ${tool} ]] || die "LEGATE_COMPONENTIZE=${tool} is not an executable"
else
    locked=()
    [[ -f ${REPO_ROOT}/Cargo.lock ]] && locked=(--locked)
    (cd "${REPO_ROOT}" && cargo build -q "${locked[@]}" -p legate-componentize) ||
        die "building tools/componentize failed (see above)"
    tool="${TARGET_DIR}/debug/legate-componentize"
fi

# 1. Bindings: http_filter.h, http_filter.c, http_filter_component_type.o.
"${tool}" bindings "${REPO_ROOT}/abi/wit" http-filter "${WORK}/gen" >/dev/null

# 2. Compile and link. The filter's own code must be warning-free; the
# generated bindings are compiled without -Werror, as their warnings are not
# ours to fix.
"${CC_WASM}" "${CFLAGS[@]}" -Wall -Wextra -Werror -I "${WORK}/gen" \
    -c "${SRC}/filter.c" -o "${WORK}/filter.o"
"${CC_WASM}" "${CFLAGS[@]}" -I "${WORK}/gen" \
    -c "${WORK}/gen/http_filter.c" -o "${WORK}/http_filter.o"
# The *_component_type.o carries the world's type in a custom section; the
# component encoder reads it to know which world the module implements.
"${CC_WASM}" "${LDFLAGS[@]}" -o "${WORK}/c_filter.core.wasm" \
    "${WORK}/filter.o" "${WORK}/http_filter.o" "${WORK}/gen/http_filter_component_type.o"

# 3. Component, then the structural check.
mkdir -p "$(dirname "${OUT}")"
"${tool}" component "${WORK}/c_filter.core.wasm" "${OUT}"
"${tool}" check-http-filter "${OUT}"
log "ok: ${OUT} ($(wc -c <"${OUT}") bytes)"
