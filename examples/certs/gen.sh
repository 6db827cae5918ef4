#!/usr/bin/env bash
# Demo certificates for examples/edge.yaml and examples/sidecar.yaml.
#
#   examples/certs/gen.sh [OUT_DIR]      (default: examples/certs/out)
#
# Writes two throwaway certificate authorities and the leaf certificates the
# examples name, as PEM (keys are PKCS#8 ECDSA P-256, mode 0600):
#
#   ca.pem, ca-key.pem              "edge" CA: what a browser would trust
#   www.pem, www-key.pem            server cert for www.example.test
#   api.pem, api-key.pem            server cert for api.example.test
#   mesh-ca.pem, mesh-ca-key.pem    "mesh" CA: identities of workloads
#   orders.pem, orders-key.pem      the sidecar's workload identity
#                                   (orders.mesh.test, SPIFFE id
#                                   spiffe://mesh.test/ns/default/sa/orders;
#                                   server AND client auth:
#                                   it terminates inbound mTLS and presents itself
#                                   on outbound mTLS)
#   frontend.pem, frontend-key.pem  a peer workload's client identity
#                                   (frontend.mesh.test, spiffe://mesh.test/ns/
#                                   default/sa/frontend; client auth only), for
#                                   calling the sidecar's inbound port with curl
#
# The two CAs are separate on purpose: a certificate that may serve a public
# name must not also be accepted as a workload identity inside the mesh.
#
# Every run regenerates everything (it takes well under a second). These are
# demo certificates: the CA keys sit next to the certificates and nothing is
# ever revoked. See examples/README.md for what to do in production.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/out}"

command -v openssl >/dev/null 2>&1 || {
    echo "gen.sh: openssl not found; install it with: apt-get install openssl" >&2
    exit 1
}

mkdir -p "$out"
umask 077
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# One openssl config for every certificate: the extension sections are what
# WebPKI verifiers (rustls, browsers) check.
cat >"$tmp/openssl.cnf" <<'CNF'
[req]
distinguished_name = dn
[dn]
[ca_ext]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[leaf_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = $ENV::LEGATE_EKU
subjectAltName = $ENV::LEGATE_SAN
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
CNF

key() {
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"
}

# ca NAME COMMON_NAME
ca() {
    key "$out/$1-key.pem"
    LEGATE_EKU=serverAuth LEGATE_SAN=DNS:unused \
        openssl req -new -x509 -config "$tmp/openssl.cnf" -extensions ca_ext \
        -key "$out/$1-key.pem" -subj "/O=Legate examples/CN=$2" \
        -days 3650 -sha256 -out "$out/$1.pem"
}

# leaf NAME CA DNS_NAME EKU [URI]
leaf() {
    local san="DNS:$3${5:+,URI:$5}"
    key "$out/$1-key.pem"
    LEGATE_EKU="$4" LEGATE_SAN="$san" \
        openssl req -new -config "$tmp/openssl.cnf" \
        -key "$out/$1-key.pem" -subj "/O=Legate examples/CN=$3" -out "$tmp/$1.csr"
    # 825 days: the longest validity Apple platforms accept for a server cert.
    LEGATE_EKU="$4" LEGATE_SAN="$san" \
        openssl x509 -req -in "$tmp/$1.csr" -CA "$out/$2.pem" -CAkey "$out/$2-key.pem" \
        -set_serial "0x$(openssl rand -hex 16)" -days 825 -sha256 \
        -extfile "$tmp/openssl.cnf" -extensions leaf_ext -out "$out/$1.pem" 2>/dev/null
}

ca ca "Legate Example Edge CA"
leaf www ca www.example.test serverAuth
leaf api ca api.example.test serverAuth

ca mesh-ca "Legate Example Mesh CA"
leaf orders mesh-ca orders.mesh.test serverAuth,clientAuth spiffe://mesh.test/ns/default/sa/orders
leaf frontend mesh-ca frontend.mesh.test clientAuth spiffe://mesh.test/ns/default/sa/frontend

# Certificates are public; only the keys stay 0600.
chmod 0644 "$out"/*.pem
chmod 0600 "$out"/*-key.pem

for c in www api; do
    openssl verify -CAfile "$out/ca.pem" "$out/$c.pem" >/dev/null
done
for c in orders frontend; do
    openssl verify -CAfile "$out/mesh-ca.pem" "$out/$c.pem" >/dev/null
done
echo "gen.sh: certificates written to $out"
