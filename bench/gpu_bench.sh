#!/bin/bash
# GPU benchmarks of issue 8, run ON the H100 (device tool) from the repository root, after ../shared/gpu's
# device-setup.sh put vLLM in /tmp/site and the model in /tmp/models/smollm2-135m-instruct.
#
#   bash bench/gpu_bench.sh                      # phases: fleet, then invariant (default)
#   bash bench/gpu_bench.sh fleet                # one phase; also: invariant, overhead
#   REPLICAS=8 PROMPTS=288 MAX_TOKENS=256 DEADLINE_S=1140 bash bench/gpu_bench.sh
#   KV_BYTES=2147483648 DEADLINE_S=1500 bash bench/gpu_bench.sh fleet invariant   # replicas 1..N-1 start together
#
# Start it detached so it outlives one device call, then poll:
#   setsid nohup bash bench/gpu_bench.sh > /tmp/bench/gpu_bench.log 2>&1 &      (mkdir -p /tmp/bench first)
#   tail /tmp/bench/gpu_bench.log; ls /tmp/bench/*.json                         ("[..s] done" ends the log)
#
# Results: one JSON line per phase in /tmp/bench/<phase>.json (also printed), progress in /tmp/bench/<phase>.log.
# Time: every vLLM start costs ~100 s on the H100 (~270 s for the first, cold torch.compile; Study D logs) and the
# fleet's replicas start one after another, so the whole script is held to DEADLINE_S (default 1140 s = 19 min):
# the fleet phase gets as many replicas (at most REPLICAS, at least 2) as fit in the time left after reserving
# ~420 s for each later invariant phase and ~240 s for a later overhead phase (start times and batch-1 speed are
# taken from an earlier invariant phase when there is one), and records requested vs used. A phase that cannot fit
# is skipped with a {"skipped": ...} JSON line. Expected: the default call gets a fleet of 2 plus the invariant
# phase; `bash bench/gpu_bench.sh fleet` alone gets ~5 replicas in 19 min; the full 8 need
# `DEADLINE_S=1560 bash bench/gpu_bench.sh fleet` (~26 min, a device hold of its own).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${BENCH_OUT:-/tmp/bench}
MODEL=${MODEL:-/tmp/models/smollm2-135m-instruct}
REPLICAS=${REPLICAS:-8}
PROMPTS=${PROMPTS:-288}
MAX_TOKENS=${MAX_TOKENS:-256}
UTIL=${UTIL:-0.8}                 # the fleet's total: each of N replicas gets UTIL / N (8 -> 0.1)
ATTN=${ATTN:-TRITON_ATTN}         # as in Study D (FA3 can break batch invariance on Hopper)
DEADLINE_S=${DEADLINE_S:-1140}
KV_BYTES=${KV_BYTES:-}            # set (e.g. 2147483648): fixed KV cache per replica, replicas 1..N-1 start together
PHASES=("$@")
[[ ${#PHASES[@]} -gt 0 ]] || PHASES=(fleet invariant)

mkdir -p "$OUT"
export PYTHONPATH=/tmp/evalhost:/tmp/site PYTHONUNBUFFERED=1 EVALHOST_CACHE=/tmp/ehcache EVALHOST_SOLO_CACHE=0
# evalhost itself, laid out as its installed package (core/ -> evalhost, plugins/ -> evalhost.plugins, tasks/)
rm -rf /tmp/evalhost && mkdir -p /tmp/evalhost && cp -r core /tmp/evalhost/evalhost
cp -r plugins /tmp/evalhost/evalhost/plugins && cp -r tasks /tmp/evalhost/evalhost/tasks

T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $(date -u +%H:%M:%SZ) $*"; }
left() { echo $(( DEADLINE_S - ($(date +%s) - T0) )); }
skip() { echo "{\"bench\": \"$1\", \"skipped\": \"$2\"}" | tee "$OUT/$1.json"; stamp "skipped $1: $2"; }
COMMON=(--model "$MODEL" --dtype float16 --max-model-len 2048 --attention-backend "$ATTN")
rc=0

run_phase() {  # name, seconds allowed, command...
  local name=$1 allowed=$2; shift 2
  stamp "start $name (at most ${allowed}s): $*"
  if timeout --kill-after=60 "$allowed" "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"; then
    stamp "done $name"
  else
    local code=$?
    stamp "FAILED $name (exit $code; 124 = time limit); last lines of $OUT/$name.log:"
    tail -n 15 "$OUT/$name.log" || true
    rc=1
  fi
  cat "$OUT/$name.json" || true
}

gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null || echo "no CUDA device")
stamp "gpu bench: phases ${PHASES[*]}; deadline ${DEADLINE_S}s; $gpu"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true

reserve_after() {  # seconds the phases after position $1 need
  local total=0 p
  for p in "${PHASES[@]:$(( $1 + 1 ))}"; do
    case $p in invariant) total=$(( total + 420 ));; overhead) total=$(( total + 240 ));; esac
  done
  echo $total
}

for idx in "${!PHASES[@]}"; do
  phase=${PHASES[$idx]}
  case $phase in
    invariant)
      # two servers (vllm, then vllm-invariant), same settings; 64 prompts at batch 1, 8 and 64
      if (( $(left) < 300 )); then skip invariant_cost "less than 300 s left"; continue; fi
      allowed=$(( $(left) - $(reserve_after "$idx") ))
      run_phase invariant_cost "$(( allowed < 720 ? allowed : 720 ))" \
        python3 bench/invariant_cost.py "${COMMON[@]}" --gpu-memory-utilization 0.8 --prompts 64 \
        --max-tokens "$MAX_TOKENS" --batch-sizes 1,8,64 --run-dir "$OUT/invariant_run"
      ;;
    fleet)
      # replicas that fit: per-start seconds measured above (else 110 s; 280 s for a cold first start), work from
      # the measured batch-1 speed (else 0.4 s a prompt): sequential + two fleet passes + warm-ups
      budget=$(( $(left) - $(reserve_after "$idx") ))
      if [[ -n $KV_BYTES ]]; then  # replica 0, then the others together: about two start times for any N
        fit=$(( budget > 700 ? REPLICAS : 0 ))
      else
      fit=$(python3 - "$OUT/invariant_cost.json" "$budget" "$REPLICAS" "$PROMPTS" "$MAX_TOKENS" <<'EOF'
import json, math, sys
path = sys.argv[1]
left, want, prompts, max_tokens = (int(a) for a in sys.argv[2:6])
start, first, per_prompt = 110.0, 280.0, 0.4
try:
    backends = json.loads(open(path).read().strip().splitlines()[-1])["backends"]
    starts = [float(b["startup_s"]) for b in backends.values()]
    start, first = max(60.0, min(starts)), max(60.0, max(starts))  # the first replica may compile cold
    per_prompt = max_tokens / float(backends["vllm"]["bs1"]["tok_s"])
except Exception:
    pass
work = prompts * per_prompt * 1.6 + 60
n = 1 + math.floor((left - 60 - first - work) / (start * 1.15))
print(max(0, min(want, n)))
EOF
)
      fi
      if (( fit < 2 )); then
        skip solo_fleet "not enough time for 2 replicas (${budget} s of $(left) s left)"; continue
      fi
      (( fit < REPLICAS )) && stamp "fleet: $fit of $REPLICAS replicas fit in ${budget} s"
      run_phase solo_fleet "$(( budget - 10 ))" \
        python3 bench/solo_fleet.py "${COMMON[@]}" --replicas "$fit" --gpu-memory-utilization "$UTIL" \
        --prompts "$PROMPTS" --max-tokens "$MAX_TOKENS" --baseline replica0 \
        ${KV_BYTES:+--kv-cache-memory-bytes "$KV_BYTES" --no-chunked} --run-dir "$OUT/fleet_run"
      if [[ -s $OUT/solo_fleet.json ]] && (( fit < REPLICAS )); then
        python3 - "$OUT/solo_fleet.json" "$REPLICAS" <<'EOF'
import json, sys
p = sys.argv[1]; d = json.loads(open(p).read().strip().splitlines()[-1]); d["replicas_requested"] = int(sys.argv[2])
open(p, "w").write(json.dumps(d, sort_keys=True) + "\n")
EOF
      fi
      ;;
    overhead)
      if (( $(left) < 240 )); then skip host_overhead "less than 240 s left"; continue; fi
      run_phase host_overhead "$(( $(left) - $(reserve_after "$idx") - 10 ))" \
        python3 bench/host_overhead.py "${COMMON[@]}" --gpu-memory-utilization 0.8 --prompts 64 --max-tokens 128 \
        --batch-size 8 --reps 3 --run-dir "$OUT/overhead_run"
      ;;
    *) echo "unknown phase '$phase' (phases: invariant, fleet, overhead)" >&2; exit 2 ;;
  esac
done
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader || true  # nothing of ours should be left
stamp "done (exit $rc)"
exit $rc
