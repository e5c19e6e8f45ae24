"""The text stream's input adapter: sub-word embedding + absolute position table, and,
for post-norm encoders (BERT), a LayerNorm over their sum, as BERT's embeddings have."""
from __future__ import annotations

from torch import Tensor, nn

from polymae.shared.model import InputAdapter
from polymae.shared.tokens import Tokens


class TextInputAdapter(InputAdapter):
    def __init__(self, vocab_size: int, width: int, max_positions: int, position: str, eps: float,
                 embedding_norm: bool, kernels: str = "auto"):
        super().__init__(0, width, 1, position, (max_positions,), kernels=kernels, vocab_size=vocab_size)
        self.norm = nn.LayerNorm(width, eps=eps) if embedding_norm else None

    def forward(self, tokens: Tokens) -> Tensor:
        x = super().forward(tokens)
        return self.norm(x) if self.norm is not None else x
