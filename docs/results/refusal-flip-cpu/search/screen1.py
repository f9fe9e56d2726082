"""Stage 1 (screening): first-token top-5 logprobs of every candidate prompt, one forward pass per padded batch of
32 prompts of similar length (screening values only; stage 2 re-measures the shortlist solo through the backend)."""
import json, sys, time
from common import *
from phrases import prompts as gen_prompts
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), *['..'] * 4))
dtype = sys.argv[1]; out = sys.argv[2]
cands = gen_prompts()
for path, src in ((ROOT + "/training/refusal/data/heldout_task.jsonl", "heldout"),
                  (ROOT + "/tasks/jailbreak_amplification.jsonl", "jailbreak"), (ROOT + "/tasks/benign.jsonl", "benign")):
    for l in open(path):
        it = json.loads(l)
        if "prompt" in it:
            cands.append({"id": f"{src}:{it['id']}", "grade": src, "prompt": it["prompt"]})
b = backend(dtype)
tok, lm = b.tok, b.lm
done = set()
try:
    done = {json.loads(l)["id"] for l in open(out)}
except FileNotFoundError:
    pass
rendered = [(render(b, c["prompt"]), c) for c in cands if c["id"] not in done]
rendered.sort(key=lambda rc: len(tok(rc[0], add_special_tokens=False)["input_ids"]))
B = 32
t0 = time.time()
torch.set_flush_denormal(True)
with open(out, "a") as f:
    for s in range(0, len(rendered), B):
        chunk = rendered[s:s + B]
        enc = tok([r for r, _ in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = lm(**enc, position_ids=pos, use_cache=False, logits_to_keep=1).logits[:, -1].float()
        v, i = torch.log_softmax(logits, -1).topk(5, -1)
        for (r, c), vv, ii in zip(chunk, v.tolist(), i.tolist()):
            f.write(json.dumps({**c, "top": [[a, round(x, 5)] for a, x in zip(ii, vv)]}) + "\n")
        f.flush()
        print(s + len(chunk), round(time.time() - t0, 1), flush=True)
