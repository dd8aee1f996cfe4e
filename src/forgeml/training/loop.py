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
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from forgeml.data.shards import ShardStream
from forgeml.errors import ForgeError
from forgeml.models.registry import Batch, logits_of
from forgeml.recipe import TrainConfig
from forgeml.training.callbacks import Callback, LoopState, model_weights
from forgeml.training.checkpoint import Checkpoints
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


class EpochBatches:
    """Micro-batches across epochs from a loader over a ShardStream. The stream's order is a function
    of (seed, epoch), so the position is just (epoch, batches taken); the augmentation generator is
    re-seeded from it before each batch, so a resumed run sees exactly the batches it would have.
    Saved positions count samples of the whole job, so a resume on another number of data-parallel
    ranks starts at the same place in the epoch."""

    def __init__(self, loader: DataLoader, augment: torch.Generator | None, seed: int, dp_rank: int, dp_degree: int):
        self.loader = loader
        self.stream: ShardStream = loader.dataset
        self.augment = augment
        self.seed, self.dp_rank, self.dp_degree = seed, dp_rank, dp_degree
        self.epoch = self.position = 0
        self.iterator: Iterator[Batch] | None = None

    def __next__(self) -> Batch:
        if self.iterator is None:
            self.stream.load_state_dict({"epoch": self.epoch, "consumed": self.position * self.loader.batch_size})
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

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "samples": self.position * self.loader.batch_size * self.dp_degree}

    def resume(self, state: dict[str, int]) -> None:
        per_batch = self.loader.batch_size * self.dp_degree
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


def fit(
    model: nn.Module,
    train_loader: torch.utils.data.DataLoader,
    cfg: TrainConfig,
    loss_fn: Any,
    strategy: Strategy,
    evaluate: Callable[[nn.Module], dict[str, Any]] | None = None,
    callbacks: list[Callback] = (),
    augment: torch.Generator | None = None,
    checkpoints: Checkpoints | None = None,
    resume: bool = False,
    flops_per_token: float | None = None,
) -> LoopState:
    """Train ``model`` (as the strategy wrapped it) in place; returns the final loop state.

    ``train_loader`` iterates a ShardStream; ``augment`` is the generator its collate draws from.
    With ``checkpoints``, a checkpoint is saved every ``cfg.checkpoint_every`` steps and at the
    end, and ``resume`` continues from the newest. With ``flops_per_token`` (the model's training
    FLOPs per token), the state carries MFU against the peak of every device in the job.
    """
    accumulate = accumulation(cfg, strategy)
    steps_per_epoch = len(train_loader) // accumulate
    if steps_per_epoch == 0:
        raise ForgeError(
            f"the training split gives {len(train_loader)} micro-batches of {cfg.micro_batch} rows, fewer than "
            f"one global batch ({cfg.global_batch_size}); lower train.global_batch_size or add data"
        )
    total = total_steps(cfg, steps_per_epoch)
    eval_every = cfg.eval_every or steps_per_epoch
    device = strategy.device
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    autocast = autocast_for(cfg.precision, device)
    state = LoopState(network=model, total_steps=total, steps_per_epoch=steps_per_epoch)
    window: deque[tuple[float, int, int]] = deque(maxlen=cfg.log_every)
    batches = EpochBatches(train_loader, augment, cfg.seed, strategy.dp_rank, strategy.dp_degree)
    job_peak_flops = sum(strategy.env.gather(peak_flops(device, cfg.precision))) if flops_per_token else None

    def rng_tensors() -> dict[str, torch.Tensor]:
        rng = {"torch_rng": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda_rng"] = torch.cuda.get_rng_state(device)
        return rng

    # Callbacks by kind (and rank among those of their kind): a resumed run builds them from the same recipe.
    kinds = [type(callback).__name__ for callback in callbacks]
    keyed = {f"{kind}-{kinds[:i].count(kind)}": callbacks[i] for i, kind in enumerate(kinds)}

    def save_checkpoint(checkpoints: Checkpoints) -> None:
        kept = {key: values for key, callback in keyed.items() if (values := callback.state_dict())}
        weights = {key: values.pop("weights") for key, values in kept.items() if "weights" in values}
        extra = {"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "data": batches.state()}
        counters = {name: getattr(state, name) for name in RESUMED_COUNTERS}
        checkpoints.save(state.step, model, optimizer, rng_tensors(), {**extra, **counters, "callbacks": kept}, weights)

    if checkpoints is not None and resume:
        tensors = rng_tensors()
        resumed = checkpoints.restore(model, optimizer, tensors, weights_like=lambda: model_weights(model))
        if resumed is not None:
            scheduler.load_state_dict(resumed.extra["scheduler"])
            scaler.load_state_dict(resumed.extra["scaler"])
            batches.resume(resumed.extra["data"])
            if resumed.rng_restored:
                torch.set_rng_state(tensors["torch_rng"])
                if device.type == "cuda":
                    torch.cuda.set_rng_state(tensors["cuda_rng"], device)
            else:
                state.notes.append("resumed on another number of processes: random streams start afresh")
            state.notes += [f"skipped corrupt checkpoint {name}" for name in resumed.skipped]
            state.step = resumed.step
            for name in RESUMED_COUNTERS:
                setattr(state, name, resumed.extra.get(name, getattr(state, name)))
            for key, values in resumed.extra.get("callbacks", {}).items():
                if key not in keyed:  # a callback of that run only (a test's crash, say)
                    continue
                weights = {"weights": resumed.weights[key]} if key in resumed.weights else {}
                keyed[key].load_state_dict({**values, **weights})
    for callback in callbacks:
        callback.on_fit_start(state)

    # Python's automatic collections walk every live object at moments set by allocation counts,
    # which costs a few percent of step time and makes it uneven; collect at fixed steps instead
    # (as torchtitan's gc_freq does), fully after each evaluation.
    gc_was_enabled = gc.isenabled()
    if cfg.gc_every:
        gc.collect()
        gc.disable()
    # on_fit_end always runs, so a crash or Ctrl-C still closes the progress display and the logs.
    try:
        model.train()
        for step in range(state.step + 1, total + 1):
            started = time.perf_counter()
            micro = [next(batches).to(device) for _ in range(accumulate)]
            # The global batch's normalizer, over every data-parallel rank's micro-batches; each
            # rank's loss is scaled by dp_degree because DDP and FSDP average the gradients.
            norm = strategy.dp_sum(sum(loss_fn.normalizer(b.targets) for b in micro)) / strategy.dp_degree
            step_loss = torch.zeros((), device=device)
            for batch in micro:
                with autocast():
                    logits = logits_of(model(**batch.inputs))
                loss = loss_fn(logits, batch.targets) * (loss_fn.normalizer(batch.targets) / norm)
                scaler.scale(loss).backward()
                step_loss += loss.detach()
                # Free the logits now: held into the next forward they keep the allocator from
                # reusing their memory, which cost 5-7 % of step time on the lm recipe's model.
                del logits, loss
            if cfg.grad_clip is not None:
                scaler.unscale_(optimizer)
                strategy.clip_gradients(model, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()

            # Counted over the whole job: every data-parallel rank took as many as this one.
            samples = sum(b.size for b in micro) * strategy.dp_degree
            tokens = sum(b.tokens for b in micro) * strategy.dp_degree
            window.append((time.perf_counter() - started, samples, tokens))
            elapsed = sum(w[0] for w in window)
            step_loss = strategy.dp_sum(step_loss) / strategy.dp_degree
            state.step, state.loss, state.lr = step, step_loss.item(), scheduler.get_last_lr()[0]
            state.samples += samples
            state.tokens += tokens
            state.samples_per_s = sum(w[1] for w in window) / elapsed
            state.tokens_per_s = sum(w[2] for w in window) / elapsed
            if job_peak_flops:
                state.mfu = flops_per_token * state.tokens_per_s / job_peak_flops
            check_loss(state, NONFINITE_STEPS_SKIPPED if scaler.is_enabled() else 0)
            state.log_step = step % cfg.log_every == 0 or step == total
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
            if checkpoints is not None and (step == total or step % (cfg.checkpoint_every or total) == 0):
                save_checkpoint(checkpoints)

            if state.should_stop:
                break
    finally:
        for callback in callbacks:
            callback.on_fit_end(state)
        if gc_was_enabled:
            gc.enable()
    return state
