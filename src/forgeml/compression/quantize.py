"""PyTorch dynamic int8: every nn.Linear's weights stored as int8 with a per-tensor scale,
activations quantised on the fly. torch.ao's quantize_dynamic is used rather than torchao: on a
2-core x86 CPU, at batch 32, it ran the MiniLM classifier at 0.40x fp32's time, torchao's
Int8DynamicActivationInt8WeightConfig at 0.90x.

quantize_dynamic's modules hold packed weights that safetensors cannot store, so the variant
keeps each Linear's int8 weight, scale and zero point as plain tensors beside the fp32 rest,
and rebuilds the packed modules from them exactly when loaded.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from forgeml.compression.variants import Variant, preprocessing_copy, tied_parameters, torch_logits
from forgeml.errors import NotOffered
from forgeml.models.registry import load_family

WEIGHTS = "model.int8.safetensors"


@contextmanager
def quiet_quantization() -> Iterator[None]:
    """torch marks its quantised tensor types deprecated in favour of torchao; they are what runs fastest here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantiz.*deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*", category=DeprecationWarning)
        yield


def quantize_linear(network: nn.Module) -> nn.Module:
    """A copy of ``network`` with every nn.Linear dynamic int8."""
    from torch.ao.quantization import quantize_dynamic

    with quiet_quantization():
        return quantize_dynamic(network, {nn.Linear}, dtype=torch.qint8, inplace=False)


def linear_names(network: nn.Module) -> list[str]:
    return [name for name, module in network.named_modules() if isinstance(module, nn.Linear)]


def torch_int8(source: Variant, folder: Path) -> Variant:
    """Dynamic int8 of the source variant's torch network, saved in ``folder``."""
    network = source.family.network
    blocks = source.family.blocks()
    if blocks is not None and not any(isinstance(m, nn.Linear) for m in blocks.modules()):
        kinds = sorted({type(m).__name__ for m in blocks.modules() if getattr(m, "weight", None) is not None})
        raise NotOffered(
            f"dynamic int8 quantises nn.Linear layers, and this model's blocks hold none ({', '.join(kinds)})"
        )
    preprocessing_copy(source, folder)
    quantized = quantize_linear(network)
    linears = linear_names(network)
    tensors = {k: v.contiguous() for k, v in network.state_dict().items() if k.rsplit(".", 1)[0] not in linears}
    # A linear whose weight is another parameter's (a language model's head tied to its embedding)
    # is stored int8 for itself; its fp32 twin is already among the tensors.
    shared = tied_parameters(network)
    tied = [name for name in linears if f"{name}.weight" in shared]
    modules = dict(quantized.named_modules())
    for name in linears:
        weight, bias = modules[name].weight(), modules[name].bias()
        tensors[f"{name}.weight_int8"] = weight.int_repr().contiguous()
        tensors[f"{name}.weight_scale"] = torch.tensor(weight.q_scale(), dtype=torch.float64)
        tensors[f"{name}.weight_zero_point"] = torch.tensor(weight.q_zero_point(), dtype=torch.int64)
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().contiguous()
    metadata = {"format": "forgeml-int8-dynamic", "tied": json.dumps(tied)}
    save_file(tensors, str(folder / WEIGHTS), metadata=metadata)
    family = load_torch_int8(folder)
    variant = Variant("torch-int8", "quantize", "torch", family, torch_logits(family.network), folder, [WEIGHTS])
    variant.write_record(source=source.name)
    return variant


def load_torch_int8(folder: Path):  # -> ModelFamily, with its network quantised
    """The family of ``folder`` with the int8 network its WEIGHTS file describes, bit for bit."""
    stored = load_file(str(folder / WEIGHTS))
    with safe_open(str(folder / WEIGHTS), "pt") as file:
        tied = json.loads((file.metadata() or {}).get("tied", "[]"))
    scales = {k.removesuffix(".weight_scale"): v for k, v in stored.items() if k.endswith(".weight_scale")}
    fp32 = {k: v for k, v in stored.items() if not k.endswith(("_int8", "_scale", "_zero_point"))}
    for name, scale in scales.items():  # the dequantised weights: the module shapes, and values close enough
        zero = stored[f"{name}.weight_zero_point"]
        fp32[f"{name}.weight"] = (stored[f"{name}.weight_int8"].float() - zero) * scale.float()
    family = load_family(folder, {k: v for k, v in fp32.items() if k.removesuffix(".weight") not in tied})
    family.network = quantize_linear(family.network)
    modules = dict(family.network.named_modules())
    with quiet_quantization():
        for name, scale in scales.items():  # ... then the exact stored int8 values
            exact = torch.quantize_per_tensor(
                fp32[f"{name}.weight"], float(scale), int(stored[f"{name}.weight_zero_point"]), torch.qint8
            )
            modules[name].set_weight_bias(exact, stored.get(f"{name}.bias"))
    family.network.eval()
    return family
