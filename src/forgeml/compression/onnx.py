"""ONNX export and ONNX Runtime variants: fp32 with ORT's graph optimisations saved into the file,
dynamic int8 (weights int8, activations quantised per batch) and static int8 (activation ranges
calibrated on training rows)."""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from forgeml.compression.variants import Logits, Variant, preprocessing_copy
from forgeml.models.registry import ModelFamily, load_family, logits_of

MODEL = "model.onnx"


class Positional(nn.Module):
    """The network with named inputs turned positional, as the ONNX exporter wants them."""

    def __init__(self, network: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.network, self.names = network, list(names)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return logits_of(self.network(**dict(zip(self.names, tensors, strict=True))))


def export(family: ModelFamily, sample: dict[str, torch.Tensor], path: Path) -> None:
    """Batch (and, for text, sequence length) stay dynamic; everything else is fixed by ``sample``."""
    names = list(sample)
    axes = {name: {0: "batch", 1: "sequence"} if family.inputs == "text" else {0: "batch"} for name in names}
    # In eval mode, wrapper included: the exporter puts every module back in its wrapper's mode
    # afterwards, and a fresh wrapper's would leave the network training (dropout on).
    wrapper = Positional(family.network, names).eval()
    with warnings.catch_warnings():  # torch calls this exporter legacy; it is the one that needs no onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapper,
            tuple(sample[name] for name in names),
            str(path),
            input_names=names,
            output_names=["logits"],
            dynamic_axes={**axes, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,  # the TorchScript exporter handles transformers' encoders with dynamic axes in ~2 s
        )


def session(path: Path, threads: int | None, optimized_to: Path | None = None):  # -> ort.InferenceSession
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    # Idle pool threads sleep instead of spinning: spinning, they take the cores from PyTorch (or
    # another session) running in the same process, as when variants are measured side by side.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_to is not None:
        # Extended, not "all": the layout-specific rewrites of "all" would tie the file to this CPU.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(optimized_to)
    else:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_logits(sess) -> Logits:
    names = [i.name for i in sess.get_inputs()]

    def run(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.from_numpy(sess.run(None, {name: inputs[name].numpy() for name in names})[0]).float()

    return run


def load_onnx(folder: Path, model: str, threads: int | None) -> tuple[ModelFamily, Logits]:
    """The family's preprocessing (no torch weights) and an ORT session on ``model``."""
    return load_family(folder, {}), ort_logits(session(folder / model, threads))


def onnx_variants(
    source: Variant,
    sample: dict[str, torch.Tensor],
    calibration: list[dict[str, torch.Tensor]],
    root: Path,
    threads: int,
) -> Iterator[Variant]:
    """onnx-fp32, onnx-int8-dynamic and onnx-int8-static of the source variant, one by one."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        raw, prepared = Path(tmp) / "raw.onnx", Path(tmp) / "prepared.onnx"
        export(source.family, sample, raw)

        folder = preprocessing_copy(source, root / "onnx-fp32")
        session(raw, threads, optimized_to=folder / MODEL)
        yield made("onnx-fp32", source, folder, threads)

        # ORT's symbolic shape inference gives up on transformers' attention masks; ONNX's own suffices.
        quant_pre_process(str(raw), str(prepared), skip_symbolic_shape=True)
        folder = preprocessing_copy(source, root / "onnx-int8-dynamic")
        quantize_dynamic(str(prepared), str(folder / MODEL), weight_type=QuantType.QInt8)
        yield made("onnx-int8-dynamic", source, folder, threads)

        folder = preprocessing_copy(source, root / "onnx-int8-static")
        quantize_static(
            str(prepared),
            str(folder / MODEL),
            Calibration(calibration),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            # Only the matrix products: static ranges for softmax, LayerNorm and the residual adds
            # broke the MiniLM classifier (7 % label agreement); the products carry the time.
            op_types_to_quantize=["MatMul", "Gemm"],
        )
        yield made("onnx-int8-static", source, folder, threads)


class Calibration:
    """onnxruntime's CalibrationDataReader over batches of training rows."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.feeds = iter([{name: t.numpy() for name, t in batch.items()} for batch in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def made(name: str, source: Variant, folder: Path, threads: int) -> Variant:
    family, logits = load_onnx(folder, MODEL, threads)
    variant = Variant(name, "onnx", "onnxruntime", family, logits, folder, [MODEL])
    variant.write_record(source=source.name)
    return variant
