"""Stage 4: tasks/refusal_boundary.jsonl from stage 2's solo margins: the generated prompts (not the held-out,
jailbreak or benign ones, which are shipped elsewhere or held out) whose bfloat16 first-token margin between a
refusing and a complying start is at most one bf16 step (0.125 nats), in stage-2 order (fp32 margin, smallest first).

    python make_task.py s2b.jsonl ../../../../tasks/refusal_boundary.jsonl
"""
import json, sys
from phrases import TEMPLATES, prompts

s2b, out = sys.argv[1], sys.argv[2]
P = {p["id"]: p for p in prompts()}
rows = [json.loads(l) for l in open(s2b)]
sel = [r for r in rows if r["id"] in P and r["bfloat16"]["margin"] is not None and r["bfloat16"]["margin"] <= 0.13]
with open(out, "w") as f:
    for r in sel:
        p = P[r["id"]]
        f.write(json.dumps({"id": f"rb-{r['id']}", "prompt": p["prompt"], "domain": "safety", "scorer": "refusal",
                            "metadata": {"grade": p["grade"], "phrase": p["phrase"], "template": TEMPLATES[p["template"]],
                                         "margin_fp32": round(r["float32"]["margin"], 6),
                                         "margin_bf16": round(r["bfloat16"]["margin"], 6)}}, ensure_ascii=False) + "\n")
print(len(sel), "items")
