#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for a bounded time and prints one line per target.
# Usage: scripts/fuzz.sh [seconds per target, default 60]   (or FUZZ_SECONDS=...)
# Needs a nightly toolchain (cargo-fuzz builds with sanitizers); installs cargo-fuzz if missing.
# Corpora start from the repo's own files (WFDB fixtures, shipped configs, answer examples) and
# grow in fuzz/corpus/ (ignored by git). A crash leaves its input in fuzz/artifacts/<target>/:
# turn it into a regression test next to the parser, fix the parser, and rerun.
set -uo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-${FUZZ_SECONDS:-60}}

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: needs a nightly toolchain (rustup toolchain install nightly)" >&2
  exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz (once)"
  cargo install cargo-fuzz --locked || exit 2
fi

seed() {
  local target=$1 dir=fuzz/corpus/$1
  mkdir -p "$dir"
  case $target in
    wfdb_header)
      for hea in data/tests/fixtures/wfdb/*.hea; do
        # header text, a NUL, then the record's signal bytes (first 600 bytes are plenty)
        { cat "$hea"; printf '\0'; head -c 600 "${hea%.hea}.dat"; } > "$dir/seed-$(basename "$hea" .hea)"
      done ;;
    run_config)
      for f in configs/*.toml; do cp "$f" "$dir/seed-$(basename "$f")"; done ;;
    answer_parser)
      printf '<think>ST depression, troponin raised</think><answer>coronary artery disease; hypertension</answer>' > "$dir/seed-1"
      printf '  <think>\n</think>\n<answer>CAD;;  Sepsis ; none</answer>  ' > "$dir/seed-2"
      printf '<answer>pneumonia</answer><think>x</think>' > "$dir/seed-3" ;;
  esac
}

status=0
results=()
for target in wfdb_header answer_parser run_config; do
  seed "$target"
  log=fuzz/target/$target.log
  mkdir -p fuzz/target
  echo "fuzz: $target for ${SECS}s"
  if cargo +nightly fuzz run --fuzz-dir fuzz "$target" "fuzz/corpus/$target" -- \
      -max_total_time="$SECS" -max_len=4096 -timeout=10 >"$log" 2>&1; then
    runs=$(grep -Eo 'Done [0-9]+ runs' "$log" | tail -1 | grep -Eo '[0-9]+' || echo "?")
    results+=("| $target | ${SECS}s | $runs | no crash |")
  else
    status=1
    crash=$(grep -Eo 'fuzz/artifacts/[^ ]+' "$log" | tail -1)
    results+=("| $target | ${SECS}s | - | CRASH: ${crash:-see $log} |")
  fi
done
echo
echo "| target | time | runs | result |"
echo "|---|---:|---:|---|"
printf '%s\n' "${results[@]}"
exit $status
