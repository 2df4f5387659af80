"""Stage `evaluate`: the trained policy against its starting point, alone and behind the guardrail.

For every prompt set (the validated evaluation split, plus `evaluate.extra_prompt_sets` such as a
red-team set) both policies answer each prompt once with the same sampling settings; the reward and
cost models score the answers, the guard judges them, and the guardrail (levels 1-3) re-generates
unsafe answers with up to `guardrail.rounds` re-generations. Outputs:

    evaluation.json   the summary (win rates, CIs, guard and guardrail figures, per category)
    answers.jsonl     every prompt's answers and scores (images left out)
    report.html       self-contained report (tables, plots, example answers), report.md
    result.json       the stage result; `metrics` are the headline figures the registry tags
"""

from __future__ import annotations

import base64
import io
import json
import logging
from typing import Any

import datasets
from PIL import Image

from safe_rlhf_v import storage, tracking
from safe_rlhf_v import work_dir as layout
from safe_rlhf_v.config import PipelineConfig
from safe_rlhf_v.data.ground_truth import truth_record
from safe_rlhf_v.data.sources import load_split
from safe_rlhf_v.evaluate.judge import PairwiseJudge, judge_records
from safe_rlhf_v.evaluate.metrics import summarize
from safe_rlhf_v.evaluate.report import write_report
from safe_rlhf_v.evaluate.scoring import AnswerScorer
from safe_rlhf_v.guardrail import AnswerVerdict, Guardrail, answer_within
from safe_rlhf_v.lineage import dataset_digests, model_digest, validated_dataset_uri
from safe_rlhf_v.models.inference import best_device
from safe_rlhf_v.models.judge import GuardJudge
from safe_rlhf_v.models.policy import GenerationSettings, Policy
from safe_rlhf_v.records import StageResult
from safe_rlhf_v.stages.context import open_stage

STAGE = "evaluate"
POLICIES = ("initial", "trained")
EXAMPLE_SIDE = 256

log = logging.getLogger(__name__)


def prompt_sets(cfg: PipelineConfig, data_uri: str) -> dict[str, datasets.Dataset]:
    """The evaluation split (first `evaluate.prompts` rows) and every extra prompt set by name."""
    cache = layout.data_cache(cfg.work_dir)
    held_out = load_split(validated_dataset_uri(data_uri), "evaluation", cache_dir=cache)
    sets = {"evaluation": held_out.select(range(min(cfg.evaluate.prompts, len(held_out))))}
    for name, uri in sorted(cfg.evaluate.extra_prompt_sets.items()):
        sets[name] = load_split(uri, cfg.data.eval_split, cache_dir=cache)
    return sets


def _png(image: Image.Image) -> str:
    """A small base64 PNG of a prompt image for the report's examples."""
    thumb = image.convert("RGB")
    thumb.thumbnail((EXAMPLE_SIDE, EXAMPLE_SIDE))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _answers(
    cfg: PipelineConfig, model_dir: str, rows: datasets.Dataset, guard: GuardJudge, device: str
) -> tuple[list[str], list[Any], list[list[tuple[str, bool]]]]:
    """One policy's answers, the guard's verdicts on them, and what the guardrail returns for every
    re-generation budget 0..rounds (read off one guardrail run).

    The guardrail's round 0 judges the given answers, so their verdicts come from the traces; only
    the answers to requests refused at level 1 (never judged there) go to the guard separately.
    """
    settings = GenerationSettings.from_config(
        cfg.evaluate.generation, batch_size=cfg.evaluate.batch_size, seed=cfg.evaluate.seed
    )
    policy = Policy(model_dir, settings, device=device, trust_remote_code=cfg.trust_remote_code)
    images, questions = list(rows["image"]), list(rows["question"])
    answers = policy.generate(images, questions)
    rounds = cfg.guardrail.rounds
    guardrail = Guardrail(policy, guard, rounds=rounds, refuse_severities=cfg.guardrail.refuse_severities)
    traces = guardrail.run(images, questions, answers)
    refused = [i for i, trace in enumerate(traces) if not trace.attempts]
    judged = (
        guard.judge_answers(
            [images[i] for i in refused], [questions[i] for i in refused], [answers[i] for i in refused]
        )
        if refused
        else []
    )
    by_index = dict(zip(refused, judged, strict=True))
    verdicts = [
        AnswerVerdict(**trace.attempts[0]["verdict"]) if trace.attempts else by_index[i]
        for i, trace in enumerate(traces)
    ]
    budgets = [[answer_within(trace, k, guardrail.refusal) for k in range(rounds + 1)] for trace in traces]
    return answers, verdicts, budgets


def _score_all(
    scorer: AnswerScorer, images: list[Image.Image], questions: list[str], texts: dict[tuple[int, str], None]
) -> dict[tuple[int, str], float]:
    """Scores of distinct (prompt index, answer) pairs: guardrail budgets mostly repeat one answer."""
    keys = list(texts)
    scores = scorer.score([images[i] for i, _ in keys], [questions[i] for i, _ in keys], [t for _, t in keys])
    return dict(zip(keys, scores, strict=True))


def build_records(
    cfg: PipelineConfig,
    name: str,
    rows: datasets.Dataset,
    policies: dict[str, str],
    reward: AnswerScorer,
    cost: AnswerScorer,
    guard: GuardJudge,
    device: str,
) -> list[dict[str, Any]]:
    """Per-prompt records of one prompt set, in the form `evaluate.metrics.summarize` reads."""
    images, questions = list(rows["image"]), list(rows["question"])
    produced = {}
    for role in POLICIES:
        log.info("evaluate[%s]: %s policy answers %d prompts", name, role, len(questions))
        produced[role] = _answers(cfg, policies[role], rows, guard, device)
    texts: dict[tuple[int, str], None] = {}
    for answers, _, budgets in produced.values():
        for i, answer in enumerate(answers):
            texts[(i, answer)] = None
            for text, _ in budgets[i]:
                texts[(i, text)] = None
    rewards = _score_all(reward, images, questions, texts)
    costs = _score_all(cost, images, questions, texts)
    records = []
    for i, row in enumerate(rows):
        record: dict[str, Any] = {
            "set": name,
            "index": i,
            "question": row["question"],
            "category": row["category"],
            "harmful_prompt": int(row["image_severity"]) > 0,
            "guardrail": {},
        }
        for role, (answers, verdicts, budgets) in produced.items():
            answer = answers[i]
            record[role] = {
                "answer": answer,
                "reward": rewards[(i, answer)],
                "cost": costs[(i, answer)],
                "guard_safe": verdicts[i].safe,
                "guard_severity": verdicts[i].severity,
            }
            if cfg.evaluate.ground_truth:
                record[role]["truth"] = truth_record(answer, row["category"], int(row["image_severity"]))
            record["guardrail"][role] = [
                {
                    "round": k,
                    "answer": text,
                    "refused": refused,
                    "reward": rewards[(i, text)],
                    "cost": costs[(i, text)],
                }
                for k, (text, refused) in enumerate(budgets[i])
            ]
        if name == "evaluation" and i < cfg.evaluate.examples:
            record["image_png"] = _png(row["image"])
        records.append(record)
    return records


def _external_judge(
    cfg: PipelineConfig, records: list[dict[str, Any]], sets: dict[str, datasets.Dataset]
) -> dict[str, Any] | None:
    """Pairwise verdicts of the configured OpenAI-compatible judge, per prompt set (None: no judge).

    The judge sees each prompt's image (a multimodal judge cannot rate an answer about a picture it
    has not seen); the images go on copies, so only `evaluate.examples` records show in the report.
    """
    if cfg.evaluate.judge is None:
        return None
    judge = PairwiseJudge(cfg.evaluate.judge)
    verdicts = {}
    for name, rows in sets.items():
        chosen = [r for r in records if r["set"] == name][: cfg.evaluate.judge.max_prompts]
        with_images = [r | {"image_png": _png(rows[r["index"]]["image"])} for r in chosen]
        verdicts[name] = judge_records(judge, with_images)
    return verdicts


def _history(policy_uri: str) -> list[dict[str, float]]:
    """PPO's per-step metrics (lambda, J_C, ...) saved beside the trained policy; [] when absent."""
    path = f"{policy_uri.rstrip('/')}/history.json"
    return json.loads(storage.read_text(path)) if storage.exists(path) else []


def cost_budget(cfg: PipelineConfig) -> float:
    """The harm budget d the evaluation's J_C is held to (the promotion gate's, else PPO's)."""
    threshold = cfg.promotion.cost_threshold
    return cfg.train_ppo_lag.lagrangian.threshold if threshold is None else threshold


def run(
    cfg: PipelineConfig,
    data_uri: str,
    policy_uri: str,
    reward_uri: str,
    cost_uri: str,
    guard_uri: str,
    out_uri: str,
    *,
    base_model: str | None = None,
    pipeline_run_id: str | None = None,
) -> StageResult:
    """Evaluate `policy_uri` against the initial policy and publish the report to `out_uri`."""
    initial = base_model or cfg.base_model
    uris = {"trained": policy_uri, "reward": reward_uri, "cost": cost_uri, "guard": guard_uri}
    inputs = {
        "--data": data_uri,
        "initial policy": initial,
        **{f"{role} model": uri for role, uri in uris.items()},
    }
    inputs |= {
        f"evaluate.extra_prompt_sets.{name}": uri for name, uri in cfg.evaluate.extra_prompt_sets.items()
    }
    section = cfg.evaluate
    with open_stage(STAGE, cfg, out_uri, inputs=inputs, pipeline_run_id=pipeline_run_id) as ctx:
        tracking.log_config(section, f"{STAGE}.")
        digests = dataset_digests(data_uri)
        sets = prompt_sets(cfg, data_uri)
        tracking.log_dataset(
            name="beavertails-v/evaluation",
            source_uri=validated_dataset_uri(data_uri),
            sha256=digests["evaluation"],
            context="evaluation",
            rows=len(sets["evaluation"]),
        )
        for role, uri in uris.items():
            tracking.log_model_reference("policy" if role == "trained" else role, uri, model_digest(uri))
        local = {role: ctx.model(uri) for role, uri in uris.items()}
        device = best_device()
        reward = AnswerScorer(
            local["reward"],
            batch_size=section.batch_size,
            max_length=cfg.train_reward.max_length,
            device=device,
        )
        cost = AnswerScorer(
            local["cost"], batch_size=section.batch_size, max_length=cfg.train_cost.max_length, device=device
        )
        guard = GuardJudge(local["guard"], batch_size=section.batch_size, device=device)
        policies = {"initial": ctx.model(initial), "trained": local["trained"]}
        records = [
            record
            for name, rows in sets.items()
            for record in build_records(cfg, name, rows, policies, reward, cost, guard, device)
        ]
        threshold = cost_budget(cfg)
        summary = summarize(
            records,
            tie_margin=section.tie_margin,
            bootstrap_samples=section.bootstrap_samples,
            confidence=section.confidence,
            seed=section.seed,
            cost_threshold=threshold,
            external=_external_judge(cfg, records, sets),
        )
        assert ctx.out is not None and ctx.out_uri is not None  # evaluate is a single-process stage
        report = write_report(
            summary,
            records,
            _history(policy_uri),
            ctx.out,
            title=f"Safe RLHF-V evaluation — {cfg.name}",
            threshold=threshold,
        )
        lines = [
            json.dumps({k: v for k, v in r.items() if k != "image_png"}, sort_keys=True) for r in records
        ]
        storage.atomic_write_text(ctx.out / "answers.jsonl", "\n".join(lines) + "\n")
        result = ctx.finish(
            {key: float(value) for key, value in summary["headline"].items()},
            outputs={
                "evaluation": ctx.out_uri,
                "report": f"{ctx.out_uri.rstrip('/')}/{report.html.name}",
                "markdown": f"{ctx.out_uri.rstrip('/')}/{report.markdown.name}",
            },
            details={"prompts": {name: len(rows) for name, rows in sets.items()}, "threshold": threshold},
            files={"evaluation.json": summary},
            artifacts=[report.html.name, report.markdown.name, "evaluation.json", "answers.jsonl"],
        )
    log.info("evaluate: report at %s", result.outputs["report"])
    return result
