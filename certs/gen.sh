#!/usr/bin/env bash
# Makes the development CA and the localhost certificate that quic-report uses
# by default. Development only: the private keys are checked in and public.
#
#   ca.pem / ca.key              development CA (ECDSA P-256, 20 years)
#   localhost.pem / localhost.key  leaf for DNS:localhost, IP:127.0.0.1, IP:::1,
#                                signed by the CA (ECDSA P-256, 20 years)
#   clients/NAME.pem / NAME.key  client certificates (extendedKeyUsage
#                                clientAuth, subject CN=NAME) signed by the CA,
#                                for `server --client-ca certs/ca.pem`:
#                                device-1, device-2 (reporters) and
#                                ops-reader (for `server --reader ops-reader`)
#
#   ./certs/gen.sh           remakes everything (a new CA: every certificate changes)
#   ./certs/gen.sh clients   remakes only clients/ and the client test
#                            certificates, signed by the CA already here
#
# ECDSA P-256 because a server signs once per handshake and P-256 signs about
# 30x faster than RSA-2048 (see ../shared/PERFORMANCE.md, section 2b).
# Run from anywhere: ./certs/gen.sh
set -euo pipefail
cd "$(dirname "$0")"
days=7300
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# A client certificate signed by the dev CA: client NAME [SUBJECT] [OUT].
client() {
  local name=$1 subj=${2:-"/O=quic-report development/CN=$1"} out=${3:-clients/$1}
  openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out "$out.key"
  openssl req -new -key "$out.key" -subj "$subj" -multivalue-rdn -utf8 -out "$tmp/$name.csr"
  cat > "$tmp/$name.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
EXT
  openssl x509 -req -in "$tmp/$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial \
    -CAserial "$tmp/ca.srl" -days "$days" -sha256 -extfile "$tmp/$name.ext" -out "$out.pem" 2>/dev/null
}

# Client certificates, and the client test certificates:
#   test/other-ca-client.pem/.key  CN=device-1, signed by a CA that is not the dev CA
#   test/two-cn.pem/.key           two CNs in the subject (refused: ambiguous)
#   test/no-cn.pem/.key            no CN in the subject (refused)
clients() {
  mkdir -p clients test
  for name in device-1 device-2 ops-reader; do client "$name"; done
  for name in device-1 device-2 ops-reader; do openssl verify -CAfile ca.pem "clients/$name.pem"; done
  client two-cn "/O=quic-report development/CN=device-1/CN=device-2" test/two-cn
  client no-cn "/O=quic-report development/OU=no common name" test/no-cn
  openssl ecparam -name prime256v1 -genkey -noout -out "$tmp/other-ca.key"
  openssl req -x509 -new -key "$tmp/other-ca.key" -sha256 -days "$days" \
    -subj "/CN=some other CA" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$tmp/other-ca.pem"
  openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out test/other-ca-client.key
  openssl req -new -key test/other-ca-client.key -subj "/CN=device-1" -out "$tmp/other.csr"
  printf 'extendedKeyUsage=clientAuth\n' > "$tmp/other.ext"
  openssl x509 -req -in "$tmp/other.csr" -CA "$tmp/other-ca.pem" -CAkey "$tmp/other-ca.key" \
    -CAcreateserial -CAserial "$tmp/other.srl" -days "$days" -sha256 -extfile "$tmp/other.ext" \
    -out test/other-ca-client.pem 2>/dev/null
}

if [ "${1:-}" = clients ]; then
  clients
  exit 0
fi

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

clients
