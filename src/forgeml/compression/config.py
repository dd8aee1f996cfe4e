"""The compress section: which variants of the trained model to build, and how they are measured."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PositiveInt

from forgeml.section import Section

CompressMethod = Literal["quantize", "onnx", "compile", "prune", "distill"]


class PruneConfig(Section):
    sparsities: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        [0.5, 0.8], description="magnitude pruning: the share of linear weights set to zero, one variant each"
    )
    structured_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.5, description="structured pruning: the share of heads and channels (or hidden units) removed"
    )
    finetune_steps: PositiveInt = Field(50, description="training steps after pruning, with the recipe's settings")


class DistillConfig(Section):
    alpha: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.5, description="weight of the teacher's soft targets; the labels get 1 - alpha"
    )
    temperature: Annotated[float, Field(gt=0)] = Field(2.0, description="softens both models' probabilities")
    student_layers: PositiveInt | None = Field(
        None,
        description="models with blocks (transformers): how many of the teacher's blocks the student keeps, "
        "evenly spaced, the top one included (default: half)",
    )
    student_width: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.5, description="mlp: the student's hidden sizes as a fraction of the teacher's"
    )


class CompressConfig(Section):
    """Compression variants of the trained model (``forgeml compress``), each measured against it."""

    methods: list[CompressMethod] = Field(
        [],
        description="quantize (torch dynamic int8), onnx (ONNX Runtime fp32, dynamic and static int8), "
        "compile (torch.compile), distill (a smaller student, with and without the teacher), prune (magnitude "
        "and structured, each fine-tuned); "
        "empty: the stage does not run in `forgeml run`",
    )
    target_latency_ms: Annotated[float, Field(gt=0)] | None = Field(
        None,
        description="recommend the most accurate variant at or under this p50 batch-1 latency; "
        "default: the knee of the accuracy-latency front",
    )
    threads: PositiveInt = Field(2, description="threads every variant runs with while measured")
    latency_runs: Annotated[int, Field(ge=10)] = Field(100, description="batch-1 predictions timed per variant")
    throughput_batches: PositiveInt = Field(5, description="batches of 32 timed per variant")
    test_rows: PositiveInt | None = Field(
        None,
        description="the first N test rows every variant is measured on; default: all of them for a classifier, "
        "64 sequences for a language model, whose every position's probabilities are kept per variant",
    )
    generation_prompts: Annotated[int, Field(ge=0)] = Field(
        4, description="language models: test prompts whose greedy continuation every variant must reproduce"
    )
    generation_tokens: PositiveInt = Field(16, description="language models: tokens of each greedy continuation")
    calibration_rows: PositiveInt = Field(
        128, description="training rows that calibrate static int8 and find the matrices int8 harms most"
    )
    blockwise_error: Annotated[float, Field(gt=0)] = Field(
        0.1,
        description="ONNX dynamic int8: a matrix whose output on the calibration rows moves by more than this "
        "(relative) under one int8 scale per tensor gets a scale per block of 32 weights and activations instead",
    )
    distill: DistillConfig = DistillConfig()
    prune: PruneConfig = PruneConfig()
