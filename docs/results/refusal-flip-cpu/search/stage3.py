"""Stage 3: a task's items exactly as the study groups them (evalhost.plan.make_groups with the study seed), first
token only: solo vs every padded batch, per dtype. Prints the solo margin, the batch margin and whether the top-1
token changed; writes every row."""
import json, sys, time
from common import *
from evalhost.plan import make_groups
task_file, out, seed, sizes = sys.argv[1], sys.argv[2], int(sys.argv[3]), [int(x) for x in sys.argv[4].split(",")]
dtypes = sys.argv[5].split(",") if len(sys.argv) > 5 else ["float32", "bfloat16"]
task = sys.argv[6] if len(sys.argv) > 6 else "refusal_boundary"
items = [json.loads(l) for l in open(task_file)]
titems = [TaskItem(id=it["id"], task=task, domain=it.get("domain", "safety"), prompt=it["prompt"]) for it in items]
S = Sampling(max_tokens=1, top_logprobs=5)
t0 = time.time()
flips = {}
with open(out, "a") as f:
    for dt in dtypes:
        b = backend(dt)
        solo = {}
        for it in titems:
            top = b.generate([b.render(it)], S)[0].top_logprobs[0]
            solo[it.id] = top
        for bs in sizes:
            for g, members in enumerate(make_groups(titems, bs, seed, task)):
                gens = b.generate([b.render(m) for m, _ in members], S)
                for pos, ((m, role), gen) in enumerate(zip(members, gens)):
                    if role != "target":
                        continue
                    st, bt = solo[m.id], gen.top_logprobs[0]
                    d = dict((t, l) for t, l in bt)
                    row = {"dtype": dt, "bs": bs, "group": g, "pos": pos, "item": m.id,
                           "solo_top": st[:2], "batch_top": bt[:2],
                           "solo_margin": st[0][1] - st[1][1],
                           "batch_margin_same_tokens": (d.get(st[0][0], -99) - d.get(st[1][0], -99)),
                           "flip": st[0][0] != bt[0][0]}
                    f.write(json.dumps(row) + "\n")
                    flips[dt, bs] = flips.get((dt, bs), 0) + row["flip"]
                    if row["flip"]:
                        print("FLIP", row, flush=True)
            print(dt, bs, "flips", flips.get((dt, bs), 0), round(time.time() - t0), flush=True)
print(flips)
