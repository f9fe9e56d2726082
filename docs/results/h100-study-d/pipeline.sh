#!/bin/bash
# Runs ON the H100 (device tool), from the repository root, after ../shared/gpu's device-setup.sh put vLLM 0.25.1
# in /tmp/site and the model in /tmp/models. Discovery -> candidates -> Study D -> validate + report; logs to
# /tmp/runs/pipeline.log. Start it detached (setsid) so it outlives one device call; poll with `tail`.
set -euo pipefail
R=docs/results/h100-study-d
mkdir -p /tmp/runs
export PYTHONPATH=/tmp/evalhost:/tmp/site PYTHONUNBUFFERED=1 EVALHOST_CACHE=/tmp/ehcache
# evalhost itself, laid out as its installed package (core/ -> evalhost, plugins/ -> evalhost.plugins, tasks/)
rm -rf /tmp/evalhost && mkdir -p /tmp/evalhost && cp -r core /tmp/evalhost/evalhost
cp -r plugins /tmp/evalhost/evalhost/plugins && cp -r tasks /tmp/evalhost/evalhost/tasks
eh() { python3 -m evalhost.cli "$@"; }
t0=$(date +%s); stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
stamp "discovery"
eh run $R/discovery.toml --quiet
D=$(ls -d /tmp/runs/h100_discovery-* | tail -1)
eh validate "$D"
stamp "candidates"
eh candidates "$D" -o /tmp/runs/candidates.jsonl --text-changes
wc -l /tmp/runs/candidates.jsonl
stamp "study d"
eh run $R/study_d.toml --quiet
S=$(ls -d /tmp/runs/h100_study_d-* | tail -1)
eh validate "$S"
stamp "done"
