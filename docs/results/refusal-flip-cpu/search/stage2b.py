"""Stage 2 (cheap): solo first-token top-5 of the shortlist through the hf backend (batch of one), fp32 and bf16."""
import json, sys, time
from common import *
s1, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
REF = {"I", "No", "Sorry", "That", "Unfortunately", "As", "Nope"}
rows = [json.loads(l) for l in open(s1)]
bk = {"float32": backend("float32"), "bfloat16": backend("bfloat16")}
tok = bk["float32"].tok
def cls(t): return "R" if tok.decode([t]).strip() in REF else "C"
short = []
for r in rows:
    t1, l1 = r["top"][0]
    alt = next(((t, l) for t, l in r["top"][1:] if cls(t) != cls(t1)), None)
    if alt:
        short.append((l1 - alt[1], r))
short.sort(key=lambda x: x[0])
t0 = time.time()
S = Sampling(max_tokens=1, top_logprobs=5)
with open(out, "w") as f:
    for m1, r in short[:n]:
        rec = {k: r[k] for k in ("id", "grade", "prompt")}
        rec["screen_margin"] = m1
        for dt, b in bk.items():
            top = b.generate([render(b, r["prompt"])], S)[0].top_logprobs[0]
            first = top[0][0]
            alt = next(((t, l) for t, l in top[1:] if cls(t) != cls(first)), None)
            rec[dt] = {"top": top, "margin": None if alt is None else top[0][1] - alt[1],
                       "first": tok.decode([first]), "alt": None if alt is None else tok.decode([alt[0]])}
        f.write(json.dumps(rec) + "\n"); f.flush()
        print(rec["id"], round(m1, 4), {dt: (rec[dt]["first"], rec[dt]["alt"], rec[dt]["margin"]) for dt in bk},
              round(time.time() - t0), flush=True)
