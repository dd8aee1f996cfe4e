"""Networks as a user writes them, for the ``module`` family's tests: called by forgeml as
``factory(num_classes=..., vocab_size=..., **options)``."""

import torch
from torch import nn


class ConvText(nn.Module):
    """A small convolution over token embeddings, max-pooled over the unmasked positions."""

    def __init__(self, num_classes: int, vocab_size: int, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.conv = nn.Conv1d(width, width, kernel_size=3, padding=1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.embed(input_ids).transpose(1, 2)).relu().transpose(1, 2)
        x = x.masked_fill(attention_mask[..., None] == 0, float("-inf")).amax(1)
        return self.head(x)


def conv_text(num_classes: int, vocab_size: int, width: int = 16) -> nn.Module:
    return ConvText(num_classes, vocab_size, width)


class FeatureNet(nn.Module):
    """Called with ``features=``, as forgeml calls feature networks."""

    def __init__(self, num_classes: int, vocab_size: None, hidden: int = 8, n_features: int = 3) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)
