"""The training loop. It reads top to bottom; strategies wrap the model, callbacks watch.

One optimizer step = ``accumulation`` micro-batches. Each micro-batch's mean loss is scaled
by its share of the global batch's normalizer (rows, tokens or class weight), so the
accumulated gradient equals the gradient of the global batch's mean loss.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from forgeml.data.shards import ShardStream
from forgeml.errors import ForgeError
from forgeml.models.registry import Batch, logits_of
from forgeml.training.callbacks import Callback, LoopState, model_weights
from forgeml.training.checkpoint import Checkpoints
from forgeml.training.config import TrainConfig
from forgeml.training.strategies import Strategy, accumulation
from forgeml.training.throughput import peak_flops, peak_memory_bytes


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decoupled weight decay on matrices only: no decay on biases and norm weights (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = partial(warmup_cosine, warmup=cfg.warmup_steps, total=total, min_ratio=cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast on CPU or CUDA; fp16 with a grad scaler on CUDA only."""
    if precision == "fp32":
        return contextlib.nullcontext
    if precision == "fp16" and device.type != "cuda":
        raise ForgeError("train.precision: fp16 needs a CUDA device; on CPU use bf16 (or fp32)")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return partial(torch.autocast, device_type=device.type, dtype=dtype)


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    limits = [cfg.max_steps] if cfg.max_steps else []
    if cfg.max_epochs:
        limits.append(max(1, math.ceil(cfg.max_epochs * steps_per_epoch)))
    return min(limits)


class BatchSource(Protocol):
    """What ``fit`` trains from: micro-batches without end (epoch after epoch) that can report their
    position and go back to it, so a resumed run sees exactly the batches it would have."""

    per_epoch: int  # micro-batches in one epoch on this rank
    batch_size: int  # rows in one micro-batch

    def __next__(self) -> Batch: ...

    def state_dict(self) -> dict[str, int]: ...

    def load_state_dict(self, state: dict[str, int]) -> None: ...


class Epochs:
    """Any re-iterable of Batch with a length (a DataLoader over a user's dataset, a list) as a
    BatchSource: one pass is an epoch; the position is (epoch, batches taken), and a resume replays
    the epoch up to it. Resumes are exact when a pass's order depends on its epoch alone: a sampler
    with ``set_epoch`` (DistributedSampler's convention) is told each epoch before its pass."""

    def __init__(self, batches: Any, batch_size: int) -> None:
        self.batches, self.batch_size, self.per_epoch = batches, batch_size, len(batches)
        self.epoch = self.position = 0
        self.iterator: Iterator[Batch] | None = None

    def __next__(self) -> Batch:
        if self.iterator is None:
            sampler = getattr(self.batches, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)
            # A DataLoader's iter() draws a seed from torch's global generator, and skipped batches
            # may draw too: kept off the stream dropout draws from, so a resumed run draws as the first.
            with torch.random.fork_rng(devices=[]):
                self.iterator = iter(self.batches)
                for _ in range(self.position):  # back to where the saved run stood in this epoch
                    next(self.iterator)
        try:
            batch = next(self.iterator)
        except StopIteration:
            self.epoch, self.position, self.iterator = self.epoch + 1, 0, None
            return next(self)
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self.iterator = state["epoch"], state["batches"], None


class EpochBatches:
    """Micro-batches across epochs from a loader over a ShardStream. The stream's order is a function
    of (seed, epoch), so the position is just (epoch, batches taken) and the stream skips to it
    without reading what it skips; the augmentation generator is re-seeded from it before each
    batch. Saved positions count samples of the whole job, so a resume on another number of
    data-parallel ranks starts at the same place in the epoch."""

    def __init__(self, loader: DataLoader, augment: torch.Generator | None, seed: int, dp_rank: int, dp_degree: int):
        self.loader = loader
        self.stream: ShardStream = loader.dataset
        self.augment = augment
        self.batch_size, self.per_epoch = loader.batch_size, len(loader)
        self.seed, self.dp_rank, self.dp_degree = seed, dp_rank, dp_degree
        self.epoch = self.position = 0
        self.iterator: Iterator[Batch] | None = None

    def __next__(self) -> Batch:
        if self.iterator is None:
            self.stream.load_state_dict({"epoch": self.epoch, "consumed": self.position * self.batch_size})
            self.iterator = iter(self.loader)
        if self.augment is not None:  # collate (which augments) runs inside next(): num_workers=0
            entropy = [self.seed, self.epoch, self.position, self.dp_rank]
            self.augment.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
        try:
            batch = next(self.iterator)
        except StopIteration:
            self.epoch, self.position, self.iterator = self.epoch + 1, 0, None
            return next(self)
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "samples": self.position * self.batch_size * self.dp_degree}

    def load_state_dict(self, state: dict[str, int]) -> None:
        per_batch = self.batch_size * self.dp_degree
        self.epoch, self.position, self.iterator = state["epoch"], state["samples"] // per_batch, None


# LoopState fields a checkpoint keeps, so a resumed run counts, logs and decides as an uninterrupted one.
RESUMED_COUNTERS = ("samples", "tokens", "losses_since_log", "history", "best_step", "skipped_steps", "nonfinite_run")

# Under fp16 the grad scaler skips a step whose gradients overflowed and halves its scale, so a few
# non-finite losses in a row are expected; this many in a row means the scale cannot rescue it.
NONFINITE_STEPS_SKIPPED = 8


def check_loss(state: LoopState, tolerated: int) -> None:
    """Count the step's loss into the log window if it is finite; a non-finite one is a skipped step,
    and more than ``tolerated`` of them in a row (any, without a grad scaler) end training."""
    if math.isfinite(state.loss):
        state.nonfinite_run = 0
        state.losses_since_log.append(state.loss)
        return
    state.nonfinite_run += 1
    state.skipped_steps += 1
    if state.nonfinite_run > tolerated:
        in_a_row = f" ({state.nonfinite_run} steps in a row)" if tolerated else ""
        raise ForgeError(
            f"the training loss became {state.loss} at step {state.step}{in_a_row}; "
            "lower train.lr or set train.grad_clip"
        )


class Optimization:
    """What a step needs besides the model and its batches: AdamW, the warmup-cosine schedule over
    ``total`` steps, the grad scaler (fp16) and autocast for the recipe's precision."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, total: int, device: torch.device) -> None:
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, total)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        self.autocast = autocast_for(cfg.precision, device)
        self.grad_clip = cfg.grad_clip


def train_step(
    model: nn.Module, micro: list[Batch], loss_fn: Any, strategy: Strategy, opt: Optimization
) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches; returns the step's loss on this rank
    (its share of the global batch's mean), left on the device: reading it would wait for the step.
    Gradients are averaged across data-parallel ranks once, during the last micro-batch's backward."""
    # The global batch's normalizer, over every data-parallel rank's micro-batches; each
    # rank's loss is scaled by dp_degree because DDP and FSDP average the gradients.
    norm = strategy.dp_sum(sum(loss_fn.normalizer(b.targets) for b in micro)) / strategy.dp_degree
    step_loss = torch.zeros((), device=strategy.device)
    for index, batch in enumerate(micro):
        with strategy.gradient_sync(model, index == len(micro) - 1):
            with opt.autocast():
                output = model(**batch.inputs)
            # The logits are not held past the loss: through the backward pass (or into the next
            # forward) they would keep the allocator from reusing their memory, which cost 5-9 % of
            # step time on a language model's vocabulary-wide logits.
            loss = loss_fn(logits_of(output), batch.targets) * (loss_fn.normalizer(batch.targets) / norm)
            del output
            opt.scaler.scale(loss).backward()
        step_loss += loss.detach()
        del loss
    if opt.grad_clip is not None:
        opt.scaler.unscale_(opt.optimizer)
        strategy.clip_gradients(model, opt.grad_clip)
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.optimizer.zero_grad(set_to_none=True)
    opt.scheduler.step()
    return step_loss


class PendingLosses:
    """Step losses held on the device until a step that needs them (a log line, a checkpoint, the
    end): then summed over the data-parallel ranks and read back in one transfer, and checked step
    by step, so the loop neither waits for each step nor adds a collective to it."""

    def __init__(self, strategy: Strategy, tolerated: int) -> None:
        self.strategy, self.tolerated = strategy, tolerated
        self.losses: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor) -> None:
        self.losses.append(loss)

    def read(self, state: LoopState) -> None:
        """Every rank calls it at the same steps: the sum is a collective."""
        if not self.losses:
            return
        values = (self.strategy.dp_sum(torch.stack(self.losses)) / self.strategy.dp_degree).tolist()
        last = state.step
        for offset, value in enumerate(values):
            state.step, state.loss = last - len(values) + 1 + offset, value
            check_loss(state, self.tolerated)
        state.step = last
        self.losses = []


class Throughput:
    """Samples, tokens and MFU per second over the last ``window`` steps (evaluation left out)."""

    def __init__(self, window: int, peak_flops: float | None, flops_per_token: float | None) -> None:
        self.steps: deque[tuple[float, int, int]] = deque(maxlen=window)
        self.peak_flops, self.flops_per_token = peak_flops, flops_per_token

    def update(self, state: LoopState, seconds: float, samples: int, tokens: int) -> None:
        self.steps.append((seconds, samples, tokens))
        elapsed = sum(s[0] for s in self.steps)
        state.samples += samples
        state.tokens += tokens
        state.samples_per_s = sum(s[1] for s in self.steps) / elapsed
        state.tokens_per_s = sum(s[2] for s in self.steps) / elapsed
        if self.peak_flops:
            state.mfu = self.flops_per_token * state.tokens_per_s / self.peak_flops


class Resumable:
    """Everything a checkpoint holds so a resumed run goes on as an uninterrupted one: model and
    optimizer (through ``Checkpoints``), schedule, grad scaler, data position, random streams,
    the loop's counters and each callback's state."""

    def __init__(
        self,
        checkpoints: Checkpoints,
        model: nn.Module,
        opt: Optimization,
        batches: BatchSource,
        callbacks: list[Callback],
        device: torch.device,
    ) -> None:
        self.checkpoints, self.model, self.opt, self.batches, self.device = checkpoints, model, opt, batches, device
        # Callbacks by kind (and rank among those of their kind): a resumed run builds them from the same recipe.
        kinds = [type(callback).__name__ for callback in callbacks]
        self.callbacks = {f"{kind}-{kinds[:i].count(kind)}": callbacks[i] for i, kind in enumerate(kinds)}

    def rng_tensors(self) -> dict[str, torch.Tensor]:
        rng = {"torch_rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return rng

    def save(self, state: LoopState) -> None:
        kept = {key: values for key, callback in self.callbacks.items() if (values := callback.state_dict())}
        weights = {key: values.pop("weights") for key, values in kept.items() if "weights" in values}
        extra = {
            "scheduler": self.opt.scheduler.state_dict(),
            "scaler": self.opt.scaler.state_dict(),
            "data": self.batches.state_dict(),
            **{name: getattr(state, name) for name in RESUMED_COUNTERS},
            "callbacks": kept,
        }
        self.checkpoints.save(state.step, self.model, self.opt.optimizer, self.rng_tensors(), extra, weights)

    def restore(self, state: LoopState) -> None:
        """The newest complete checkpoint into the model, the optimizer and ``state``, if there is one."""
        tensors = self.rng_tensors()
        resumed = self.checkpoints.restore(
            self.model, self.opt.optimizer, tensors, weights_like=lambda: model_weights(self.model)
        )
        if resumed is None:
            return
        self.opt.scheduler.load_state_dict(resumed.extra["scheduler"])
        self.opt.scaler.load_state_dict(resumed.extra["scaler"])
        self.batches.load_state_dict(resumed.extra["data"])
        if resumed.rng_restored:
            torch.set_rng_state(tensors["torch_rng"])
            if self.device.type == "cuda":
                torch.cuda.set_rng_state(tensors["cuda_rng"], self.device)
        else:
            state.notes.append("resumed on another number of processes: random streams start afresh")
        state.notes += [f"skipped corrupt checkpoint {name}" for name in resumed.skipped]
        state.step = resumed.step
        for name in RESUMED_COUNTERS:
            setattr(state, name, resumed.extra.get(name, getattr(state, name)))
        for key, values in resumed.extra.get("callbacks", {}).items():
            if key in self.callbacks:  # else a callback of that run only (a test's crash, say)
                weights = {"weights": resumed.weights[key]} if key in resumed.weights else {}
                self.callbacks[key].load_state_dict({**values, **weights})


@contextlib.contextmanager
def collecting_on_schedule(every: int | None) -> Iterator[None]:
    """Python's automatic collections walk every live object at moments set by allocation counts,
    which costs a few percent of step time and makes it uneven; the loop collects at fixed steps
    instead (as torchtitan's gc_freq does), fully after each evaluation."""
    was_enabled = gc.isenabled()
    if every:
        gc.collect()
        gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def fit(
    model: nn.Module,
    batches: BatchSource,
    cfg: TrainConfig,
    loss_fn: Any,
    strategy: Strategy,
    evaluate: Callable[[nn.Module], dict[str, Any]] | None = None,
    callbacks: list[Callback] = (),
    checkpoints: Checkpoints | None = None,
    resume: bool = False,
    flops_per_token: float | None = None,
) -> LoopState:
    """Train ``model`` (as the strategy wrapped it) in place on ``batches``; returns the final loop state.

    With ``checkpoints``, a checkpoint is saved every ``cfg.checkpoint_every`` steps and at the
    end, and ``resume`` continues from the newest. With ``flops_per_token`` (the model's training
    FLOPs per token), the state carries MFU against the peak of every device in the job.
    """
    if cfg.global_batch_size % (batches.batch_size * strategy.dp_degree):
        raise ForgeError(
            f"train.global_batch_size ({cfg.global_batch_size}) must be a multiple of the batches' size "
            f"({batches.batch_size}) x the data-parallel degree ({strategy.dp_degree})"
        )
    accumulate = accumulation(cfg.global_batch_size, batches.batch_size, strategy)
    steps_per_epoch = batches.per_epoch // accumulate
    if steps_per_epoch == 0:
        raise ForgeError(
            f"the training split gives {batches.per_epoch} micro-batches of {batches.batch_size} rows, fewer than "
            f"one global batch ({cfg.global_batch_size}); lower train.global_batch_size or add data"
        )
    total = total_steps(cfg, steps_per_epoch)
    eval_every = cfg.eval_every or steps_per_epoch
    device = strategy.device
    opt = Optimization(model, cfg, total, device)
    state = LoopState(network=model, total_steps=total, steps_per_epoch=steps_per_epoch)
    job_peak = sum(strategy.env.gather(peak_flops(device, cfg.precision))) if flops_per_token else None
    throughput = Throughput(cfg.log_every, job_peak, flops_per_token)
    pending = PendingLosses(strategy, NONFINITE_STEPS_SKIPPED if opt.scaler.is_enabled() else 0)
    saved = None if checkpoints is None else Resumable(checkpoints, model, opt, batches, list(callbacks), device)
    if saved is not None and resume:
        saved.restore(state)
    for callback in callbacks:
        callback.on_fit_start(state)

    # on_fit_end always runs, so a crash or Ctrl-C still closes the progress display and the logs.
    try:
        with collecting_on_schedule(cfg.gc_every):
            model.train()
            for step in range(state.step + 1, total + 1):
                started = time.perf_counter()
                micro = [next(batches).to(device) for _ in range(accumulate)]
                pending.add(train_step(model, micro, loss_fn, strategy, opt))
                # Counted over the whole job: every data-parallel rank took as many as this one.
                samples = sum(b.size for b in micro) * strategy.dp_degree
                tokens = sum(b.tokens for b in micro) * strategy.dp_degree
                state.step, state.lr = step, opt.scheduler.get_last_lr()[0]
                state.log_step = step % cfg.log_every == 0 or step == total
                checkpointing = saved is not None and (step == total or step % (cfg.checkpoint_every or total) == 0)
                if state.log_step or checkpointing:
                    pending.read(state)
                throughput.update(state, time.perf_counter() - started, samples, tokens)
                if state.log_step:  # a collective: the same steps on every rank
                    state.peak_memory = strategy.env.gather(peak_memory_bytes(device))
                for callback in callbacks:
                    callback.on_step_end(state)
                if state.log_step:
                    state.losses_since_log = []
                if cfg.gc_every and step % cfg.gc_every == 0:
                    gc.collect(1)
                if evaluate is not None and (step % eval_every == 0 or step == total):
                    metrics = evaluate(model)
                    state.history.append({"step": step, **metrics})
                    for callback in callbacks:
                        callback.on_eval(state, metrics)
                    if cfg.gc_every:
                        gc.collect()
                if checkpointing:
                    saved.save(state)
                if state.should_stop:
                    break
            pending.read(state)  # what the last steps left unchecked
    finally:
        for callback in callbacks:
            callback.on_fit_end(state)
    return state
