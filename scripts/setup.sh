#!/usr/bin/env bash
# The one place that installs what Legate needs on a fresh Debian 12 machine
# that already has rustup (the toolchain itself comes from rust-toolchain.toml).
#
# Usage: scripts/setup.sh [GROUP...]
#   test    what the test suite needs, wasm targets and the C guest toolchain included
#           (default when no group is given)
#   bench   test + load generators and the proxies bench/run.sh compares with
#   demo    what scripts/demo.sh needs
#   wasm    the WebAssembly targets (see ensure_wasm_targets)
#   cguest  the C toolchain for wasm32-wasi guests (scripts/build-c-filter.sh)
#   pyguest componentize-py, pinned, in a virtualenv (scripts/build-python-filter.sh)
#
# Idempotent: packages already installed are skipped, and `apt-get update` only
# runs when something is missing. Daemons that Debian packages start on install
# (nginx, haproxy, redis-server) are stopped and disabled again, so nothing keeps
# ports busy.
#
# It can also be sourced (`. scripts/setup.sh`) to use its functions.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Package groups. Keep them minimal: every entry costs time on a fresh CI box.
# redis-server: the Redis KV backend's tests start their own on an ephemeral
# loopback port (tests/src/redis.rs); the packaged service is not used.
# util-linux and mount: `unshare` and `mount --bind` give a test's legate a
# private /etc/hosts (tests/tests/reload.rs); both are in every Debian install.
TEST_PKGS=(iproute2 iptables nghttp2-client curl redis-server util-linux mount)
BENCH_PKGS=(wrk nghttp2-client nginx haproxy hyperfine util-linux openssl valgrind curl)
DEMO_PKGS=(curl)
# Debian 12's clang 14 builds wasm32-wasi with lld's wasm-ld, wasi-libc and the
# wasm32 compiler-rt builtins.
CGUEST_PKGS=(clang lld wasi-libc libclang-rt-14-dev-wasm32)
# componentize-py builds Python filters (examples/python-filter). Pinned: its
# output embeds CPython and its own runtime, so a new version changes what the
# tests load. From PyPI, into a virtualenv of its own (Debian 12's python3 is
# "externally managed": no system-wide pip installs).
COMPONENTIZE_PY_VERSION=0.25.1
# Packages that ship a daemon Debian starts on install.
SERVICE_PKGS=(nginx haproxy redis-server)

log() { printf 'setup: %s\n' "$*" >&2; }
die() {
    printf 'setup: error: %s\n' "$*" >&2
    exit 1
}

# Run as root: directly when we are root, through sudo otherwise.
as_root() {
    if [[ ${EUID} -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root to run '$*' (not root and no sudo found)"
    fi
}

is_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == installed ]]
}

apt_get() {
    # Wait for a concurrent apt/dpkg instead of failing on its lock.
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get -o DPkg::Lock::Timeout=300 -y "$@"
}

# Stop and disable the daemons that packages installed in this run started,
# so they do not hold port 80 or race the benchmark for CPU.
quiesce_services() {
    local pkg pidfile pid
    for pkg in "$@"; do
        if command -v systemctl >/dev/null 2>&1; then
            # `disable` works even without a running systemd (it edits links).
            as_root systemctl disable --now "${pkg}" >/dev/null 2>&1 ||
                as_root systemctl disable "${pkg}" >/dev/null 2>&1 || true
        fi
        if command -v service >/dev/null 2>&1; then
            as_root service "${pkg}" stop >/dev/null 2>&1 || true
        fi
        if command -v update-rc.d >/dev/null 2>&1; then
            as_root update-rc.d "${pkg}" disable >/dev/null 2>&1 || true
        fi
        # Last resort: the daemon's own pid file.
        pidfile="/run/${pkg}.pid"
        if [[ -r ${pidfile} ]]; then
            pid="$(cat "${pidfile}" 2>/dev/null || true)"
            if [[ ${pid} =~ ^[0-9]+$ ]] && kill -0 "${pid}" 2>/dev/null; then
                log "stopping ${pkg} (pid ${pid}) started by its package"
                as_root kill "${pid}" || true
            fi
        fi
    done
}

# Install the given Debian packages that are not installed yet.
apt_install() {
    local pkg missing=() new_services=() svc
    for pkg in "$@"; do
        is_installed "${pkg}" || missing+=("${pkg}")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 ||
        die "missing packages (${missing[*]}) and no apt-get: this script targets Debian 12"

    # Remember which daemon packages we are about to add, to quiesce them after.
    for pkg in "${missing[@]}"; do
        for svc in "${SERVICE_PKGS[@]}"; do
            [[ ${pkg} == "${svc}" ]] && new_services+=("${pkg}")
        done
    done

    # A policy-rc.d that says 101 keeps maintainer scripts from starting
    # daemons at all (the Debian convention for containers). Only add one when
    # none exists, and always remove ours afterwards.
    local policy=/usr/sbin/policy-rc.d ours=0
    if [[ ${#new_services[@]} -gt 0 && ! -e ${policy} ]]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' > ${policy} && chmod 755 ${policy}"
        ours=1
    fi

    log "installing: ${missing[*]}"
    local rc=0
    { apt_get update -q && apt_get install -q --no-install-recommends "${missing[@]}"; } || rc=$?

    if [[ ${ours} -eq 1 ]]; then
        as_root rm -f "${policy}"
    fi
    if [[ ${#new_services[@]} -gt 0 ]]; then
        quiesce_services "${new_services[@]}"
    fi
    [[ ${rc} -eq 0 ]] || die "apt-get failed (exit ${rc}) installing: ${missing[*]}"
}

# Make sure the pinned toolchain from rust-toolchain.toml is usable; the rustup
# proxies install it on first use.
ensure_rust() {
    command -v cargo >/dev/null 2>&1 ||
        die "cargo not found: install rustup (https://rustup.rs) and re-run"
    (cd "${REPO_ROOT}" && cargo --version >/dev/null) ||
        die "the toolchain pinned in rust-toolchain.toml is not usable (see above)"
}

# WebAssembly targets for plugins. Prefer rustup's targets; where rustup cannot
# fetch them, fall back to Debian's rustc-web, whose std sources let cargo
# build std for wasm32-unknown-unknown itself.
ensure_wasm_targets() {
    if command -v rustup >/dev/null 2>&1 &&
        (cd "${REPO_ROOT}" && rustup target add wasm32-wasip1 wasm32-wasip2); then
        return 0
    fi
    log "rustup could not add wasm32-wasip1/wasm32-wasip2; falling back to Debian's rustc-web"
    apt_install rustc-web cargo-web rust-web-src
    cat >&2 <<'EOF'
setup: Debian's toolchain has no prebuilt wasm std; build plugins with:
setup:   RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 /usr/bin/cargo build \
setup:     -Zbuild-std=std,panic_abort --target wasm32-unknown-unknown
EOF
}

# The virtualenv componentize-py is installed in: one per version, outside the
# repository so every worktree and clean clone shares it.
componentize_py_venv() {
    local cache="${XDG_CACHE_HOME:-${HOME:+${HOME}/.cache}}"
    cache="${cache:-${REPO_ROOT}/target/cache}"
    printf '%s\n' "${LEGATE_PY_VENV:-${cache}/legate/componentize-py-${COMPONENTIZE_PY_VERSION}}"
}

componentize_py_bin() {
    printf '%s/bin/componentize-py\n' "$(componentize_py_venv)"
}

# Install componentize-py ${COMPONENTIZE_PY_VERSION} unless that version is there.
ensure_componentize_py() {
    local venv bin
    venv="$(componentize_py_venv)"
    bin="$(componentize_py_bin)"
    if [[ -x ${bin} && "$("${bin}" --version 2>/dev/null)" == "componentize-py ${COMPONENTIZE_PY_VERSION}" ]]; then
        return 0
    fi
    command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
    log "installing componentize-py ${COMPONENTIZE_PY_VERSION} into ${venv}"
    rm -rf "${venv}"
    # Debian's python3 makes virtualenvs only with python3-venv (ensurepip).
    if ! python3 -m venv "${venv}" >/dev/null 2>&1; then
        rm -rf "${venv}"
        apt_install python3-venv
        python3 -m venv "${venv}" || die "python3 -m venv ${venv} failed"
    fi
    "${venv}/bin/pip" install --quiet --disable-pip-version-check \
        "componentize-py==${COMPONENTIZE_PY_VERSION}" ||
        die "pip install componentize-py==${COMPONENTIZE_PY_VERSION} failed"
}

main() {
    local groups=("$@") group pkgs=()
    [[ ${#groups[@]} -gt 0 ]] || groups=(test)
    for group in "${groups[@]}"; do
        case "${group}" in
            test)
                # The C guest tests (tests/tests/c_guest.rs) build with the C
                # toolchain: installed here, before tests run in parallel, so no
                # two of them race for apt's lock installing it.
                pkgs+=("${TEST_PKGS[@]}" "${CGUEST_PKGS[@]}")
                # The AssemblyScript proxy-wasm fixture (tests/proxy-wasm-as) is
                # built with npm; any Node.js with npm will do (by command, not
                # package: a nodesource nodejs bundles npm and conflicts with it).
                command -v npm >/dev/null 2>&1 || pkgs+=(nodejs npm)
                ;;
            bench)
                pkgs+=("${TEST_PKGS[@]}" "${BENCH_PKGS[@]}")
                # bench/run.sh parses results with python3; any python3 will do.
                command -v python3 >/dev/null 2>&1 || pkgs+=(python3)
                ;;
            demo) pkgs+=("${DEMO_PKGS[@]}") ;;
            cguest) pkgs+=("${CGUEST_PKGS[@]}") ;;
            pyguest) ;;
            wasm) ;;
            -h | --help)
                sed -n '2,18s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
                return 0
                ;;
            *) die "unknown group '${group}' (want: test, bench, demo, wasm, cguest, pyguest)" ;;
        esac
    done

    ensure_rust
    # De-duplicate while keeping order.
    local -A seen=()
    local uniq=() p
    for p in "${pkgs[@]}"; do
        [[ -n ${seen[${p}]:-} ]] && continue
        seen[${p}]=1
        uniq+=("${p}")
    done
    if [[ ${#uniq[@]} -gt 0 ]]; then
        apt_install "${uniq[@]}"
    fi
    # The test suite builds plugins (`legate plugin build`), so `test` (and
    # `bench`, which includes it) need the targets too.
    local want_wasm=0
    for group in "${groups[@]}"; do
        [[ ${group} == wasm || ${group} == test || ${group} == bench ]] && want_wasm=1
    done
    if [[ ${want_wasm} -eq 1 ]]; then
        ensure_wasm_targets
    fi
    # The Python example's test (tests/tests/plugin_examples.rs) builds it with
    # componentize-py: installed here, before tests run in parallel.
    for group in "${groups[@]}"; do
        if [[ ${group} == pyguest || ${group} == test || ${group} == bench ]]; then
            ensure_componentize_py
            break
        fi
    done
    log "ok (${groups[*]})"
}

# Run main only when executed, not when sourced.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
