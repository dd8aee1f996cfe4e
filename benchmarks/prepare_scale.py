"""Audit + prepare at scale: peak memory flat in the number of rows, tokenization against Hugging Face
datasets, and near-duplicate recall on planted copies.

Corpora (seeded, generated here and cached in --work-dir): text classification with 10 classes, 30-50 words
a row from a 20,000-word vocabulary, and 2 % planted copies of earlier rows (half exact, with changed case
and spacing; half with one word substituted among the last four: Jaccard of 5-gram shingles >= 0.8); and a
language-modelling corpus of documents of 1,000-3,000 words (--lm-mb of CSV) with 2 % planted copies.

Each size runs ``forgeml run --until prepare`` (audit, then prepare with prepare.workers processes) in a
child process of its own, so its peak resident memory (``ru_maxrss`` from the OS, via wait4) is that run's
alone; rows/s and MB/s are of the whole audit + prepare. Recall is the share of planted copies that the
audit puts in one duplicate group with their source; precision the share of the audit's duplicate pairs
(each group member with its group's first row) that are a planted copy and its source.

Tokenization, side by side in this process on the same rows and tokenizer (MiniLM's, max_length 64): forgeml's
shard writer (encode and write zstd Parquet shards, prepare.workers processes) against Hugging Face
datasets ``Dataset.map(batched=True, num_proc=workers)`` (which writes Arrow cache files), alternating,
--repeats times; medians. The Ray engine is not built yet: its goal is reported as not measured.

Prints one JSON line.

    python benchmarks/prepare_scale.py [--sizes 100000,1000000,4000000] [--lm-mb 1000] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from figures import emit, record_option

CLASSES = 10
VOCABULARY = 20_000
COPY_FRACTION = 0.02
CHUNK = 200_000  # rows generated at a time


def vocabulary(rng: np.random.Generator) -> np.ndarray:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = {"".join(rng.choice(letters, rng.integers(3, 10))) for _ in range(2 * VOCABULARY)}
    return np.array(sorted(words)[:VOCABULARY])


def write_corpus(path: Path, rows: int, words: tuple[int, int], seed: int, label: bool) -> np.ndarray:
    """Write the corpus as CSV; returns, per row, the row it copies (-1 for an original)."""
    rng = np.random.default_rng(seed)
    vocab = vocabulary(rng)
    weights = 1.0 / np.arange(20, VOCABULARY + 20)
    weights /= weights.sum()
    source = np.full(rows, -1, np.int64)
    texts: list[str] = []
    with path.open("w", encoding="utf-8", newline="") as out:
        header = True
        for start in range(0, rows, CHUNK):
            n = min(CHUNK, rows - start)
            lengths = rng.integers(words[0], words[1] + 1, n)
            flat = vocab[rng.choice(VOCABULARY, int(lengths.sum()), p=weights)]
            cuts = np.cumsum(lengths)[:-1]
            chunk = [list(w) for w in np.split(flat, cuts)]
            copy = rng.random(n) < COPY_FRACTION
            copy[0] = False
            texts = []
            for k in range(n):
                if copy[k]:
                    src = int(rng.integers(0, k))
                    source[start + k] = start + src
                    doc = list(chunk[src])
                    if rng.random() < 0.5:
                        doc[0] = doc[0].upper()  # equal once normalised
                        text = "  ".join(doc)
                    else:
                        doc[len(doc) - 1 - int(rng.integers(0, 4))] = str(vocab[rng.integers(VOCABULARY)]) + "x"
                        text = " ".join(doc)
                    chunk[k] = doc
                else:
                    text = " ".join(chunk[k])
                texts.append(text)
            frame = pd.DataFrame({"text": texts})
            if label:
                frame["label"] = [f"c{c}" for c in rng.integers(0, CLASSES, n)]
                labels = frame["label"].to_numpy()
                for k in np.flatnonzero(copy):  # in order, so a copy of a copy has its source's label
                    labels[k] = labels[source[start + k] - start]
                frame["label"] = labels
            frame.to_csv(out, index=False, header=header)
            header = False
    return source


def recipe_text(source: Path, workers: int, lm: dict | None) -> dict:
    model = lm or {"name": "text-classifier", "max_length": 64}
    data = {"source": str(source), "text_column": "text"}
    if lm is None:
        data["label_column"] = "label"
    else:
        data["format"] = "text"
    return {
        "name": "scale",
        "data": data,
        "model": model,
        "audit": {"label_issues": lm is None},
        "prepare": {"workers": workers, "deduplicate": "near"},
        "train": {"max_steps": 1},
    }


def run_child(recipe: dict, folder: Path) -> dict:
    """audit + prepare in a child process: its wall time, peak RSS and stage timings."""
    import yaml

    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = folder / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    code = (
        "import sys; from forgeml.recipe import load_recipe; from forgeml.pipeline import run_stages; "
        "run_stages(load_recipe(sys.argv[1]), sys.argv[2], until='prepare')"
    )
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code, str(path), str(run_dir)], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if status:
        raise SystemExit(f"audit + prepare failed ({status}) on {recipe['data']['source']}")
    record = json.loads((run_dir / "run.json").read_text())
    stages = {name: round(entry["duration_s"] or 0.0, 1) for name, entry in record["stages"].items()}
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "stages_s": stages, "run": run_dir}


def recall_precision(report: dict, source: np.ndarray) -> tuple[float, float]:
    group_of: dict[int, set[int]] = {}
    pairs = []
    for key in ("exact_duplicates", "near_duplicates"):
        for n, group in enumerate(report[key]):
            for row in group:
                group_of.setdefault(row, set()).add((key, n))
            pairs += [(group[0], row) for row in group[1:]]
    family = np.arange(len(source))
    for row in np.flatnonzero(source >= 0):  # sources come first: one pass finds each row's root
        family[row] = family[source[row]]
    copies = np.flatnonzero(source >= 0)
    found = sum(bool(group_of.get(int(c), set()) & group_of.get(int(source[c]), set())) for c in copies)
    right = sum(family[a] == family[b] for a, b in pairs)
    return found / max(len(copies), 1), right / max(len(pairs), 1)


def tokenization(csv: Path, rows: int, workers: int, repeats: int, folder: Path) -> dict:
    """forgeml's shard writer against datasets.map on the same rows and tokenizer, alternating."""
    import datasets

    from forgeml.data.writer import Journal, ShardWriter, start_worker
    from forgeml.models.hf_classifier import HFClassifier
    from forgeml.models.registry import Splits
    from forgeml.recipe import validate_recipe

    frame = pd.read_csv(csv, nrows=rows)
    config = validate_recipe(recipe_text(csv, workers, None)).model
    encoder = HFClassifier.fit_encoder(config, Splits(frame, frame, frame, "text", [], "label", [], None))
    encoder_dir = folder / "encoder"
    encoder.save(encoder_dir)
    labels = sorted(frame["label"].unique())
    tokenizer = encoder.tokenizer
    times: dict[str, list[float]] = {"forgeml": [], "datasets": []}
    for _ in range(repeats):
        out = folder / "shards"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        init = (start_worker, (HFClassifier, config, str(encoder_dir), False))
        journal = Journal(folder / "progress.json", "bench")
        with ShardWriter(encoder, str(out), 50_000, "label", labels, journal, workers, init) as writer:
            for lo in range(0, len(frame), 16_384):
                writer.add("train", frame.iloc[lo : lo + 16_384].reset_index(drop=True))
            writer.close()
        times["forgeml"].append(time.perf_counter() - start)

        cache = folder / "hf-cache"
        shutil.rmtree(cache, ignore_errors=True)
        start = time.perf_counter()
        dataset = datasets.Dataset.from_pandas(frame, preserve_index=False)
        dataset.map(
            lambda batch: tokenizer(batch["text"], truncation=True, max_length=64),
            batched=True,
            num_proc=workers,
            cache_file_name=str(cache / "tokens.arrow"),
        )
        times["datasets"].append(time.perf_counter() - start)
    ours, theirs = statistics.median(times["forgeml"]), statistics.median(times["datasets"])
    return {
        "rows": len(frame),
        "forgeml_rows_per_s": round(len(frame) / ours),
        "datasets_rows_per_s": round(len(frame) / theirs),
        "ratio_vs_datasets": round(theirs / ours, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000,4000000")
    parser.add_argument("--lm-mb", type=int, default=1000, help="size of the language-modelling corpus (0: none)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tokenize-rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "forgeml-prepare-scale")
    record_option(parser)
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    sizes = [int(s) for s in args.sizes.split(",")]
    results = {}
    for rows in sizes:
        folder = args.work_dir / f"text-{rows}"
        folder.mkdir(exist_ok=True)
        csv = folder / "data.csv"
        truth = folder / "source.npy"
        if not (csv.exists() and truth.exists()):
            np.save(truth, write_corpus(csv, rows, (30, 50), seed=rows, label=True))
        source = np.load(truth)
        run = run_child(recipe_text(csv, args.workers, None), folder)
        report = json.loads((run.pop("run") / "audit" / "report.json").read_text())
        recall, precision = recall_precision(report, source)
        mb = csv.stat().st_size / 2**20
        results[rows] = {
            "csv_mb": round(mb, 1),
            "seconds": round(run["seconds"], 1),
            "rows_per_s": round(rows / run["seconds"]),
            "mb_per_s": round(mb / run["seconds"], 2),
            "peak_rss_mb": round(run["peak_rss_mb"]),
            "stages_s": run["stages_s"],
            "near_dup_recall": round(recall, 4),
            "near_dup_precision": round(precision, 4),
        }
        print(json.dumps({"rows": rows, **results[rows]}), file=sys.stderr)

    lm = None
    if args.lm_mb:
        from forgeml.tiny_checkpoints import decoder_tokenizer

        folder = args.work_dir / f"lm-{args.lm_mb}mb"
        folder.mkdir(exist_ok=True)
        csv = folder / "data.csv"
        docs = int(args.lm_mb * 2**20 / (2000 * 7))
        if not csv.exists():
            write_corpus(csv, docs, (1000, 3000), seed=7, label=False)
        tokenizer_dir = folder / "tokenizer"
        if not tokenizer_dir.exists():
            sample = pd.read_csv(csv, nrows=2000)["text"].tolist()
            decoder_tokenizer(vocab_size=8000, corpus=sample).save_pretrained(tokenizer_dir)
        model = {
            "name": "hf-causal-lm",
            "architecture": "llama",
            "config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
            "tokenizer": str(tokenizer_dir),
            "max_length": 512,
        }
        run = run_child(recipe_text(csv, args.workers, model), folder)
        run.pop("run")
        mb = csv.stat().st_size / 2**20
        lm = {
            "csv_mb": round(mb, 1),
            "documents": docs,
            "seconds": round(run["seconds"], 1),
            "mb_per_s": round(mb / run["seconds"], 2),
            "peak_rss_mb": round(run["peak_rss_mb"]),
            "stages_s": run["stages_s"],
        }
        print(json.dumps({"lm": lm}), file=sys.stderr)

    largest = args.work_dir / f"text-{max(sizes)}" / "data.csv"
    tokens = tokenization(largest, args.tokenize_rows, args.workers, args.repeats, args.work_dir / "tokenize")
    small, big = results[min(sizes)], results[max(sizes)]
    rss_ratio = big["peak_rss_mb"] / small["peak_rss_mb"]
    line = {
        "benchmark": "prepare_scale",
        "cores": os.cpu_count(),
        "workers": args.workers,
        "text": {str(k): v for k, v in results.items()},
        "lm": lm,
        "tokenization": tokens,
        "peak_rss_ratio_largest_vs_smallest": round(rss_ratio, 3),
        "goals": {
            "peak RSS at the largest size <= 1.3x the smallest": rss_ratio <= 1.3,
            "tokenization >= datasets.map": tokens["ratio_vs_datasets"] >= 1.0,
            "near-duplicate recall and precision >= 0.95 at every size": all(
                r["near_dup_recall"] >= 0.95 and r["near_dup_precision"] >= 0.95 for r in results.values()
            ),
            "Ray engine within 1.3x of the local engine": "not measured: the Ray engine is not built yet",
        },
    }
    emit(line, args.record)


if __name__ == "__main__":
    main()
