# shellcheck shell=bash
# What the bench scripts share, sourced by them (not run): logging, setup and
# the release build, a scratch directory whose processes are stopped on exit,
# and waiting for ports. Loopback only.
#
#   BENCH_NAME=plugins
#   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#   bench_setup bench wasm        # scripts/setup.sh GROUPS, unless SKIP_SETUP=1
#   bench_need wrk curl           # each tool must be on PATH
#   bench_build                   # release legate + demo upstream, unless SKIP_BUILD=1
#   bench_workdir                 # $WORK, and $pids stopped on exit
#
# Sets REPO_ROOT (and cds there), UPSTREAM_BIN and LEGATE_BIN, from cargo's
# target directory (CARGO_TARGET_DIR if set; LEGATE_BIN from the environment
# wins: another build of legate to measure).

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${REPO_ROOT}"

log() { printf '[%s] %s\n' "${BENCH_NAME:-bench}" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# scripts/setup.sh with these groups (what the script needs installed).
bench_setup() {
    if [[ -z ${SKIP_SETUP:-} ]]; then
        bash scripts/setup.sh "$@"
    fi
}

# Every named tool must be on PATH.
bench_need() {
    local tool
    for tool in "$@"; do
        command -v "${tool}" >/dev/null 2>&1 || die "'${tool}' not found: run scripts/setup.sh bench"
    done
}

lock=()
[[ -f Cargo.lock ]] && lock=(--locked)
# Cargo's target directory: CARGO_TARGET_DIR if set (where cargo builds), so a
# worktree with its own target directory measures its own build.
TARGET_DIR="${CARGO_TARGET_DIR:-${REPO_ROOT}/target}"
UPSTREAM_BIN="${TARGET_DIR}/release/legate-demo-upstream"
LEGATE_BIN="${LEGATE_BIN:-${TARGET_DIR}/release/legate}"

# The release builds of legate and the demo upstream.
bench_build() {
    if [[ -z ${SKIP_BUILD:-} ]]; then
        log "building legate and the demo upstream (release)"
        cargo build --release "${lock[@]}" -p legate-demo-upstream -p legate-host
    fi
}

# bench/pw-noop-filter (the no-op proxy-wasm filter, upstream Rust SDK) as
# $WORK/pwnoop.wasm; call after bench_workdir.
bench_build_pwnoop() {
    log "building bench/pw-noop-filter (wasm32-wasip1, release)"
    cargo build --release --locked --target wasm32-wasip1 \
        --manifest-path bench/pw-noop-filter/Cargo.toml \
        --target-dir "${TARGET_DIR}/pw-noop-filter" >"${WORK}/pw-build.log" 2>&1 ||
        die "building bench/pw-noop-filter failed: $(tail -n 20 "${WORK}/pw-build.log")"
    cp "${TARGET_DIR}/pw-noop-filter/wasm32-wasip1/release/legate_bench_pw_noop_filter.wasm" "${WORK}/pwnoop.wasm"
}

# An RS256 key, its JWKS modulus ($JWT_N) and a token valid for a day
# ($TOKEN, issuer https://id.bench, audience bench, kid bench): what the JWT
# setups verify (a 2048-bit key, the common case). Needs openssl; call after
# bench_workdir.
bench_jwt() {
    local head body sig
    b64url() { base64 -w0 | tr '+/' '-_' | tr -d '='; }
    openssl genrsa -out "${WORK}/jwt.key" 2048 2>/dev/null
    JWT_N=$(openssl rsa -in "${WORK}/jwt.key" -noout -modulus | cut -d= -f2 |
        perl -ne 'chomp; print pack("H*", $_)' | b64url)
    head=$(printf '{"alg":"RS256","typ":"JWT","kid":"bench"}' | b64url)
    body=$(printf '{"iss":"https://id.bench","aud":"bench","sub":"user-1","exp":%d}' \
        "$(($(date +%s) + 86400))" | b64url)
    sig=$(printf '%s.%s' "${head}" "${body}" |
        openssl dgst -sha256 -sign "${WORK}/jwt.key" -binary | b64url)
    TOKEN="${head}.${body}.${sig}"
}

# The plugins.yaml entries of the two auth setups (after bench_jwt): `auth-key`
# (API key `bench-key` in `x-api-key`) and `auth-jwt` ($TOKEN as a bearer token).
bench_auth_plugins() {
    cat <<EOF
  - name: auth-key
    module: builtin:auth
    config:
      api_keys:
        # sha256("bench-key")
        - name: keys
          keys: [{ id: bench, sha256: $(printf %s bench-key | sha256sum | cut -d' ' -f1) }]
      rules: [{ match: { prefix: / }, requires: { any: [keys] } }]
  - name: auth-jwt
    module: builtin:auth
    config:
      providers:
        - name: corp
          issuer: https://id.bench
          audiences: [bench]
          jwks: { keys: [{ kty: RSA, kid: bench, alg: RS256, use: sig, n: "${JWT_N}", e: AQAB }] }
          claim_to_headers: [{ claim: sub, header: x-user }]
      rules: [{ match: { prefix: / }, requires: { any: [corp] } }]
EOF
}

# A scratch directory, $WORK; every pid in $pids is stopped on exit, and on
# failure the logs' tails are shown.
bench_workdir() {
    WORK="$(mktemp -d -t "legate-${BENCH_NAME:-bench}.XXXXXX")"
    pids=()
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

bench_cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    for p in "${pids[@]}"; do kill "${p}" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "${p}" 2>/dev/null || true; done
    [[ ${rc} -ne 0 ]] && tail -n 20 "${WORK}"/*.log >&2 2>/dev/null
    rm -rf "${WORK}"
    exit "${rc}"
}

port_open() { (: >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Waits up to 10 s for something to listen on port $1.
wait_port() {
    local i
    for ((i = 0; i < 100; i++)); do port_open "$1" && return 0; sleep 0.1; done
    die "nothing listens on port $1 (logs in ${WORK})"
}
