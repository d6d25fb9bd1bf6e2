#!/usr/bin/env bash
# `make chaos`: runs the fault-injection tests (cli/tests/chaos.rs) one at a time against the real
# `medtvt` processes and prints their outcomes as one Markdown table (fault injected | expected
# outcome | observed outcome | result). Exits non-zero when any scenario fails. Debug build, the
# same one `make test` uses; the whole run takes a few minutes on 2 cores.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
report="$PWD/target/chaos-report.md"
mkdir -p target
: > "$report"
MEDTVT_CHAOS_REPORT="$report" "${CARGO:-cargo}" test -p medtvt-cli --test chaos -- --test-threads=1
status=$?
echo
echo "| fault injected | expected outcome | observed outcome | result |"
echo "|---|---|---|---|"
sort "$report"
exit "$status"
