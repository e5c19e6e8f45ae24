"""Loss terms for sub-word streams beside the shared `cross_entropy` (masked LM).

next_token  MEAP's (and any causal LM's) objective: the logits at position t predict
            the true sub-word at t + 1, over every real position whose successor is
            real. With MEAP's masker a few inputs enter as [MASK]; the targets are
            the true sub-words all the same, so masking costs nothing extra.
starbucks   Starbucks pre-training (2D Matryoshka masked LM): the masked-LM loss is
            computed from a fixed list of (layer, width) pairs, small to large, each
            reading the first `width` dimensions of encoder layer `layer`'s output
            through the stream's own MLM head cut to that width, and summed, so every
            listed (depth, width) sub-network is a usable encoder on its own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymae.shared.errors import ConfigError
from polymae.shared.model import MLPHead, restore_stream
from polymae.shared.objectives import Objective, token_cross_entropy
from polymae.shared.registry import OBJECTIVES


@OBJECTIVES.register("next_token")
class NextTokenLoss(Objective):
    def forward(self, outputs, batch):
        if "rows" in outputs.streams[self.stream]:
            raise ConfigError("objective next_token scores every place: set decoder.rows=all (streams.<name>."
                              "decoder.rows=all in a recipe of several streams)")
        targets, weights = self.scored(batch)
        return token_cross_entropy(outputs.pred(self.stream)[:, :-1], targets, weights)

    def scored(self, batch):
        """(the next sub-word of every position but the last [B, N-1], 1 where it is real)."""
        tokens = batch.streams[self.stream]
        targets = tokens.ids[:, 1:]
        weights = tokens.valid[:, 1:] if tokens.valid is not None else torch.ones_like(targets, dtype=torch.bool)
        return targets, weights.float()


DEFAULT_PAIRS = ((2, 128), (4, 256), (6, 384))


@OBJECTIVES.register("starbucks")
class StarbucksLoss(Objective):
    """`pairs`: [[layer, width], ...] small to large (default (2, 128), (4, 256), (6, 384))."""

    reads_model = True

    def __init__(self, stream: str, model: nn.Module, pairs=DEFAULT_PAIRS):
        super().__init__(stream)
        self.pairs = [(int(layer), int(width)) for layer, width in pairs]
        self.summands = len(self.pairs)  # cross-entropies summed: what a baseline is scaled by
        head = model.decoders[stream]
        if not isinstance(head, MLPHead):
            raise ConfigError(f"objective starbucks reads stream {stream!r}'s MLM head (decoder kind vocab or mlp)")
        depth, width = model.config.depth, model.config.width
        for layer, w in self.pairs:
            if not (1 <= layer <= depth and 1 <= w <= width):
                raise ConfigError(f"objective starbucks: pair ({layer}, {w}) outside the encoder's {depth} layers "
                                  f"x {width} dims")
        # the parts it reads, not owned: a plain attribute would register them twice
        self.__dict__["head"], self.__dict__["encoder"] = head, model.encoder

    @staticmethod
    def layers(options: dict) -> tuple[int, ...]:
        return tuple(int(layer) for layer, _ in options.get("pairs", DEFAULT_PAIRS))

    def forward(self, outputs, batch):
        tokens = batch.streams[self.stream]
        weights = batch.target_weights(self.stream)
        total = None
        for layer, width in self.pairs:  # the MLM targets at every (depth, width)
            codes = restore_stream(outputs.hidden_states[layer], self.encoder.num_prefix, batch, self.stream)
            loss = token_cross_entropy(self.logits(codes[..., :width], width), tokens.ids, weights)
            total = loss if total is None else total + loss
        return total

    def scored(self, batch):
        return batch.streams[self.stream].ids, batch.target_weights(self.stream)

    def logits(self, x: Tensor, width: int) -> Tensor:
        """The MLM head (and, for pre-norm encoders, the final norm) restricted to the first `width` dims."""
        norm = self.encoder.norm
        if isinstance(norm, nn.LayerNorm):
            x = F.layer_norm(x, (width,), norm.weight[:width], norm.bias[:width], norm.eps)
        head = self.head
        x = F.linear(x, head.dense.weight[:width, :width], head.dense.bias[:width])
        x = F.layer_norm(head.act(x), (width,), head.norm.weight[:width], head.norm.bias[:width], head.norm.eps)
        return F.linear(x, head.head.weight[:, :width], head.head.bias)
