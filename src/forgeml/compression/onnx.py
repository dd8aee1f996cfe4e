"""ONNX export and ONNX Runtime variants: fp32 with ORT's graph optimisations saved into the file,
dynamic int8 (weights int8, activations quantised per batch) and static int8 (activation ranges
calibrated on training rows)."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from forgeml.compression.variants import Logits, Variant, preprocessing_copy
from forgeml.errors import NotOffered, first_line
from forgeml.models.registry import ModelFamily, load_family, logits_of

MODEL = "model.onnx"


class Positional(nn.Module):
    """The network with named inputs turned positional, as the ONNX exporter wants them."""

    def __init__(self, network: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.network, self.names = network, list(names)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return logits_of(self.network(**dict(zip(self.names, tensors, strict=True))))


@contextlib.contextmanager
def exporting(family: ModelFamily) -> Iterator[None]:
    """An architecture the exporter cannot trace is not offered as ONNX: its error is the reason."""
    try:
        yield
    except (RuntimeError, TypeError, ValueError, NotImplementedError, torch.onnx.errors.OnnxExporterError) as error:
        raise NotOffered(
            f"the ONNX exporter cannot trace this {family.name} model: {first_line(error)[:300]}"
        ) from error


def export(family: ModelFamily, sample: dict[str, torch.Tensor], path: Path) -> None:
    """The axes the family names dynamic (batch, and for text the sequence) stay so; everything else
    is fixed by ``sample``."""
    names = list(sample)
    axes = family.dynamic_axes(names)
    # In eval mode, wrapper included: the exporter puts every module back in its wrapper's mode
    # afterwards, and a fresh wrapper's would leave the network training (dropout on).
    wrapper = Positional(family.network, names).eval()
    with warnings.catch_warnings(), exporting(family):  # torch calls this exporter legacy; it needs no onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        # Branches the tracer fixes to the sample's case (transformers' attention asks whether there is
        # one query) are the export's to get right: every variant's agreement with the trained model is
        # measured, and served only after the server's check.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # Decoder classifiers index each row's last token; the indices are never negative.
        warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
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
    blockwise_error: float,
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
        fragile = fragile_matmuls(prepared, calibration, blockwise_error)
        mixed = Path(tmp) / "blockwise.onnx"
        if fragile:
            blockwise(prepared, fragile, mixed)
        quantize_dynamic(str(mixed if fragile else prepared), str(folder / MODEL), weight_type=QuantType.QInt8)
        yield made("onnx-int8-dynamic", source, folder, threads, blockwise=fragile)

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


def made(name: str, source: Variant, folder: Path, threads: int, **record: Any) -> Variant:
    family, logits = load_onnx(folder, MODEL, threads)
    variant = Variant(name, "onnx", "onnxruntime", family, logits, folder, [MODEL])
    variant.write_record(source=source.name, **record)
    return variant


def fragile_matmuls(model_path: Path, calibration: list[dict[str, torch.Tensor]], threshold: float) -> list[str]:
    """The MatMul nodes with a constant weight whose output on the calibration batches moves by more
    than ``threshold`` (relative L2 norm) under ORT's dynamic int8: activations uint8 with one scale
    per call, weights int8 with one symmetric scale per tensor. In BERT-style encoders these are the
    FFN's second matrices, whose GELU inputs span a wide range and whose weights hold the outlier
    hidden dimension; per-tensor int8 there cost the MiniLM classifier 4 % of its labels."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    weights = {init.name: init for init in model.graph.initializer}
    nodes = [node for node in model.graph.node if node.op_type == "MatMul" and node.input[1] in weights]
    if not nodes:  # an MLP exports its layers as Gemm; the block-wise choice concerns MatMul only
        return []
    typed = {value.name: value for value in [*model.graph.value_info, *model.graph.input]}
    probed = list(dict.fromkeys(node.input[0] for node in nodes))  # Q, K and V share theirs
    outputs = {output.name for output in model.graph.output}
    # Each product's input becomes an output, to probe it (typed where shape inference could say).
    model.graph.output.extend(typed.get(n, onnx.ValueInfoProto(name=n)) for n in probed if n not in outputs)
    probe = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in probe.get_inputs()]
    matrices = [numpy_helper.to_array(weights[node.input[1]]) for node in nodes]
    quantized = [int8_symmetric(w) for w in matrices]
    errors = np.zeros(len(nodes))
    for batch in calibration:
        values = dict(zip(probed, probe.run(probed, {name: batch[name].numpy() for name in names}), strict=True))
        for k, (node, w, wq) in enumerate(zip(nodes, matrices, quantized, strict=True)):
            x = values[node.input[0]]
            exact = x @ w
            errors[k] += np.linalg.norm(uint8_asymmetric(x) @ wq - exact) / max(np.linalg.norm(exact), 1e-12)
    errors /= max(len(calibration), 1)
    return [node.name for node, error in zip(nodes, errors, strict=True) if error > threshold]


def uint8_asymmetric(x: np.ndarray) -> np.ndarray:
    """``x`` through DynamicQuantizeLinear and back: the range, zero included, in 255 steps."""
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (high - low) / 255 or 1.0
    zero = round(-low / scale)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def int8_symmetric(w: np.ndarray) -> np.ndarray:
    scale = float(np.abs(w).max()) / 127 or 1.0
    return np.clip(np.round(w / scale), -127, 127) * scale


def blockwise(model_path: Path, nodes: list[str], out: Path) -> None:
    """``nodes`` as MatMulNBits: int8 weights with a scale per block of 32 along the input, and
    activations quantised per block too (accuracy level 4), so an outlier costs only its block.
    On the MiniLM classifier this kept 98 % of labels where one scale per tensor kept 96 %."""
    import onnx

    quantizer = blockwise_quantizer()
    model = onnx.load(str(model_path))
    others = [node.name for node in model.graph.node if node.op_type == "MatMul" and node.name not in nodes]
    quantizer = quantizer(model, bits=8, block_size=32, is_symmetric=True, accuracy_level=4, nodes_to_exclude=others)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), False)


def blockwise_quantizer():  # -> type[MatMulNBitsQuantizer]
    """ORT's block-wise quantiser. Its module sets the root logger to INFO when first imported,
    which would flood the user's own logging; the root logger's settings are put back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root.handlers[:] = handlers
    root.setLevel(level)
    return MatMulNBitsQuantizer
