#!/bin/bash
# Runs ON the H100 (device tool) after device-setup.sh: the stress study, then validate + report.
# Start detached (setsid) and poll /tmp/stress.log; results in /tmp/runs/h100_invariance_stress-*.
set -euo pipefail
R=docs/results/h100-invariance
mkdir -p /tmp/runs
rm -rf /tmp/evalhost && mkdir -p /tmp/evalhost && cp -r core /tmp/evalhost/evalhost
cp -r plugins /tmp/evalhost/evalhost/plugins && cp -r tasks /tmp/evalhost/evalhost/tasks
export PYTHONPATH=/tmp/evalhost:/tmp/site PYTHONUNBUFFERED=1 EVALHOST_CACHE=/tmp/ehcache
t0=$(date +%s); stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
stamp "stress"
python3 -m evalhost.cli run $R/stress.toml --quiet
S=$(ls -d /tmp/runs/h100_invariance_stress-* | tail -1)
python3 -m evalhost.cli validate "$S"
stamp "done"
