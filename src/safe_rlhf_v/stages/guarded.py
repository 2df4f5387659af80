"""`guarded-generate`: a policy's answers to a data set's prompts behind the multi-level guardrail."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safe_rlhf_v import work_dir as layout
from safe_rlhf_v.config import PipelineConfig
from safe_rlhf_v.data.sources import load_split
from safe_rlhf_v.guardrail import Guardrail, summarize
from safe_rlhf_v.models.judge import GuardJudge
from safe_rlhf_v.models.policy import GenerationSettings, Policy
from safe_rlhf_v.storage import atomic_write_text


def guarded_generate(
    cfg: PipelineConfig,
    policy_dir: str,
    guard_dir: str,
    data_uri: str,
    out: Path,
    *,
    limit: int | None = None,
) -> dict[str, Any]:
    """Answer the evaluation prompts of `data_uri` through the guardrail; write traces and summary."""
    section = cfg.guardrail
    prompts = load_split(data_uri, cfg.data.eval_split, cache_dir=layout.data_cache(cfg.work_dir))
    if limit is not None:
        prompts = prompts.select(range(min(limit, len(prompts))))
    policy = Policy(
        policy_dir, GenerationSettings.from_config(section.generation, batch_size=section.batch_size)
    )
    guardrail = Guardrail(
        policy,
        GuardJudge(guard_dir, batch_size=section.batch_size),
        rounds=section.rounds,
        refuse_severities=section.refuse_severities,
    )
    traces = guardrail.run(list(prompts["image"]), list(prompts["question"]))
    summary = summarize(traces, section.rounds)
    items = [
        trace.to_dict() | {"category": category}
        for trace, category in zip(traces, prompts["category"], strict=True)
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps({"summary": summary, "traces": items}, indent=2))
    return summary
