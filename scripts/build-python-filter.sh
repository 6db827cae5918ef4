#!/usr/bin/env bash
# Builds the Python example filter (examples/python-filter) into a Legate HTTP
# filter component with componentize-py.
#
# Usage: scripts/build-python-filter.sh [OUT.wasm]
#   OUT.wasm  where to write the component
#             (default: ${CARGO_TARGET_DIR:-target}/python-filter/python_filter.wasm)
#
# The one build command (examples/python-filter/README.md):
#   componentize-py -d abi/wit -w http-filter componentize -p examples/python-filter app -o OUT.wasm
# componentize-py comes from the virtualenv `scripts/setup.sh pyguest` makes
# (pinned there; set COMPONENTIZE_PY to another binary to use it instead).
#
# Builds are cached by the inputs' SHA-256 (app.py, abi/wit/*.wit, the
# componentize-py version) under ${CARGO_TARGET_DIR:-target}/python-filter/,
# behind a lock: parallel test processes build once, and reuse it after.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-${REPO_ROOT}/target}"
OUT="${1:-${TARGET_DIR}/python-filter/python_filter.wasm}"

# For COMPONENTIZE_PY_VERSION and componentize_py_bin (it defines log and die
# too: ours, below, replace them).
# shellcheck source=setup.sh
. "${REPO_ROOT}/scripts/setup.sh"

log() { printf 'build-python-filter: %s\n' "$*" >&2; }
die() {
    printf 'build-python-filter: error: %s\n' "$*" >&2
    exit 1
}

[[ $# -le 1 ]] || die "usage: scripts/build-python-filter.sh [OUT.wasm]"

CPY="${COMPONENTIZE_PY:-$(componentize_py_bin)}"
if [[ ! -x ${CPY} ]]; then
    log "componentize-py ${COMPONENTIZE_PY_VERSION} not installed; installing it (scripts/setup.sh pyguest)"
    bash "${REPO_ROOT}/scripts/setup.sh" pyguest
fi
[[ -x ${CPY} ]] || die "no componentize-py at ${CPY}"
version="$("${CPY}" --version)"

mkdir -p "${TARGET_DIR}/python-filter"
key="$(cd "${REPO_ROOT}" && { cat examples/python-filter/app.py abi/wit/*.wit; echo "${version}"; } | sha256sum | cut -c1-16)"
cached="${TARGET_DIR}/python-filter/python_filter-${key}.wasm"
(
    flock 9
    if [[ ! -s ${cached} ]]; then
        log "building with ${version}"
        start=${SECONDS}
        (cd "${REPO_ROOT}" && "${CPY}" -q -d abi/wit -w http-filter componentize \
            -p examples/python-filter app -o "${cached}.tmp")
        mv "${cached}.tmp" "${cached}"
        log "built in $((SECONDS - start)) s: $(stat -c %s "${cached}") bytes"
    fi
) 9>"${TARGET_DIR}/python-filter/.lock"
if [[ ${OUT} != "${cached}" ]]; then
    mkdir -p "$(dirname "${OUT}")"
    cp "${cached}" "${OUT}"
fi
