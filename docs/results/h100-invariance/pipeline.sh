#!/bin/bash
# Runs ON the H100 (device tool) after device-setup.sh: a stress study, then validate + report.
#   bash docs/results/h100-invariance/pipeline.sh                                  # run 1: stress.toml, 32 targets
#   bash docs/results/h100-invariance/pipeline.sh stress-246.toml --parallel 4     # runs 2 and 3: 246 targets
#   bash docs/results/h100-invariance/pipeline.sh prefix-cache.toml --parallel 4   # run 4: prefix caching on/off
# Start detached (setsid) and poll /tmp/stress.log; results in /tmp/runs/<study name>-*.
set -euo pipefail
R=docs/results/h100-invariance
STUDY=${1:-stress.toml}
shift || true
mkdir -p /tmp/runs
rm -rf /tmp/evalhost && mkdir -p /tmp/evalhost && cp -r core /tmp/evalhost/evalhost
cp -r plugins /tmp/evalhost/evalhost/plugins && cp -r tasks /tmp/evalhost/evalhost/tasks
export PYTHONPATH=/tmp/evalhost:/tmp/site PYTHONUNBUFFERED=1 EVALHOST_CACHE=/tmp/ehcache
t0=$(date +%s); stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
stamp "$STUDY $* on $(nvidia-smi --query-gpu=name --format=csv,noheader)"
python3 -m evalhost.cli run "$R/$STUDY" --quiet "$@"
name=$(python3 -c "import sys, tomllib; print(tomllib.load(open(sys.argv[1], 'rb'))['study']['name'])" "$R/$STUDY")
S=$(ls -d /tmp/runs/"$name"-* | tail -1)
python3 -m evalhost.cli validate "$S"
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader || true  # nothing of ours should be left
stamp "done"
