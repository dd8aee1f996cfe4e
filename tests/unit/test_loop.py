"""The training loop on a real (small) MLP: accumulation, early stopping, precision, losses, schedule."""

import math
import uuid
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from forgeml.data.shards import write_shards
from forgeml.errors import ForgeError
from forgeml.models.mlp import MLP, MLPConfig
from forgeml.models.registry import Splits
from forgeml.training.builder import loaders
from forgeml.training.callbacks import Callback
from forgeml.training.config import TrainConfig
from forgeml.training.loop import fit, warmup_cosine
from forgeml.training.losses import ClassificationLoss, balanced_weights
from forgeml.training.strategies import Strategy


def table(n: int = 160, seed: int = 0) -> Splits:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1).astype(np.int64)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(6)]).assign(label=np.array(["a", "b", "c"])[y])
    return Splits(
        train=frame.iloc[:128],
        val=frame.iloc[128:144],
        test=frame.iloc[144:],
        feature_columns=[f"f{i}" for i in range(6)],
        label_column="label",
        labels=["a", "b", "c"],
    )


def stored(splits: Splits, encoder) -> tuple[dict, str]:
    """The splits as the prepare stage stores them: shards (several per split) and a manifest."""
    folder = f"memory://loop-{uuid.uuid4().hex}"
    parts = {name: getattr(splits, name) for name in ("train", "val", "test")}
    rows = {name: encoder.rows(part, splits.label_column, splits.labels) for name, part in parts.items()}
    return {"splits": {name: {"shards": write_shards(r, folder, name, 40)} for name, r in rows.items()}}, folder


def train_mlp(
    splits: Splits,
    dropout: float = 0.0,
    loss=None,
    callbacks=(),
    evaluate=None,
    checkpoints=None,
    resume=False,
    micro_batch_size=None,
    **train,
):
    cfg = TrainConfig(**{"max_steps": 8, "lr": 1e-2, "warmup_steps": 0, "seed": 0, **train})
    family, encoder = MLP.fit(MLPConfig(name="mlp", hidden_sizes=[16], dropout=dropout), splits, seed=0)
    manifest, folder = stored(splits, encoder)
    strategy = Strategy.single(torch.device("cpu"))
    batches, _ = loaders(family, manifest, folder, cfg, micro_batch_size or cfg.global_batch_size, strategy)
    torch.manual_seed(cfg.seed)
    state = fit(
        family.network,
        batches,
        cfg,
        loss or ClassificationLoss(),
        strategy,
        evaluate=evaluate,
        callbacks=list(callbacks),
        checkpoints=checkpoints,
        resume=resume,
    )
    return family, state


def weights(family) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in family.network.parameters()])


def test_accumulation_4x8_equals_batch_32():
    splits = table()
    full, _ = train_mlp(splits, global_batch_size=32)
    accumulated, _ = train_mlp(splits, global_batch_size=32, micro_batch_size=8)
    assert weights(full).sub(weights(accumulated)).abs().max() < 1e-5


def test_accumulation_is_exact_with_class_weights():
    splits = table()
    class_weights = torch.tensor([1.0, 3.0, 10.0])
    full, _ = train_mlp(splits, loss=ClassificationLoss(class_weights=class_weights), global_batch_size=32)
    acc, _ = train_mlp(
        splits, loss=ClassificationLoss(class_weights=class_weights), global_batch_size=32, micro_batch_size=8
    )
    assert weights(full).sub(weights(acc)).abs().max() < 1e-5


def test_training_is_deterministic_for_a_seed():
    splits = table()
    a, _ = train_mlp(splits, dropout=0.2, global_batch_size=16)
    b, _ = train_mlp(splits, dropout=0.2, global_batch_size=16)
    assert torch.equal(weights(a), weights(b))


def test_scheduled_garbage_collection_changes_nothing_but_when_it_runs():
    import gc

    splits = table()
    managed, _ = train_mlp(splits, dropout=0.2, global_batch_size=16, gc_every=3)
    assert gc.isenabled()  # handed back to Python after the loop
    automatic, _ = train_mlp(splits, dropout=0.2, global_batch_size=16, gc_every=None)
    assert torch.equal(weights(managed), weights(automatic))


class Snapshots(Callback):
    def __init__(self):
        self.at: dict[int, torch.Tensor] = {}

    def on_eval(self, state, metrics):
        self.at[state.step] = torch.cat([p.detach().flatten().clone() for p in state.network.parameters()])


def test_early_stopping_stops_and_restores_the_best_weights():
    from forgeml.training.callbacks import EarlyStopping

    losses = iter([1.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0])
    snapshots = Snapshots()
    stopper = EarlyStopping("loss", patience=2, min_delta=0.0)
    family, state = train_mlp(
        table(),
        global_batch_size=16,
        eval_every=1,
        max_steps=8,
        evaluate=lambda model: {"loss": next(losses)},
        callbacks=[snapshots, stopper],
    )
    assert state.stopped_early and state.step == 4 and state.best_step == 2
    assert torch.equal(weights(family), snapshots.at[2])
    assert not torch.equal(weights(family), snapshots.at[4])


def test_bf16_autocast_trains_on_cpu():
    splits = table()
    _, before = train_mlp(splits, max_steps=1, global_batch_size=32, precision="bf16")
    _, after = train_mlp(splits, max_steps=24, global_batch_size=32, precision="bf16")
    assert math.isfinite(after.loss) and after.loss < before.loss


def test_fp16_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ForgeError, match="fp16 needs a CUDA device"):
        train_mlp(table(), precision="fp16")


def test_too_little_data_for_one_batch_is_a_clear_error():
    with pytest.raises(ForgeError, match="fewer than one global batch"):
        train_mlp(table(), global_batch_size=256)


def test_weight_decay_skips_biases_and_norms():
    from forgeml.training.loop import param_groups

    network = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(network, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_warmup_then_cosine_schedule():
    values = [warmup_cosine(s, warmup=4, total=20, min_ratio=0.1) for s in range(21)]
    assert values[:4] == sorted(values[:4]) and values[3] < 1.0
    assert values[4] == pytest.approx(1.0)
    assert values[20] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[4:], values[5:], strict=False))


def test_focal_loss_with_gamma_zero_is_cross_entropy():
    logits = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    targets = torch.arange(10) % 4
    focal = ClassificationLoss("focal", focal_gamma=0.0)(logits, targets)
    assert focal == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)


def test_focal_loss_down_weights_easy_examples():
    logits = torch.tensor([[4.0, 0.0], [0.2, 0.0]])
    targets = torch.tensor([0, 0])
    ce = F.cross_entropy(logits, targets, reduction="none")
    focal = ClassificationLoss("focal", focal_gamma=2.0)
    easy, hard = (focal(logits[i : i + 1], targets[i : i + 1]).item() / ce[i].item() for i in range(2))
    assert easy < hard < 1.0


def test_balanced_weights_match_sklearn():
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([0] * 10 + [1] * 3 + [2] * 1)
    ours = balanced_weights(torch.tensor([10.0, 3.0, 1.0])).numpy()
    theirs = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_mixup_and_noise_augment_training_batches_only():
    from forgeml.training.config import AugmentConfig

    splits = table()
    family, encoder = MLP.fit(MLPConfig(name="mlp", hidden_sizes=[8]), splits, seed=0)
    items = family.items(encoder.table(splits.train, "label", splits.labels))[:8]
    plain = family.collate(items, augment=None, generator=None)
    augment = AugmentConfig(gaussian_noise=0.1, mixup_alpha=0.4)
    mixed = family.collate(items, augment=augment, generator=torch.Generator().manual_seed(0))
    assert plain.targets.dtype == torch.long
    assert mixed.targets.shape == (8, 3) and torch.allclose(mixed.targets.sum(1), torch.ones(8))
    assert not torch.equal(mixed.inputs["features"], plain.inputs["features"])


def test_noise_augmentation_works_when_the_network_is_on_another_device():
    """Training moves the network (and its scale buffer) to the GPU while batches are built on the
    CPU; torch's lazy device stands in for the GPU on a CPU-only machine."""
    from forgeml.training.config import AugmentConfig

    lazy = pytest.importorskip("torch._lazy.ts_backend", reason="torch built without the lazy backend")
    lazy.init()
    splits = table()
    family, encoder = MLP.fit(MLPConfig(name="mlp", hidden_sizes=[8]), splits, seed=0)
    items = family.items(encoder.table(splits.train, "label", splits.labels))[:8]
    family.network.to("lazy")
    batch = family.collate(items, AugmentConfig(gaussian_noise=0.1), torch.Generator().manual_seed(0))
    assert batch.inputs["features"].device.type == "cpu"
    assert not torch.equal(batch.inputs["features"], family.collate(items, None, None).inputs["features"])


class Crash(Callback):
    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, state):
        if state.step == self.at:
            raise KeyboardInterrupt


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path):
    from forgeml.training.checkpoint import Checkpoints
    from forgeml.training.config import AugmentConfig

    splits = table()
    # Dropout, noise and mixup draw random numbers: the resumed run must draw the same ones.
    settings = dict(
        dropout=0.2,
        global_batch_size=32,
        micro_batch_size=16,
        max_steps=10,
        checkpoint_every=3,
        augment=AugmentConfig(gaussian_noise=0.1, mixup_alpha=0.4),
    )
    straight, _ = train_mlp(splits, **settings)
    checkpoints = Checkpoints(tmp_path / "ckpt", tag="t", keep_last=2)
    with pytest.raises(KeyboardInterrupt):
        train_mlp(splits, checkpoints=checkpoints, callbacks=[Crash(at=8)], **settings)
    assert [p.name for p in checkpoints.complete()] == ["step-3", "step-6"]  # keep_last=2
    resumed, state = train_mlp(splits, checkpoints=checkpoints, resume=True, **settings)
    assert state.step == 10
    assert torch.equal(weights(straight), weights(resumed))
    assert [p.name for p in checkpoints.complete()] == ["step-9", "step-10"]


def test_resume_with_early_stopping_matches_an_uninterrupted_run(tmp_path):
    """The best value, the patience count, the best weights and the history survive a crash."""
    from forgeml.training.callbacks import EarlyStopping
    from forgeml.training.checkpoint import Checkpoints

    by_step = {1: 1.0, 2: 0.5, 3: 0.7, 4: 0.8, 5: 0.9, 6: 0.6, 7: 0.95, 8: 0.99}
    settings = dict(
        dropout=0.2, global_batch_size=32, eval_every=1, max_steps=8, checkpoint_every=3,
        evaluate=lambda model: {"loss": by_step[int(model.steps_seen.item())]},
    )  # fmt: skip

    class StepCounter(Callback):  # lets the scripted evaluation know its step through the model
        def on_step_end(self, state):
            state.network.steps_seen.fill_(state.step)

    def run(checkpoints=None, resume=False, crash=None):
        splits = table()
        family, encoder = MLP.fit(MLPConfig(name="mlp", hidden_sizes=[16], dropout=0.2), splits, seed=0)
        family.network.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))
        callbacks = [StepCounter(), EarlyStopping("loss", patience=3, min_delta=0.0)] + ([crash] if crash else [])
        cfg = TrainConfig(max_steps=8, lr=1e-2, warmup_steps=0, seed=0, global_batch_size=32, eval_every=1,
                          checkpoint_every=3)  # fmt: skip
        manifest, folder = stored(splits, encoder)
        strategy = Strategy.single(torch.device("cpu"))
        batches, _ = loaders(family, manifest, folder, cfg, cfg.global_batch_size, strategy)
        torch.manual_seed(0)
        state = fit(family.network, batches, cfg, ClassificationLoss(), strategy,
                    evaluate=settings["evaluate"], callbacks=callbacks,
                    checkpoints=checkpoints, resume=resume)  # fmt: skip
        return family, state

    straight, expected = run()
    assert expected.stopped_early and expected.best_step == 2 and expected.step == 5
    checkpoints = Checkpoints(tmp_path / "ckpt", tag="t", keep_last=2)
    with pytest.raises(KeyboardInterrupt):
        run(checkpoints, crash=Crash(at=4))  # after step 3's checkpoint: best at 2, one bad evaluation
    resumed, state = run(checkpoints, resume=True)
    assert (state.step, state.best_step, state.stopped_early) == (5, 2, True)
    assert state.history == expected.history
    assert torch.equal(weights(resumed), weights(straight))


def test_a_non_finite_loss_ends_training_at_once_without_a_grad_scaler():
    from forgeml.training.callbacks import LoopState
    from forgeml.training.loop import check_loss

    state = LoopState(network=torch.nn.Linear(1, 1), total_steps=10, steps_per_epoch=10, step=3, loss=float("nan"))
    with pytest.raises(ForgeError, match="became nan at step 3; lower train.lr"):
        check_loss(state, tolerated=0)


def test_fp16_skips_a_few_overflowing_steps_and_stops_when_they_persist():
    from forgeml.training.callbacks import LoopState
    from forgeml.training.loop import check_loss

    state = LoopState(network=torch.nn.Linear(1, 1), total_steps=10, steps_per_epoch=10)
    for loss in [2.0, float("inf"), float("inf"), 1.5, float("inf")]:
        state.step, state.loss = state.step + 1, loss
        check_loss(state, tolerated=2)
    assert state.losses_since_log == [2.0, 1.5] and state.skipped_steps == 3 and state.nonfinite_run == 1
    state.loss = float("inf")
    check_loss(state, tolerated=2)
    with pytest.raises(ForgeError, match=r"became inf at step 5 \(3 steps in a row\)"):
        check_loss(state, tolerated=2)


def test_a_checkpoint_index_that_would_run_code_is_refused(tmp_path):
    """Checksums sit beside the files, so a deliberate swap passes them; the index's unpickler must
    still build nothing but DCP's metadata."""
    import json
    import pickle

    from forgeml.errors import RunDirError
    from forgeml.rundir import sha256_file
    from forgeml.training.checkpoint import META, Checkpoints

    checkpoints = Checkpoints(tmp_path / "ckpt", tag="t", keep_last=1)
    train_mlp(table(), checkpoints=checkpoints, max_steps=2, global_batch_size=32)
    newest = checkpoints.complete()[-1]
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (newest / ".metadata").write_bytes(pickle.dumps(Payload()))
    meta = json.loads((newest / META).read_text())
    meta["files"][".metadata"] = sha256_file(newest / ".metadata")
    (newest / META).write_text(json.dumps(meta))
    with pytest.raises(RunDirError, match="io.open is not part of a checkpoint index"):
        train_mlp(table(), checkpoints=checkpoints, resume=True, max_steps=4, global_batch_size=32)
    assert not marker.exists()


def test_a_corrupt_checkpoint_is_refused(tmp_path):
    from forgeml.errors import RunDirError
    from forgeml.training.checkpoint import Checkpoints

    checkpoints = Checkpoints(tmp_path / "ckpt", tag="t", keep_last=1)
    train_mlp(table(), checkpoints=checkpoints, max_steps=2, global_batch_size=32)
    newest = checkpoints.complete()[-1]
    shard = next(p for p in newest.iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:-8] + b"tampered")
    with pytest.raises(RunDirError, match="corrupt"):
        train_mlp(table(), checkpoints=checkpoints, resume=True, max_steps=4, global_batch_size=32)


@pytest.mark.parametrize(
    ("damage", "named"),
    [("truncate", "does not match its checksum"), ("flip", "does not match its checksum"), ("delete", "is missing")],
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, damage, named):
    from forgeml.training.checkpoint import Checkpoints

    checkpoints = Checkpoints(tmp_path / "ckpt", tag="t", keep_last=2)
    settings = dict(global_batch_size=32, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        train_mlp(table(), checkpoints=checkpoints, callbacks=[Crash(at=5)], max_steps=8, **settings)
    older, newest = checkpoints.complete()
    shard = next(p for p in newest.iterdir() if p.suffix == ".distcp")
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 1
        shard.write_bytes(bytes(data))
    else:
        shard.unlink()
    _, state = train_mlp(table(), checkpoints=checkpoints, resume=True, max_steps=8, **settings)
    assert state.step == 8
    assert state.notes == [f"skipped corrupt checkpoint {newest.name} ({shard.name} {named})"]
    assert older.name == "step-2"


def test_an_unfinished_checkpoint_is_invisible(tmp_path):
    from forgeml.training.checkpoint import Checkpoints

    checkpoints = Checkpoints(tmp_path / "ckpt", tag="t", keep_last=2)
    train_mlp(table(), checkpoints=checkpoints, max_steps=2, global_batch_size=32)
    (tmp_path / "ckpt" / "step-5.tmp").mkdir()
    (tmp_path / "ckpt" / "step-7").mkdir()  # no checkpoint.json: never finished
    assert [p.name for p in checkpoints.complete()] == ["step-2"]
    assert Checkpoints(tmp_path / "ckpt", tag="other", keep_last=2).complete() == []


def test_prepare_rebalancing_choice_reaches_the_loss():
    from forgeml.tasks import CLASSIFICATION

    labels, counts = ["a", "b", "c"], {"a": 60, "b": 30, "c": 10}
    cfg = TrainConfig(max_steps=1)
    weighted = CLASSIFICATION.loss(cfg, labels, counts, "class_weights")
    np.testing.assert_allclose(weighted.class_weights.numpy(), [100 / 180, 100 / 90, 100 / 30], rtol=1e-6)
    assert CLASSIFICATION.loss(cfg, labels, counts, "focal").kind == "focal"
    explicit = TrainConfig(max_steps=1, class_weights=[1, 2, 3])
    assert CLASSIFICATION.loss(explicit, labels, counts, "class_weights").class_weights.tolist() == [1, 2, 3]
    assert CLASSIFICATION.loss(cfg, labels, counts, "none").class_weights is None


def test_a_users_own_data_loader_trains_and_resumes_exactly(tmp_path):
    """fit takes any re-iterable of Batch through Epochs; a sampler with set_epoch gives each epoch
    its own order, and a run resumed from a checkpoint mid-epoch ends with the same weights."""
    from torch.utils.data import DataLoader, DistributedSampler

    from forgeml.training.checkpoint import Checkpoints
    from forgeml.training.loop import Epochs

    splits = table()
    cfg = TrainConfig(max_steps=10, lr=1e-2, warmup_steps=0, seed=0, global_batch_size=16, checkpoint_every=3)

    def run(checkpoints=None, resume=False, callbacks=()):
        family, encoder = MLP.fit(MLPConfig(name="mlp", hidden_sizes=[16], dropout=0.2), splits, seed=0)
        items = family.items(encoder.table(splits.train, "label", splits.labels))
        sampler = DistributedSampler(items, num_replicas=1, rank=0, shuffle=True, seed=0)
        collate = partial(family.collate, augment=None, generator=None)
        batches = Epochs(DataLoader(items, batch_size=16, sampler=sampler, collate_fn=collate), batch_size=16)
        torch.manual_seed(0)
        state = fit(family.network, batches, cfg, ClassificationLoss(), Strategy.single(torch.device("cpu")),
                    callbacks=list(callbacks), checkpoints=checkpoints, resume=resume)  # fmt: skip
        return family, state

    straight, state = run()
    assert state.step == 10 and state.epoch == 10 / 8  # 128 rows: 8 steps an epoch
    checkpoints = Checkpoints(tmp_path / "ckpt", tag="t", keep_last=1)
    with pytest.raises(KeyboardInterrupt):
        run(checkpoints, callbacks=[Crash(at=8)])  # after step 6's checkpoint, mid-epoch
    resumed, _ = run(checkpoints, resume=True)
    assert torch.equal(weights(straight), weights(resumed))
