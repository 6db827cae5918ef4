#!/usr/bin/env bash
# The one test command: installs what the tests need, then runs every test in
# the workspace (unit, integration and doc tests). Exits non-zero on failure.
#
# Uses cargo-nextest when it is installed (faster, isolates tests in
# processes), otherwise plain `cargo test`. Extra arguments go to the main
# (non-doc) run, e.g. a test-name filter: `scripts/test.sh config::`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh test

# --locked makes CI fail instead of silently re-resolving dependencies; only
# meaningful once a lock file exists.
lock=()
if [[ -f Cargo.lock ]]; then
    lock=(--locked)
fi

# In CI, report every failing test rather than stopping at the first binary.
flags=("${lock[@]}")
if [[ ${CI:-} == true ]]; then
    flags+=(--no-fail-fast)
fi

if cargo nextest --version >/dev/null 2>&1; then
    echo "==> cargo nextest run --workspace --all-targets ${flags[*]} $*"
    cargo nextest run --workspace --all-targets "${flags[@]}" "$@"
else
    echo "==> cargo test --workspace --all-targets ${flags[*]} $* (cargo-nextest not installed)"
    cargo test --workspace --all-targets "${flags[@]}" "$@"
fi

# `--all-targets` leaves out doc tests (and nextest cannot run them at all), so
# they get their own run, when some workspace member has a library to test.
meta="$(cargo metadata "${lock[@]}" --no-deps --format-version 1)"
if grep -Eq '"kind":\[[^]]*"(lib|rlib|proc-macro)"' <<<"${meta}"; then
    echo "==> cargo test --workspace --doc ${flags[*]}"
    cargo test --workspace --doc "${flags[@]}"
else
    echo "==> no library targets: no doc tests to run"
fi
