"""load_split over every supported source layout, to_flat, and the errors for bad sources."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import datasets
import pytest
from PIL import Image

from safe_rlhf_v import storage
from safe_rlhf_v.data import sources, synthetic
from safe_rlhf_v.data.schema import FLAT_COLUMNS, FLAT_FEATURES, PAIRED_COLUMNS, PAIRED_FEATURES

TEXT_COLUMNS = [column for column in PAIRED_COLUMNS if column != "image"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, datasets.Dataset]:
    """The synthetic train (40 rows) and evaluation (20 rows) splits, read back from parquet."""
    paths = synthetic.write_demo_data(tmp_path_factory.mktemp("demo"), rows=40, eval_rows=20, seed=5)
    return {split: datasets.Dataset.from_parquet(str(path)) for split, path in paths.items()}


def _row_keys(dataset: datasets.Dataset) -> list[tuple[Any, ...]]:
    """Every row as comparable values (the image by its pixels), sorted, so two loads that
    differ only in row order compare equal."""
    keys = []
    for row in dataset:
        assert isinstance(row["image"], Image.Image)
        pixels = hashlib.sha256(row["image"].convert("RGB").tobytes()).hexdigest()
        keys.append((*(row[column] for column in TEXT_COLUMNS), pixels))
    return sorted(keys)


def _write_jsonl(dataset: datasets.Dataset, jsonl: Path, image_dir: Path) -> None:
    """A jsonl file whose ``image`` fields are PNG paths relative to the jsonl file."""
    image_dir.mkdir(parents=True, exist_ok=True)
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    raw = dataset.cast_column("image", datasets.Image(decode=False))
    lines = []
    for index, row in enumerate(raw):
        image_path = image_dir / f"{jsonl.stem}-{index}.png"
        image_path.write_bytes(row["image"]["bytes"])
        record = {column: row[column] for column in TEXT_COLUMNS}
        record["image"] = Path(os.path.relpath(image_path, jsonl.parent)).as_posix()
        lines.append(json.dumps(record))
    jsonl.write_text("\n".join(lines) + "\n")


def _halves(dataset: datasets.Dataset) -> tuple[datasets.Dataset, datasets.Dataset]:
    middle = len(dataset) // 2
    return dataset.select(range(middle)), dataset.select(range(middle, len(dataset)))


def _single_file(demo: dict[str, datasets.Dataset], root: Path) -> str:
    demo["train"].to_parquet(str(root / "mine.parquet"))
    return str(root / "mine.parquet")


def _split_file(demo: dict[str, datasets.Dataset], root: Path) -> str:
    for split, dataset in demo.items():
        dataset.to_parquet(str(root / f"{split}.parquet"))
    return str(root)


def _shards(demo: dict[str, datasets.Dataset], root: Path) -> str:
    for index, half in enumerate(_halves(demo["train"])):
        half.to_parquet(str(root / f"train-0000{index}-of-00002.parquet"))
    demo["evaluation"].to_parquet(str(root / "evaluation-00000-of-00001.parquet"))
    return str(root)


def _split_folder(demo: dict[str, datasets.Dataset], root: Path) -> str:
    for split, dataset in demo.items():
        (root / split).mkdir()
        for index, half in enumerate(_halves(dataset)):
            half.to_parquet(str(root / split / f"part-{index}.parquet"))
    return str(root)


def _hub_layout(demo: dict[str, datasets.Dataset], root: Path) -> str:
    for config, (train, evaluation) in zip(
        ("cfg_a", "cfg_b"), zip(_halves(demo["train"]), _halves(demo["evaluation"]), strict=True), strict=True
    ):
        (root / config).mkdir()
        train.to_parquet(str(root / config / "train-00000-of-00001.parquet"))
        evaluation.to_parquet(str(root / config / "evaluation-00000-of-00001.parquet"))
    return str(root)


def _jsonl_split_file(demo: dict[str, datasets.Dataset], root: Path) -> str:
    for split, dataset in demo.items():
        _write_jsonl(dataset, root / f"{split}.jsonl", root / "images")
    return str(root)


def _jsonl_hub_layout(demo: dict[str, datasets.Dataset], root: Path) -> str:
    for index, half in enumerate(_halves(demo["train"])):
        _write_jsonl(half, root / f"cfg_{index}" / "train-00000.jsonl", root / f"cfg_{index}" / "img")
    _write_jsonl(demo["evaluation"], root / "cfg_0" / "evaluation-00000.jsonl", root / "cfg_0" / "img")
    return str(root)


def _single_jsonl_file(demo: dict[str, datasets.Dataset], root: Path) -> str:
    _write_jsonl(demo["train"], root / "nested" / "rows.jsonl", root / "pictures")
    return str(root / "nested" / "rows.jsonl")


def _dataset_dict(demo: dict[str, datasets.Dataset], root: Path) -> str:
    datasets.DatasetDict(demo).save_to_disk(str(root / "saved"))
    return str(root / "saved")


def _saved_split_folders(demo: dict[str, datasets.Dataset], root: Path) -> str:
    for split, dataset in demo.items():
        dataset.save_to_disk(str(root / split))
    return str(root)


LAYOUTS: dict[str, Callable[[dict[str, datasets.Dataset], Path], str]] = {
    "parquet file": _single_file,
    "DIR/<split>.parquet": _split_file,
    "DIR/<split>-*.parquet": _shards,
    "DIR/<split>/*.parquet": _split_folder,
    "DIR/*/<split>-*.parquet": _hub_layout,
    "DIR/<split>.jsonl": _jsonl_split_file,
    "DIR/*/<split>-*.jsonl": _jsonl_hub_layout,
    "jsonl file": _single_jsonl_file,
    "save_to_disk DatasetDict": _dataset_dict,
    "save_to_disk DIR/<split>": _saved_split_folders,
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_local_layout_gives_the_same_rows_and_images(
    demo: dict[str, datasets.Dataset], tmp_path: Path, layout: str
) -> None:
    uri = LAYOUTS[layout](demo, tmp_path)
    loaded = sources.load_split(uri, "train", cache_dir=tmp_path / "cache")
    assert loaded.features == PAIRED_FEATURES
    assert tuple(loaded.column_names) == PAIRED_COLUMNS
    assert _row_keys(loaded) == _row_keys(demo["train"])


def test_the_evaluation_split_is_told_apart_from_train(
    demo: dict[str, datasets.Dataset], tmp_path: Path
) -> None:
    uri = _hub_layout(demo, tmp_path)
    loaded = sources.load_split(uri, "evaluation", cache_dir=tmp_path / "cache")
    assert _row_keys(loaded) == _row_keys(demo["evaluation"])


def test_configs_pick_config_folders_of_the_hub_layout(
    demo: dict[str, datasets.Dataset], tmp_path: Path
) -> None:
    uri = _hub_layout(demo, tmp_path)
    loaded = sources.load_split(uri, "train", configs=["cfg_b"], cache_dir=tmp_path / "cache")
    assert _row_keys(loaded) == _row_keys(_halves(demo["train"])[1])
    with pytest.raises(FileNotFoundError, match=r"configs \['cfg_zzz'\]"):
        sources.load_split(uri, "train", configs=["cfg_a", "cfg_zzz"], cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match=r"in configs \['nope'\]; found: .*cfg_a/train-00000"):
        sources.load_split(uri, "train", configs=["nope"], cache_dir=tmp_path / "cache")


def test_configs_are_refused_where_they_cannot_apply(
    demo: dict[str, datasets.Dataset], tmp_path: Path
) -> None:
    uri = _dataset_dict(demo, tmp_path)
    with pytest.raises(ValueError, match=r"configs .* not to save_to_disk folder"):
        sources.load_split(uri, "train", configs=["animal_abuse"])
    with pytest.raises(ValueError, match=f"revision 'ee19041' pins a hub commit and cannot apply to {uri}"):
        sources.load_split(uri, "train", revision="ee19041")


def test_a_single_saved_dataset_serves_the_split_unless_it_records_another(
    demo: dict[str, datasets.Dataset], tmp_path: Path
) -> None:
    unnamed = datasets.Dataset.from_dict(demo["evaluation"].to_dict(), features=PAIRED_FEATURES)
    assert unnamed.split is None
    unnamed.save_to_disk(str(tmp_path / "unnamed"))
    loaded = sources.load_split(str(tmp_path / "unnamed"), "evaluation")
    assert _row_keys(loaded) == _row_keys(demo["evaluation"])

    named = datasets.load_dataset(
        "parquet", data_files=_single_file(demo, tmp_path), split="train", cache_dir=str(tmp_path / "c")
    )
    named.save_to_disk(str(tmp_path / "named"))
    with pytest.raises(FileNotFoundError, match="holds split 'train', not 'evaluation'"):
        sources.load_split(str(tmp_path / "named"), "evaluation")


def test_the_flattened_layout_loads(demo: dict[str, datasets.Dataset], tmp_path: Path) -> None:
    sources.to_flat(demo["train"]).to_parquet(str(tmp_path / "train.parquet"))
    loaded = sources.load_split(str(tmp_path), "train", cache_dir=tmp_path / "cache")
    assert tuple(loaded.column_names) == (*FLAT_COLUMNS, "harmless_rate")
    assert datasets.Features({c: loaded.features[c] for c in FLAT_COLUMNS}) == FLAT_FEATURES
    assert len(loaded) == 2 * len(demo["train"])
    assert isinstance(loaded[0]["image"], Image.Image)


def test_to_flat_puts_both_responses_of_a_pair_next_to_each_other(demo: dict[str, datasets.Dataset]) -> None:
    paired = demo["train"]
    flat = sources.to_flat(paired)
    assert len(flat) == 2 * len(paired)
    assert flat.features["harmless_rate"] == datasets.Value("int64")
    for index in (0, 7, len(paired) - 1):
        pair = paired[index]
        for offset, i in enumerate(("1", "2")):
            row = flat[2 * index + offset]
            assert row["response"] == pair[f"response_{i}"]
            assert row["is_response_safe"] == pair[f"is_response_{i}_safe"]
            assert row["harmless_rate"] == pair[f"response_{i}_harmless_rate"]
            assert row["question"] == pair["question"]
            assert row["category"] == pair["category"]
            assert row["image_severity"] == pair["image_severity"]
            assert row["image"].tobytes() == pair["image"].tobytes()
    with pytest.raises(ValueError, match="already flattened"):
        sources.to_flat(flat)


def test_jsonl_values_are_cast_to_the_schema_types(demo: dict[str, datasets.Dataset], tmp_path: Path) -> None:
    _write_jsonl(demo["evaluation"], tmp_path / "evaluation.jsonl", tmp_path / "images")
    rows = [json.loads(line) for line in (tmp_path / "evaluation.jsonl").read_text().splitlines()]
    for row in rows:
        row["more_helpful_response_id"] = int(row["more_helpful_response_id"])
    (tmp_path / "evaluation.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    loaded = sources.load_split(str(tmp_path), "evaluation", cache_dir=tmp_path / "cache")
    assert loaded.features == PAIRED_FEATURES
    assert loaded["more_helpful_response_id"] == demo["evaluation"]["more_helpful_response_id"]

    for row in rows:
        row["image_severity"] = "high"
    (tmp_path / "evaluation.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"column 'image_severity' of type .* cannot be read as"):
        sources.load_split(str(tmp_path), "evaluation", cache_dir=tmp_path / "cache2")


def test_jsonl_with_missing_or_non_path_images_is_rejected(
    demo: dict[str, datasets.Dataset], tmp_path: Path
) -> None:
    _write_jsonl(demo["evaluation"], tmp_path / "a" / "evaluation.jsonl", tmp_path / "a" / "images")
    next((tmp_path / "a" / "images").iterdir()).unlink()
    with pytest.raises(FileNotFoundError, match=r"evaluation\.jsonl: 1 image files do not exist"):
        sources.load_split(str(tmp_path / "a"), "evaluation", cache_dir=tmp_path / "cache")

    (tmp_path / "b").mkdir()
    row = {column: demo["evaluation"][0][column] for column in TEXT_COLUMNS} | {"image": 3}
    (tmp_path / "b" / "evaluation.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="column 'image' must hold image file paths"):
        sources.load_split(str(tmp_path / "b"), "evaluation", cache_dir=tmp_path / "cache")


def test_missing_sources_and_splits_are_named(demo: dict[str, datasets.Dataset], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unsupported data URI 'gs://bucket/data'"):
        sources.load_split("gs://bucket/data", "train")
    with pytest.raises(FileNotFoundError, match=f"data source {tmp_path / 'nowhere'} does not exist"):
        sources.load_split(str(tmp_path / "nowhere"), "train")

    demo["evaluation"].to_parquet(str(tmp_path / "evaluation.parquet"))
    (tmp_path / "notes.txt").write_text("not data")
    with pytest.raises(
        FileNotFoundError,
        match=r"no parquet or jsonl files for split 'train' under .*; found: evaluation\.parquet, notes\.txt",
    ):
        sources.load_split(str(tmp_path), "train")

    saved = _dataset_dict(demo, tmp_path / "dd")
    with pytest.raises(
        FileNotFoundError, match=r"has no split 'test'; its splits are \['evaluation', 'train'\]"
    ):
        sources.load_split(saved, "test")


def test_unreadable_files_and_mixed_formats_are_rejected(
    demo: dict[str, datasets.Dataset], tmp_path: Path
) -> None:
    (tmp_path / "train.csv").write_text("question\n")
    with pytest.raises(ValueError, match=r"train\.csv: expected a \.parquet or \.jsonl file"):
        sources.load_split(str(tmp_path / "train.csv"), "train")

    demo["train"].to_parquet(str(tmp_path / "train.parquet"))
    _write_jsonl(demo["train"], tmp_path / "train.jsonl", tmp_path / "images")
    with pytest.raises(ValueError, match="both parquet and jsonl files for split 'train'"):
        sources.load_split(str(tmp_path), "train")


def test_data_in_neither_layout_is_rejected_naming_the_missing_columns(
    demo: dict[str, datasets.Dataset], tmp_path: Path
) -> None:
    demo["train"].remove_columns(["response_2", "safer_response_id"]).to_parquet(str(tmp_path / "x.parquet"))
    with pytest.raises(
        ValueError, match=r"x\.parquet \(split 'train'\): .*paired layout misses \['response_2', "
    ):
        sources.load_split(str(tmp_path / "x.parquet"), "train", cache_dir=tmp_path / "cache")


def test_hub_ids_load_each_config_and_concatenate(
    demo: dict[str, datasets.Dataset], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[Any, ...]] = []

    def fake_load_dataset(name: str, config: str | None, **kwargs: Any) -> datasets.Dataset:
        calls.append((name, config, kwargs))
        return demo["evaluation"]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    loaded = sources.load_split(
        "hf://saferlhf-v/BeaverTails-V",
        "evaluation",
        configs=["animal_abuse", "sexual_crimes"],
        revision="ee19041",
        cache_dir=tmp_path,
    )
    expected_kwargs = {"split": "evaluation", "revision": "ee19041", "cache_dir": str(tmp_path / "hf")}
    assert calls == [
        ("saferlhf-v/BeaverTails-V", "animal_abuse", expected_kwargs),
        ("saferlhf-v/BeaverTails-V", "sexual_crimes", expected_kwargs),
    ]
    assert len(loaded) == 2 * len(demo["evaluation"])
    assert loaded.features == PAIRED_FEATURES

    calls.clear()
    sources.load_split("hf://PKU-Alignment/BeaverTails-V", "train")
    assert calls == [
        ("PKU-Alignment/BeaverTails-V", None, {"split": "train", "revision": None, "cache_dir": None})
    ]

    with pytest.raises(ValueError, match="malformed hub URI 'hf://'"):
        sources.load_split("hf://", "train")


def test_s3_prefixes_download_once_per_content(
    demo: dict[str, datasets.Dataset],
    s3_bucket: str,
    s3_env: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = boto3.client("s3", endpoint_url=s3_env)
    for split, dataset in demo.items():
        dataset.to_parquet(str(tmp_path / f"{split}.parquet"))
        client.upload_file(str(tmp_path / f"{split}.parquet"), s3_bucket, f"demo/{split}.parquet")
    downloads: list[str] = []
    real_download = storage.download

    def counting_download(uri: str, local: Path) -> Path:
        downloads.append(uri)
        return real_download(uri, local)

    monkeypatch.setattr(storage, "download", counting_download)
    cache = tmp_path / "cache"
    uri = f"s3://{s3_bucket}/demo"

    first = sources.load_split(uri, "train", cache_dir=cache)
    second = sources.load_split(uri, "evaluation", cache_dir=cache)
    assert _row_keys(first) == _row_keys(demo["train"])
    assert _row_keys(second) == _row_keys(demo["evaluation"])
    assert downloads == [uri]
    assert len(list((cache / "s3").iterdir())) == 1

    demo["train"].select(range(10)).to_parquet(str(tmp_path / "small.parquet"))
    client.upload_file(str(tmp_path / "small.parquet"), s3_bucket, "demo/train.parquet")
    changed = sources.load_split(uri, "train", cache_dir=cache)
    assert len(changed) == 10
    assert downloads == [uri, uri]
    assert len(list((cache / "s3").iterdir())) == 2


def test_s3_sources_need_a_cache_and_an_existing_prefix(s3_bucket: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a cache_dir"):
        sources.load_split(f"s3://{s3_bucket}/demo", "train")
    with pytest.raises(storage.StorageError, match=f"no object or prefix at s3://{s3_bucket}/absent"):
        sources.load_split(f"s3://{s3_bucket}/absent", "train", cache_dir=tmp_path)
