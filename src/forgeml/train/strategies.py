"""Where the model runs. A strategy only places/wraps the network; the loop never forks on it.

Distributed strategies (DDP, FSDP2, tensor parallel) plug in here with the same interface.
"""

from __future__ import annotations

import torch
from torch import nn

from forgeml.errors import ForgeError


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ForgeError("train.device: 'cuda' was asked for but no CUDA device is available; use 'auto' or 'cpu'")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


class Single:
    """One process, one device."""

    rank = 0
    world_size = 1

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def wrap(self, network: nn.Module) -> nn.Module:
        return network.to(self.device)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model
