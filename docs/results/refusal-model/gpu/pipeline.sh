#!/bin/bash
# Runs ON the H200 (device tool) from the repository root, after training/refusal/gpu_train.sh in the same lease
# (it lays out evalhost in /tmp/evalhost with the trained adapter and merges builtin:smollm2-135m-refusal into
# /tmp/ehcache). Discovery -> evalhost candidates --text-changes -> Study D -> validate; run directories packed as
# /tmp/runs/*.tgz (records and server logs gzipped). Start detached (setsid) and poll /tmp/runs/pipeline.log.
set -uo pipefail
R=docs/results/refusal-model/gpu
mkdir -p /tmp/runs
export PYTHONPATH=/tmp/evalhost:/tmp/site:/tmp/llmshim PYTHONUNBUFFERED=1 EVALHOST_CACHE=/tmp/ehcache
eh() { python3 -m evalhost.cli "$@"; }
t0=$(date +%s); stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
pack() { d=$1; for f in "$d"/records.jsonl "$d"/*.log "$d"/logs/*.log; do [ -f "$f" ] && gzip -f "$f"; done
         tar czf "/tmp/runs/$(basename "$d").tgz" -C "$(dirname "$d")" "$(basename "$d")"; }
stamp "discovery on $(nvidia-smi --query-gpu=name --format=csv,noheader)"
eh run $R/discovery.toml --quiet --parallel 2
D=$(ls -d /tmp/runs/h200_refusal_discovery-* | tail -1)
eh validate "$D"
eh candidates "$D" -o /tmp/runs/candidates.jsonl --text-changes
wc -l /tmp/runs/candidates.jsonl
stamp "study d"
eh run $R/study_d.toml --quiet --parallel 4
S=$(ls -d /tmp/runs/h200_refusal_study_d-* | tail -1)
eh validate "$S"
stamp "packing"
pack "$D"; [ -n "$S" ] && pack "$S"
stamp "done"
touch /tmp/runs/done
