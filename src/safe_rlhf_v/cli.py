"""`safe-rlhf-v`: one command line, a subcommand per pipeline stage and per operation.

Every subcommand is a thin caller of a library function. A `UserError` (something in the config,
data, models, storage or environment that the user must fix) prints as one line and exits with
status 2, and so does an operating-system refusal the user can act on (disk full, over quota,
permission denied, read-only file system), naming the path. Any other exception is a bug here
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from safe_rlhf_v import __version__
from safe_rlhf_v.config import PipelineConfig, load_config, preset_names, preset_of
from safe_rlhf_v.errors import ArgumentError, UserError, redact
from safe_rlhf_v.progress import VERBOSE_ENV

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

DEFAULT_CONFIG = "demo.yaml"
EXIT_USER_ERROR = 2

_OS_REFUSALS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on device", "free space and rerun"),
    errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota and rerun"),
    errno.EACCES: ("permission denied", "check the owner and mode of the path, or choose another"),
    errno.EPERM: ("operation not permitted", "check the owner and mode of the path, or choose another"),
    errno.EROFS: ("read-only file system", "choose a writable location"),
}
"""Operating-system errors that are the user's to fix: errno -> (what happened, what to do)."""


def default_config_path() -> Path:
    """The embedded default preset (`configs/demo.yaml`, shipped inside the package)."""
    return Path(str(resources.files("safe_rlhf_v.configs") / DEFAULT_CONFIG))


def _config(args: argparse.Namespace) -> PipelineConfig:
    return load_config(args.config or default_config_path(), overrides=args.set)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="pipeline YAML (default: the embedded configs/demo.yaml)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set validate_data.preference_mostly=0.98 (repeatable)",
    )


def _add_config_uri_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config-uri",
        help="what the run form's `config` names: s3:// or a file in the mounted ConfigMap "
        "(default: the preset --config is; --set overrides become `config_overrides`)",
    )


def _add_run_id_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pipeline-run-id",
        help="nest the MLflow run under this pipeline run and share its checkpoints (default: a new id)",
    )


def cmd_make_demo_data(args: argparse.Namespace) -> int:
    from safe_rlhf_v.data.synthetic import write_demo_data

    paths = write_demo_data(Path(args.out), rows=args.rows, eval_rows=args.eval_rows, seed=args.seed)
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0


def cmd_make_demo_model(args: argparse.Namespace) -> int:
    from safe_rlhf_v.train.sft import build_demo_policy

    metrics = build_demo_policy(
        args.data, Path(args.out), seed=args.seed, epochs=args.sft_epochs, family=args.family
    )
    print(f"eval loss: {metrics['loss']:.4f} per response token")
    print(f"model: {args.out}")
    return 0


def cmd_validate_data(args: argparse.Namespace) -> int:
    from safe_rlhf_v.stages import validate_data

    cfg = _config(args)
    result = validate_data.run(cfg, args.out, data_uri=args.data)
    print(json.dumps(result.metrics, indent=2, sort_keys=True))
    print(f"validated data: {result.outputs['dataset']}")
    return 0


def cmd_train_score(args: argparse.Namespace) -> int:
    from safe_rlhf_v.stages import train_score

    cfg = _config(args)
    result = train_score.run(
        args.command,
        cfg,
        args.data,
        args.out,
        base_model=args.base_model,
        pipeline_run_id=args.pipeline_run_id,
    )
    if result.outputs:
        print(json.dumps(result.metrics, indent=2, sort_keys=True))
        print(f"model: {result.outputs['model']}")
    return 0


def cmd_train_ppo(args: argparse.Namespace) -> int:
    from safe_rlhf_v.stages import train_ppo

    cfg = _config(args)
    result = train_ppo.run(
        cfg,
        args.data,
        args.reward_model,
        args.cost_model,
        args.out,
        variant=args.variant,
        base_model=args.policy,
        pipeline_run_id=args.pipeline_run_id,
    )
    if result.outputs:
        print(json.dumps(result.metrics, indent=2, sort_keys=True))
        print(f"policy: {result.outputs['model']}")
    return 0


def cmd_train_guard(args: argparse.Namespace) -> int:
    from safe_rlhf_v.stages import train_guard

    result = train_guard.run(
        _config(args), args.data, args.out, base_model=args.base_model, pipeline_run_id=args.pipeline_run_id
    )
    if result.outputs:
        print(json.dumps(result.metrics, indent=2, sort_keys=True))
        print(f"guard: {result.outputs['model']}")
    return 0


def _read_image(path: str) -> PILImage:
    """An RGB image, or an ArgumentError naming the file (missing, not an image, truncated)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (FileNotFoundError, UnidentifiedImageError, OSError) as error:
        raise ArgumentError(f"--image {path}: cannot read image: {error}") from None


def cmd_moderate(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from safe_rlhf_v.models.judge import GuardJudge

    if not args.question.strip():
        raise ArgumentError("--question is empty: the guard judges a question (and optionally an answer)")
    image = _read_image(args.image)
    judge = GuardJudge(args.guard)
    verdict: dict[str, object] = {"query": asdict(judge.judge_queries([image], [args.question])[0])}
    if args.response is not None:
        verdict["response"] = asdict(judge.judge_answers([image], [args.question], [args.response])[0])
    print(json.dumps(verdict, indent=2))
    return 0


def cmd_guarded_generate(args: argparse.Namespace) -> int:
    from safe_rlhf_v.stages.guarded import guarded_generate

    cfg = _config(args)
    summary = guarded_generate(cfg, args.policy, args.guard, args.data, Path(args.out), limit=args.limit)
    print(json.dumps(summary, indent=2))
    print(f"answers and traces: {args.out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from safe_rlhf_v.serve import run_server

    run_server(
        _config(args),
        model=args.model,
        guard=args.guard,
        host=args.host,
        port=args.port,
        name=args.served_model_name,
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from safe_rlhf_v.pipelines.local import run_local
    from safe_rlhf_v.summary import format_summary

    cfg = _config(args)
    outcome = run_local(cfg, data_uri=args.data)
    print(format_summary(outcome))
    return 0 if outcome.succeeded else 1


def cmd_seeds(args: argparse.Namespace) -> int:
    from safe_rlhf_v.seeds import format_table, run_seeds

    results = run_seeds(_config(args), args.seeds, Path(args.out))
    print(format_table(results))
    print(f"figures: {Path(args.out) / 'seeds.json'}")
    return 0 if all(all(r.checks.values()) for r in results) else 1


def _config_reference(args: argparse.Namespace) -> str:
    """What a compiled pipeline's `config` parameter names: `--config-uri`, else the preset that
    `--config` is. A local file is refused, since no cluster pod can read the compiling machine's disk."""
    if args.config_uri:
        return args.config_uri
    path = args.config or default_config_path()
    preset = preset_of(path)
    if preset is None:
        raise ArgumentError(
            f"--config {path} is not a packaged preset ({', '.join(preset_names())}): put it where the "
            "pods can read it (s3:// or the kubernetes.config_map ConfigMap) and pass --config-uri"
        )
    return preset


def cmd_compile(args: argparse.Namespace) -> int:
    from safe_rlhf_v.ops.kfp_ops import compile_pipeline

    cfg = _config(args)
    compile_pipeline(cfg, Path(args.out), _config_reference(args), args.set)
    print(f"compiled pipeline: {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from safe_rlhf_v.stages import evaluate

    result = evaluate.run(
        _config(args),
        args.data,
        args.policy,
        args.reward,
        args.cost,
        args.guard,
        args.out,
        base_model=args.base_model,
        pipeline_run_id=args.pipeline_run_id,
    )
    print(json.dumps(result.metrics, indent=2, sort_keys=True))
    print(f"report: {result.outputs['report']}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from safe_rlhf_v.stages import register

    cfg = _config(args)
    result = register.run(
        cfg,
        policy_uri=args.policy,
        reward_uri=args.reward,
        cost_uri=args.cost,
        guard_uri=args.guard,
        evaluation_uri=args.evaluation,
        pipeline_run_id=args.pipeline_run_id,
    )
    versions = result.details["versions"]
    for role, version in versions.items():
        state = "created" if version["created"] else f"existing (registered in {version['registered_in']})"
        print(f"{role:<7} {version['uri']:<36} {state:<9} {version['source']}")
    policy = versions["policy"]
    if policy["alias"]:
        print(f"alias {policy['alias']!r} -> {policy['uri']}")
    else:
        print(
            f"alias {cfg.registry.candidate_alias!r} not moved: these policy bytes are already "
            f"{policy['uri']}, registered in pipeline run {policy['registered_in']}"
        )
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from safe_rlhf_v import registry

    cfg = _config(args)
    try:
        result = registry.promote(
            cfg,
            model=args.model,
            version=args.version,
            to=args.to,
            force=args.force,
            reason=args.reason,
            user=args.user,
        )
    except registry.PromotionRefused as refused:
        print(registry.gate_table(refused.checks))
        print(f"error: {refused}", file=sys.stderr)
        return 2
    print(registry.gate_table(result.checks))
    previous = f"version {result.previous_version}" if result.previous_version else "no version"
    forced = f" (forced: {result.reason})" if result.forced else ""
    print(f"{result.model}: alias {result.alias!r} moved from {previous} to version {result.version}{forced}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from safe_rlhf_v import registry

    rows = registry.list_versions(_config(args), args.name)
    print(registry.versions_table(rows) if rows else "no registered model versions yet")
    return 0


def cmd_upload(args: argparse.Namespace) -> int:
    import tempfile

    from safe_rlhf_v.ops.kfp_ops import PipelineOps, compile_pipeline

    cfg = _config(args)
    ops = PipelineOps.connect(args.host)  # before compiling: a wrong host fails fast
    with tempfile.TemporaryDirectory(prefix="safe-rlhf-v-") as tmp:
        package = compile_pipeline(cfg, Path(tmp) / "pipeline.yaml", _config_reference(args), args.set)
        pipeline = args.pipeline_name or cfg.name
        done = ops.upload(package, pipeline_name=pipeline, version_name=args.version_name)
    print(f"{done.action}: pipeline {done.pipeline_id}, version {done.version_name} ({done.version_id})")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from safe_rlhf_v.ops.kfp_ops import PipelineOps, read_params

    cfg = _config(args)
    params = read_params(Path(args.params)) if args.params else {}
    ops = PipelineOps.connect(args.host)
    pipeline = args.pipeline_name or cfg.name
    run_id = ops.submit(
        pipeline_name=pipeline,
        params=params,
        experiment=args.experiment or pipeline,
        run_name=args.run_name,
        service_account=cfg.kubernetes.service_account,
    )
    print(f"run: {run_id}")
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from safe_rlhf_v.ops.kfp_ops import PipelineOps, kfp_cron, read_params

    cfg = _config(args)
    params = read_params(Path(args.params)) if args.params else {}
    ops = PipelineOps.connect(args.host)
    pipeline = args.pipeline_name or cfg.name
    done = ops.schedule(
        pipeline_name=pipeline,
        cron=args.cron,
        name=args.name or f"{pipeline}-retrain",
        params=params,
        experiment=args.experiment or pipeline,
        service_account=cfg.kubernetes.service_account,
    )
    print(
        f"recurring run {done.action}: {done.recurring_run_id} ({done.status}; cron {kfp_cron(args.cron)}, "
        "latest version, max concurrency 1)"
    )
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from safe_rlhf_v.ops.kfp_ops import PipelineOps, format_runs

    ops = PipelineOps.connect(args.host)
    print(format_runs(ops.recent_runs(limit=args.limit, experiment=args.experiment)))
    return 0


def _add_kfp_args(parser: argparse.ArgumentParser, *, pipeline: bool = True) -> None:
    parser.add_argument("--host", help="Kubeflow Pipelines API URL (default $KFP_HOST); token: $KFP_TOKEN")
    if pipeline:
        parser.add_argument("--pipeline-name", help="pipeline name in Kubeflow (default: the config's name)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the docs and tests)."""
    parser = argparse.ArgumentParser(prog="safe-rlhf-v", description=__doc__.splitlines()[0])
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging; `run` also shows kfp.local's task dumps and repeated library warnings",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-demo-data", help="write synthetic BeaverTails-V train/evaluation parquet")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--rows", type=int, default=600, help="train pairs (default 600)")
    p.add_argument("--eval-rows", type=int, default=None, help="evaluation pairs (default rows/5)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_demo_data)

    p = sub.add_parser(
        "make-demo-model", help="build the tiny local vision-language model and warm-start it by SFT"
    )
    p.add_argument("--out", required=True, help="output folder (a Hugging Face model directory)")
    p.add_argument(
        "--data", required=True, help="demo data folder: its texts train the tokenizer, its pairs the SFT"
    )
    p.add_argument("--sft-epochs", type=int, default=None, help="supervised epochs (default: the demo's 5)")
    p.add_argument(
        "--family", default="llava", help="model family: llava (default), llava_next, qwen2_vl or qwen2_5_vl"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_demo_model)

    p = sub.add_parser("validate-data", help="stage: validate the data set with great-expectations")
    p.add_argument("--data", help="data URI (folder, s3://, hf://); default: the config's data.uri")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    _add_config_args(p)
    p.set_defaults(func=cmd_validate_data)

    for name, what in (
        ("train-reward", "reward model (RM-V, helpfulness)"),
        ("train-cost", "cost model (CM-V, harm)"),
    ):
        p = sub.add_parser(name, help=f"stage: train the {what} on validated data (torchrun-able)")
        p.add_argument("--data", required=True, help="a validate-data output folder (local or s3://)")
        p.add_argument("--out", required=True, help="output model folder or s3:// prefix")
        p.add_argument("--base-model", help="backbone to start from; default: the config's base_model")
        _add_run_id_arg(p)
        _add_config_args(p)
        p.set_defaults(func=cmd_train_score)

    p = sub.add_parser("train-guard", help="stage: train the Beaver-Guard-V guard on validated data")
    p.add_argument("--data", required=True, help="a validate-data output folder (local or s3://)")
    p.add_argument("--out", required=True, help="output guard folder or s3:// prefix")
    p.add_argument("--base-model", help="backbone to start from; default: the config's base_model")
    _add_run_id_arg(p)
    _add_config_args(p)
    p.set_defaults(func=cmd_train_guard)

    p = sub.add_parser("moderate", help="judge one request (and answer) with a guard; prints JSON")
    p.add_argument("--guard", required=True, help="a train-guard output folder")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--question", required=True)
    p.add_argument("--response", help="an answer to judge too")
    p.set_defaults(func=cmd_moderate)

    p = sub.add_parser(
        "guarded-generate", help="answer a data set's prompts behind the multi-level guardrail"
    )
    p.add_argument("--policy", required=True, help="policy model folder")
    p.add_argument("--guard", required=True, help="guard folder")
    p.add_argument("--data", required=True, help="data URI whose evaluation split gives the prompts")
    p.add_argument("--out", required=True, help="output JSON file: summary and one trace per prompt")
    p.add_argument("--limit", type=int, default=None, help="at most this many prompts")
    _add_config_args(p)
    p.set_defaults(func=cmd_guarded_generate)

    p = sub.add_parser(
        "serve", help="OpenAI-compatible chat endpoint for a policy behind the multi-level guardrail"
    )
    p.add_argument(
        "--model",
        required=True,
        help="policy folder, s3:// prefix, or models:/NAME@ALIAS | models:/NAME/VERSION",
    )
    p.add_argument("--guard", help="guard folder or models:/ URI (default: the registered policy's guard)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--served-model-name", help="model id clients send (default: the registered name or folder name)"
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("train-ppo-lag", help="stage: Safe RLHF-V PPO-Lagrangian fine-tuning (torchrun-able)")
    p.add_argument("--data", required=True, help="a validate-data output folder (prompts)")
    p.add_argument("--reward-model", required=True, help="train-reward output folder")
    p.add_argument("--cost-model", required=True, help="train-cost output folder")
    p.add_argument("--out", required=True, help="output policy folder or s3:// prefix")
    p.add_argument("--policy", help="initial policy; default: the config's base_model")
    _add_run_id_arg(p)
    p.add_argument(
        "--variant", default="safe-rlhf-v", choices=["safe-rlhf-v", "reward-only", "fixed-lambda"],
        help="safe-rlhf-v (default) or an ablation",
    )  # fmt: skip
    _add_config_args(p)
    p.set_defaults(func=cmd_train_ppo)

    p = sub.add_parser("run", help="run the whole pipeline locally through kfp.local")
    p.add_argument("--data", help="data URI; default: the config's data.uri")
    _add_config_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "seeds", help="train the PPO variants at several seeds and grade them with the exact judge"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="PPO seeds (default 0 1 2)")
    p.add_argument("--out", required=True, help="output folder: models, checkpoints and seeds.json")
    _add_config_args(p)
    p.set_defaults(func=cmd_seeds)

    p = sub.add_parser("compile", help="compile the pipeline to YAML for the Kubeflow UI")
    p.add_argument("--out", required=True, help="output YAML file")
    _add_config_args(p)
    _add_config_uri_arg(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser(
        "evaluate", help="stage: a trained policy against the initial one, alone and behind the guardrail"
    )
    p.add_argument("--policy", required=True, help="the trained policy folder (a train-ppo-lag output)")
    p.add_argument("--reward", required=True, help="train-reward output folder or s3:// prefix")
    p.add_argument("--cost", required=True, help="train-cost output folder or s3:// prefix")
    p.add_argument("--guard", required=True, help="train-guard output folder or s3:// prefix")
    p.add_argument("--data", required=True, help="a validate-data output folder (its evaluation split)")
    p.add_argument("--out", required=True, help="output folder: report.html, evaluation.json, answers")
    p.add_argument(
        "--base-model", help="the initial policy to compare with; default: the config's base_model"
    )
    _add_run_id_arg(p)
    _add_config_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("register", help="stage: register the run's models in MLflow; policy -> candidate")
    p.add_argument("--policy", required=True, help="train-ppo-lag output (the safe-rlhf-v policy)")
    p.add_argument("--reward", required=True, help="train-reward output folder or s3:// prefix")
    p.add_argument("--cost", required=True, help="train-cost output folder or s3:// prefix")
    p.add_argument("--guard", required=True, help="train-guard output folder or s3:// prefix")
    p.add_argument("--evaluation", required=True, help="evaluate output folder (its result.json)")
    p.add_argument(
        "--pipeline-run-id", help="the pipeline run that trained the policy (the default); another is refused"
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("promote", help="move the staging/production alias to a version behind the gate")
    p.add_argument("--model", required=True, help="registered model name")
    p.add_argument("--version", required=True, help="version number")
    p.add_argument("--to", required=True, choices=["staging", "production"], help="target alias")
    p.add_argument("--force", action="store_true", help="promote even if the gate fails (needs --reason)")
    p.add_argument("--reason", help="why; recorded on the version")
    p.add_argument("--user", help="who promotes; default: the login name")
    _add_config_args(p)
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("models", help="list registered model versions, their aliases and figures")
    p.add_argument("--name", help="one registered model; default: the config's four")
    _add_config_args(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("upload", help="compile the pipeline and upload it (or a new version) to Kubeflow")
    _add_kfp_args(p)
    p.add_argument("--version-name", help="default: <package version>-<hash of the compiled YAML>")
    _add_config_args(p)
    _add_config_uri_arg(p)
    p.set_defaults(func=cmd_upload)

    p = sub.add_parser("submit", help="start a run of the latest uploaded pipeline version")
    _add_kfp_args(p)
    p.add_argument("--params", help="YAML mapping of pipeline parameters, e.g. data_uri: s3://bucket/data")
    p.add_argument("--experiment", help="experiment (created if missing; default: the pipeline name)")
    p.add_argument("--run-name", help="default: the pipeline name and the UTC time")
    _add_config_args(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("schedule", help="retrain on a cron schedule (recurring run of the latest version)")
    _add_kfp_args(p)
    p.add_argument(
        "--cron", required=True, help="crontab line, e.g. '0 3 * * 0' = Sundays 03:00 (scheduler time, UTC)"
    )
    p.add_argument("--name", help="recurring run name (default: <pipeline>-retrain)")
    p.add_argument("--params", help="YAML mapping of pipeline parameters for every triggered run")
    p.add_argument("--experiment", help="experiment (created if missing; default: the pipeline name)")
    _add_config_args(p)
    p.set_defaults(func=cmd_schedule)

    p = sub.add_parser("runs", help="status table of recent pipeline runs in Kubeflow")
    _add_kfp_args(p, pipeline=False)
    p.add_argument("--limit", type=int, default=10, help="how many runs, newest first (default 10)")
    p.add_argument("--experiment", help="only runs of this experiment")
    p.set_defaults(func=cmd_runs)

    return parser


def _one_line(text: str) -> str:
    """A message as one stderr line: its lines joined (after a heading's colon by a space, else by
    "; "), credentials in quoted URIs masked."""
    joined = ""
    for line in filter(None, (line.strip() for line in text.splitlines())):
        joined += line if not joined else (" " if joined.endswith(":") else "; ") + line
    return redact(joined)


def _os_refusal(error: OSError) -> str | None:
    """The one-line explanation of an OSError the user can fix, None for any other OSError."""
    known = _OS_REFUSALS.get(error.errno or 0)
    if known is None:
        return None
    what, fix = known
    paths = [str(path) for path in (error.filename, error.filename2) if path is not None]
    where = f": {' -> '.join(paths)}" if paths else ""
    return f"{what}{where} ({fix})"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `safe-rlhf-v` console script."""
    args = build_parser().parse_args(argv)
    if args.verbose:  # for this process and the pipeline tasks it starts (see `progress`)
        os.environ[VERBOSE_ENV] = "1"
    # Our progress at INFO; third-party libraries (great-expectations logs hundreds of INFO lines on
    # import) only from WARNING unless --verbose.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("safe_rlhf_v").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    # MLflow sets its own logger to INFO and announces every new sqlite store on stderr, which would
    # bury the one error line a failing command prints.
    logging.getLogger("mlflow").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UserError as error:
        if args.verbose:
            raise
        message = str(error)
    except OSError as error:
        refusal = _os_refusal(error)
        if refusal is None or args.verbose:
            raise
        message = refusal
    print(f"error: {_one_line(message)}", file=sys.stderr)
    return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
