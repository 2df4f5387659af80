"""Checkpoints as one sealed transaction over every engine of a stage, keyed integrity, tensor-only loads.

In-process, on MLP engines: a crash is an exception raised at the chosen point of a save (nothing is
cleaned up on the way out, so the disk is left as a kill would leave it). Real SIGKILLs of the real
trainers: test_kill_resume.py.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from mlp_training import BATCH, KEY, config, max_diff, mlp, params, regression, run_steps
from torch import nn

from safe_rlhf_v.train import checkpoint, integrity
from safe_rlhf_v.train.checkpoint import (
    STATE,
    Checkpointer,
    ConfigChanged,
    ResumeRefused,
    engine_fingerprint,
    rng_file,
)
from safe_rlhf_v.train.distributed import (
    DistInfo,
    Engine,
    init_distributed,
    model_init_context,
    seed_everything,
    train_ds_config,
)
from safe_rlhf_v.train.integrity import MANIFEST, CheckpointRejected, checkpoint_key, sha256_file

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
DATA = regression()
ENGINES = ("actor", "critic")


class Crash(Exception):
    """Stands in for a SIGKILL at one point of a save."""


@pytest.fixture(scope="module")
def dist() -> DistInfo:
    return init_distributed()


def engines(seed: int = 0, **cfg: object) -> dict[str, Engine]:
    seed_everything(seed, 0)
    return {name: Engine(mlp(), config(**cfg), total_steps=10, name=name) for name in ENGINES}


def store(root: Path, *, keep: int = 2, fingerprint: dict | None = None, **kwargs: object) -> Checkpointer:
    return Checkpointer(root, key=KEY, fingerprint=fingerprint or {"lr": 0.02}, keep=keep, **kwargs)


def advance(trained: dict[str, Engine], steps: range) -> dict[str, dict[str, torch.Tensor]]:
    """Train every engine over `steps` (the critic on shifted batches); returns their weights."""
    for offset, engine in enumerate(trained.values()):
        run_steps(engine, DATA, range(steps.start + offset, steps.stop + offset))
    return {name: params(engine.module) for name, engine in trained.items()}


def payload(marker: Path) -> object:
    """An object whose unpickling writes `marker`: what an attacker would plant."""

    class Payload:
        def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
            return (exec, (f"open({str(marker)!r}, 'w').write('code ran')",))

    return Payload()


# --- one engine --------------------------------------------------------------------------------


def test_resume_continues_exactly_like_an_uninterrupted_run(dist: DistInfo, tmp_path: Path) -> None:
    # Dropout makes the result depend on the restored RNG state, not only on weights and Adam moments.
    cfg = config(zero_stage=2, lr_scheduler="cosine", warmup_ratio=0.25)

    def fresh_engine(seed: int) -> Engine:
        seed_everything(seed, dist.rank)
        return Engine(mlp(dropout=0.2), cfg, total_steps=8)

    uninterrupted = fresh_engine(0)
    run_steps(uninterrupted, DATA, range(8))

    interrupted = fresh_engine(0)
    run_steps(interrupted, DATA, range(4))
    folder = store(tmp_path).save(4, {"mlp": interrupted}, {"position": {"epoch": 0, "batches_done": 4}})
    assert folder == tmp_path / "step-4"
    assert {MANIFEST, STATE, rng_file(0), "mlp"} <= {p.name for p in folder.iterdir()}
    lr_at_save = interrupted.lr

    resumed = fresh_engine(123)  # a restarted pod: other initial weights, other RNG
    state = store(tmp_path).restore({"mlp": resumed})
    assert state == {"step": 4, "position": {"epoch": 0, "batches_done": 4}}
    assert resumed.global_step == 4
    assert resumed.lr == pytest.approx(lr_at_save, abs=1e-12)
    run_steps(resumed, DATA, range(4, 8))
    assert max_diff(params(resumed.module), params(uninterrupted.module)) < 1e-6


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_zero_stage_resumes_through_tensor_only_loading(
    dist: DistInfo, tmp_path: Path, stage: int
) -> None:
    cfg = config(zero_stage=stage)
    ds_config = train_ds_config(cfg, dist.world_size, dist.device.type)

    def fresh_engine(seed: int) -> Engine:
        seed_everything(seed, dist.rank)
        with model_init_context(ds_config):
            return Engine(mlp(), cfg, total_steps=4, name="mlp")

    trained = fresh_engine(0)
    assert isinstance(trained.ds.checkpoint_engine, integrity.WeightsOnlyCheckpointEngine)
    run_steps(trained, DATA, range(3))
    store(tmp_path).save(3, {"mlp": trained}, {})
    resumed = fresh_engine(9)
    assert store(tmp_path).restore({"mlp": resumed}) == {"step": 3}
    assert max_diff(resumed.state_dict_for_save(), trained.state_dict_for_save()) == 0.0
    assert resumed.global_step == 3


def test_save_guards(dist: DistInfo, tmp_path: Path) -> None:
    engine = Engine(mlp(), config(gradient_accumulation_steps=2), total_steps=2)
    x, y = DATA
    engine.backward_and_step(nn.functional.mse_loss(engine(x[:BATCH]), y[:BATCH]))
    with pytest.raises(RuntimeError, match="mlp: checkpoint requested between optimizer steps"):
        store(tmp_path).save(0, {"mlp": engine}, {})
    engine.backward_and_step(nn.functional.mse_loss(engine(x[BATCH:16]), y[BATCH:16]))
    with pytest.raises(TypeError, match="checkpoint state must be JSON-serialisable"):
        store(tmp_path).save(1, {"mlp": engine}, {"position": object()})
    with pytest.raises(ValueError, match="at least 32 bytes, got 5"):
        Checkpointer(tmp_path, key=b"short", fingerprint={}, keep=1)
    assert not (tmp_path / "step-1").exists()


# --- several engines: one transaction ----------------------------------------------------------


def crash_at(point: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the next save fail at `point`, leaving the disk as a kill there would."""
    if point == "after the first engine":
        original = Engine.save_state

        def save_state(self: Engine, folder: Path, tag: str) -> None:
            if tag == ENGINES[1]:
                raise Crash
            original(self, folder, tag)

        monkeypatch.setattr(Engine, "save_state", save_state)
    elif point == "before the seal":
        monkeypatch.setattr(integrity, "seal", lambda *args, **kwargs: (_ for _ in ()).throw(Crash()))
    else:  # "before pruning"
        monkeypatch.setattr(checkpoint, "prune", lambda *args, **kwargs: (_ for _ in ()).throw(Crash()))


@pytest.mark.parametrize("point", ["after the first engine", "before the seal", "before pruning"])
def test_a_step_counts_only_once_every_engine_and_the_state_are_sealed(
    dist: DistInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    """The issue's run: keep_checkpoints 1, killed while saving step 4. Every engine resumes from the
    same step, the last one sealed, and nothing is pruned before the new step is sealed."""
    trained = engines()
    at_2 = advance(trained, range(2))
    store(tmp_path, keep=1).save(2, trained, {"marker": 2})
    at_4 = advance(trained, range(2, 4))
    crash_at(point, monkeypatch)
    with pytest.raises(Crash):
        store(tmp_path, keep=1).save(4, trained, {"marker": 4})
    monkeypatch.undo()

    sealed = point == "before pruning"
    assert (tmp_path / "step-2" / MANIFEST).is_file(), "the older step survives until the new one is sealed"
    assert (tmp_path / "step-4" / MANIFEST).is_file() is sealed
    resumed = engines(seed=5)
    state = store(tmp_path, keep=1).restore(resumed)
    expected, step = (at_4, 4) if sealed else (at_2, 2)
    assert state == {"step": step, "marker": step}
    for name, engine in resumed.items():
        assert engine.global_step == step, name
        assert max_diff(params(engine.module), expected[name]) == 0.0, name

    # The next save seals its step and only then removes the others, unsealed leftovers included.
    advance(resumed, range(step, step + 2))
    store(tmp_path, keep=1).save(step + 2, resumed, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"step-{step + 2}"]


def test_corrupt_incomplete_or_planted_checkpoints_are_skipped(
    dist: DistInfo, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trained = engines()
    for step in (2, 4, 6):
        advance(trained, range(step - 2, step))
        store(tmp_path, keep=3).save(step, trained, {"at": step})
    model_file = tmp_path / "step-6" / "critic" / "mp_rank_00_model_states.pt"
    flipped = bytearray(model_file.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    model_file.write_bytes(bytes(flipped))
    with caplog.at_level(logging.WARNING):
        assert store(tmp_path).restore(engines())["at"] == 4
    assert "step-6: critic/mp_rank_00_model_states.pt does not match its sha256" in caplog.text

    (tmp_path / "step-4" / MANIFEST).unlink()  # as if the pod died while saving step 4
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert store(tmp_path).restore(engines())["at"] == 2
    assert "step-4: manifest.json is missing (the save did not finish)" in caplog.text

    (tmp_path / "step-2" / "actor" / "planted.pt").write_bytes(b"not ours")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert store(tmp_path).restore(engines()) is None
    assert "files not in the manifest: actor/planted.pt" in caplog.text


def old_unkeyed_manifest(folder: Path, step: int) -> None:
    """The manifest format 1 wrote: every file's sha256, signed by nobody."""
    files = {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST}  # fmt: skip
    (folder / MANIFEST).write_text(
        json.dumps({"format": 1, "global_step": step, "world_size": 1, "files": files})
    )


@pytest.mark.parametrize("reseal", ["the old unkeyed manifest", "another key"])
def test_a_planted_pickle_payload_never_runs(
    dist: DistInfo, tmp_path: Path, caplog: pytest.LogCaptureFixture, reseal: str
) -> None:
    """Someone who can write the checkpoint folder swaps a DeepSpeed file for a pickle that runs code,
    then re-seals the folder as well as they can: resume refuses it before anything is unpickled."""
    trained = engines()
    advance(trained, range(2))
    folder = store(tmp_path).save(2, trained, {})
    marker = tmp_path / "marker"
    planted = folder / "actor" / "mp_rank_00_model_states.pt"
    torch.save({"module": payload(marker)}, planted)
    TorchCheckpointEngine().load(str(planted))  # DeepSpeed's own loader: the payload is live
    assert marker.read_text() == "code ran"
    marker.unlink()
    if reseal == "another key":
        integrity.seal(
            folder, b"a-forger-s-own-key-of-32-bytes!!", step=2, world_size=1, engines=list(ENGINES)
        )
    else:
        old_unkeyed_manifest(folder, 2)

    with caplog.at_level(logging.WARNING):
        assert store(tmp_path).restore(engines()) is None
    expected = (
        "not sealed with this work dir's checkpoint key" if reseal == "another key" else "no keyed seal"
    )
    assert expected in caplog.text
    assert not marker.exists()


def test_tensor_only_loading_refuses_a_payload_even_in_a_sealed_folder(
    dist: DistInfo, tmp_path: Path
) -> None:
    """The second lock: a file swapped after verification (or sealed by someone holding the key)
    still cannot run code, because DeepSpeed's files are read with weights_only=True."""
    trained = engines()
    advance(trained, range(2))
    folder = store(tmp_path).save(2, trained, {})
    marker = tmp_path / "marker"
    torch.save({"module": payload(marker)}, folder / "critic" / "mp_rank_00_model_states.pt")
    integrity.seal(folder, KEY, step=2, world_size=1, engines=list(ENGINES))
    with pytest.raises(
        CheckpointRejected, match=r"mp_rank_00_model_states.pt holds more than tensors.*GLOBAL"
    ):
        store(tmp_path).restore(engines())
    assert not marker.exists()


def reseal(folder: Path, **changes: object) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    facts = {key: manifest[key] for key in ("step", "world_size", "engines")} | changes
    integrity.seal(folder, KEY, **facts)


def test_resume_refuses_another_world_size_or_other_engines(dist: DistInfo, tmp_path: Path) -> None:
    trained = engines()
    advance(trained, range(2))
    folder = store(tmp_path).save(2, trained, {})
    reseal(folder, world_size=2)
    with pytest.raises(
        ResumeRefused, match=r"saved by 2 processes but this job has 1.*resume with 2 processes"
    ):
        store(tmp_path).restore(engines())
    reseal(folder, world_size=1)
    with pytest.raises(
        ResumeRefused, match=r"holds the engines \['actor', 'critic'\] but this run trains \['actor'\]"
    ):
        store(tmp_path).restore({"actor": engines()["actor"]})


def test_resume_under_changed_settings_is_refused_naming_them_unless_allowed(
    dist: DistInfo, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trained = engines()
    weights = advance(trained, range(2))
    saved = {"train": {"learning_rate": 0.02, "seed": 1}, "base_model": "/models/a"}
    store(tmp_path, fingerprint=saved).save(2, trained, {})
    changed = {"train": {"learning_rate": 0.05, "seed": 1}, "base_model": "/models/a", "rows": 80}
    fresh = engines(seed=3)
    with pytest.raises(ConfigChanged) as refused:
        store(tmp_path, fingerprint=changed).restore(fresh)
    message = str(refused.value)
    assert "\n" not in message
    assert "rows (unset -> 80); train.learning_rate (0.02 -> 0.05)" in message
    assert "seed" not in message and "base_model" not in message
    assert "resume_with_changed_config: true" in message
    assert all(engine.global_step == 0 for engine in fresh.values()), "nothing was loaded"

    with caplog.at_level(logging.WARNING):
        state = store(tmp_path, fingerprint=changed, allow_changed_config=True).restore(fresh)
    assert state == {"step": 2}
    assert "although settings changed" in caplog.text and "train.learning_rate (0.02 -> 0.05)" in caplog.text
    assert max_diff(params(fresh["actor"].module), weights["actor"]) == 0.0


def test_the_fingerprint_holds_the_resolved_schedule_not_where_training_stops(dist: DistInfo) -> None:
    def fingerprint(**cfg: object) -> dict[str, object]:
        settings = config(**cfg)
        return engine_fingerprint(Engine(mlp(), settings, total_steps=settings.max_steps or 10))

    constant = fingerprint(max_steps=4)
    assert fingerprint(max_steps=8, epochs=3, log_every_steps=1, checkpoint_every_steps=2) == constant
    assert fingerprint(max_steps=4, gradient_checkpointing=False, keep_checkpoints=5) == constant
    assert "schedule_steps" not in constant and constant["warmup_steps"] == 0
    cosine = fingerprint(max_steps=4, lr_scheduler="cosine", warmup_ratio=0.25)
    assert (cosine["schedule_steps"], cosine["warmup_steps"]) == (4, 1)
    assert fingerprint(max_steps=8, lr_scheduler="cosine", warmup_ratio=0.25)["schedule_steps"] == 8
    assert fingerprint(max_steps=4, learning_rate=0.1) != constant
    assert fingerprint(max_steps=4, seed=7) != constant


def test_pruning_keeps_the_newest_sealed_and_drops_unsealed_and_abandoned_steps(
    dist: DistInfo, tmp_path: Path
) -> None:
    (tmp_path / "step-0").mkdir()  # an interrupted save: no manifest
    (tmp_path / "step-99").mkdir()  # a timeline abandoned by resuming earlier
    (tmp_path / "step-1").mkdir()
    old_unkeyed_manifest(tmp_path / "step-1", 1)  # not ours any more
    engine = {"mlp": Engine(mlp(), config(), total_steps=4)}
    for step in range(1, 5):
        run_steps(engine["mlp"], DATA, range(step - 1, step))
        store(tmp_path, keep=2).save(step, engine, {})
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-3", "step-4"]


# --- the key -----------------------------------------------------------------------------------


def test_the_key_comes_from_the_environment_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(integrity.KEY_ENV, "s" * 40)
    assert checkpoint_key(tmp_path) == b"s" * 40
    assert not (tmp_path / integrity.KEY_FILE).exists()
    monkeypatch.setenv(integrity.KEY_ENV, "short")
    with pytest.raises(ValueError, match=f"{integrity.KEY_ENV} holds 5 characters.*at least 32"):
        checkpoint_key(tmp_path)


def test_the_key_file_is_private_created_once_and_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(integrity.KEY_ENV, raising=False)
    work = tmp_path / "work"
    key = checkpoint_key(work)
    path = work / integrity.KEY_FILE
    assert len(key) == 64 and os.stat(path).st_mode & 0o777 == 0o600
    assert checkpoint_key(work) == key, "the same key on every later use"
    assert sorted(p.name for p in work.iterdir()) == [integrity.KEY_FILE], "no temporary file left"
    path.chmod(0o640)
    with pytest.raises(ValueError, match=r"accessible to other users \(mode 0640\); chmod 600"):
        checkpoint_key(work)
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="is not a regular file"):
        checkpoint_key(work)
