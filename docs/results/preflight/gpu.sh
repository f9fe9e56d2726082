#!/bin/bash
# Runs ON the H200 (device tool) from the repository root, after ../shared/gpu/device-setup.sh in the same lease
# (vLLM in /tmp/site, SmolLM2-135M-Instruct in float16 at /tmp/models/smollm2-135m-instruct). Issue 23's GPU grid:
#   bash docs/results/preflight/gpu.sh MINUTES CONFIG[:MINUTES]...   e.g. gpu.sh 10 invariant-flash-prefix-off x:5
# CONFIG is a file name under docs/results/preflight/configs/ without .toml (":M" gives it M minutes instead of
# MINUTES). Each is preflighted in turn (`evalhost preflight --config`, that budget; the server start is not
# counted), validated, and packed as
# /tmp/runs/<run directory>.tgz as soon as it is done, so a lease that ends early keeps what finished. One line per
# config (exit code and verdicts) goes to /tmp/runs/summary.txt. Start it detached and poll /tmp/runs/gpu.log:
#   setsid nohup bash docs/results/preflight/gpu.sh 10 invariant-flash-prefix-off > /tmp/runs/gpu.log 2>&1 &
# EH (default /tmp/evalhost) and RUNS (default /tmp/runs) move the code copy and the results elsewhere.
set -uo pipefail
R=docs/results/preflight
EH=${EH:-/tmp/evalhost}
RUNS=${RUNS:-/tmp/runs}
MINUTES=${1:?usage: gpu.sh MINUTES CONFIG[:MINUTES]...}
shift
[ $# -gt 0 ] || { echo "usage: gpu.sh MINUTES CONFIG[:MINUTES]..." >&2; exit 2; }
mkdir -p "$RUNS"
rm -rf "$EH" && mkdir -p "$EH" && cp -r core "$EH/evalhost"
cp -r plugins "$EH/evalhost/plugins" && cp -r tasks "$EH/evalhost/tasks"
export PYTHONPATH=$EH:/tmp/site PYTHONUNBUFFERED=1 EVALHOST_CACHE=${EVALHOST_CACHE:-/tmp/ehcache}
t0=$(date +%s); stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
pack() { d=$1; for f in "$d"/records.jsonl "$d"/*.log; do [ -f "$f" ] && gzip -f "$f"; done
         tar czf "$RUNS/$(basename "$d").tgz" -C "$(dirname "$d")" "$(basename "$d")"; }
for arg in "$@"; do
  c=${arg%%:*}
  minutes=${arg#*:}
  [ "$minutes" = "$arg" ] && minutes=$MINUTES
  cfg=$R/configs/$c.toml
  [ -f "$cfg" ] || { stamp "no such config: $cfg"; continue; }
  name=$(python3 -c "import sys, tomllib; print(tomllib.load(open(sys.argv[1], 'rb'))['study']['name'])" "$cfg")
  stamp "preflight $c, $minutes min, on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo no GPU)"
  python3 -m evalhost.cli preflight --config "$cfg" --minutes "$minutes" --output-dir "$RUNS" --quiet 2>&1 | tee "$RUNS/$c.out"
  rc=${PIPESTATUS[0]}
  d=$(ls -d "$RUNS/$name"-* 2>/dev/null | grep -v '\.tgz$' | tail -1)
  if [ -n "$d" ]; then
    python3 -m evalhost.cli validate "$d" 2>&1 | tail -3
    pack "$d"
  fi
  echo "$c rc=$rc | $(grep -E '^(solo repeats|prompt_list|synchronized|continuous)[ :]' "$RUNS/$c.out" | paste -sd'|')" \
    >> "$RUNS/summary.txt"
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>/dev/null || true  # nothing of ours should be left
done
stamp "done"
touch "$RUNS/done"
