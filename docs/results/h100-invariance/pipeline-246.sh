#!/bin/bash
# Runs ON the H100 (device tool) after device-setup.sh: the 246-target stress study with the four server
# configurations at the same time (--parallel 4), then validate. Start detached (setsid) and poll /tmp/stress.log;
# results in /tmp/runs/h100_invariance_stress_246-*.
set -euo pipefail
R=docs/results/h100-invariance
mkdir -p /tmp/runs
rm -rf /tmp/evalhost && mkdir -p /tmp/evalhost && cp -r core /tmp/evalhost/evalhost
cp -r plugins /tmp/evalhost/evalhost/plugins && cp -r tasks /tmp/evalhost/evalhost/tasks
export PYTHONPATH=/tmp/evalhost:/tmp/site PYTHONUNBUFFERED=1 EVALHOST_CACHE=/tmp/ehcache
t0=$(date +%s); stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
stamp "stress-246 on $(nvidia-smi --query-gpu=name --format=csv,noheader)"
python3 -m evalhost.cli run $R/stress-246.toml --quiet --parallel 4
S=$(ls -d /tmp/runs/h100_invariance_stress_246-* | tail -1)
python3 -m evalhost.cli validate "$S"
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader || true  # nothing of ours should be left
stamp "done"
