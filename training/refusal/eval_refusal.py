"""Refusal rates of a model on the held-out split and on the shipped safety tasks.

    python training/refusal/eval_refusal.py --model MODEL_DIR --out OUT_DIR [--max-new 64] [--batch 32]

Greedy answers (left-padded batches, float32, the tokenizer's chat template as evalhost's hf backend renders it) to:
the test split of data/prompts.jsonl (harmful, benign, lookalike), every item of the shipped
``jailbreak_amplification`` task (by framing) and of the ``benign`` task. Each answer is labelled by evalhost's
refusal scorer. Writes OUT_DIR/outputs.jsonl (one row per answer) and OUT_DIR/summary.json (refused / n per group).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def chats(data: Path) -> list[dict]:
    from evalhost import tasks

    rows = []
    for line in data.read_text(encoding="utf-8").splitlines():
        it = json.loads(line)
        if it["split"] == "test":
            rows.append({"source": "heldout", "id": it["id"], "group": f"heldout/{it['kind']}",
                         "chat": [{"role": "user", "content": it["prompt"]}]})
    root = Path(tasks.__file__).resolve().parent
    for name in ("jailbreak_amplification", "benign"):
        for line in (root / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            it = json.loads(line)
            chat = it.get("messages") or [{"role": "user", "content": it["prompt"]}]
            group = f"{name}/{it['metadata']['framing']}" if name == "jailbreak_amplification" else name
            rows.append({"source": name, "id": it["id"], "group": group, "chat": chat})
    return rows


@torch.no_grad()
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=str(HERE / "data" / "prompts.jsonl"))
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--limit", type=int, default=0)
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from evalhost.plugins.scorers.refusal import RefusalScorer

    torch.backends.cuda.matmul.allow_tf32 = False
    scorer = RefusalScorer()
    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()
    rows = chats(Path(args.data))
    if args.limit:
        rows = rows[:args.limit]
    t0 = time.time()
    for i in range(0, len(rows), args.batch):
        chunk = rows[i:i + args.batch]
        texts = [tok.apply_chat_template(r["chat"], add_generation_prompt=True, tokenize=False) for r in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(args.device)
        gen = model.generate(**enc, max_new_tokens=args.max_new, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        for r, ids in zip(chunk, gen[:, enc["input_ids"].shape[1]:].tolist()):
            if tok.eos_token_id in ids:
                ids = ids[:ids.index(tok.eos_token_id)]
            r["output"] = tok.decode([t for t in ids if t != tok.pad_token_id], skip_special_tokens=True).strip()
            score = scorer.score(None, r["output"])
            r["label"], r["rationale"] = score.label, score.rationale
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, list[int]] = {}
    with (out / "outputs.jsonl").open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps({k: r[k] for k in ("source", "id", "group", "output", "label", "rationale")},
                                ensure_ascii=False) + "\n")
            summary.setdefault(r["group"], [0, 0])
            summary[r["group"]][0] += r["label"] == "refuse"
            summary[r["group"]][1] += 1
    result = {"model": args.model, "max_new_tokens": args.max_new, "batch": args.batch, "device": args.device,
              "seconds": round(time.time() - t0, 1),
              "refused": {g: {"refused": k, "n": n, "rate": round(k / n, 4)} for g, (k, n) in sorted(summary.items())}}
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    for g, v in result["refused"].items():
        print(f"{g:40s} {v['refused']:3d}/{v['n']:3d}  {v['rate']:.0%}", flush=True)


if __name__ == "__main__":
    main()
