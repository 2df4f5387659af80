"""Load one split of BeaverTails-V (paired or flattened) from wherever it lives.

One entry point, :func:`load_split`, so every stage reads data the same way and gets the same
thing back: a ``datasets.Dataset`` whose schema columns come first, in the order and with the
dtypes of :mod:`safe_rlhf_v.data.schema`, and whose ``image`` column decodes to PIL images.

Sources, told apart by the URI:

- ``hf://owner/name``: a Hugging Face hub data set; ``configs`` names the subsets to merge (none:
  the default config) and ``revision`` pins a commit. Needs network access or a warm HF cache.
- ``s3://bucket/prefix``: the prefix is downloaded once into ``cache_dir/s3/<listing digest>``,
  the digest covering every key, ETag and size, so unchanged data is not fetched twice and changed
  data never hides behind a stale copy; the copy is then read as a local folder.
- a local file ``x.parquet`` / ``x.jsonl``: that file is the split.
- a local folder written by ``save_to_disk``: a ``DatasetDict`` gives its ``split``; a single saved
  ``Dataset`` is taken as the split asked for (it holds only one), unless it records a different
  split name; ``DIR/<split>/`` holding a saved ``Dataset`` gives that split.
- a local folder of parquet or jsonl files, matched in this order: ``DIR/<split>.<ext>``,
  ``DIR/<split>-*.<ext>``, ``DIR/<split>/*.<ext>``, ``DIR/*/<split>-*.<ext>`` (the hub layout
  ``<config>/<split>-00000-of-00001.parquet``; there ``configs`` picks the config folders). In
  jsonl, ``image`` is a path relative to the jsonl file (or an absolute one).

Whatever the user's data gets wrong (a missing path or split, an empty or unreadable file, data in
neither layout) raises :class:`DataSourceError` naming the source; a missing path or split raises
its subclass :class:`DataSourceMissing`, which is also a ``FileNotFoundError``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import datasets
import pyarrow as pa
from datasets.exceptions import DatasetGenerationError

from safe_rlhf_v import storage
from safe_rlhf_v.data.schema import FLAT_COLUMNS, FLAT_FEATURES, PAIRED_FEATURES, detect_layout
from safe_rlhf_v.errors import UserError

HF_SCHEME = "hf://"
FORMATS = {"parquet": "parquet", "jsonl": "json"}
"""File suffix -> the ``datasets`` packaged builder that reads it."""
_LISTED_FILES = 20
_SPLIT_PATTERNS = ("{split}.{ext}", "{split}-*.{ext}", "{split}/*.{ext}", "*/{split}-*.{ext}")


class DataSourceError(UserError, ValueError):
    """The data at a URI cannot be read as BeaverTails-V; the message names the URI or file."""


class DataSourceMissing(DataSourceError, FileNotFoundError):
    """The path, split or image files a data URI points at do not exist."""


def load_split(
    uri: str,
    split: str,
    *,
    configs: list[str] | None = None,
    revision: str | None = None,
    cache_dir: Path | None = None,
) -> datasets.Dataset:
    """One split of the data at ``uri``, in the paired or the flattened layout, images decoded.

    ``cache_dir`` holds the ``datasets`` cache (under ``hf/``) and S3 downloads (under ``s3/``);
    it is required for ``s3://`` sources, where it is what makes a second load skip the download.
    Raises :class:`DataSourceMissing` for a missing path or split and :class:`DataSourceError`
    for anything else wrong with the data, naming the source.
    """
    hf_cache = str(cache_dir / "hf") if cache_dir is not None else None
    if uri.startswith(HF_SCHEME):
        dataset = _load_hub(uri, split, configs or [], revision, hf_cache)
    elif revision is not None:
        raise DataSourceError(f"revision {revision!r} pins a hub commit and cannot apply to {uri}")
    elif storage.is_s3(uri):
        if cache_dir is None:
            raise DataSourceError(f"loading {uri} needs a cache_dir to download the S3 prefix into")
        dataset = _load_local(_fetch_s3(uri, cache_dir / "s3"), split, configs or [], hf_cache)
    elif "://" in uri:
        raise DataSourceError(
            f"unsupported data URI {uri!r}: use a local path, s3://bucket/prefix or hf://owner/name"
        )
    else:
        dataset = _load_local(Path(uri), split, configs or [], hf_cache)
    return _canonical(dataset, uri, split)


def to_flat(dataset: datasets.Dataset) -> datasets.Dataset:
    """The flattened layout of a paired data set: one row per response, the two responses of a
    pair next to each other, plus ``harmless_rate`` (int) because the guard trains on the rating,
    not only on the yes/no label. Built from column selections, so images are not re-encoded."""
    if detect_layout(dataset.column_names) != "paired":
        raise ValueError("to_flat needs the paired layout; the data set is already flattened")
    shared = ["question", "image", "category", "image_severity"]
    halves = [
        dataset.select_columns(
            [*shared, f"response_{i}", f"is_response_{i}_safe", f"response_{i}_harmless_rate"]
        ).rename_columns(
            {
                f"response_{i}": "response",
                f"is_response_{i}_safe": "is_response_safe",
                f"response_{i}_harmless_rate": "harmless_rate",
            }
        )
        for i in ("1", "2")
    ]
    flat = datasets.interleave_datasets(halves)
    return flat.select_columns([*FLAT_COLUMNS, "harmless_rate"])


# ------------------------------------------------------------------------------------ hub


def _load_hub(
    uri: str, split: str, configs: list[str], revision: str | None, cache_dir: str | None
) -> datasets.Dataset:
    """Each named config's split (or the default config's), concatenated in the given order."""
    name = uri[len(HF_SCHEME) :].strip("/")
    if not name:
        raise DataSourceError(f"malformed hub URI {uri!r}: expected hf://owner/name")
    parts = [
        datasets.load_dataset(name, config, split=split, revision=revision, cache_dir=cache_dir)
        for config in (configs or [None])
    ]
    return datasets.concatenate_datasets(parts)


# ------------------------------------------------------------------------------------- S3


def _listing_digest(uri: str) -> str:
    """sha256 over (relative key, ETag, size) of every object under the prefix: it changes when
    any object is added, removed or rewritten, without reading the data."""
    storage.list_files(uri)  # raises a StorageError naming the URI for a missing bucket or prefix
    bucket, key = storage.split_s3(uri)
    prefix = f"{key.strip('/')}/" if key.strip("/") else ""
    pages = storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    entries = sorted(
        f"{item['Key'][len(prefix) :]}\t{item['ETag']}\t{item['Size']}\n"
        for page in pages
        for item in page.get("Contents", [])
        if not item["Key"].endswith("/")
    )
    return hashlib.sha256("".join(entries).encode()).hexdigest()


def _fetch_s3(uri: str, cache_root: Path) -> Path:
    """The local copy of an S3 prefix, downloaded (atomically) only if its listing changed."""
    local = cache_root / _listing_digest(uri)
    if not local.is_dir():
        storage.download(uri, local)
    return local


# ---------------------------------------------------------------------------------- local


def _load_local(path: Path, split: str, configs: list[str], cache_dir: str | None) -> datasets.Dataset:
    if not path.exists():
        raise DataSourceMissing(f"data source {path} does not exist")
    if path.is_file():
        _refuse_configs(configs, f"file {path}")
        return _load_files(_file_format(path), [path], cache_dir)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        _refuse_configs(configs, f"save_to_disk folder {path}")
        return _from_saved(path, split)
    if (path / split / "state.json").is_file():
        _refuse_configs(configs, f"save_to_disk folder {path / split}")
        return _from_saved(path / split, split)
    ext, files = _split_files(path, split, configs)
    return _load_files(ext, files, cache_dir)


def _refuse_configs(configs: list[str], what: str) -> None:
    """Configs select hub subsets; silently ignoring them elsewhere would load other data than asked."""
    if configs:
        raise DataSourceError(
            f"configs {configs} apply to hf:// ids and <config>/<split>-*.parquet folders, not to {what}"
        )


def _file_format(path: Path) -> str:
    ext = path.suffix.lstrip(".")
    if ext not in FORMATS:
        raise DataSourceError(f"cannot read {path}: expected a .parquet or .jsonl file")
    return ext


def _from_saved(path: Path, split: str) -> datasets.Dataset:
    """A split of a `save_to_disk` folder (validate-data's output).

    `datasets` writes the cache files of later transforms (interleave, map, filter) next to a
    loaded folder's Arrow files. Those would land in the user's validated data, whose Arrow files
    are hashed for lineage. Caching is therefore switched off for the process, which sends those
    files to a temporary folder instead; our transforms are cheap to redo.
    """
    datasets.disable_caching()
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataSourceMissing(f"{path} has no split {split!r}; its splits are {sorted(loaded)}")
        return loaded[split]
    if loaded.split is not None and str(loaded.split) != split:
        raise DataSourceMissing(f"{path} holds split {str(loaded.split)!r}, not {split!r}")
    return loaded


def _split_files(root: Path, split: str, configs: list[str]) -> tuple[str, list[Path]]:
    """The files of ``split`` under ``root`` and their format, from the first pattern that matches."""
    found = {ext: _match(root, split, ext, configs) for ext in FORMATS}
    formats = [ext for ext, files in found.items() if files]
    if len(formats) > 1:
        raise DataSourceError(
            f"{root} holds both parquet and jsonl files for split {split!r}; keep one format"
        )
    if not formats:
        raise DataSourceMissing(
            f"no parquet or jsonl files for split {split!r} under {root}"
            f"{f' in configs {configs}' if configs else ''}; found: {_describe(root)}"
        )
    return formats[0], found[formats[0]]


def _match(root: Path, split: str, ext: str, configs: list[str]) -> list[Path]:
    if configs:
        per_config = [sorted(root.glob(f"{config}/{split}-*.{ext}")) for config in configs]
        missing = [config for config, files in zip(configs, per_config, strict=True) if not files]
        if missing and len(missing) < len(configs):
            raise DataSourceMissing(f"{root} has no {ext} files of split {split!r} for configs {missing}")
        return [file for files in per_config for file in files]
    for pattern in _SPLIT_PATTERNS:
        files = sorted(root.glob(pattern.format(split=split, ext=ext)))
        if files:
            return files
    return []


def _describe(root: Path) -> str:
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    shown = ", ".join(files[:_LISTED_FILES]) or "no files"
    return shown + (f" and {len(files) - _LISTED_FILES} more" if len(files) > _LISTED_FILES else "")


def _load_files(ext: str, files: list[Path], cache_dir: str | None) -> datasets.Dataset:
    for file in files:
        _refuse_empty(file)
    if ext == "parquet":
        try:
            return datasets.load_dataset(
                "parquet", data_files=[str(f) for f in files], split="train", cache_dir=cache_dir
            )
        except (pa.ArrowInvalid, DatasetGenerationError) as err:
            named = files[0] if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"
            raise DataSourceError(f"cannot read {named} as parquet: {_first_line(err)}") from err
    return datasets.concatenate_datasets([_load_jsonl(file, cache_dir) for file in files])


def _refuse_empty(file: Path) -> None:
    """An empty file is a split with no schema, which the readers report as a bare StopIteration or
    an Arrow error about byte counts; say what it is instead."""
    if file.stat().st_size == 0 or (file.suffix == ".jsonl" and not file.read_bytes().strip()):
        raise DataSourceError(f"data file {file} is empty: it holds no rows (and no columns)")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _load_jsonl(file: Path, cache_dir: str | None) -> datasets.Dataset:
    """One jsonl file with ``image`` turned from a path relative to the file into an image."""
    try:
        dataset = datasets.load_dataset("json", data_files=str(file), split="train", cache_dir=cache_dir)
    except DatasetGenerationError as err:
        cause = err.__cause__ or err
        raise DataSourceError(f"cannot read {file} as JSON lines: {_first_line(cause)}") from err
    if dataset.features.get("image") != datasets.Value("string"):
        raise DataSourceError(f"{file}: column 'image' must hold image file paths (strings)")
    images = [(file.parent / relative).resolve() for relative in dataset["image"]]
    missing = [str(image) for image in images if not image.is_file()]
    if missing:
        raise DataSourceMissing(f"{file}: {len(missing)} image files do not exist, e.g. {missing[0]}")
    columns = dataset.column_names
    dataset = dataset.remove_columns("image").add_column("image", [str(image) for image in images])
    return dataset.select_columns(columns).cast_column("image", datasets.Image())


# --------------------------------------------------------------------------------- schema


def _canonical(dataset: datasets.Dataset, uri: str, split: str) -> datasets.Dataset:
    """Schema columns first, in schema order and types (jsonl ints and undecoded images are cast),
    extra columns after them, so every source yields the same table shape."""
    try:
        layout = detect_layout(dataset.column_names)
    except ValueError as err:
        raise DataSourceError(f"{uri} (split {split!r}): {err}") from err
    features = PAIRED_FEATURES if layout == "paired" else FLAT_FEATURES
    for column, feature in features.items():
        if dataset.features[column] == feature:
            continue
        try:
            dataset = dataset.cast_column(column, feature)
        except (ValueError, TypeError, pa.ArrowException) as err:
            raise DataSourceError(
                f"{uri} (split {split!r}): column {column!r} of type {dataset.features[column]} "
                f"cannot be read as {feature}: {err}"
            ) from err
    extras = [column for column in dataset.column_names if column not in features]
    return dataset.select_columns([*features, *extras])
