#!/usr/bin/env bash
# Runs the fuzz targets, each for SECONDS, and prints their statistics.
#
#   fuzz/run.sh SECONDS [TARGET...]     (default: every target)
#
# Only stable Rust is needed: cargo-fuzz builds with nightly flags
# (-Zsanitizer=address), which stable rustc accepts under RUSTC_BOOTSTRAP=1.
# Seeds are read from fuzz/corpus/TARGET (checked in, written by
# `QUIC_REPORT_WRITE_CORPUS=1 cargo test -p quic-report-tests --test
# fuzz_corpus`); what libFuzzer finds goes to fuzz/work/TARGET (ignored by
# git), crashes to fuzz/artifacts/TARGET. Exits non-zero if a target failed.
set -uo pipefail

secs=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
cd "$(dirname "$0")"

export RUSTC_BOOTSTRAP=1
# BoringSSL is built with -fsanitize=address too (the cc crate follows
# RUSTFLAGS), and its duplicated constants trip ASan's ODR check.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_odr_violation=0}

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "run.sh: installing cargo-fuzz"
    cargo install cargo-fuzz --locked || exit 1
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list --fuzz-dir .)
fi

failed=()
summary=()
for t in "${targets[@]}"; do
    mkdir -p "work/$t" "corpus/$t"
    log="work/$t.log"
    echo "== $t: ${secs}s (log: fuzz/$log)"
    # -a: debug assertions and overflow checks in every Rust crate.
    # -timeout: an input that takes 10 s is a hang, reported like a crash.
    cargo fuzz run --fuzz-dir . -a "$t" "work/$t" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -max_len=16384 \
        -print_final_stats=1 >"$log" 2>&1
    status=$?
    grep -E '^#[0-9]+.*(INITED|pulse|DONE)|^==[0-9]+==|panicked|SUMMARY|Test unit written' "$log" | tail -n 12
    stat() { grep -o "stat::$1: *[0-9]*" "$log" | grep -o '[0-9]*$' | tail -n 1; }
    last=$(grep -E '^#[0-9]+[[:space:]].*cov: ' "$log" | tail -n 1)
    cov=$(grep -o 'cov: [0-9]*' <<<"$last" | grep -o '[0-9]*')
    ft=$(grep -o 'ft: [0-9]*' <<<"$last" | grep -o '[0-9]*')
    corp=$(grep -o 'corp: [0-9]*/[0-9]*[a-zA-Z]*' <<<"$last" | cut -d' ' -f2)
    line="$t: $(stat number_of_executed_units) execs, $(stat average_exec_per_sec) exec/s, cov $cov, ft $ft, corpus $corp, peak rss $(stat peak_rss_mb) MB"
    if [ $status -ne 0 ]; then
        line="$line, FAILED (exit $status; see fuzz/$log and fuzz/artifacts/$t/)"
        failed+=("$t")
    fi
    summary+=("$line")
done

echo
echo "== summary"
printf '%s\n' "${summary[@]}"
[ ${#failed[@]} -eq 0 ]
