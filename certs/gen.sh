#!/usr/bin/env bash
# Makes the development CA and the localhost certificate that quic-report uses
# by default. Development only: the private keys are checked in and public.
#
#   ca.pem / ca.key              development CA (ECDSA P-256, 20 years)
#   localhost.pem / localhost.key  leaf for DNS:localhost, IP:127.0.0.1, IP:::1,
#                                signed by the CA (ECDSA P-256, 20 years)
#
# ECDSA P-256 because a server signs once per handshake and P-256 signs about
# 30x faster than RSA-2048 (see ../shared/PERFORMANCE.md, section 2b).
# Run from anywhere: ./certs/gen.sh
set -euo pipefail
cd "$(dirname "$0")"
days=7300
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

openssl ecparam -name prime256v1 -genkey -noout -out "$tmp/ca.key"
openssl req -x509 -new -key "$tmp/ca.key" -sha256 -days "$days" \
  -subj "/O=quic-report development/CN=quic-report dev CA" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out "$tmp/ca.pem"

openssl ecparam -name prime256v1 -genkey -noout -out "$tmp/leaf.key"
openssl pkcs8 -topk8 -nocrypt -in "$tmp/leaf.key" -out "$tmp/localhost.key"
openssl req -new -key "$tmp/localhost.key" -subj "/O=quic-report development/CN=localhost" \
  -out "$tmp/leaf.csr"
cat > "$tmp/leaf.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1
EXT
openssl x509 -req -in "$tmp/leaf.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" \
  -CAcreateserial -days "$days" -sha256 -extfile "$tmp/leaf.ext" -out "$tmp/localhost.pem"

openssl pkcs8 -topk8 -nocrypt -in "$tmp/ca.key" -out ca.key
cp "$tmp/ca.pem" ca.pem
cp "$tmp/localhost.pem" localhost.pem
cp "$tmp/localhost.key" localhost.key
openssl verify -CAfile ca.pem localhost.pem

# Test certificates (for the certificate-refusal tests; never for use):
#   test/expired.pem/.key     signed by the dev CA, expired in 2021
#   test/untrusted.pem/.key   self-signed "localhost", not signed by the dev CA
mkdir -p test
cat > "$tmp/ca.cnf" <<CNF
[ca]
default_ca = dev
[dev]
database = $tmp/index.txt
new_certs_dir = $tmp
serial = $tmp/serial
default_md = sha256
policy = any
copy_extensions = copy
[any]
commonName = supplied
CNF
: > "$tmp/index.txt"; echo 1000 > "$tmp/serial"
openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out test/expired.key
openssl req -new -key test/expired.key -subj "/CN=localhost" \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1" -out "$tmp/expired.csr"
openssl ca -batch -config "$tmp/ca.cnf" -cert ca.pem -keyfile ca.key -in "$tmp/expired.csr" \
  -startdate 20200101000000Z -enddate 20210101000000Z -out "$tmp/expired.pem" 2>/dev/null
openssl x509 -in "$tmp/expired.pem" -out test/expired.pem
openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out test/untrusted.key
openssl req -x509 -new -key test/untrusted.key -sha256 -days "$days" -subj "/CN=localhost" \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1" -out test/untrusted.pem
