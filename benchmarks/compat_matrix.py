"""Which stage works on which architecture: every tiny random checkpoint forgeml knows how to build
(forgeml.tiny_checkpoints, encoders and decoders) through train, compress, serve, explain and the
export, each cell measured: pass, skipped with the model's reason, or the error.

    python benchmarks/compat_matrix.py [--readme README.md]

Prints one JSON line (architecture -> stage -> result); with ``--readme`` the table between the
``compat-matrix`` markers of that file is replaced by this run's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import forgeml
from forgeml.errors import first_line
from forgeml.tiny_checkpoints import DECODERS, ENCODERS, tiny_checkpoint

STAGES = ["train", "torch-int8", "onnx-fp32", "onnx-int8-static", "distilled", "prune-50", "prune-structured",
          "serve", "ig", "lime", "attention", "plain export"]  # fmt: skip
START, END = "<!-- compat-matrix:start -->", "<!-- compat-matrix:end -->"


def recipe(checkpoint: Path) -> dict[str, Any]:
    return {
        "name": "compat",
        "data": {"source": {"name": "stdlib-docstrings", "top_k_labels": 3}, "max_rows": 120},
        "audit": {"enabled": False},
        "model": {"name": "hf-classifier", "pretrained": str(checkpoint), "max_length": 32},
        "train": {"max_steps": 4, "global_batch_size": 16, "lr": 5e-4, "seed": 0},
        "compress": {
            "methods": ["quantize", "onnx", "distill", "prune"],
            "latency_runs": 10, "throughput_batches": 1, "calibration_rows": 16,
            "prune": {"finetune_steps": 2, "sparsities": [0.5]},
        },
        "explain": {"n": 2, "lime_samples": 20, "ig_steps": 4},
    }  # fmt: skip


def one_architecture(arch: str, folder: Path) -> dict[str, str]:
    cells: dict[str, str] = {}
    run = folder / "run"
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet):
            forgeml.train(recipe(tiny_checkpoint(arch, folder / "checkpoint")), run)
        cells["train"] = "pass"
    except Exception as error:  # a cell of the table: whatever went wrong is what it shows
        return {stage: f"error: {first_line(error)[:160]}" if stage == "train" else "not reached" for stage in STAGES}
    for stage, work in (("compress", lambda: forgeml.compress(run)), ("explain", lambda: forgeml.explain(run))):
        try:
            with contextlib.redirect_stdout(quiet):
                work()
        except Exception as error:  # a cell of the table
            cells[stage] = f"error: {first_line(error)[:160]}"
    built = {row["name"] for row in read(run / "compress" / "variants.json", [])}
    skipped = {row["name"]: row["reason"] for row in read(run / "compress" / "skipped.json", [])}
    for name in ("torch-int8", "onnx-fp32", "onnx-int8-static", "distilled", "prune-50", "prune-structured"):
        if name in built:
            cells[name] = "pass"
        elif name in skipped or "onnx" in skipped and name.startswith("onnx"):
            cells[name] = f"skipped: {skipped.get(name) or skipped['onnx']}"
        else:
            cells[name] = cells.get("compress", "error: not built")
    summary = read(run / "explain" / "summary.json", {})
    for method in ("ig", "lime", "attention"):
        if method in summary.get("methods", {}):
            cells[method] = "pass"
        elif method in summary.get("skipped", {}):
            cells[method] = f"skipped: {summary['skipped'][method]}"
        else:
            cells[method] = cells.get("explain", "error: not run")
    cells["serve"] = attempt(lambda: served(run))
    cells["plain export"] = attempt(lambda: plain_export(run))
    return {stage: cells[stage] for stage in STAGES}


def attempt(check) -> str:
    try:
        check()
    except Exception as error:  # a cell of the table
        return f"error: {first_line(error)[:160]}"
    return "pass"


def served(run: Path) -> None:
    from forgeml.serving.backends import open_model

    model = open_model(run, "recommended", threads=None)  # checked against the probabilities compress measured
    probs = model.predict(["Return the base name of a path."])
    assert probs.shape[-1] == len(model.variant.family.labels)


def plain_export(run: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    family = forgeml.load(run)
    plain = AutoModelForSequenceClassification.from_pretrained(run / "train" / "model").eval()
    texts = ["Return the base name of a path.", "Send the message."]
    with torch.no_grad():
        logits = plain(**family.encode_inputs(texts)).logits
    torch.testing.assert_close(logits.softmax(-1), family.predict_proba(texts), atol=1e-5, rtol=0)


def read(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.exists() else default


def markdown(matrix: dict[str, dict[str, str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| architecture | " + " | ".join(STAGES) + " |", "|---" * (len(STAGES) + 1) + "|"]
    notes: dict[str, int] = {}
    for arch, row in matrix.items():
        shown = []
        for stage in STAGES:
            text = row[stage]
            if text == "pass":
                shown.append("pass")
            else:
                number = notes.setdefault(text, len(notes) + 1)
                shown.append(f"{text.split(':')[0]} [{number}]")
        lines.append(f"| {arch} | " + " | ".join(shown) + " |")
    lines.append("")
    lines += [f"[{n}] {cell(text)}  " for text, n in notes.items()]
    return "\n".join(lines)


def write_readme(path: Path, table: str, command: str) -> None:
    text = path.read_text()
    block = f"{START}\n<!-- written by {command}; do not edit by hand -->\n{table}\n{END}"
    if START not in text:
        raise SystemExit(f"{path} has no {START} ... {END} markers to write the table between")
    path.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.DOTALL))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", type=Path, default=None, help="rewrite the compat-matrix table of this file")
    args = parser.parse_args()
    matrix, seconds = {}, {}
    for arch in (*ENCODERS, *DECODERS):
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            matrix[arch] = one_architecture(arch, Path(tmp))
        seconds[arch] = round(time.perf_counter() - started, 1)
    print(json.dumps({"benchmark": "compat_matrix", "matrix": matrix, "seconds": seconds}))
    if args.readme:
        write_readme(args.readme, markdown(matrix), "python benchmarks/compat_matrix.py --readme README.md")


if __name__ == "__main__":
    main()
