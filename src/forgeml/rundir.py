"""The run directory: where stages meet. Paths, atomic writes, and stage records in run.json."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from forgeml.errors import RunDirError


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write to a temporary name in the same folder, fsync, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class StageRecord:
    status: str  # running | done | failed
    config_hash: str
    input_hashes: dict[str, str]
    started: str
    ended: str | None = None
    duration_s: float | None = None
    error: str | None = None


class RunDir:
    """``runs/<name>/``: recipe.yaml, run.json and one folder per stage. The files one stage
    leaves for the next are named here, relative to the run folder."""

    RECIPE = "recipe.yaml"  # the settled recipe every stage ran with
    RECORD = "run.json"  # each stage's status, config hash and input hashes
    REPORT = "report.html"
    AUDIT_REPORT = "audit/report.json"
    DATA = "data"  # prepare: the shards, unless prepare.shards_url puts them elsewhere
    MANIFEST = "data/manifest.json"  # prepare: shards, their checksums, labels, what was cleaned
    ENCODER = "data/encoder"  # prepare: the fitted tokenizer or feature scales
    PROGRESS = "data/progress.json"  # prepare, while it runs: the shards finished, for a resume
    MODEL = "train/model"  # train: the exported model (config, weights, encoder)
    EVAL = "train/eval.json"
    METRICS = "train/metrics.jsonl"
    TENSORBOARD = "train/tensorboard"
    CHECKPOINTS = "train/checkpoints"
    TUNE = "tune"  # the study's locks and worker recipes
    TRIALS = "tune/trials"  # one run folder per trial: tune/trials/<study>/<number>
    TRIALS_TABLE = "tune/trials.csv"
    TUNED_RECIPE = "tune/best.yaml"
    TUNE_SUMMARY = "tune/summary.json"
    TUNE_PLOTS = "tune/*.png"
    COMPRESS = "compress"  # one folder per variant
    BASELINE = "compress/baseline"
    VARIANTS = "compress/variants.json"
    SKIPPED_VARIANTS = "compress/skipped.json"  # what the model does not offer, and why
    PARETO = "compress/pareto.png"
    EXPLAIN = "explain"
    ATTRIBUTIONS = "explain/attributions.json"
    TOKENS_PAGE = "explain/tokens.html"
    EXPLAIN_SUMMARY = "explain/summary.json"
    EXPLAIN_PICTURES = "explain/*.png"
    BENCHMARKS = "benchmarks/*.json"  # figures a benchmark recorded into this run (--record)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        """``run / RunDir.MODEL``: a path named above, in this run."""
        return self.path / name

    def glob(self, pattern: str) -> list[Path]:
        """``run.glob(RunDir.TUNE_PLOTS)``: the files a pattern named above matches, sorted."""
        return sorted(self.path.glob(pattern))

    @property
    def recipe_path(self) -> Path:
        return self.path / self.RECIPE

    @property
    def record_path(self) -> Path:
        return self.path / self.RECORD

    # -- stage records

    def records(self) -> dict[str, StageRecord]:
        if not self.record_path.exists():
            return {}
        try:
            stages = json.loads(self.record_path.read_text())["stages"]
            return {name: StageRecord(**rec) for name, rec in stages.items()}
        except (ValueError, KeyError, TypeError) as exc:
            raise RunDirError(
                f"{self.record_path} is not a forgeml run record ({exc}); move it away or choose another --run-dir"
            ) from exc

    def _save_records(self, records: dict[str, StageRecord]) -> None:
        write_json(self.record_path, {"stages": {k: vars(v) for k, v in records.items()}})

    def is_done(self, stage: str, config_hash: str, input_hashes: dict[str, str]) -> bool:
        rec = self.records().get(stage)
        return bool(
            rec and rec.status == "done" and rec.config_hash == config_hash and rec.input_hashes == input_hashes
        )

    def was_interrupted(self, stage: str, config_hash: str, input_hashes: dict[str, str]) -> bool:
        """The last attempt at this stage, with this config and these inputs, did not finish."""
        rec = self.records().get(stage)
        return bool(
            rec and rec.status != "done" and rec.config_hash == config_hash and rec.input_hashes == input_hashes
        )

    def start(self, stage: str, config_hash: str, input_hashes: dict[str, str]) -> float:
        records = self.records()
        records[stage] = StageRecord("running", config_hash, input_hashes, now())
        self._save_records(records)
        return time.perf_counter()

    def finish(self, stage: str, started: float, error: str | None = None) -> None:
        records = self.records()
        rec = records[stage]
        rec.status = "failed" if error else "done"
        rec.ended = now()
        rec.duration_s = round(time.perf_counter() - started, 3)
        rec.error = error
        records[stage] = rec
        self._save_records(records)

    def require(self, stage: str, hint: str) -> None:
        rec = self.records().get(stage)
        if not rec or rec.status != "done":
            raise RunDirError(f"{self.path}: the {stage} stage has not finished here; {hint}")

    # -- the resolved recipe

    def claim(self, recipe_yaml: str, config_hashes: dict[str, str], force: bool) -> None:
        """Take the folder for this recipe. Refuse a folder of other files (even when forced), and,
        unless forced, to overwrite a finished stage that was made with a different configuration."""
        if self.path.is_dir() and any(self.path.iterdir()) and not self.record_path.exists():
            raise RunDirError(
                f"{self.path} holds other files and is not a forgeml run directory (no run.json); "
                "choose a new or empty --run-dir"
            )
        stale = [
            name
            for name, rec in self.records().items()
            if rec.status == "done" and name in config_hashes and rec.config_hash != config_hashes[name]
        ]
        if stale and not force:
            old = yaml.safe_load(self.recipe_path.read_text()) if self.recipe_path.exists() else {}
            changed = diff_keys(old or {}, yaml.safe_load(recipe_yaml))
            shown = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
            raise RunDirError(
                f"{self.path} holds a finished run of another recipe ({', '.join(stale)} made with different "
                f"settings{': ' + shown if shown else ''}); choose another --run-dir, or pass --force to overwrite it"
            )
        if not self.record_path.exists():  # mark the folder as ours before writing anything else
            self._save_records({})
        atomic_write(self.recipe_path, recipe_yaml)


def diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [k for key in keys for k in diff_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]
