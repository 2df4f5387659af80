"""Configuration: the embedded preset loads; mistakes name the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from safe_rlhf_v.cli import default_config_path
from safe_rlhf_v.config import ConfigError, PipelineConfig, config_from_dict, load_config


def write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def minimal() -> dict:
    return {"data": {"uri": "work/data"}, "base_model": "work/model"}


def test_embedded_demo_preset_loads() -> None:
    cfg = load_config(default_config_path())
    assert isinstance(cfg, PipelineConfig)
    assert cfg.data.uri == "work/data/demo"
    assert cfg.validate_data.min_rows == {"train": 100, "evaluation": 20}
    assert cfg.resources_for("validate-data").memory == "8Gi"
    assert cfg.resources_for("no-such-stage").gpus == 0


def test_misspelled_key_names_key_and_file(tmp_path: Path) -> None:
    tree = minimal() | {"validate_data": {"prefernce_mostly": 0.9}}
    path = write(tmp_path, tree)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert str(path) in message
    hint = "did you mean validate_data.preference_mostly?"
    assert f"validate_data.prefernce_mostly: unknown key ({hint})" in message


def test_wrong_type_is_not_coerced(tmp_path: Path) -> None:
    path = write(tmp_path, minimal() | {"validate_data": {"min_image_side": "16"}})
    with pytest.raises(ConfigError, match=r"validate_data\.min_image_side: Input should be a valid integer"):
        load_config(path)


def test_missing_required_key_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, {"data": {"uri": "x"}})
    with pytest.raises(ConfigError, match="base_model: Field required"):
        load_config(path)


def test_overrides_apply_with_yaml_typing(tmp_path: Path) -> None:
    path = write(tmp_path, minimal())
    cfg = load_config(
        path,
        overrides=["validate_data.preference_mostly=0.95", "data.configs=[animal_abuse, sexual_crimes]"],
    )
    assert cfg.validate_data.preference_mostly == 0.95
    assert cfg.data.configs == ["animal_abuse", "sexual_crimes"]


def test_bad_override_key_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, minimal())
    with pytest.raises(ConfigError, match=r"validate_data\.nope: unknown key"):
        load_config(path, overrides=["validate_data.nope=1"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(path, overrides=["validate_data.preference_mostly"])


def test_out_of_range_value_rejected() -> None:
    with pytest.raises(ConfigError, match=r"preference_mostly: Input should be less than or equal to 1"):
        config_from_dict(minimal() | {"validate_data": {"preference_mostly": 1.5}})


def test_unpinned_image_rejected() -> None:
    with pytest.raises(ConfigError, match=r"images\.gpu must carry a pinned tag"):
        config_from_dict(minimal() | {"images": {"gpu": "ghcr.io/x/train:latest"}})


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_config_is_frozen() -> None:
    cfg = config_from_dict(minimal())
    with pytest.raises(Exception, match="frozen"):
        cfg.base_model = "other"  # type: ignore[misc]


PRESETS = sorted(path.name for path in default_config_path().parent.glob("*.yaml"))


def test_presets_cover_every_model_family_that_ships() -> None:
    assert {"demo.yaml", "llava-1.5-7b.yaml", "qwen2-vl-7b.yaml", "qwen2.5-vl-7b.yaml"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_shipped_preset_loads(preset: str) -> None:
    cfg = load_config(default_config_path().parent / preset)
    if preset != "demo.yaml":  # the Safe RLHF-V settings for 7B models
        train = cfg.train_cost.train
        assert (train.zero_stage, train.precision, train.learning_rate, train.epochs) == (3, "bf16", 3e-5, 3)
        assert train.lr_scheduler == "cosine" and train.warmup_ratio == 0.03
        assert cfg.train_reward.regularization == 0.001
        assert len(cfg.data.configs) == 20


def test_rollout_engine_defaults_to_hf_and_takes_vllm() -> None:
    assert config_from_dict(minimal()).train_ppo_lag.rollout.engine == "hf"
    cfg = config_from_dict(minimal() | {"train_ppo_lag": {"rollout": {"engine": "vllm"}}})
    assert cfg.train_ppo_lag.rollout.engine == "vllm"
    with pytest.raises(ConfigError, match="engine"):
        config_from_dict(minimal() | {"train_ppo_lag": {"rollout": {"engine": "sglang"}}})


def test_vllm_rollouts_refuse_a_zero3_actor() -> None:
    """Under ZeRO-3 no rank holds the actor's weights whole; until they are gathered layer by layer,
    sending them to vLLM would send shards."""
    with pytest.raises(ConfigError, match="zero_stage=3"):
        config_from_dict(
            minimal() | {"train_ppo_lag": {"rollout": {"engine": "vllm"}, "actor": {"zero_stage": 3}}}
        )
