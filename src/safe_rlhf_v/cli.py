"""`safe-rlhf-v`: one command line, a subcommand per pipeline stage and per operation.

Every subcommand is a thin caller of a library function; errors in what the user supplied (config,
data, storage) print one clear message and exit with status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from safe_rlhf_v.config import ConfigError, PipelineConfig, load_config

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

DEFAULT_CONFIG = "demo.yaml"


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
    result = train_score.run(args.command, cfg, args.data, args.out, base_model=args.base_model)
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
    )
    if result.outputs:
        print(json.dumps(result.metrics, indent=2, sort_keys=True))
        print(f"policy: {result.outputs['model']}")
    return 0


def cmd_train_guard(args: argparse.Namespace) -> int:
    from safe_rlhf_v.stages import train_guard

    result = train_guard.run(_config(args), args.data, args.out, base_model=args.base_model)
    if result.outputs:
        print(json.dumps(result.metrics, indent=2, sort_keys=True))
        print(f"guard: {result.outputs['model']}")
    return 0


def _read_image(path: str) -> PILImage:
    """An RGB image, or a ValueError naming the file (missing, not an image, truncated)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (FileNotFoundError, UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from None


def cmd_moderate(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from safe_rlhf_v.models.judge import GuardJudge

    if not args.question.strip():
        raise ValueError("--question is empty: the guard judges a question (and optionally an answer)")
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


def cmd_run(args: argparse.Namespace) -> int:
    from safe_rlhf_v.pipelines.local import run_local
    from safe_rlhf_v.summary import format_summary

    cfg = _config(args)
    outcome = run_local(cfg, data_uri=args.data)
    print(format_summary(outcome))
    return 0 if outcome.succeeded else 1


def cmd_compile(args: argparse.Namespace) -> int:
    from kfp import compiler

    from safe_rlhf_v.pipelines.safe_rlhf_v import build_pipeline

    cfg = _config(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(cfg), package_path=args.out)
    print(f"compiled pipeline: {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the docs and tests)."""
    parser = argparse.ArgumentParser(prog="safe-rlhf-v", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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
    p.add_argument("--family", default="llava", help="model family (default llava)")
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
        _add_config_args(p)
        p.set_defaults(func=cmd_train_score)

    p = sub.add_parser("train-guard", help="stage: train the Beaver-Guard-V guard on validated data")
    p.add_argument("--data", required=True, help="a validate-data output folder (local or s3://)")
    p.add_argument("--out", required=True, help="output guard folder or s3:// prefix")
    p.add_argument("--base-model", help="backbone to start from; default: the config's base_model")
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

    p = sub.add_parser("train-ppo-lag", help="stage: Safe RLHF-V PPO-Lagrangian fine-tuning (torchrun-able)")
    p.add_argument("--data", required=True, help="a validate-data output folder (prompts)")
    p.add_argument("--reward-model", required=True, help="train-reward output folder")
    p.add_argument("--cost-model", required=True, help="train-cost output folder")
    p.add_argument("--out", required=True, help="output policy folder or s3:// prefix")
    p.add_argument("--policy", help="initial policy; default: the config's base_model")
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

    p = sub.add_parser("compile", help="compile the pipeline to YAML for the Kubeflow UI")
    p.add_argument("--out", required=True, help="output YAML file")
    _add_config_args(p)
    p.set_defaults(func=cmd_compile)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from safe_rlhf_v.stages.validate_data import DataValidationError
    from safe_rlhf_v.storage import StorageError

    return (ConfigError, DataValidationError, StorageError, FileNotFoundError, FileExistsError, ValueError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `safe-rlhf-v` console script."""
    args = build_parser().parse_args(argv)
    # Our progress at INFO; third-party libraries (great-expectations logs hundreds of INFO lines on
    # import) only from WARNING unless --verbose.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("safe_rlhf_v").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except _user_errors() as error:
        if args.verbose:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
