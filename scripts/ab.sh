#!/usr/bin/env bash
# scripts/ab.sh: two (or more) server builds compared under the same load,
# trial by trial, so that a change's cost is told apart from the machine's
# noise (which moves whole runs of `make bench` by 10-20 % between hours).
#
#   scripts/ab.sh [-n REPS] LABEL=SERVER_BINARY LABEL=SERVER_BINARY ...
#
# e.g. comparing this tree with an older commit:
#
#   git worktree add /tmp/old OLD_COMMIT && (cd /tmp/old && cargo build --release -p quic-report)
#   cargo build --release -p quic-report -p quic-report-bench
#   scripts/ab.sh -n 8 old=/tmp/old/target/release/quic-report new=target/release/quic-report
#
# Every server runs at once (stdout to /dev/null, RUST_LOG=warn, pinned to
# CPU 1); one generator (this tree's quic-report-bench, pinned to CPU 0)
# takes them in turn each repetition: C=16 K=8 reports, C=1 K=1 reports, and
# 4-worker handshakes, 2 s each after a 500 ms warm-up. The same generator
# for every side keeps the client's cost out of the comparison. Prints one
# line per trial, then per figure the median and range of each side and
# the median of the per-repetition ratios to the first side. It reports; it
# never fails on a figure.
set -uo pipefail

cd "$(dirname "$0")/.."
REPS=8
if [[ ${1:-} == -n ]]; then
  REPS=$2
  shift 2
fi
if (($# < 2)); then
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
GEN=${QUIC_REPORT_BENCH:-target/release/quic-report-bench}
[[ -x $GEN ]] || {
  echo "ab: $GEN not found; run: cargo build --release -p quic-report-bench" >&2
  exit 1
}
SRV_PIN=() GEN_PIN=()
if command -v taskset >/dev/null && (($(nproc) >= 2)); then
  SRV_PIN=(taskset -c 1)
  GEN_PIN=(taskset -c 0)
fi

TMP=$(mktemp -d /tmp/quic-report-ab.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

LABELS=()
declare -A PORT PID
base=$((20000 + RANDOM % 20000))
for arg in "$@"; do
  label=${arg%%=*} bin=${arg#*=}
  [[ -x $bin ]] || {
    echo "ab: $label: $bin is not an executable" >&2
    exit 1
  }
  LABELS+=("$label")
  PORT[$label]=$((base + ${#LABELS[@]}))
  RUST_LOG=warn "${SRV_PIN[@]}" "$bin" server --listen "127.0.0.1:${PORT[$label]}" \
    >/dev/null 2>"$TMP/$label.log" &
  PID[$label]=$!
  PIDS+=("${PID[$label]}")
done
sleep 1.5
for label in "${LABELS[@]}"; do
  kill -0 "${PID[$label]}" 2>/dev/null || {
    echo "ab: the $label server did not start:" >&2
    cat "$TMP/$label.log" >&2
    exit 1
  }
done

# `key=value` of one generator run (both of its output lines).
kv() { grep -o "$1=[0-9.]*" <<<"$2" | head -1 | cut -d= -f2; }
trial() {
  "${GEN_PIN[@]}" "$GEN" --server "127.0.0.1:$1" -d 2s --warmup 500ms --server-pid "$2" "${@:3}" 2>&1
}

for rep in $(seq "$REPS"); do
  for label in "${LABELS[@]}"; do
    p=${PORT[$label]} pid=${PID[$label]}
    many=$(trial "$p" "$pid" -c 16 -k 8)
    one=$(trial "$p" "$pid" -c 1 -k 1)
    hs=$(trial "$p" "$pid" --handshakes -c 4 --insecure)
    echo "$rep $label reports_16x8=$(kv reports_per_s "$many") us_16x8=$(kv server_cpu_us_per_op "$many")" \
      "p50ms_1x1=$(kv p50_ms "$one") us_1x1=$(kv server_cpu_us_per_op "$one")" \
      "handshakes=$(kv handshakes_per_s "$hs") us_handshake=$(kv server_cpu_us_per_op "$hs")"
  done
done | tee "$TMP/trials"

echo
awk -v first="${LABELS[0]}" '
  function median(list, n,   a, i, j, t) {
    n = split(list, a, " ")
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  {
    rep = $1; label = $2
    if (!(label in seen)) { seen[label] = 1; order[++nl] = label }
    for (i = 3; i <= NF; i++) {
      split($i, kv, "=")
      if (kv[2] == "") continue
      if (!(kv[1] in fseen)) { fseen[kv[1]] = 1; fig[++nf] = kv[1] }
      v[kv[1], label] = v[kv[1], label] " " kv[2]
      at[kv[1], label, rep] = kv[2]
      if (label == first) reps[rep] = 1
    }
  }
  END {
    for (f = 1; f <= nf; f++) {
      k = fig[f]; line = sprintf("%-13s", k)
      for (l = 1; l <= nl; l++) {
        lb = order[l]; n = split(v[k, lb], xs, " ")
        lo = xs[1]; hi = xs[1]
        for (i = 1; i <= n; i++) { if (xs[i] < lo) lo = xs[i]; if (xs[i] > hi) hi = xs[i] }
        line = line sprintf("  %s %s [%s-%s]", lb, median(v[k, lb]), lo, hi)
        if (lb != first) {
          ratios = ""
          for (r in reps) if (at[k, first, r] > 0 && at[k, lb, r] != "") ratios = ratios " " at[k, lb, r] / at[k, first, r]
          if (ratios != "") line = line sprintf(" (%s/%s per repetition: median %.3f)", lb, first, median(ratios))
        }
      }
      print line
    }
  }' "$TMP/trials"
