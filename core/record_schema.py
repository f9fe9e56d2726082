"""The record schema: what one generation becomes in ``records.jsonl`` (:func:`build_records`), version
:data:`SCHEMA_VERSION`. The fields are documented in ``docs/architecture.md`` ("Records"); ``evalhost import`` writes
the same schema.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .backend_extra import record_extra
from .cobatch import finalize
from .plan import record_key
from .scoring import Scorers
from .types import sha256_text

if TYPE_CHECKING:
    from .run_worker import GroupDone
    from .study import Study

SCHEMA_VERSION = 1


def build_records(study: "Study", run_id: str, done: "GroupDone", fid: str, scorers: Scorers) -> list[dict[str, Any]]:
    """The records of one finished group: one per target member (fillers get none), scored, in the schema of
    ``docs/architecture.md``'s records table (version :data:`SCHEMA_VERSION`)."""
    job, result = done.job, done.result
    ids = [item.id for item, _ in job.members]
    out = []
    for pos, ((item, role), prompt, gen) in enumerate(zip(job.members, done.prompts, result.generations)):
        if role != "target":
            continue
        scorer, score, scorer_error = scorers.score(job, item, gen.text)
        cand = item.metadata.get("candidate") or {}
        t = dict(gen.timings)
        if "sent" in t and "finished" in t:
            t["latency_s"] = round(t["finished"] - t["sent"], 6)
        out.append({
            "schema": SCHEMA_VERSION,
            "key": record_key(job.cell, item.id, job.repeat),
            "study": study.name, "phase": cand.get("phase") or study.phase, "run_id": run_id, "cell": job.cell,
            "model": job.model.name, "alignment_type": job.model.alignment_type,
            "backend": job.backend.label, "backend_plugin": job.backend.plugin, "backend_config": job.backend.options,
            "dispatcher": job.dispatcher.label, "dispatcher_plugin": job.dispatcher.plugin,
            "arm": job.dispatcher.options.get("arm"),
            "batch_size": job.batch_size, "condition": job.condition, "repeat": job.repeat,
            "task": item.task, "task_source": cand.get("task_source", job.task.source), "item_id": item.id,
            "domain": item.domain,
            "group_id": job.group_id, "position": pos, "peers": ids[:pos] + ids[pos + 1:],
            "prompt_sha256": sha256_text(prompt),
            "output_text": gen.text, "output_token_ids": list(gen.token_ids), "output_sha256": sha256_text(gen.text),
            "finish_reason": gen.finish_reason, "logprobs": gen.logprobs,
            # [sampling] top_logprobs = k: per output token its k most likely [token, logprob], most likely first
            **({"top_logprobs": gen.top_logprobs} if gen.top_logprobs is not None else {}),
            "scorer": scorer, "label": None if score is None else score.label,
            "score": None if score is None else score.value,
            "rationale": None if score is None else score.rationale, "scorer_error": scorer_error,
            "timings": t, "attempts": gen.attempts, "restarted": gen.restarted,
            # batch groups get their co-batching verdict and whether it counts (evalhost.cobatch)
            "dispatch_evidence": finalize(result.evidence, job.condition, study.count_unverified, len(job.members)),
            "fingerprint_id": fid,
            # Generation.extra, JSON-safe and at most 64 KiB (evalhost.backend_extra)
            "backend_extra": record_extra(gen.extra),
            "candidate_kind": cand.get("kind"),
            # Study D: the discovery row's direction in the addendum's vocabulary (candidates task source)
            "original_direction": cand.get("original_direction"),
        })
    return out
