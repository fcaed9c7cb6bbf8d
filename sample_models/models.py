"""Tiny sample models for exercising fitcli.

Standalone: imports only torch. Factory functions ``mlp``, ``cnn`` and
``resmlp`` return fresh instances, so an architecture can be referenced as
``sample_models/models.py:mlp`` (etc.).

Attribute names are relied upon by tests, docs and ``truth.json``; do not
rename them.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    """3-layer MLP on [B, in_features] with ReLU *modules* (relu1, relu2)."""

    def __init__(self, in_features=16, hidden=32, classes=4):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(x)))))


class CNN(nn.Module):
    """Small CNN on [B, 1, 8, 8].

    The three ReLUs are deliberately spelled three different functional ways
    (F.relu, torch.relu, Tensor.relu) and none of them is a module.
    """

    def __init__(self, classes=4):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        x = self.fc1(x).relu()
        return self.fc2(x)


class Block(nn.Module):
    """Pre-norm transformer block: self-attention + GELU MLP, both residual."""

    def __init__(self, d=16, hidden=32, heads=2):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc_in = nn.Linear(d, hidden)
        self.fc_out = nn.Linear(hidden, d)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.fc_out(F.gelu(self.fc_in(self.ln2(x))))
        return x


class ResMLP(nn.Module):
    """Tiny transformer-style classifier on [B, 6, in_features] sequences."""

    def __init__(self, in_features=8, d=16, hidden=32, classes=4):
        super().__init__()
        self.embed = nn.Linear(in_features, d)
        self.blocks = nn.ModuleList([Block(d, hidden), Block(d, hidden)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x).mean(dim=1))


def mlp():
    return MLP()


def cnn():
    return CNN()


def resmlp():
    return ResMLP()


__all__ = ["MLP", "CNN", "Block", "ResMLP", "mlp", "cnn", "resmlp"]
