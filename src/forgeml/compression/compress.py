"""The compress stage: build the variants the recipe asks for from the trained model, measure
them all side by side, and write ``compress/variants.json``, a Pareto plot and one folder per
variant."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from forgeml.compression.config import CompressConfig
from forgeml.compression.measure import (
    Inputs,
    agreement,
    continuations,
    generation_agreement,
    pareto,
    quality,
    recommend,
    speed,
)
from forgeml.compression.operators import check_promise, integer_operators, operators
from forgeml.compression.variants import METRICS_FILE, VARIANT_FILE, Variant, baseline, torch_logits
from forgeml.data.prepare import read_manifest, shard_location
from forgeml.data.shards import read_shard
from forgeml.errors import ForgeError, NotOffered
from forgeml.models.registry import ModelFamily, trained_model_dir
from forgeml.recipe import Recipe
from forgeml.reporting.plots import accuracy_latency
from forgeml.rundir import RunDir, write_json

BATCH = 32
CHECK_ROWS = 2  # test rows whose probabilities each variant keeps, for the server's start-up check
CALIBRATION_BATCH = 8


@dataclass
class Skipped:
    """A variant (or a method's variants) this model does not offer, and why."""

    name: str
    reason: str


@dataclass
class CompressResult:
    variants: list[dict[str, Any]]  # as in variants.json
    recommended: str
    folder: Path
    skipped: list[Skipped] = field(default_factory=list)  # as in skipped.json

    def __str__(self) -> str:
        row = next(row for row in self.variants if row["name"] == self.recommended)
        baseline = self.variants[0]
        return (
            f"{len(self.variants)} variants in {self.folder}; recommended {self.recommended}: accuracy "
            f"{row['accuracy']:.3f} (trained {baseline['accuracy']:.3f}), {row['p50_ms']:.2f} ms at batch 1 "
            f"(trained {baseline['p50_ms']:.2f})" + (f"; {len(self.skipped)} not offered" if self.skipped else "")
        )


def split_items(family: ModelFamily, run: RunDir, split: str, shards_url: str | None) -> list[Any]:
    manifest = read_manifest(run)
    location = shard_location(run, manifest, shards_url)
    return [item for shard in manifest["splits"][split]["shards"] for item in family.items(read_shard(location, shard))]


def measurement_inputs(family: ModelFamily, run: RunDir, cfg: CompressConfig, shards_url: str | None) -> Inputs:
    test = split_items(family, run, "test", shards_url)
    test = test[: cfg.test_rows or family.task.test_rows]
    if not test:
        raise ForgeError("the test split is empty: nothing to measure the variants on; raise prepare.test_fraction")

    def collate(items: list[Any]) -> dict[str, torch.Tensor]:
        return family.collate(items, augment=None, generator=None).inputs

    batches = [test[i : i + BATCH] for i in range(0, len(test), BATCH)]
    targets = torch.cat([family.collate(b, augment=None, generator=None).targets for b in batches])
    cycled = (test * (BATCH // len(test) + 1))[: max(len(test), BATCH)]  # at least one full batch
    full = [cycled[i : i + BATCH] for i in range(0, len(cycled) - BATCH + 1, BATCH)]
    prompts = [family.prompt_of(item) for item in test] if family.generates else []
    return Inputs(
        batches=[collate(b) for b in batches],
        targets=targets,
        singles=[collate([item]) for item in test[: cfg.latency_runs]],
        thirty_twos=[collate(b) for b in full[: cfg.throughput_batches]],
        prompts=[p for p in prompts if p][: cfg.generation_prompts],
    )


def calibration_batches(
    family: ModelFamily, run: RunDir, rows: int, shards_url: str | None
) -> list[dict[str, torch.Tensor]]:
    train = split_items(family, run, "train", shards_url)[:rows]
    return [
        family.collate(train[i : i + CALIBRATION_BATCH], augment=None, generator=None).inputs
        for i in range(0, len(train), CALIBRATION_BATCH)
    ]


def compiled(source: Variant, folder: Path) -> Variant:
    """torch.compile of the source network: the same files, compiled when loaded (dynamic shapes,
    so texts of every length share one compilation)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    relative = Path("..") / source.folder.name
    network = torch.compile(source.family.network, dynamic=True)
    weights = [str(relative / name) for name in source.weights]
    variant = Variant("torch-compile", "compile", "torch", source.family, torch_logits(network), folder, weights)
    variant.write_record(source=str(relative))
    return variant


def attempt(name: str, make: Callable[[], Iterable[Variant]]) -> Iterator[Variant | Skipped]:
    """The variants ``make`` builds, then a Skipped with the reason if the model offers no more."""
    try:
        yield from make()
    except NotOffered as error:
        yield Skipped(name, str(error))


def build(method: str, source: Variant, run: RunDir, recipe: Recipe, inputs: Inputs) -> Iterator[Variant | Skipped]:
    from forgeml.compression.distill import distill_variants
    from forgeml.compression.onnx import onnx_variants
    from forgeml.compression.prune import magnitude, structured
    from forgeml.compression.quantize import torch_int8

    cfg = recipe.compress

    root = run / RunDir.COMPRESS
    if method == "distill":
        yield from attempt("distilled", lambda: distill_variants(source, recipe, run, root))
    elif method == "prune":
        for sparsity in cfg.prune.sparsities:
            yield from attempt(
                f"prune-{round(sparsity * 100)}", lambda s=sparsity: [magnitude(source, s, recipe, run, root)]
            )
        yield from attempt("prune-structured", lambda: [structured(source, recipe, run, root)])
    elif method == "quantize":
        yield from attempt("torch-int8", lambda: [torch_int8(source, root / "torch-int8")])
    elif method == "compile":
        yield compiled(source, root / "torch-compile")
    elif method == "onnx":
        calibration = calibration_batches(source.family, run, cfg.calibration_rows, recipe.prepare.shards_url)

        def exported() -> Iterator[Variant]:
            return onnx_variants(source, inputs.batches[0], calibration, root, cfg.threads, cfg.blockwise_error)

        yield from attempt("onnx", exported)


def compress(recipe: Recipe, run: RunDir, console: Console | None = None) -> CompressResult:
    """Variants of ``run``'s trained model per ``recipe.compress``, measured against it."""
    cfg = recipe.compress
    console = console or Console(stderr=True)
    model_dir = trained_model_dir(run.path)
    if not cfg.methods:
        raise ForgeError("compress.methods is empty; name some, e.g. --methods quantize,onnx")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # for building and measuring alike; the caller's count comes back
    try:
        return build_and_measure(recipe, run, model_dir, console)
    finally:
        torch.set_num_threads(threads)


def build_and_measure(recipe: Recipe, run: RunDir, model_dir: Path, console: Console) -> CompressResult:
    cfg = recipe.compress
    folder = run / RunDir.COMPRESS
    folder.mkdir(parents=True, exist_ok=True)
    source = baseline(model_dir, run / RunDir.BASELINE)
    inputs = measurement_inputs(source.family, run, cfg, recipe.prepare.shards_url)
    progress = Progress(
        TextColumn("[bold]compress {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=console,
    )  # fmt: skip
    with progress:
        task = progress.add_task("build", total=len(cfg.methods))
        variants, skipped = [source], []
        for method in cfg.methods:
            progress.update(task, description=f"build {method}")
            for made in build(method, source, run, recipe, inputs):
                if isinstance(made, Skipped):
                    progress.console.print(f"[yellow]compress: {made.name} skipped: {made.reason}[/]")
                    skipped.append(made)
                else:
                    variants.append(made)
            progress.advance(task)
        executes = [operators(variant) for variant in variants]
        for variant, ops in zip(variants, executes, strict=True):
            check_promise(variant.name, ops)
        task = progress.add_task("check", total=len(variants))
        rows = []
        reference = greedy = None  # the baseline's probabilities and continuations: it comes first
        for variant, ops in zip(variants, executes, strict=True):
            progress.update(task, description=f"check {variant.name}")
            metrics, probs = quality(variant, inputs)
            reference = probs if reference is None else reference
            generated = continuations(variant, inputs.prompts, cfg.generation_tokens) if inputs.prompts else []
            greedy = generated if greedy is None else greedy
            rows.append(
                {
                    "name": variant.name,
                    "method": variant.method,
                    "backend": variant.backend,
                    "accuracy": metrics["accuracy"],
                    variant.family.task.quality: metrics[variant.family.task.quality],
                    "size_bytes": variant.size_bytes(),
                    **agreement(probs, reference),
                    **(generation_agreement(generated, greedy) if generated else {}),
                    "operators": ops,  # what it executes, most frequent first
                    "integer_operators": integer_operators(ops),
                }
            )
            progress.advance(task)
        task = progress.add_task("time (batch 1, batch 32)", total=2)
        speeds = speed(variants, inputs, cfg.latency_runs, cfg.throughput_batches, lambda: progress.advance(task))
    for row, timing in zip(rows, speeds, strict=True):
        row.update(timing)
    for row, on_front in zip(rows, pareto(rows), strict=True):
        row["pareto"] = on_front
    chosen = recommend(rows, cfg.target_latency_ms)
    for index, row in enumerate(rows):
        row["recommended"] = index == chosen
    check = {name: value[:CHECK_ROWS] for name, value in inputs.batches[0].items()}
    for variant, row in zip(variants, rows, strict=True):
        write_json(variant.folder / METRICS_FILE, row)
        variant.record_check(check)
    write_json(run / RunDir.VARIANTS, rows)
    write_json(run / RunDir.SKIPPED_VARIANTS, [asdict(s) for s in skipped])
    stale = {p.name for p in folder.iterdir() if (p / VARIANT_FILE).exists()} - {v.name for v in variants}
    for name in stale:  # variants of an earlier call that this one did not build
        shutil.rmtree(folder / name)
    (run / RunDir.PARETO).write_bytes(accuracy_latency(rows))
    return CompressResult(rows, rows[chosen]["name"], folder, skipped)
