"""A tiny stand-in token model for trainer tests (embedding + GRU + dropout + linear head)."""

import torch
from torch import nn


class TinyRNN(nn.Module):
    def __init__(self, vocab_size: int, d: int = 16, dropout: float = 0.1):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, d)
        self.rnn = nn.GRU(d, d, batch_first=True)
        self.drop = nn.Dropout(dropout)  # exercises the RNG state in checkpoints
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab_size)
        self.A_log = nn.Parameter(torch.zeros(d, 2))  # named like an SSM parameter (no decay)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.rnn(self.emb(input_ids))[0])
        return self.head(self.norm(h)) + self.A_log.sum() * 0.0
