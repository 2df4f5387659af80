"""The one training loop (`loop.fit`), tested once for every trainer: resume, the step cap, the data
position, checkpoint and log cadence, non-finite losses, the metric history.

On the MLP regression task, in process; an interruption is an exception raised by the task (the
disk is left as a kill would leave it). Real SIGKILLs of the real trainers: test_kill_resume.py.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from mlp_training import KEY, RegressionTask, config, mlp, regression

from safe_rlhf_v.config import TrainConfig
from safe_rlhf_v.train.checkpoint import STATE, ConfigChanged, step_dirs
from safe_rlhf_v.train.distributed import DistInfo, Engine, init_distributed
from safe_rlhf_v.train.loop import BatchStream, Position, TrainingResult, fit, total_optimizer_steps

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
DATA = regression(rows=64)  # 8 batches of 8 an epoch
ODD = regression(rows=56, seed=3)  # 7 batches: with accumulation 2 an epoch ends mid-window


class Interrupted(Exception):
    """Stands in for a killed pod."""


@dataclass
class Interrupting(RegressionTask):
    """Raises on its `at`-th micro-batch (counted from 1); returns a NaN loss there when `nan`."""

    at: int = 0
    nan: bool = False
    calls: int = 0

    def losses(self, engine: Engine, indices: list[int]) -> dict[str, torch.Tensor]:
        self.calls += 1
        losses = super().losses(engine, indices)
        if self.calls == self.at:
            if self.nan:
                return {"loss": losses["loss"] * float("nan")}
            raise Interrupted
        return losses


@dataclass
class Run:
    result: TrainingResult
    weights: dict[str, torch.Tensor]
    emitted: list[tuple[int, dict[str, float]]]


@pytest.fixture(scope="module")
def dist() -> DistInfo:
    return init_distributed()


def run(root: Path, cfg: TrainConfig, data: tuple[torch.Tensor, torch.Tensor] = DATA, **task: object) -> Run:
    weights: dict[str, torch.Tensor] = {}
    emitted: list[tuple[int, dict[str, float]]] = []
    result = fit(
        Interrupting(*data, **task),
        lambda: mlp(dropout=0.2),  # dropout: the result depends on the restored RNG too
        cfg,
        rows=len(data[0]),
        rows_name="rows",
        checkpoint_dir=root,
        checkpoint_key=KEY,
        settings={"task": "regression"},
        sink=lambda values, step: emitted.append((step, values)),
        save=lambda model, state: weights.update({k: v.clone() for k, v in state.items()}),
    )
    return Run(result, weights, emitted)


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def saved_state(root: Path, step: int) -> dict:
    return json.loads((root / f"step-{step}" / STATE).read_text())


def test_resume_at_max_steps_takes_no_further_step(dist: DistInfo, tmp_path: Path) -> None:
    cfg = config(epochs=2, max_steps=3, log_every_steps=1)
    first = run(tmp_path, cfg)
    assert [step for step, values in first.emitted if "train/loss" in values] == [1, 2, 3]
    again = run(tmp_path, cfg)
    assert again.emitted == [], "nothing trained, nothing logged"
    assert same_weights(again.weights, first.weights)
    assert again.result == first.result  # the last evaluation and the history come from the checkpoint
    assert [step for step, _ in step_dirs(tmp_path)] == [3]


def test_a_longer_rerun_goes_on_with_the_same_epoch_as_a_run_that_never_stopped(
    dist: DistInfo, tmp_path: Path
) -> None:
    stopped = run(tmp_path / "stopped", config(epochs=2, max_steps=3))
    assert saved_state(tmp_path / "stopped", 3)["position"] == {"epoch": 0, "batches_done": 3}
    continued = run(tmp_path / "stopped", config(epochs=2, max_steps=12))
    straight = run(tmp_path / "straight", config(epochs=2, max_steps=12))
    assert same_weights(continued.weights, straight.weights)
    assert continued.result.metrics == straight.result.metrics
    # The same records, plus the evaluation the first run made when it stopped at step 3.
    stop_eval = {"step": 3, **stopped.emitted[-1][1]}
    assert continued.result.history == sorted([*straight.result.history, stop_eval], key=lambda r: r["step"])


def test_a_longer_rerun_of_a_decaying_schedule_is_refused_unless_allowed(
    dist: DistInfo, tmp_path: Path
) -> None:
    """Under cosine the cap moves the LR schedule's horizon: going on would not give the weights
    of either run, so it is refused, naming the setting."""
    cosine = {"epochs": 2, "lr_scheduler": "cosine", "warmup_ratio": 0.0, "log_every_steps": 1}
    run(tmp_path, config(max_steps=3, **cosine))
    with pytest.raises(ConfigChanged, match=r"mlp\.schedule_steps \(3 -> 6\)"):
        run(tmp_path, config(max_steps=6, **cosine))
    allowed = run(tmp_path, config(max_steps=6, resume_with_changed_config=True, **cosine))
    assert [step for step, values in allowed.emitted if "train/loss" in values] == [4, 5, 6]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_interrupted_anywhere_then_resumed_equals_the_uninterrupted_run(
    dist: DistInfo, tmp_path: Path, accumulation: int
) -> None:
    """Three interruptions at seeded random micro-batches, each followed by a resume: the final
    weights, the evaluation and the whole history equal a run that was never interrupted. With
    accumulation 2 an epoch of 7 batches ends mid-window, so positions cross epoch boundaries."""
    cfg = config(
        epochs=3, gradient_accumulation_steps=accumulation, checkpoint_every_steps=2, log_every_steps=2
    )
    straight = run(tmp_path / "straight", cfg, ODD)
    micro_batches = 3 * 7
    chain = tmp_path / "chain"
    for at in sorted(random.Random(1300 + accumulation).sample(range(1, micro_batches + 1), 3)):
        newest = step_dirs(chain)[0][0] if step_dirs(chain) else 0
        with pytest.raises(Interrupted):
            run(chain, cfg, ODD, at=at - newest * accumulation)  # counted from where this attempt resumes
    resumed = run(chain, cfg, ODD)
    assert same_weights(resumed.weights, straight.weights)
    assert resumed.result == straight.result


def test_checkpoints_follow_the_cadence_and_every_epoch_never_mid_window(
    dist: DistInfo, tmp_path: Path
) -> None:
    run(tmp_path / "plain", config(epochs=2, checkpoint_every_steps=3, keep_checkpoints=20))
    saved = {step: saved_state(tmp_path / "plain", step) for step, _ in step_dirs(tmp_path / "plain")}
    assert sorted(saved) == [3, 6, 8, 9, 12, 15, 16]
    assert saved[3]["position"] == {"epoch": 0, "batches_done": 3} and saved[3]["metrics"] is None
    assert saved[8]["position"] == {"epoch": 1, "batches_done": 0} and "mse" in saved[8]["metrics"]
    assert saved[9]["position"] == {"epoch": 1, "batches_done": 1}
    assert saved[16]["position"] == {"epoch": 2, "batches_done": 0}

    # 7 batches, accumulation 2: the first epoch ends between steps 3 and 4, so it is not saved.
    run(
        tmp_path / "odd",
        config(epochs=2, gradient_accumulation_steps=2, checkpoint_every_steps=2, keep_checkpoints=9),
        ODD,
    )
    saved = {step: saved_state(tmp_path / "odd", step)["position"] for step, _ in step_dirs(tmp_path / "odd")}
    assert saved == {
        2: {"epoch": 0, "batches_done": 4},
        4: {"epoch": 1, "batches_done": 1},
        6: {"epoch": 1, "batches_done": 5},
        7: {"epoch": 2, "batches_done": 0},
    }


def test_figures_are_logged_on_the_first_step_every_interval_and_after_each_epoch(
    dist: DistInfo, tmp_path: Path
) -> None:
    done = run(tmp_path, config(epochs=2, log_every_steps=3, learning_rate=0.01))
    train = [(step, values) for step, values in done.emitted if "train/loss" in values]
    assert [step for step, _ in train] == [1, 3, 6, 9, 12, 15]
    assert all(
        values.keys() == {"train/loss", "train/lr"} and values["train/lr"] == 0.01 for _, values in train
    )
    evals = [(step, values) for step, values in done.emitted if "eval/mse" in values]
    assert [step for step, _ in evals] == [8, 16]
    assert done.result.metrics == {"mse": evals[-1][1]["eval/mse"]}
    assert done.result.history == [{"step": step, **values} for step, values in done.emitted]


def test_a_non_finite_loss_stops_before_the_step_and_the_last_checkpoint_stays_good(
    dist: DistInfo, tmp_path: Path
) -> None:
    cfg = config(epochs=2, checkpoint_every_steps=2)
    with pytest.raises(FloatingPointError) as stopped:
        run(tmp_path / "chain", cfg, at=5, nan=True)
    assert str(stopped.value) == (
        f"mlp: loss is nan at step 4, epoch 1; the last good checkpoint is kept under {tmp_path / 'chain'}: "
        "lower learning_rate and resume"
    )
    assert [step for step, _ in step_dirs(tmp_path / "chain")] == [4, 2]
    assert same_weights(run(tmp_path / "chain", cfg).weights, run(tmp_path / "straight", cfg).weights)


def test_the_untouched_model_is_evaluated_as_step_0_of_a_fresh_run_only(
    dist: DistInfo, tmp_path: Path
) -> None:
    def first() -> list[tuple[int, dict[str, float]]]:
        emitted: list[tuple[int, dict[str, float]]] = []
        fit(
            RegressionTask(*DATA),
            mlp,
            config(epochs=1, max_steps=2),
            rows=64,
            rows_name="rows",
            checkpoint_dir=tmp_path,
            checkpoint_key=KEY,
            settings={},
            sink=lambda values, step: emitted.append((step, values)),
            evaluate_first=True,
        )
        return emitted

    fresh = first()
    assert fresh[0][0] == 0 and set(fresh[0][1]) == {"eval/mse"}
    assert first() == []  # resumed at its cap: no step-0 evaluation, nothing else


def test_the_batch_stream_deals_each_rank_its_own_rows_epoch_after_epoch() -> None:
    def stream(rank: int, rows: int = 10, batch: int = 2) -> BatchStream:
        info = DistInfo(rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu"), backend="gloo")
        return BatchStream(rows, batch, seed=3, dist=info, what="rows")

    first, second = stream(0), stream(1)
    assert first.per_epoch == 2  # 5 rows per rank: two full batches, the fifth row is left out
    for epoch in (0, 1):
        mine, theirs = first.epoch_batches(epoch), second.epoch_batches(epoch)
        assert all(len(batch) == 2 for batch in mine + theirs)
        assert not {i for b in mine for i in b} & {i for b in theirs for i in b}
    assert first.epoch_batches(0) != first.epoch_batches(1), "reshuffled every epoch"
    assert first.epoch_batches(1) == stream(0).epoch_batches(1), "the same order for the same seed"
    assert first.after(0, 1) == Position(0, 1) and first.after(0, 2) == Position(1, 0)
    with pytest.raises(ValueError, match=r"3 rows give no full batch of 4 per process on 2 process\(es\)"):
        stream(0, rows=3, batch=4)


def test_total_optimizer_steps_counts_micro_batches_across_epochs() -> None:
    assert total_optimizer_steps(TrainConfig(epochs=3, gradient_accumulation_steps=4), 10) == 7
    assert total_optimizer_steps(TrainConfig(epochs=3, gradient_accumulation_steps=4, max_steps=5), 10) == 5
    with pytest.raises(ValueError, match="fewer than gradient_accumulation_steps=4"):
        total_optimizer_steps(TrainConfig(epochs=1, gradient_accumulation_steps=4), 2)
