"""A stage's resume checkpoint: every engine it trains and the loop's state, as one transaction.

One folder per optimizer step, holding all of it::

    root/step-<N>/<engine>/           DeepSpeed's files of each trained engine (actor, critics, ...)
                 state.json           the loop's state: data position, metric history, lambda, ...
                                      and the config fingerprint
                 rng-rank<R>.json     each rank's random generators
                 manifest.json        the keyed seal (integrity.py), written last

A step counts only once its manifest is written, after every rank saved every engine and the state;
old steps are pruned only after that, so a kill at any moment leaves the previous complete step in
place. Resume takes the newest sealed step and loads every engine from that same step: engines
cannot drift apart.

The config fingerprint: `state.json` records the settings that decide what training computes, and a
resume under other settings is refused with an error naming the keys (a changed learning rate must
not continue, and then publish, weights trained with the old one), unless the stage's
`resume_with_changed_config` says so. What counts: the models (their paths) and how they are cut
(max length, freezing), the data geometry (number of rows, batch size, accumulation, seed), the
objective, the optimizer, precision and ZeRO stage (a checkpoint of one stage does not load into
another), and the LR schedule *as resolved* (warmup steps, and the horizon for a decaying
schedule). What does not: where training stops (`epochs`, `max_steps`: a constant-LR run may be
extended, a cosine one only when its horizon stays put), checkpoint and log cadence, evaluation
settings, and settings that choose how the same computation runs (gradient checkpointing, CPU
sampling threads, the frozen models' ZeRO stage). The data's content is not hashed here: a
pipeline run reads one validated data set. World size is checked apart: DeepSpeed cannot
re-partition a checkpoint.

Our own state never goes through pickle: the state and RNG files are JSON.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from safe_rlhf_v.errors import UserError
from safe_rlhf_v.train import integrity
from safe_rlhf_v.train.distributed import Engine, barrier, broadcast_int, get_logger, init_distributed

STATE = "state.json"
_TAG = re.compile(r"^step-(\d+)$")
_STOPS_AND_CADENCE = frozenset(
    {
        "epochs",
        "max_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "log_every_steps",
        "gradient_checkpointing",
        "resume_with_changed_config",
    }
)
"""TrainConfig fields that do not change what an optimizer step computes (see the module docstring)."""

log = get_logger(__name__)


class ResumeRefused(UserError, ValueError):
    """A checkpoint this run cannot go on from; the message says why and what to do."""


class ConfigChanged(ResumeRefused):
    """A checkpoint was trained under other settings than the ones this run was given."""


def tag_for(step: int) -> str:
    """The folder name of the checkpoint taken after step `step`."""
    return f"step-{step}"


def rng_file(rank: int) -> str:
    """Each rank has its own generators (dropout masks differ per rank), hence one file per rank."""
    return f"rng-rank{rank:05d}.json"


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """`(step, folder)` of every `step-N` folder directly under `root`, newest first.

    Symbolic links are left out: a checkpoint is only ever read from inside the given root.
    """
    if not root.is_dir():
        return []
    found = [
        (int(match.group(1)), entry)
        for entry in root.iterdir()
        if (match := _TAG.match(entry.name)) and entry.is_dir() and not entry.is_symlink()
    ]
    return sorted(found, key=lambda item: item[0], reverse=True)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys with JSON values, the form fingerprints are compared in."""
    flat: dict[str, Any] = {}
    for key, value in json.loads(json.dumps(tree, default=str)).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def engine_fingerprint(engine: Engine) -> dict[str, Any]:
    """What of an engine's TrainConfig decides its steps, with its LR schedule as resolved."""
    cfg = engine.cfg
    fields: dict[str, Any] = cfg.model_dump(exclude=set(_STOPS_AND_CADENCE))
    fields["warmup_steps"] = engine.warmup_steps
    if cfg.lr_scheduler != "constant_with_warmup":  # the others decay towards the horizon
        fields["schedule_steps"] = engine.total_steps
    return fields


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """`key (old -> new)` for every setting that differs between two flattened fingerprints."""

    def shown(settings: Mapping[str, Any], key: str) -> str:
        return repr(settings[key]) if key in settings else "unset"

    return [
        f"{key} ({shown(saved, key)} -> {shown(current, key)})"
        for key in sorted(saved.keys() | current.keys())
        if key not in saved or key not in current or saved[key] != current[key]
    ]


class Checkpointer:
    """Saves and restores a stage's checkpoints under `root`, sealed with `key` (see the module docstring).

    Every rank constructs it and calls `save` and `restore` together. Only rank 0 seals and
    verifies, so only rank 0's `key` matters (the checkpoint root must be shared by all ranks).
    """

    def __init__(
        self,
        root: Path,
        *,
        key: bytes,
        fingerprint: Mapping[str, Any],
        keep: int,
        allow_changed_config: bool = False,
    ) -> None:
        if len(key) < integrity.MIN_KEY_LENGTH:
            raise ValueError(
                f"a checkpoint key needs at least {integrity.MIN_KEY_LENGTH} bytes, got {len(key)}"
            )
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.key = key
        self.fingerprint = flatten(fingerprint)
        self.keep = keep
        self.allow_changed_config = allow_changed_config
        self.dist = init_distributed()

    @property
    def _is_main(self) -> bool:
        return self.dist.rank == 0

    def save(self, step: int, engines: Mapping[str, Engine], state: Mapping[str, Any]) -> Path:
        """Save every engine and `state` (JSON) as step `step`, seal it, then prune old steps."""
        for name, engine in engines.items():
            if not engine.at_step_boundary:
                raise RuntimeError(
                    f"{name}: checkpoint requested between optimizer steps (gradients of a partial "
                    "accumulation window are pending and cannot be saved); save right after a step"
                )
        try:
            payload = json.dumps({"step": step, "fingerprint": self.fingerprint, **state})
        except TypeError as exc:
            raise TypeError(f"checkpoint state must be JSON-serialisable: {exc}") from exc
        folder = self.root / tag_for(step)
        if self._is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if folder.exists():  # left by an interrupted save of this step or an abandoned timeline
                shutil.rmtree(folder)
        barrier()
        for name, engine in engines.items():
            engine.save_state(folder, name)
        integrity.write_json_atomic(folder / rng_file(self.dist.rank), rng_state())
        if self._is_main:
            integrity.write_json_atomic(folder / STATE, json.loads(payload))
        barrier()
        if self._is_main:
            integrity.seal(
                folder, self.key, step=step, world_size=self.dist.world_size, engines=sorted(engines)
            )
            removed = prune(self.root, current_step=step, keep=self.keep, key=self.key)
            log.info("saved %s%s", folder, f", removed {len(removed)} old" if removed else "")
        barrier()
        return folder

    def restore(self, engines: Mapping[str, Engine]) -> dict[str, Any] | None:
        """Load every engine, the RNGs and the state of the newest sealed step; None when there is none.

        Rank 0 verifies (skipping, with a warning, every folder that fails) and tells the others
        which step to load. Raises `ResumeRefused` when that step was saved by another world size,
        was trained under other settings (`ConfigChanged`, unless allowed) or holds other engines.
        """
        chosen = broadcast_int(self._newest_verified() if self._is_main else -1)
        if chosen < 0:
            log.info("no sealed checkpoint under %s, starting fresh", self.root)
            return None
        folder = self.root / tag_for(chosen)
        manifest = json.loads((folder / integrity.MANIFEST).read_text(encoding="utf-8"))
        if manifest["world_size"] != self.dist.world_size:
            raise ResumeRefused(
                f"{folder} was saved by {manifest['world_size']} processes but this job has "
                f"{self.dist.world_size}; DeepSpeed cannot re-partition its state: resume with "
                f"{manifest['world_size']} processes"
            )
        state: dict[str, Any] = json.loads((folder / STATE).read_text(encoding="utf-8"))
        self._check_fingerprint(state.pop("fingerprint"), folder)
        if manifest["engines"] != sorted(engines):
            raise ResumeRefused(
                f"{folder} holds the engines {manifest['engines']} but this run trains {sorted(engines)}"
            )
        for name, engine in engines.items():
            engine.load_state(folder, name)
        restore_rng_state(json.loads((folder / rng_file(self.dist.rank)).read_text(encoding="utf-8")))
        log.info("resumed from %s", folder)
        return state

    def _newest_verified(self) -> int:
        for step, folder in step_dirs(self.root):
            try:
                integrity.verify(folder, self.key)
            except integrity.CheckpointRejected as problem:
                log.warning("skipping checkpoint %s: %s", folder, problem)
                continue
            return step
        return -1

    def _check_fingerprint(self, saved: Mapping[str, Any], folder: Path) -> None:
        changes = changed_settings(saved, self.fingerprint)
        if not changes:
            return
        listed = "; ".join(changes)
        if self.allow_changed_config:
            log.warning(
                "resuming %s although settings changed (resume_with_changed_config): %s", folder, listed
            )
            return
        raise ConfigChanged(
            f"refusing to resume {folder}: it was trained with other settings: {listed}; rerun with the "
            "same settings, start a new pipeline run, or set resume_with_changed_config: true to continue"
        )


def prune(root: Path, *, current_step: int, keep: int, key: bytes) -> list[Path]:
    """Delete checkpoints that can no longer be wanted; returns what was removed.

    Kept: the newest `keep` sealed checkpoints at or before `current_step`. Removed: older sealed
    ones, unsealed ones (an interrupted save, a forgery), and any step beyond `current_step`, which
    belongs to an abandoned timeline (a run that resumed from an earlier step and has now re-saved).
    """
    removed: list[Path] = []
    kept = 0
    for step, folder in step_dirs(root):
        if step <= current_step and kept < keep and _sealed(folder, key):
            kept += 1
            continue
        shutil.rmtree(folder)
        removed.append(folder)
    return removed


def _sealed(folder: Path, key: bytes) -> bool:
    try:
        integrity.read_seal(folder, key)
    except integrity.CheckpointRejected:
        return False
    return True


def rng_state() -> dict[str, Any]:
    """The state of every random generator training draws from, as JSON-able lists."""
    version, mt_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(mt_state), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`. CUDA states are restored only where CUDA exists (same hardware resume)."""
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
