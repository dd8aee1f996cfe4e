"""The train section (what is learned and how) and the parallel section (how the work is spread)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, NonNegativeFloat, PositiveInt, model_validator

from forgeml.section import UNHASHED, Probability, Section


class EarlyStoppingConfig(Section):
    metric: Literal["loss", "accuracy", "macro_f1", "perplexity"] = "loss"
    patience: PositiveInt = 3
    min_delta: NonNegativeFloat = 0.0


class AugmentConfig(Section):
    """Training-time augmentation; 0 turns an option off."""

    token_dropout: Probability = Field(0.0, description="text: drop each token with this probability")
    random_mask: Probability = Field(0.0, description="text: replace each token by [MASK] with this probability")
    gaussian_noise: NonNegativeFloat = Field(0.0, description="tables: std of noise added to standardised features")
    mixup_alpha: NonNegativeFloat = Field(0.0, description="tables: Beta(alpha, alpha) mixup of rows and labels")


class TrainConfig(Section):
    """What is learned and how: optimisation, schedule, regularisation, evaluation, checkpoints."""

    max_steps: PositiveInt | None = None
    max_epochs: Annotated[float, Field(gt=0)] | None = None
    global_batch_size: PositiveInt = 32
    lr: Annotated[float, Field(gt=0, le=1)] = 3e-4
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    weight_decay: NonNegativeFloat = 0.01
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    grad_clip: Annotated[float, Field(gt=0)] | None = 1.0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 0
    eval_every: PositiveInt | None = Field(None, description="steps between evaluations; default: once per epoch")
    eval_batch_size: PositiveInt = 64
    eval_before: bool = Field(
        False,
        description="also score the network on the test split before training (a pretrained one: what training bought)",
        json_schema_extra=UNHASHED,
    )
    checkpoint_every: PositiveInt | None = None
    keep_last: PositiveInt = 2
    resume: Literal["auto", "never", "require"] = Field(
        "auto",
        description="auto: a train stage that stopped midway continues from its newest intact checkpoint; "
        "never: it starts over; require (--resume): it must continue, and it is an error when there is no "
        "interrupted training with a checkpoint to continue from",
        json_schema_extra=UNHASHED,
    )
    log_every: PositiveInt = Field(10, json_schema_extra=UNHASHED)
    gc_every: PositiveInt | None = Field(
        50,
        description="collect garbage every N steps instead of whenever Python decides; null: Python's own",
        json_schema_extra=UNHASHED,
    )
    early_stopping: EarlyStoppingConfig | None = None
    loss: Literal["cross_entropy", "focal"] = "cross_entropy"
    focal_gamma: NonNegativeFloat = 2.0
    label_smoothing: Probability = 0.0
    class_weights: Literal["balanced"] | list[Annotated[float, Field(gt=0)]] | None = None
    augment: AugmentConfig = AugmentConfig()

    @model_validator(mode="after")
    def _check_length(self) -> TrainConfig:
        if self.max_steps is None and self.max_epochs is None:
            raise ValueError("set train.max_steps or train.max_epochs (or both: training stops at the first)")
        return self


class ParallelConfig(Section):
    """How the work is spread over processes, devices and memory; nothing here changes what is
    learned beyond floating-point order, so a run resumes under other settings."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    strategy: Literal["auto", "single", "ddp", "fsdp", "tp", "fsdp+tp"] = Field(
        "auto", description="how processes share the work; auto: single for one process, ddp for more"
    )
    tp_degree: PositiveInt = Field(2, description="fsdp+tp: processes that split each layer (tp uses all)")
    activation_checkpointing: bool = Field(False, description="recompute each block's activations in backward")
    micro_batch_size: PositiveInt | Literal["auto"] | None = Field(
        None,
        description="rows per forward pass on each rank; default: the global batch split over the data-parallel "
        "ranks; auto: the largest that fits in memory (accumulation keeps the global batch)",
    )
    memory_budget_gb: Annotated[float, Field(gt=0)] | None = Field(
        None, description="CPU, micro_batch_size auto: memory per process; default: half the available, shared"
    )
    collective_timeout_s: Annotated[float, Field(gt=0)] = Field(
        600.0, description="a rank that does not join a collective within this ends the run with an error"
    )
    num_threads: PositiveInt | None = Field(None, description="CPU threads for torch; default: torch's choice")
    keep_freed_memory: bool = Field(
        True, description="glibc: reuse freed memory instead of returning it to the OS each step (fewer page faults)"
    )
