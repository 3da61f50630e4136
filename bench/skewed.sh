#!/usr/bin/env bash
# The skewed-suite benchmark of dtf's duration history (figures in docs/reports.md).
#
# The fixture's `rep_skew_` tests: twenty tests of 100 ms and one of 1000 ms, the long one last
# by name. On SLOTS slots (default 2) the run is timed RUNS times (default 7) without history
# (an empty history directory before each run: name order) and with history (recorded by one
# warm-up run: longest first), and the medians are set against the lower bound
# max(longest, total/slots) computed from the durations the history measured.
#
# Usage: bench/skewed.sh [RUNS] [SLOTS]
set -euo pipefail

runs=${1:-7}
slots=${2:-2}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

bin=$(cargo build --quiet -p dtf-fixture --test fixture --message-format=json \
    | grep '"reason":"compiler-artifact"' | grep '"name":"fixture"' \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
[ -x "$bin" ] || { echo "cannot find the fixture binary" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# One timed run: prints its wall time in seconds.
timed() {
    local dir=$1 start end
    start=$(date +%s%N)
    DTF_HISTORY_DIR=$dir RUST_BACKTRACE=0 "$bin" rep_skew_ --test-threads "$slots" --format terse \
        >/dev/null
    end=$(date +%s%N)
    awk -v ns=$((end - start)) 'BEGIN { printf "%.3f\n", ns / 1e9 }'
}

median() {
    sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

cold=()
warm=()
timed "$work/warm" >/dev/null # records the history
for _ in $(seq "$runs"); do
    rm -rf "$work/cold"
    cold+=("$(timed "$work/cold")")
    warm+=("$(timed "$work/warm")")
done

# The lower bound from the durations the history recorded (process start-up included).
bound=$(tr ',{}' '\n\n\n' <"$work/warm/dtf-fixture.fixture.json" \
    | sed -n 's/.*"last_secs":\([0-9.e-]*\).*/\1/p' \
    | awk -v slots="$slots" '{ total += $1; if ($1 > longest) longest = $1 }
        END { b = total / slots; if (longest > b) b = longest; printf "%.3f\n", b }')

without=$(printf '%s\n' "${cold[@]}" | median)
with=$(printf '%s\n' "${warm[@]}" | median)
echo "skewed suite: 20 x 100 ms + 1 x 1000 ms on $slots slots, median of $runs runs"
echo "lower bound max(longest, total/slots): ${bound}s"
awk -v w="$without" -v b="$bound" 'BEGIN { printf "without history (name order):        %.3fs  (%.2f x bound)\n", w, w / b }'
awk -v w="$with" -v b="$bound" 'BEGIN { printf "with history (longest first):        %.3fs  (%.2f x bound)\n", w, w / b }'
echo "runs without: ${cold[*]}"
echo "runs with:    ${warm[*]}"
