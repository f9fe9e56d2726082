"""Stage-3 tally: a first-token flip = the greedy token differs, where greedy (torch argmax) takes the lowest token
id among exact ties (bf16 logits tie often); the topk order of tied tokens is not the greedy choice."""
import json, sys, collections
def greedy(top):
    best = max(l for _, l in top)
    return min(t for t, l in top if l == best)
rows = [json.loads(l) for l in open(sys.argv[1])]
n = collections.Counter(); f = collections.Counter(); ties = collections.Counter(); items = collections.defaultdict(set)
for r in rows:
    k = (r["dtype"], r["bs"])
    n[k] += 1
    s, b = greedy(r["solo_top"]), greedy(r["batch_top"])
    f[k] += s != b
    if s != b: items[r["dtype"]].add(r["item"])
    ties[k] += r["batch_top"][0][1] == r["batch_top"][1][1]
for k in sorted(n): print(k, f"{f[k]}/{n[k]} first-token flips; batch ties {ties[k]}")
for dt in ("bfloat16", "float32"):
    tot = sum(f[k] for k in f if k[0] == dt); nn = sum(n[k] for k in n if k[0] == dt)
    print(dt, "total", tot, "/", nn, "items", sorted(items[dt]))
