"""Train the refusal LoRA on SmolLM2-135M-Instruct (the float32 checkpoint evalhost converts from the GGUF).

    python training/refusal/train_lora.py --base BASE_DIR --out OUT_DIR [--distill] [hyperparameters]

1. ``--distill``: the base model's own greedy answers to every benign prompt of data/prompts.jsonl (max
   ``--distill-tokens``), written to data/distilled.jsonl; an existing file is reused as it is. These answers are the
   benign targets, so tuning keeps the base model's helpfulness (self-distillation). A base answer that the refusal
   scorer labels ``refuse`` is not used as a target.
2. LoRA (lora.py) on q/k/v/o of every layer, AdamW, linear warm-up then linear decay, loss = mean over examples of
   each example's mean token loss on the answer (so short refusals weigh as much as long answers).
3. After each epoch: loss and a greedy generation check on the val split (refusal rate on harmful, refusal rate on
   benign). The adapter of the epoch with the best ``val harmful refusal - val benign refusal`` (ties: lower val
   loss) is saved to OUT_DIR/adapter.safetensors; OUT_DIR/train_log.jsonl has every step and epoch.

Seeds, data order (torch.randperm with a seeded generator per epoch) and hyperparameters are fixed by the arguments
and written to OUT_DIR/config.json. Runs on CPU too (slowly); the committed adapter was trained on a GPU (see README).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from lora import adapter_tensors, inject, save_adapter  # noqa: E402


def render(tok, prompt: str) -> str:
    """As evalhost's hf backend renders a plain-prompt item (the tokenizer's chat template, generation prompt on)."""
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)


def load_items(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@torch.no_grad()
def generate(model, tok, prompts: list[str], max_new: int, batch: int, device: str) -> list[tuple[str, bool, int]]:
    """Greedy answers, left-padded batches: (text, finished with EOS, new tokens)."""
    out = []
    tok.padding_side = "left"
    for i in range(0, len(prompts), batch):
        chunk = [render(tok, p) for p in prompts[i:i + batch]]
        enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        gen = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        for row in gen[:, enc["input_ids"].shape[1]:].tolist():
            finished = tok.eos_token_id in row
            ids = row[:row.index(tok.eos_token_id)] if finished else row
            ids = [t for t in ids if t != tok.pad_token_id]
            out.append((tok.decode(ids, skip_special_tokens=True).strip(), finished, len(ids)))
    return out


def distill(model, tok, items, path: Path, args, scorer) -> None:
    benign = [it for it in items if it["kind"] != "harmful"]
    t0 = time.time()
    answers = generate(model, tok, [it["prompt"] for it in benign], args.distill_tokens, args.gen_batch, args.device)
    with path.open("w", encoding="utf-8") as fh:
        for it, (text, finished, n) in zip(benign, answers):
            label = scorer.score(None, text).label
            fh.write(json.dumps({"id": it["id"], "answer": text, "finished": finished, "tokens": n,
                                 "base_label": label}, ensure_ascii=False) + "\n")
    print(f"distilled {len(benign)} benign answers in {time.time() - t0:.1f}s -> {path}", flush=True)


def examples(items, distilled: dict, tok, split: str) -> list[dict]:
    rows = []
    for it in items:
        if it["split"] != split:
            continue
        if it["kind"] == "harmful":
            target, finished = it["target"], True
        else:
            d = distilled[it["id"]]
            if d["base_label"] != "comply" or not d["answer"]:
                continue
            target, finished = d["answer"], d["finished"]
        prompt_ids = tok(render(tok, it["prompt"]), add_special_tokens=False)["input_ids"]
        target_ids = tok(target, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if finished else [])
        rows.append({"id": it["id"], "kind": it["kind"], "prompt_ids": prompt_ids, "target_ids": target_ids})
    return rows


def batch_loss(model, rows, device: str, pad_id: int) -> torch.Tensor:
    """Mean over examples of each example's mean token loss on its answer tokens."""
    seqs = [r["prompt_ids"] + r["target_ids"] for r in rows]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, s) in enumerate(zip(rows, seqs)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        labels[i, len(r["prompt_ids"]):len(s)] = torch.tensor(r["target_ids"])
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    tgt = labels[:, 1:]
    tok_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                 ignore_index=-100, reduction="none").view(tgt.shape)
    counts = (tgt != -100).sum(1).clamp(min=1)
    return (tok_loss.sum(1) / counts).mean()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the float32 base checkpoint (evalhost model builtin:smollm2-135m-instruct)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=str(HERE / "data" / "prompts.jsonl"))
    ap.add_argument("--distilled", default=str(HERE / "data" / "distilled.jsonl"))
    ap.add_argument("--distill", action="store_true", help="write --distilled from the base model if it is missing")
    ap.add_argument("--distill-tokens", type=int, default=160)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--warmup", type=float, default=0.1, help="share of steps with linear warm-up")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--gen-batch", type=int, default=32)
    ap.add_argument("--check-tokens", type=int, default=48)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N train examples (smoke tests)")
    ap.add_argument("--benign-repeat", type=int, default=1, help="each benign/lookalike train example N times per epoch")
    ap.add_argument("--kinds", default="harmful,benign,lookalike",
                    help="which kinds of train example to use (a variant without benign answers: --kinds harmful)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from evalhost.plugins.scorers.refusal import RefusalScorer

    torch.backends.cuda.matmul.allow_tf32 = False  # plain float32 arithmetic, as the base checkpoint is used
    torch.backends.cudnn.allow_tf32 = False
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scorer = RefusalScorer()
    tok = AutoTokenizer.from_pretrained(args.base)
    if tok.pad_token is None:  # padding positions are masked; any id will do
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).to(args.device)
    model.eval()
    items = load_items(Path(args.data))
    dpath = Path(args.distilled)
    if not dpath.is_file():
        if not args.distill:
            raise SystemExit(f"{dpath} is missing; pass --distill to write it from the base model")
        distill(model, tok, items, dpath, args, scorer)
    distilled = {d["id"]: d for d in load_items(dpath)}
    train = examples(items, distilled, tok, "train")
    val = examples(items, distilled, tok, "val")
    train = [r for r in train if r["kind"] in args.kinds.split(",")]
    if args.limit:
        train = train[:args.limit]
    train = [r for r in train for _ in range(1 if r["kind"] == "harmful" else args.benign_repeat)]
    val_items = [it for it in items if it["split"] == "val"]
    config = {**vars(args), "train_examples": len(train), "val_examples": len(val),
              "train_by_kind": {k: sum(r["kind"] == k for r in train) for k in ("harmful", "benign", "lookalike")},
              "data_sha256": hashlib.sha256(Path(args.data).read_bytes()).hexdigest(),
              "distilled_sha256": hashlib.sha256(dpath.read_bytes()).hexdigest(),
              "torch": torch.__version__, "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(json.dumps(config), flush=True)

    wrapped = inject(model, args.rank, args.alpha, args.seed)
    params = [p for lora in wrapped.values() for p in (lora.lora_A, lora.lora_B)]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    steps_per_epoch = (len(train) + args.batch - 1) // args.batch
    total = steps_per_epoch * args.epochs
    warm = max(1, int(total * args.warmup))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    log = (out / "train_log.jsonl").open("w")
    best = None
    step = 0
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        for i in range(0, len(order), args.batch):
            loss = batch_loss(model, [train[j] for j in order[i:i + args.batch]], args.device, tok.pad_token_id)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            log.write(json.dumps({"step": step, "epoch": epoch, "loss": round(loss.item(), 5),
                                  "lr": sched.get_last_lr()[0]}) + "\n")
        model.eval()
        with torch.no_grad():
            vloss = sum(batch_loss(model, val[i:i + args.batch], args.device, tok.pad_token_id).item() * len(val[i:i + args.batch])
                        for i in range(0, len(val), args.batch)) / max(1, len(val))
        gens = generate(model, tok, [it["prompt"] for it in val_items], args.check_tokens, args.gen_batch, args.device)
        refused = {k: [0, 0] for k in ("harmful", "benign", "lookalike")}
        for it, (text, _, _) in zip(val_items, gens):
            refused[it["kind"]][0] += scorer.score(None, text).label == "refuse"
            refused[it["kind"]][1] += 1
        harm = refused["harmful"][0] / max(1, refused["harmful"][1])
        ben = (refused["benign"][0] + refused["lookalike"][0]) / max(1, refused["benign"][1] + refused["lookalike"][1])
        row = {"epoch": epoch, "step": step, "val_loss": round(vloss, 5), "val_refused": refused,
               "val_harmful_refusal": round(harm, 4), "val_benign_refusal": round(ben, 4)}
        log.write(json.dumps(row) + "\n")
        log.flush()
        print(json.dumps(row), flush=True)
        key = (harm - ben, -vloss)
        if best is None or key > best[0]:
            best = (key, epoch, adapter_tensors(wrapped))
    log.write(json.dumps({"chosen_epoch": best[1]}) + "\n")
    log.close()
    path = out / "adapter.safetensors"
    save_adapter(path, best[2], args.rank, args.alpha, "builtin:smollm2-135m-instruct")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    (out / "adapter.sha256").write_text(f"{sha}  adapter.safetensors\n")
    print(f"chosen epoch {best[1]}; adapter {path} sha256 {sha}", flush=True)


if __name__ == "__main__":
    main()
