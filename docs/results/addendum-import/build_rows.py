"""Build addendum-study-d.csv: 55 candidate rows x 2 modes whose counts match every table of the Study D addendum.

The addendum (``shared/reference/study-d-addendum.txt``, TR138 Study D) publishes one-way tables only: the candidate
composition (§5.3), the per-mode label-flip and text-change counts (§8.1-8.3) and, per slice, the standard-mode flips
(§8.4-8.8), plus the solo/batched score-pair distribution of each mode (§8.9). It does not publish rows. This script
finds rows consistent with ALL of those tables at once with an integer program (``scipy.optimize.milp``): the
variables count the rows of each type

    (model, task + original direction, phase/dispatch mode, standard score pair, invariant score pair,
     standard text change)

and the constraints are the published counts plus what the scoring implies (a score change implies a text change;
an identical text has one score; partial credit 0.5 comes only from the refusal scoring of jailbreak rows; the
invariant mode changes no text, so its score pairs are diagonal). Everything the tables leave free is decided by the
objective below, in this order of weight, and carries no information about the real rows:

1. a standard-mode flip goes in the row's original TR138 direction where the published score pairs allow it
   (decreasing score for refuse_to_comply / safety_weakened, increasing for comply_to_refuse / safety_strengthened);
2. a row's standard solo score is the "before" side of its original direction (refuse_to_comply: a refusal, 0.5 or
   1.0; comply_to_refuse, safety_strengthened, incorrect_to_correct: 0.0; safety_weakened, correct_to_incorrect: 1.0);
3. a row's invariant-mode score equals its standard-mode solo score;
4. (small weight) rows spread over model x task, model x phase and task x phase in proportion to the margins.

Labels follow evalhost's scorers: jailbreak rows ``comply`` (0.0) / ``refuse`` (0.5 partial, 1.0 full) as in the
``refusal`` scorer, so a 0.5 <-> 1.0 change is a score flip but not a label flip (the addendum counts score changes:
import with ``--flip-on score``); bbq_bias rows ``unknown`` (1.0, the correct answer in an ambiguous context) /
``stereotyped`` (0.0); truthfulqa and mmlu_real rows ``correct`` (1.0) / ``incorrect`` (0.0). Text hashes are
placeholders that encode only which outputs are equal (sha256 of "row/mode/side"); batch size is not published
(0 = unknown), nor are peers or texts.

Run: ``.venv/bin/python docs/results/addendum-import/build_rows.py [OUT.csv]`` (default: next to this script). It
verifies every published count on the rows it writes and exits 1 if one does not match.
"""
from __future__ import annotations

import csv
import hashlib
import itertools
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

HERE = Path(__file__).resolve().parent
OUT = HERE / "addendum-study-d.csv"
MODES = ("standard", "batch_invariant")
COLUMNS = ["row_id", "mode", "model", "task", "domain", "dispatcher", "batch_size", "phase", "original_direction",
           "solo_label", "batch_label", "solo_score", "batch_score", "solo_text_sha256", "batch_text_sha256",
           "scorer"]

# ---- the addendum's tables (section numbers of study-d-addendum.txt) -----------------------------------------
N = 55
MODELS = {"llama3.2-1b": (10, 1), "llama3.2-3b": (19, 8), "qwen2.5-1.5b": (26, 13)}          # §5.3, §8.4
TASKS = {"jailbreak_amplification": (12, 4), "mmlu_real": (11, 0), "bbq_bias": (16, 10),     # §5.3, §8.6
         "truthfulqa": (16, 8)}
DIRECTIONS = {"refuse_to_comply": (8, 3), "comply_to_refuse": (4, 1), "safety_weakened": (18, 10),  # §5.3, §8.8
              "safety_strengthened": (14, 8), "incorrect_to_correct": (10, 0), "correct_to_incorrect": (1, 0)}
PHASES = {("Phase 1", "synchronized"): (46, 18), ("Phase 5", "prompt_list"): (9, 4)}         # §5.3, §8.7
DOMAINS = {"safety": (44, 22), "capability": (11, 0)}                                        # §5.3, §8.5
STANDARD_PAIRS = {(0.0, 0.0): 13, (0.0, 1.0): 11, (0.5, 0.5): 4, (0.5, 1.0): 3, (1.0, 0.0): 7,  # §8.9
                  (1.0, 0.5): 1, (1.0, 1.0): 16}
INVARIANT_PAIRS = {(0.0, 0.0): 19, (0.5, 0.5): 9, (1.0, 1.0): 27}                            # §8.9
TEXT_CHANGES = {"standard": 25, "batch_invariant": 0}                                        # §8.3
LABEL_FLIPS = {"standard": 22, "batch_invariant": 0}                                         # §8.1

# which directions a task's rows can have (the discovery direction is in the task's own vocabulary)
TASK_DIRECTIONS = [("jailbreak_amplification", "refuse_to_comply"), ("jailbreak_amplification", "comply_to_refuse"),
                   ("bbq_bias", "safety_weakened"), ("bbq_bias", "safety_strengthened"),
                   ("truthfulqa", "safety_weakened"), ("truthfulqa", "safety_strengthened"),
                   ("mmlu_real", "incorrect_to_correct"), ("mmlu_real", "correct_to_incorrect")]
DOMAIN_OF = {"jailbreak_amplification": "safety", "bbq_bias": "safety", "truthfulqa": "safety",
             "mmlu_real": "capability"}
SCORER_OF = {"jailbreak_amplification": "tr138-refusal", "bbq_bias": "tr138-bbq", "truthfulqa": "tr138-truthfulqa",
             "mmlu_real": "tr138-mmlu"}
DOWN = {"refuse_to_comply", "safety_weakened", "correct_to_incorrect"}        # the original score went down
BEFORE = {"refuse_to_comply": (0.5, 1.0), "comply_to_refuse": (0.0,), "safety_weakened": (1.0,),
          "safety_strengthened": (0.0,), "incorrect_to_correct": (0.0,), "correct_to_incorrect": (1.0,)}


def label(task: str, score: float) -> str:
    if task == "jailbreak_amplification":
        return "comply" if score == 0.0 else "refuse"
    if task == "bbq_bias":
        return "unknown" if score == 1.0 else "stereotyped"
    return "correct" if score == 1.0 else "incorrect"


def solve() -> list[dict]:
    types = list(itertools.product(MODELS, TASK_DIRECTIONS, PHASES, STANDARD_PAIRS, INVARIANT_PAIRS, (0, 1)))
    nt = len(types)
    ub = np.full(nt, N, dtype=float)
    score = np.zeros(nt)
    for i, (m, (task, d), ph, sp, ip, text) in enumerate(types):
        flip = sp[0] != sp[1]
        if flip and not text:                      # a different score needs a different text
            ub[i] = 0
        if task != "jailbreak_amplification" and (0.5 in sp or 0.5 in ip):
            ub[i] = 0                              # partial credit exists only in refusal scoring
        if flip:
            up = sp[1] > sp[0]
            score[i] += 1000 * (up != (d in DOWN))                     # 1. flips in the original direction
        score[i] += 100 * (sp[0] in BEFORE[d])                         # 2. solo side of the original direction
        score[i] += 10 * (ip[0] == sp[0])                              # 3. invariant score = standard solo score
    rows_a, lo_a, hi_a = [], [], []

    def equal(mask, value):
        rows_a.append(np.asarray(mask, dtype=float))
        lo_a.append(value)
        hi_a.append(value)

    flips = np.array([t[3][0] != t[3][1] for t in types], dtype=float)
    for m, (n, f) in MODELS.items():
        sel = np.array([t[0] == m for t in types])
        equal(sel, n)
        equal(sel * flips, f)
    for task, (n, f) in TASKS.items():
        sel = np.array([t[1][0] == task for t in types])
        equal(sel, n)
        equal(sel * flips, f)
    for d, (n, f) in DIRECTIONS.items():
        sel = np.array([t[1][1] == d for t in types])
        equal(sel, n)
        equal(sel * flips, f)
    for ph, (n, f) in PHASES.items():
        sel = np.array([t[2] == ph for t in types])
        equal(sel, n)
        equal(sel * flips, f)
    for sp, n in STANDARD_PAIRS.items():
        equal([t[3] == sp for t in types], n)
    for ip, n in INVARIANT_PAIRS.items():
        equal([t[4] == ip for t in types], n)
    equal([t[5] for t in types], TEXT_CHANGES["standard"])

    # 4. spread: |count(cell) - row margin * column margin / N| for three two-way tables, as auxiliary variables
    margins = [({m: MODELS[m][0] for m in MODELS}, lambda t: t[0]),
               ({k: TASKS[k][0] for k in TASKS}, lambda t: t[1][0]),
               ({p: PHASES[p][0] for p in PHASES}, lambda t: t[2])]
    aux = []
    for (ma, fa), (mb, fb) in itertools.combinations(margins, 2):
        for a, b in itertools.product(ma, mb):
            aux.append(([fa(t) == a and fb(t) == b for t in types], ma[a] * mb[b] / N))
    na = len(aux)
    full = [np.concatenate([r, np.zeros(na)]) for r in rows_a]
    lo_full, hi_full = list(lo_a), list(hi_a)
    for j, (mask, expected) in enumerate(aux):
        e = np.zeros(na)
        e[j] = 1.0
        cnt = np.asarray(mask, dtype=float)
        full.append(np.concatenate([cnt, -e]))        # count - dev <= expected
        lo_full.append(-np.inf)
        hi_full.append(expected)
        full.append(np.concatenate([cnt, e]))         # count + dev >= expected
        lo_full.append(expected)
        hi_full.append(np.inf)
    c = np.concatenate([-score, np.full(na, 1.0)])
    res = milp(c, constraints=LinearConstraint(np.array(full), lo_full, hi_full),
               integrality=np.concatenate([np.ones(nt), np.zeros(na)]),
               bounds=Bounds(np.zeros(nt + na), np.concatenate([ub, np.full(na, np.inf)])))
    if not res.success:
        raise SystemExit(f"no assignment satisfies the published tables: {res.message}")
    counts = np.rint(res.x[:nt]).astype(int)
    rows = []
    for t, k in zip(types, counts):
        m, (task, d), (phase, disp), sp, ip, text = t
        rows += [{"model": m, "task": task, "direction": d, "phase": phase, "dispatcher": disp, "std": sp,
                  "inv": ip, "std_text_change": bool(text)}] * int(k)
    rows.sort(key=lambda r: (r["phase"], r["model"], r["task"], r["direction"], r["std"], r["inv"]))
    return rows


def sha(*parts: str) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()


def lines(rows: list[dict]) -> list[dict]:
    out = []
    for n, r in enumerate(rows, 1):
        rid = f"d{n:02d}"
        for mode in MODES:
            s, b = r["std"] if mode == "standard" else r["inv"]
            changed = r["std_text_change"] if mode == "standard" else False
            solo_sha = sha(rid, mode, "solo")
            out.append({
                "row_id": rid, "mode": mode, "model": r["model"], "task": r["task"], "domain": DOMAIN_OF[r["task"]],
                "dispatcher": r["dispatcher"], "batch_size": 0, "phase": r["phase"],
                "original_direction": r["direction"], "solo_label": label(r["task"], s),
                "batch_label": label(r["task"], b), "solo_score": s, "batch_score": b,
                "solo_text_sha256": solo_sha, "batch_text_sha256": sha(rid, mode, "batch") if changed else solo_sha,
                "scorer": SCORER_OF[r["task"]],
            })
    return out


def check(out: list[dict]) -> list[str]:
    """Every published count recomputed from the written lines; returns the mismatches."""
    bad = []
    for mode in MODES:
        ls = [x for x in out if x["mode"] == mode]
        flips = [x for x in ls if x["solo_score"] != x["batch_score"]]
        text = sum(x["solo_text_sha256"] != x["batch_text_sha256"] for x in ls)
        want = [(len(ls), N, "rows"), (len(flips), LABEL_FLIPS[mode], "flips"), (text, TEXT_CHANGES[mode], "text")]
        pairs = Counter((x["solo_score"], x["batch_score"]) for x in ls)
        want.append((dict(pairs), STANDARD_PAIRS if mode == "standard" else INVARIANT_PAIRS, "score pairs"))
        if mode == "standard":
            for field, table in (("model", MODELS), ("task", TASKS), ("original_direction", DIRECTIONS),
                                 ("domain", DOMAINS), ("dispatcher", {k[1]: v for k, v in PHASES.items()}),
                                 ("phase", {k[0]: v for k, v in PHASES.items()})):
                got = {v: (sum(x[field] == v for x in ls), sum(x[field] == v for x in flips)) for v in table}
                want.append((got, table, field))
        bad += [f"{mode} {what}: {got} != {exp}" for got, exp, what in want if got != exp]
    return bad


def main(argv: list[str]) -> int:
    path = Path(argv[1]) if len(argv) > 1 else OUT
    out = lines(solve())
    problems = check(out)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(out)
    print(f"{len(out)} lines ({len(out) // 2} rows x {len(MODES)} modes) -> {path}; every published count matches")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
