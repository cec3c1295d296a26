#!/usr/bin/env bash
# scripts/bench.sh: the figures of `make bench`, on loopback, as one table.
#
#   scripts/bench.sh            the table (about 3 minutes)
#   scripts/bench.sh profile    the server under callgrind: Ir per report and
#                               per handshake, and the top functions
#                               (PROFILE_SINK=sqlite: into a new SQLite file
#                               per run instead of stdout; PROFILE_SERVER_ARGS
#                               adds server flags, e.g. "--fsync interval")
#
# It reports; it never fails on a figure. Environment:
#   QUIC_REPORT=path     the server, client and source (default
#                        target/release/quic-report)
#   QUIC_REPORT_BENCH=path  the load generator and UDP echo server (default
#                        target/release/quic-report-bench); build both first
#                        with `cargo build --release -p quic-report -p quic-report-bench`
#   BENCH_REPS=3         repetitions of every interleaved trial (medians)
#   BENCH_DURATION=2s    measured time of one trial (after BENCH_WARMUP=500ms)
#   BENCH_IDLE_SECS=30   how long the idle client is watched
#   BENCH_IDLE_CONNS=1000
#   QUIC_REPORT_PG_URL   a PostgreSQL for the database row (make bench runs
#                        this script under target/release/pg-cluster, which
#                        starts a private cluster and sets it); without it
#                        the PostgreSQL row is skipped (QUIC_REPORT_PG_DATA,
#                        also set by pg-cluster, names the cluster whose
#                        processes are measured)
#
# Method (shared/PERFORMANCE.md): the server (or the UDP echo server) runs
# pinned to CPU 1, the generator to CPU 0 (taskset, when there are two
# CPUs). Raw UDP and ours are interleaved trial by trial, and each ratio is
# taken within one repetition; the table shows the median and the min-max
# over the repetitions. Server CPU per operation comes from
# /proc/PID/task/*/schedstat (ns), read by the generator at the start and the
# end of the measured window; so do the database rows' parts (the server's
# loop and commit thread, PostgreSQL's processes, the generator), each with
# its run-queue wait (the second schedstat field).
set -uo pipefail

cd "$(dirname "$0")/.."
B=${QUIC_REPORT:-${CARGO_TARGET_DIR:-target}/release/quic-report}
BENCH=${QUIC_REPORT_BENCH:-${CARGO_TARGET_DIR:-target}/release/quic-report-bench}
REPS=${BENCH_REPS:-3}
DUR=${BENCH_DURATION:-2s}
WARM=${BENCH_WARMUP:-500ms}
IDLE_SECS=${BENCH_IDLE_SECS:-30}
IDLE_CONNS=${BENCH_IDLE_CONNS:-1000}
MODE=${1:-table}

for bin in "$B" "$BENCH"; do
  if [[ ! -x $bin ]]; then
    echo "bench: $bin not found; run: cargo build --release -p quic-report -p quic-report-bench" >&2
    exit 1
  fi
done

TMP=$(mktemp -d /tmp/quic-report-bench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do
    kill "$p" 2>/dev/null
  done
  for p in "${PIDS[@]}"; do
    wait "$p" 2>/dev/null
  done
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

SRV_PIN=() GEN_PIN=()
if command -v taskset >/dev/null && (($(nproc) >= 2)); then
  SRV_PIN=(taskset -c 1)
  GEN_PIN=(taskset -c 0)
  PINNING="server on CPU 1, generator on CPU 0"
else
  PINNING="not pinned (no taskset, or one CPU)"
fi

# A free UDP port: random, checked with ss when it exists.
free_port() {
  local p
  for _ in $(seq 50); do
    p=$((20000 + RANDOM % 30000))
    # Free for UDP (the servers) and TCP (their --metrics) alike.
    if ! command -v ss >/dev/null || ! ss -Hlutn "sport = :$p" | grep -q .; then
      echo "$p"
      return
    fi
  done
  echo $((20000 + RANDOM % 30000))
}

# Waits until something listens on UDP port $1 (or 3 s).
wait_udp() {
  for _ in $(seq 60); do
    if command -v ss >/dev/null; then
      ss -Hlun "sport = :$1" | grep -q . && return 0
    else
      sleep 0.3 && return 0
    fi
    sleep 0.05
  done
  echo "bench: nothing listens on UDP $1" >&2
  return 1
}

# Starts our server on port $1 (RUST_LOG=$2), pinned; its PID in $SPID.
start_server() {
  RUST_LOG=$2 "${SRV_PIN[@]}" "$B" server --listen "127.0.0.1:$1" "${@:3}" >/dev/null 2>>"$TMP/server.log" &
  SPID=$!
  PIDS+=("$SPID")
  wait_udp "$1" || true
}

stop() {
  kill "$1" 2>/dev/null
  wait "$1" 2>/dev/null
}

# key=value from a line
kv() { grep -o "\b$1=[^ ]*" <<<"$2" | head -1 | cut -d= -f2; }

# median / min / max of the arguments (numbers; "nan" if none)
stat3() {
  printf '%s\n' "$@" | grep -E '^-?[0-9.]+(e[-+]?[0-9]+)?$' | sort -g | awk '
    { a[NR] = $1 }
    END {
      if (NR == 0) { print "nan nan nan"; exit }
      m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
      print m, a[1], a[NR]
    }'
}
med() { stat3 "$@" | cut -d' ' -f1; }
range() { stat3 "$@" | awk '{ printf "%s-%s", $2, $3 }'; }

# Machine load outside our processes: busy share of all CPUs over 1 s.
machine_busy() {
  local a b
  a=($(head -1 /proc/stat))
  sleep 1
  b=($(head -1 /proc/stat))
  awk -v a="${a[*]}" -v b="${b[*]}" 'BEGIN {
    split(a, x); split(b, y); tot = 0; idle = 0
    for (i = 2; i <= 11 && i in x; i++) tot += y[i] - x[i]
    idle = (y[5] - x[5]) + (y[6] - x[6])
    printf "%.0f", (tot > 0 ? 100 * (tot - idle) / tot : 0)
  }'
}

preflight() {
  local busy
  for _ in 1 2 3 4 5; do
    busy=$(machine_busy)
    ((busy <= 5)) && break
    echo "bench: the machine is ${busy}% busy; waiting for a quiet moment" >&2
    sleep 2
  done
  echo "$busy"
}

# The generator, pinned; stdout = result line, stderr detail in $TMP/detail.
gen() {
  "${GEN_PIN[@]}" "$BENCH" "$@" 2>"$TMP/gen.err"
  grep '^detail:' "$TMP/gen.err" >"$TMP/detail" || true
  grep -v '^detail:' "$TMP/gen.err" | grep -v ' INFO ' | grep -v 'insecure: the server' >&2 || true
}
detail() { kv "$1" "$(cat "$TMP/detail")"; }

# One trial: the generator with "$@"; the result line in $OUT. On this shared
# machine a trial during which other processes took more than MAX_OTHER CPUs
# (other_cpu_util, from /proc/stat) is run again, up to 3 more times; the
# last one counts then, and is reported as contended.
# At most MAX_RETRIES reruns in all, to keep `make bench` near 3-5 minutes.
MAX_OTHER=${BENCH_MAX_OTHER:-0.15}
MAX_RETRIES=${BENCH_MAX_RETRIES:-15}
RETRIED=0 CONTENDED=0
trial() {
  local attempt o
  for attempt in 1 2 3 4; do
    OUT=$(gen "$@")
    o=$(detail other_cpu_util)
    if [[ -z $o ]] || awk -v o="$o" -v m="$MAX_OTHER" 'BEGIN { exit !(o <= m) }'; then
      return
    fi
    if ((attempt == 4 || RETRIED >= MAX_RETRIES)); then
      break
    fi
    RETRIED=$((RETRIED + 1))
    sleep 2
  done
  CONTENDED=$((CONTENDED + 1))
}

# ----------------------------------------------------------------------------
# Functions of callgrind file $2 minus those of $1 (exclusive, or inclusive
# if $3 = yes), merged by function name over inlined source files: the
# cost of what run $2 did more than run $1. Top $4 lines.
cg_diff_top() {
  local a b
  a=$(callgrind_annotate --auto=no --inclusive="$3" --threshold=100 "$1" 2>/dev/null)
  b=$(callgrind_annotate --auto=no --inclusive="$3" --threshold=100 "$2" 2>/dev/null)
  awk -v top="$4" '
    function key(line,   k) {
      k = line
      sub(/^[ ]*[0-9,]+ +\([ 0-9.]+%\) +/, "", k)   # count and percentage
      sub(/^[^:]*:/, "", k)                         # source file
      sub(/ \[[^]]*\]$/, "", k)                     # object file
      return k
    }
    /^[ ]*[0-9,]+ +\(/ {
      n = $1; gsub(/,/, "", n)
      if (FNR == NR) { A[key($0)] += n } else { B[key($0)] += n }
    }
    END {
      for (k in B) { d = B[k] - A[k]; if (d > 0) D[k] = d }
      tot = 0
      for (k in D) if (k ~ /PROGRAM TOTALS/) tot = D[k]
      n = 0
      for (k in D) { keys[++n] = k }
      # selection sort of the top entries (small n)
      for (i = 1; i <= top && i <= n; i++) {
        m = i
        for (j = i + 1; j <= n; j++) if (D[keys[j]] > D[keys[m]]) m = j
        t = keys[i]; keys[i] = keys[m]; keys[m] = t
        if (keys[i] ~ /PROGRAM TOTALS/) { continue }
        printf "%14.0f %6.2f%%  %s\n", D[keys[i]], (tot > 0 ? 100 * D[keys[i]] / tot : 0), substr(keys[i], 1, 150)
      }
    }' <(echo "$a") <(echo "$b")
}

profile() {
  command -v valgrind >/dev/null || { echo "bench profile: valgrind is missing" >&2; exit 1; }
  local port n1=${PROFILE_REPORTS_SMALL:-4000} n2=${PROFILE_REPORTS:-20000} hs=${PROFILE_HANDSHAKES:-200}
  echo "tool: valgrind --tool=callgrind (this machine has no hardware perf counters); server: RUST_LOG=warn, stdout to /dev/null, sink ${PROFILE_SINK:-stdout} ${PROFILE_SERVER_ARGS:-}"
  echo "generator native: reports C=16 K=8 (fixed counts $n1 and $n2), handshakes 4 workers (0 and $hs)"
  local -A ir
  for what in r$n1 r$n2 h0 h$hs; do
    port=$(free_port)
    local sink=()
    [[ ${PROFILE_SINK:-stdout} == sqlite ]] && sink=(--sink "sqlite:$TMP/profile.$what.db")
    # shellcheck disable=SC2086 # PROFILE_SERVER_ARGS is a list of flags
    RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$TMP/cg.$what" \
      "$B" server --listen "127.0.0.1:$port" "${sink[@]}" ${PROFILE_SERVER_ARGS:-} \
      >/dev/null 2>>"$TMP/valgrind.log" &
    local pid=$!
    PIDS+=("$pid")
    wait_udp "$port" || true
    sleep 1
    case $what in
      r*) gen --server "127.0.0.1:$port" -c 16 -k 8 --warmup 0s -d 600s --count "${what#r}" >/dev/null ;;
      h*) if [[ ${what#h} -gt 0 ]]; then
            gen --server "127.0.0.1:$port" --handshakes -c 4 --warmup 0s -d 600s --count "${what#h}" >/dev/null
          fi ;;
    esac
    kill -INT "$pid"
    wait "$pid" 2>/dev/null
    ir[$what]=$(grep -m1 '^summary:' "$TMP/cg.$what" | awk '{print $2}')
    echo "run $what: ${ir[$what]} Ir"
  done
  echo "server start + stop (two quiche configs, SSL_CERT_FILE=${SSL_CERT_FILE:-unset}): ${ir[h0]} Ir"
  # Both report runs open the same 16 connections, so their difference is reports only.
  awk -v a="${ir[r$n1]}" -v b="${ir[r$n2]}" -v n=$((n2 - n1)) \
    'BEGIN { printf "Ir per report (C=16 K=8, difference of two runs): %.0f\n", (b - a) / n }'
  awk -v a="${ir[h0]}" -v b="${ir[h$hs]}" -v n="$hs" \
    'BEGIN { printf "Ir per handshake (connect + 1 report + close): %.0f\n", (b - a) / n }'
  echo
  echo "== per report: top functions, exclusive (run r$n2 minus run r$n1) =="
  cg_diff_top "$TMP/cg.r$n1" "$TMP/cg.r$n2" no 30
  echo
  echo "== per report: inclusive =="
  cg_diff_top "$TMP/cg.r$n1" "$TMP/cg.r$n2" yes 45
  echo
  echo "== per handshake: top functions, exclusive (run h$hs minus run h0) =="
  cg_diff_top "$TMP/cg.h0" "$TMP/cg.h$hs" no 30
  echo
  echo "== per handshake: inclusive =="
  cg_diff_top "$TMP/cg.h0" "$TMP/cg.h$hs" yes 45
  mkdir -p target/bench
  cp "$TMP"/cg.* target/bench/ 2>/dev/null
  echo
  echo "callgrind files kept in target/bench/ (e.g. callgrind_annotate target/bench/cg.r$n2)"
}

if [[ $MODE == profile ]]; then
  profile
  exit 0
fi

# ----------------------------------------------------------------------------
echo "quic-report bench: $(date -u +%FT%TZ), $(nproc) CPU ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(uname -r)"
echo "pinning: $PINNING; $REPS repetitions; trials of $WARM warm-up + $DUR, interleaved raw/ours"
echo "machine busy before start: $(preflight)% (other processes; want <= 5%)"

PORT=$(free_port)
start_server "$PORT" warn
SRV=$SPID
PORT_INFO=$(free_port)
start_server "$PORT_INFO" info
SRV_INFO=$SPID
# Mutual TLS: the same server requiring client certificates of the dev CA;
# the generator presents certs/clients/device-1.pem.
PORT_MTLS=$(free_port)
start_server "$PORT_MTLS" warn --client-ca certs/ca.pem
SRV_MTLS=$SPID
MTLS_CERT=(--cert certs/clients/device-1.pem --key certs/clients/device-1.key)
EPORT=$(free_port)
"${SRV_PIN[@]}" "$BENCH" --echo-server "127.0.0.1:$EPORT" 2>>"$TMP/echo.log" &
ECHO=$!
PIDS+=("$ECHO")
wait_udp "$EPORT" || true
# The same echo with recvmmsg/sendmmsg: what batching the syscalls is worth.
EPORT_B=$(free_port)
"${SRV_PIN[@]}" "$BENCH" --echo-server "127.0.0.1:$EPORT_B" --echo-batch 2>>"$TMP/echo.log" &
ECHO_B=$!
PIDS+=("$ECHO_B")
wait_udp "$EPORT_B" || true

# Key exchange group and signature of the handshakes (quiche logs them at trace).
# Database sinks (README "Scaling out"): servers recording into SQLite and
# PostgreSQL, acknowledging after each commit; their /metrics give the rows
# per commit and the commit latency of each trial.
# sqlite-interval: the same under --fsync interval (synchronous=NORMAL, the
# WAL synced within 100 ms after the acknowledgement, as a file sink's
# default): what the per-commit fsync costs.
DBS=(sqlite sqlite-interval)
[[ -n ${QUIC_REPORT_PG_URL:-} ]] && DBS+=(postgres)
declare -A DBPORT DBMET DBPID
for db in "${DBS[@]}"; do
  dbflags=()
  case $db in
    sqlite) sink="sqlite:$TMP/bench.db" ;;
    sqlite-interval) sink="sqlite:$TMP/bench-interval.db" dbflags=(--fsync interval) ;;
    postgres) sink=$QUIC_REPORT_PG_URL ;;
  esac
  DBPORT[$db]=$(free_port)
  DBMET[$db]=$(free_port)
  RUST_LOG=warn "${SRV_PIN[@]}" "$B" server --listen "127.0.0.1:${DBPORT[$db]}" --sink "$sink" \
    "${dbflags[@]}" --metrics "127.0.0.1:${DBMET[$db]}" >/dev/null 2>>"$TMP/server-$db.log" &
  DBPID[$db]=$!
  PIDS+=("${DBPID[$db]}")
  wait_udp "${DBPORT[$db]}" || true
done
# The private cluster's processes (its postmaster and the postmaster's
# children: our connection's backend, the WAL writer, ...), comma-separated,
# for the generator's --database-pids.
pg_pids() {
  local pm s rest ppid pids
  pm=$(head -1 "${QUIC_REPORT_PG_DATA:-/nonexistent}/postmaster.pid" 2>/dev/null) || return 0
  pids=$pm
  for s in /proc/[0-9]*/stat; do
    rest=$(cat "$s" 2>/dev/null) || continue
    rest=${rest##*) } # the fields after the command name
    read -r _ ppid _ <<<"$rest"
    if [[ $ppid == "$pm" ]]; then
      s=${s#/proc/}
      pids+=",${s%/stat}"
    fi
  done
  echo "$pids"
}
# CPU per report of arm $1's trial just run, by part, from its detail:
# the generator, the server's loop (its main thread), its commit thread
# (`sink`) and the database's processes; each with its run-queue wait
# (time runnable but waiting for a CPU).
thread_time() { tr ',' '\n' <<<"$(detail server_threads)" | awk -F'[:+]' -v n="$1" '$1 == n { print $2, $3 }'; }
record_parts() {
  local cpu wait
  add "gcpu_$1" "$(detail generator_cpu_us_per_op)"
  add "gwait_$1" "$(detail generator_wait_us_per_op)"
  read -r cpu wait <<<"$(thread_time main)"
  add "lcpu_$1" "$cpu"
  add "lwait_$1" "$wait"
  read -r cpu wait <<<"$(thread_time sink)"
  add "scpu_$1" "$cpu"
  add "swait_$1" "$wait"
  add "dcpu_$1" "$(detail database_cpu_us_per_op)"
  add "dwait_$1" "$(detail database_wait_us_per_op)"
}

# "rows_sum rows_count commit_seconds_sum commit_count" of server $1's metrics
sink_sample() {
  curl -s "http://127.0.0.1:${DBMET[$1]}/metrics" | awk '
    /^quic_report_sink_batch_rows_sum / { rs = $2 } /^quic_report_sink_batch_rows_count / { rc = $2 }
    /^quic_report_sink_commit_seconds_sum / { cs = $2 } /^quic_report_sink_commit_seconds_count / { cc = $2 }
    END { print rs + 0, rc + 0, cs + 0, cc + 0 }'
}

GROUP=$(RUST_LOG=warn,quiche=trace "$BENCH" --server "127.0.0.1:$PORT" --handshakes -c 1 \
  --warmup 0s -d 50ms 2>&1 >/dev/null | grep -o 'curve=Some("[^"]*") sigalg=Some("[^"]*")' | head -1 |
  sed 's/Some("\([^"]*\)")/\1/g')
echo "handshakes: ${GROUP:-group not logged} (quiche 0.30 default groups; certificate: development ECDSA P-256)"

declare -A R
add() { R[$1]="${R[$1]:-} $2"; }
SHAPES=("1 1" "1 32" "16 1" "16 8")
for rep in $(seq "$REPS"); do
  for shape in "${SHAPES[@]}"; do
    read -r c k <<<"$shape"
    id="${c}x$k"
    trial --udp-echo --echo-addr "127.0.0.1:$EPORT" -c "$c" -k "$k" -d "$DUR" --warmup "$WARM" --server-pid "$ECHO"
    out=$OUT
    raw=$(kv round_trips_per_s "$out")
    add "rawoth_$id" "$(detail other_cpu_util)"
    add "raw_$id" "$raw"
    add "rawcpu_$id" "$(detail server_cpu_us_per_op)"
    add "rawp50_$id" "$(kv p50_ms "$out")"
    add "rawp99_$id" "$(kv p99_ms "$out")"
    trial --server "127.0.0.1:$PORT" -c "$c" -k "$k" -d "$DUR" --warmup "$WARM" --server-pid "$SRV"
    out=$OUT
    ours=$(kv reports_per_s "$out")
    add "oth_$id" "$(detail other_cpu_util)"
    add "ours_$id" "$ours"
    add "err_$id" "$(kv errors "$out")"
    add "p50_$id" "$(kv p50_ms "$out")"
    add "p99_$id" "$(kv p99_ms "$out")"
    add "cpu_$id" "$(detail server_cpu_us_per_op)"
    add "gutil_$id" "$(detail generator_cpu_util)"
    add "sutil_$id" "$(detail server_cpu_util)"
    add "dg_$id" "$(detail dgrams_out_per_op)/$(detail dgrams_in_per_op)"
    add "ratio_$id" "$(awk -v a="$ours" -v b="$raw" 'BEGIN { if (b > 0) printf "%.3f", a / b }')"
    if [[ $id == 16x8 ]]; then
      record_parts stdout
      trial --udp-echo --echo-addr "127.0.0.1:$EPORT_B" -c "$c" -k "$k" -d "$DUR" --warmup "$WARM" --server-pid "$ECHO_B"
      add "rawb_$id" "$(kv round_trips_per_s "$OUT")"
      add "rawbcpu_$id" "$(detail server_cpu_us_per_op)"
      trial --server "127.0.0.1:$PORT_INFO" -c "$c" -k "$k" -d "$DUR" --warmup "$WARM" --server-pid "$SRV_INFO"
      add "info_$id" "$(kv reports_per_s "$OUT")"
      add "infocpu_$id" "$(detail server_cpu_us_per_op)"
      for db in "${DBS[@]}"; do
        read -r rs0 rc0 cs0 cc0 <<<"$(sink_sample "$db")"
        dbargs=()
        [[ $db == postgres ]] && dbargs=(--database-pids "$(pg_pids)")
        trial --server "127.0.0.1:${DBPORT[$db]}" -c "$c" -k "$k" -d "$DUR" --warmup "$WARM" --server-pid "${DBPID[$db]}" "${dbargs[@]}"
        out=$OUT
        record_parts "$db"
        sleep 0.3 # the metrics snapshot is published every 100 ms
        read -r rs1 rc1 cs1 cc1 <<<"$(sink_sample "$db")"
        rate=$(kv reports_per_s "$out")
        add "db_$db" "$rate"
        add "dbratio_$db" "$(awk -v a="$rate" -v b="$ours" 'BEGIN { if (b > 0) printf "%.3f", a / b }')"
        add "dbp50_$db" "$(kv p50_ms "$out")"
        add "dbp99_$db" "$(kv p99_ms "$out")"
        add "dberr_$db" "$(kv errors "$out")"
        add "dbcpu_$db" "$(detail server_cpu_us_per_op)"
        add "dbrows_$db" "$(awk -v a="$rs0" -v b="$rs1" -v n="$rc0" -v m="$rc1" 'BEGIN { if (m > n) printf "%.1f", (b - a) / (m - n) }')"
        add "dbms_$db" "$(awk -v a="$cs0" -v b="$cs1" -v n="$cc0" -v m="$cc1" 'BEGIN { if (m > n) printf "%.2f", 1e3 * (b - a) / (m - n) }')"
      done
    fi
  done
  # 4v: the generator verifies the certificate chain too (what a real
  # client does); the others skip it (--insecure) so that the generator's
  # one core goes to the handshake itself. The server's work is the same.
  # 4m: mutual TLS (the server verifies the generator's certificate and
  # reads its name), beside the 4-worker row without.
  for w in 1 4 4v 4m; do
    hs_args=(-c "${w%[vm]}")
    [[ $w == *v ]] || hs_args+=(--insecure)
    hs_port=$PORT hs_pid=$SRV
    if [[ $w == *m ]]; then
      hs_args+=("${MTLS_CERT[@]}")
      hs_port=$PORT_MTLS hs_pid=$SRV_MTLS
    fi
    trial --server "127.0.0.1:$hs_port" --handshakes "${hs_args[@]}" -d "$DUR" --warmup "$WARM" --server-pid "$hs_pid"
    add "hs_$w" "$(kv handshakes_per_s "$OUT")"
    add "hsoth_$w" "$(detail other_cpu_util)"
    add "hscpu_$w" "$(detail server_cpu_us_per_op)"
    add "hsgcpu_$w" "$(detail generator_cpu_us_per_op)"
    add "hsgutil_$w" "$(detail generator_cpu_util)"
    add "hsp50_$w" "$(detail p50_ms)"
    add "hsp99_$w" "$(detail p99_ms)"
    add "hserr_$w" "$(detail errors)"
    add "hsdg_$w" "$(detail dgrams_out_per_op)/$(detail dgrams_in_per_op)"
  done
done
stop "$SRV_INFO"
stop "$SRV_MTLS"

# Memory per idle connection: a fresh server each time.
for rep in $(seq "$REPS"); do
  p=$(free_port)
  start_server "$p" warn
  s=$SPID
  sleep 0.2
  out=$(gen --server "127.0.0.1:$p" --idle-connections "$IDLE_CONNS" --hold 1s --server-pid "$s")
  add mem_srv "$(kv server_kb_per_conn "$out")"
  add mem_cli "$(kv client_kb_per_conn "$out")"
  add mem_err "$(kv errors "$out")"
  add mem_before "$(detail server_rss_kb_before)"
  stop "$s"
done

# Idle cost of a real client reporting every 2 s.
SPORT=$(free_port)
"${SRV_PIN[@]}" "$B" source --listen "127.0.0.1:$SPORT" >/dev/null 2>>"$TMP/source.log" &
SOURCE=$!
PIDS+=("$SOURCE")
sleep 0.3
"${GEN_PIN[@]}" "$B" client --server "127.0.0.1:$PORT" --source "http://127.0.0.1:$SPORT/" --interval 2s \
  >"$TMP/client.out" 2>"$TMP/client.log" &
CLIENT=$!
PIDS+=("$CLIENT")
for _ in $(seq 100); do
  grep -q '^ack' "$TMP/client.out" 2>/dev/null && break
  sleep 0.05
done
# CPU (schedstat ns, and utime+stime ticks) and voluntary context switches,
# summed over the client's threads; acknowledgements so far.
client_sample() {
  local ns=0 vcs=0 t
  for t in /proc/"$CLIENT"/task/*; do
    ns=$((ns + $(cut -d' ' -f1 "$t/schedstat" 2>/dev/null || echo 0)))
    vcs=$((vcs + $(awk '/^voluntary_ctxt_switches/ { print $2 }' "$t/status" 2>/dev/null || echo 0)))
  done
  local ticks
  ticks=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' /proc/"$CLIENT"/stat 2>/dev/null)
  echo "$ns $vcs ${ticks:-0} $(grep -c '^ack' "$TMP/client.out")"
}
# Per thread (by name): CPU ns and voluntary switches.
client_threads() {
  local t
  for t in /proc/"$CLIENT"/task/*; do
    printf '%s %s %s\n' "$(tr ' ' _ <"$t/comm")" "$(cut -d' ' -f1 "$t/schedstat")" \
      "$(awk '/^voluntary_ctxt_switches/ { print $2 }' "$t/status")"
  done 2>/dev/null | sort
}
read -r ns0 vcs0 t0 a0 <<<"$(client_sample)"
client_threads >"$TMP/threads0"
sleep "$IDLE_SECS"
read -r ns1 vcs1 t1 a1 <<<"$(client_sample)"
client_threads >"$TMP/threads1"
kill -INT "$CLIENT" 2>/dev/null
wait "$CLIENT" 2>/dev/null
stop "$SOURCE"
IDLE_REPORTS=$((a1 - a0))
IDLE_THREADS=$(join "$TMP/threads0" "$TMP/threads1" | awk -v n="$IDLE_REPORTS" '
  { if (n < 1) n = 1; printf "%s%s %.0f us + %.1f switches", sep, $1, ($4 - $2) / 1e3 / n, ($5 - $3) / n; sep = "; " }')
CLK=$(getconf CLK_TCK)
IDLE=$(awk -v ns=$((ns1 - ns0)) -v v=$((vcs1 - vcs0)) -v t=$((t1 - t0)) -v n="$IDLE_REPORTS" -v s="$IDLE_SECS" -v hz="$CLK" \
  'BEGIN { if (n < 1) n = 1
           printf "%.0f us CPU/report (schedstat; utime+stime: %d ticks of %.0f ms in %d s), %.1f voluntary switches/report, %.4f%% of a core", ns / 1e3 / n, t, 1000 / hz, s, v / n, 100 * ns / 1e9 / s }')

# The machine's own cost of one handshake's crypto.
CRYPTO="openssl not found"
if command -v openssl >/dev/null; then
  ossl=$("${SRV_PIN[@]}" openssl speed -seconds 1 ecdhx25519 ecdsap256 2>/dev/null)
  x=$(awk '/X25519/ && /ecdh/ { print $NF }' <<<"$ossl" | tail -1)
  read -r sign verify < <(awk '/ecdsa/ && /nistp256/ { print $(NF-1), $NF }' <<<"$ossl" | tail -1)
  CRYPTO=$(awk -v x="$x" -v s="$sign" -v v="$verify" 'BEGIN {
    if (x > 0 && s > 0 && v > 0)
      printf "X25519 %.0f/s (%.0f us), ECDSA P-256 sign %.0f/s (%.0f us), verify %.0f/s (%.0f us): server side of a handshake (keygen + derive + sign) >= %.0f us, client side (keygen + derive + verify x2) >= %.0f us; ML-KEM-768 not in %s",
        x, 1e6 / x, s, 1e6 / s, v, 1e6 / v, 2e6 / x + 1e6 / s, 2e6 / x + 2e6 / v, "OpenSSL 3.0"
    else print "could not parse openssl speed" }')
  CRYPTO="$(openssl version | cut -d' ' -f1-2): $CRYPTO"
fi
BUSY_END=$(machine_busy)
stop "$SRV"

# ----------------------------------------------------------------------------
f() { printf "%s (%s)" "$(med ${R[$1]})" "$(range ${R[$1]})"; }
m() { med ${R[$1]}; }
echo
printf '%-34s %-30s %-30s %-24s %-16s %-16s\n' "reports (C conns x K in flight)" "raw UDP echo RT/s" "ours acked reports/s" "ours / raw (per rep)" "p50 / p99 ms" "errors"
for shape in "${SHAPES[@]}"; do
  read -r c k <<<"$shape"
  id="${c}x$k"
  printf '%-34s %-30s %-30s %-24s %-16s %-16s\n' "C=$c K=$k" "$(f raw_$id)" "$(f ours_$id)" "$(f ratio_$id)" \
    "$(m p50_$id) / $(m p99_$id)" "$(echo ${R[err_$id]} | tr ' ' '+')"
done
echo
printf '%-34s %-14s %-16s %-12s %-10s %-14s %-18s %-12s\n' "CPU per operation (median)" "server us/op" "raw echo us/RT" "server util" "gen util" "dgrams out/in" "raw p50 / p99 ms" "other CPUs"
for shape in "${SHAPES[@]}"; do
  read -r c k <<<"$shape"
  id="${c}x$k"
  printf '%-34s %-14s %-16s %-12s %-10s %-14s %-18s %-12s\n' "reports C=$c K=$k" "$(m cpu_$id)" "$(m rawcpu_$id)" \
    "$(m sutil_$id)" "$(m gutil_$id)" "$(echo ${R[dg_$id]} | cut -d' ' -f1)" "$(m rawp50_$id) / $(m rawp99_$id)" \
    "$(m oth_$id) / $(m rawoth_$id)"
done
printf '%-34s %-14s %-16s\n' "reports C=16 K=8, RUST_LOG=info" "$(m infocpu_16x8)" ""
echo "  (the server's default log level: one log line per report; $(m info_16x8) reports/s vs $(m ours_16x8) at warn)"
printf '%-34s %-14s %-16s\n' "raw echo C=16 K=8, recvmmsg/sendmmsg" "" "$(m rawbcpu_16x8)"
echo "  (batched echo: $(m rawb_16x8) RT/s vs $(m raw_16x8) with one recvfrom/sendto per datagram)"
echo
printf '%-34s %-26s %-24s %-16s %-14s %-16s %-12s %-10s\n' "database sinks, C=16 K=8" "acked reports/s" "/ stdout (per rep)" "p50 / p99 ms" "server us/op" "rows per commit" "commit ms" "errors"
for db in "${DBS[@]}"; do
  printf '%-34s %-26s %-24s %-16s %-14s %-16s %-12s %-10s\n' "$db (ack after commit)" "$(f db_$db)" "$(f dbratio_$db)" \
    "$(m dbp50_$db) / $(m dbp99_$db)" "$(m dbcpu_$db)" "$(m dbrows_$db)" "$(m dbms_$db)" "$(echo ${R[dberr_$db]} | tr ' ' '+')"
done
[[ -n ${QUIC_REPORT_PG_URL:-} ]] || echo "  (no QUIC_REPORT_PG_URL: the PostgreSQL row needs a database; make bench starts a private cluster)"
echo "  (stdout: the C=16 K=8 row above; the ratio is taken per repetition; rows per commit and commit ms are means over each trial, from the server's /metrics)"
printf '%-34s %-18s %-18s %-18s %-18s\n' "CPU per report, C=16 K=8 (us)" "generator" "server loop" "commit thread" "database"
# "CPU + wait" of part $1 (g, l, s, d as in record_parts) of arm $2, if measured.
part() { [[ $(m "${1}cpu_$2") == nan ]] || printf '%s + %s' "$(m "${1}cpu_$2")" "$(m "${1}wait_$2")"; }
for arm in stdout "${DBS[@]}"; do
  printf '%-34s %-18s %-18s %-18s %-18s\n' "$arm" "$(part g "$arm")" "$(part l "$arm")" "$(part s "$arm")" "$(part d "$arm")"
done
echo "  (medians; each part's CPU time + its run-queue wait (runnable, waiting for a CPU), per acknowledged report, from schedstat over the measured window; database: the private cluster's postmaster and its children)"
echo
printf '%-34s %-26s %-14s %-12s %-10s %-16s %-10s %-10s\n' "handshakes (connect+report+close)" "handshakes/s" "server us/hs" "gen us/hs" "gen util" "p50 / p99 ms" "errors" "other CPUs"
for w in 1 4 4v 4m; do
  label="${w%[vm]} worker(s)"
  [[ $w == *v ]] && label="${w%v} workers, chain verified"
  [[ $w == *m ]] && label="${w%m} workers, client certificates"
  printf '%-34s %-26s %-14s %-12s %-10s %-16s %-10s %-10s\n' "$label" "$(f hs_$w)" "$(m hscpu_$w)" "$(m hsgcpu_$w)" \
    "$(m hsgutil_$w)" "$(m hsp50_$w) / $(m hsp99_$w)" "$(echo ${R[hserr_$w]} | tr ' ' '+')" "$(m hsoth_$w)"
done
echo "  (the generator skips certificate chain verification except on the 'chain verified' row: one ECDSA verify less for its core; the server's work is the same; 'client certificates': mutual TLS, server --client-ca, the generator presents certs/clients/device-1.pem, so the server also verifies a chain and the client signs once more)"
echo "  server capacity at that CPU cost: $(awk -v c="$(m hscpu_4)" 'BEGIN { if (c > 0) printf "%.0f", 1e6 / c }') handshakes/s per core; datagrams out/in per handshake: $(echo ${R[hsdg_4]} | cut -d' ' -f1); ${GROUP:-group unknown}"
echo
echo "idle connections ($IDLE_CONNS, one report each): server $(f mem_srv) KB RSS per connection (VmRSS before: $(m mem_before) KB); generator $(m mem_cli) KB per Client core; errors $(echo ${R[mem_err]} | tr ' ' '+')"
echo "idle client (quic-report client, --interval 2s, ${IDLE_SECS}s, $IDLE_REPORTS reports): $IDLE"
echo "  per thread, per report: $IDLE_THREADS"
echo "crypto reference: $CRYPTO"
echo "machine busy after: ${BUSY_END}%; trials rerun for contention (other processes > $MAX_OTHER CPU): $RETRIED; kept although contended: $CONTENDED"
echo "other CPUs: CPUs' worth of time other processes used during each trial (ours / raw), from /proc/stat"
