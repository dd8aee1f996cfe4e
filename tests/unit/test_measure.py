"""One way of measuring size and latency, for compress's variants and tuning's objectives alike."""

from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from forgeml.compression.variants import torch_variant
from forgeml.measure import BLOCK, WARMUP, latency_ms, timed_rounds
from forgeml.tuning.objectives import size_mb


def test_tunings_size_is_the_bytes_compress_reports_for_the_same_model(tmp_path):
    save_file({"w": torch.zeros(1000)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}" * 5000)  # not weights: counted by neither
    family = SimpleNamespace(network=torch.nn.Linear(2, 2))  # all a torch variant reads of its family
    variant = torch_variant("baseline", "baseline", family, tmp_path)
    assert size_mb(tmp_path) * 2**20 == variant.size_bytes() == (tmp_path / "model.safetensors").stat().st_size


def test_rounds_time_every_model_alike_after_a_warm_up():
    calls = {"a": [], "b": []}
    models = [calls["a"].append, calls["b"].append]
    seconds = timed_rounds(models, list(range(10)), 9)
    assert [len(s) for s in seconds] == [9, 9]
    rounds = -(-9 // (BLOCK - 1))  # each round's first call is not timed
    assert len(calls["a"]) == len(calls["b"]) == WARMUP + 9 + rounds
    assert latency_ms(lambda item: None, [0], 5) >= 0.0
