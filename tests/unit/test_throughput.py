"""MFU's peak FLOP/s, peak memory per rank, and both reaching the logs."""

import json
import os
from pathlib import Path

import pytest
import torch

import forgeml
from forgeml.training.throughput import CUDA_PEAK_TFLOPS, peak_flops, peak_memory_bytes


def test_cpu_peak_is_measured():
    assert peak_flops(torch.device("cpu"), "fp32") > 1e8


@pytest.mark.parametrize(
    ("name", "precision", "tflops"),
    [("NVIDIA H100 80GB HBM3", "bf16", 989.0), ("NVIDIA A100-SXM4-40GB", "fp32", 19.5), ("NVIDIA H200", "fp16", 989.0)],
)
def test_cuda_peak_comes_from_the_datasheet(monkeypatch, name, precision, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0), precision) == tflops * 1e12
    assert set(CUDA_PEAK_TFLOPS[name.split()[1].split("-")[0]]) == {"fp32", "bf16", "fp16"}


def test_peak_memory_counts_what_the_process_held():
    resident = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    block = torch.ones(256 * 2**20 // 4)  # 256 MiB more, every page touched
    assert peak_memory_bytes(torch.device("cpu")) >= resident + 0.9 * block.nbytes


def test_lm_training_logs_mfu_and_peak_memory(tmp_path):
    sets = (
        "data.max_rows=60", "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=32",
        "model.tokenizer=byte", "train.max_steps=4", "train.log_every=2", "train.global_batch_size=8",
    )  # fmt: skip
    forgeml.train(forgeml.as_recipe("lm", sets), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in rows if row["split"] == "train"]
    assert [row["step"] for row in logged] == [2, 4]
    assert all(0 < row["mfu"] < 1 and len(row["peak_memory_mib"]) == 1 for row in logged)
    throughput = json.loads((tmp_path / "train" / "eval.json").read_text())["throughput"]
    assert throughput["tokens_per_s"] > 0 and throughput["peak_memory_mib"][0] > 0
