"""CROMA's encoder layout (Fuller et al., "CROMA: Remote Sensing Representations with Contrastive
Radar-Optical Masked Autoencoders"), for any co-registered streams: `model.encoder: croma`.

    per stream: input adapter without a position encoding (position "none")
      -> its own encoder on the tokens of that stream it reads      2D-ALiBi self-attention
         -> the unimodal codes (Outputs.unimodal: what a contrastive term aligns)
      -> a joint encoder per stream: self-attention over the stream's codes (2D-ALiBi),
         cross-attention to the other streams' unimodal codes (X-ALiBi), MLP
         -> the joint codes (Outputs.latent: what the decoders read)
      -> per stream: the modality's light decoder (mask tokens, sin-cos positions)

Positions reach the encoders only as an attention bias, -slope x the distance between two
tokens' coords (one slope per head, `position.distance_bias`), never as a table or an added
encoding, so the encoders read larger grids at test time than in training. The streams' coords
must be in one frame (co-registered tokens of one grid: the same place has the same coords).

CROMA's joint encoder lets the radar tokens query the optical ones and reconstructs both from
that. Here every stream's tokens query the others, so the joint codes cover every token the
encoders read and the decoders find them in the model's usual layout (`latent` in the mask's
`ids_keep` order, no [cls] token). Each stream is masked by its own masker, independently.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .kernels import attention, linear
from .model import (Block, DecoderConfig, MaskedAutoencoder, ModelConfig, biased_mask, entered_positions,
                    gather_stream, gather_tokens, Outputs)
from .position import alibi_slopes, distance_bias
from .registry import ENCODERS
from .tokens import Batch


@dataclass
class CromaOptions:
    """`model.encoder_options` of the croma encoder."""
    depths: dict[str, int] = field(default_factory=dict)  # a stream's own encoder depth (default model.depth)
    joint_depth: int | None = None                         # the joint encoder's (default model.depth // 2)


class CrossAttention(nn.Module):
    """Multi-head attention of `x` [B, N, W] over `context` [B, M, W] with an additive bias."""

    def __init__(self, width: int, heads: int, kernels: str = "auto"):
        super().__init__()
        self.heads, self.kernels = heads, kernels
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, context: Tensor, bias: Tensor, keys: Tensor | None) -> Tensor:
        (b, n, c), m = x.shape, context.shape[1]
        q = linear(x, self.q, self.kernels).view(b, n, self.heads, c // self.heads).transpose(1, 2)
        k, v = linear(context, self.kv, self.kernels).view(b, m, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, biased_mask(bias, keys, q.dtype), self.kernels)
        return linear(out.transpose(1, 2).reshape(b, n, c), self.proj, self.kernels)


class JointBlock(Block):
    """CROMA's cross-encoder layer (pre-norm): self-attention over the stream's tokens, cross-
    attention to the other streams' unimodal codes, MLP; both attentions biased by distance."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, eps: float, kernels: str = "auto"):
        super().__init__(width, heads, mlp_ratio, eps, kernels)
        self.norm_cross = nn.LayerNorm(width, eps=eps)
        self.norm_context = nn.LayerNorm(width, eps=eps)
        self.cross = CrossAttention(width, heads, kernels)

    def forward(self, x: Tensor, context: Tensor, keys: Tensor, context_keys: Tensor, self_bias: Tensor,
                cross_bias: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), keys, self_bias)
        x = x + self.cross(self.norm_cross(x), self.norm_context(context), cross_bias, context_keys)
        return x + self.feed_forward(self.norm2(x))


@dataclass
class StreamInputs:
    """The tokens of one stream that its encoder reads, gathered to the front in token order."""
    x: Tensor        # [B, K, W] embedded
    coords: Tensor   # [B, K, k]
    keys: Tensor     # bool [B, K]: real (False: a row's spare slots)
    index: Tensor    # long [B, K]: each one's place among the stream's tokens


class CromaEncoder(nn.Module):
    """An encoder per stream and a joint encoder per stream, every attention 2D-ALiBi biased."""

    num_prefix = 0  # no [cls]: CROMA pools its codes

    def __init__(self, streams: list[str], cfg: ModelConfig, options: CromaOptions):
        super().__init__()
        unknown = set(options.depths) - set(streams)
        if unknown:
            raise ConfigError(f"model.encoder_options.depths names {sorted(unknown)}, not streams of {streams}")
        if len(streams) < 2:
            raise ConfigError(f"model.encoder croma fuses several streams; the recipe has {streams}")

        def blocks(depth: int, kind=Block) -> nn.ModuleList:
            return nn.ModuleList(kind(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.layer_norm_eps, cfg.kernels)
                                 for _ in range(depth))

        joint_depth = options.joint_depth if options.joint_depth is not None else max(1, cfg.depth // 2)
        self.unimodal = nn.ModuleDict({s: blocks(options.depths.get(s, cfg.depth)) for s in streams})
        self.unimodal_norm = nn.ModuleDict({s: nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps) for s in streams})
        self.joint = nn.ModuleDict({s: blocks(joint_depth, JointBlock) for s in streams})
        self.joint_norm = nn.ModuleDict({s: nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps) for s in streams})
        self.register_buffer("slopes", alibi_slopes(cfg.heads), persistent=False)

    def forward(self, inputs: dict[str, StreamInputs]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """({stream: unimodal codes [B, K_s, W]}, {stream: joint codes [B, K_s, W]})."""
        unimodal = {}
        for name, part in inputs.items():
            x, keys = part.x, part.keys[:, None, None, :]
            bias = distance_bias(part.coords, part.coords, self.slopes)
            for block in self.unimodal[name]:
                x = block(x, keys, bias)
            unimodal[name] = self.unimodal_norm[name](x)
        joint = {}
        for name, part in inputs.items():
            others = [other for other in inputs if other != name]
            context = torch.cat([unimodal[o] for o in others], 1)
            context_coords = torch.cat([inputs[o].coords for o in others], 1)
            context_keys = torch.cat([inputs[o].keys for o in others], 1)[:, None, None, :]
            self_bias = distance_bias(part.coords, part.coords, self.slopes)
            cross_bias = distance_bias(part.coords, context_coords, self.slopes)
            x = unimodal[name]
            for block in self.joint[name]:
                x = block(x, context, part.keys[:, None, None, :], context_keys, self_bias, cross_bias)
            joint[name] = self.joint_norm[name](x)
        return unimodal, joint


class CromaAutoencoder(MaskedAutoencoder):
    """The model protocol around `CromaEncoder`: forward gives the decoders' predictions from the
    joint codes, `latent` (joint) and `unimodal` in the usual layout; `features` pools the joint
    codes of every real token of every stream."""

    separate_stream_encoders = True  # Outputs.unimodal is there (the contrastive term's codes: unimodal)

    def read_tokens(self, batch: Batch, masked: bool) -> dict[str, StreamInputs]:
        """Each stream's tokens its encoder reads: those that entered under the mask, or (not
        `masked`) all its real ones; embedded without a position, gathered to the front."""
        entered = None
        if masked:
            entered = entered_positions(batch)
            if entered is None:  # every row's encoder inputs are its first num_visible in shuffle order
                entered = batch.mask.ids_restore < batch.mask.num_visible
        inputs = {}
        for name, span in batch.layout.items():
            tokens = batch.streams[name]
            read = entered[:, span] if masked else torch.ones(tokens.primary.shape[:2], dtype=torch.bool,
                                                                device=tokens.primary.device)
            if tokens.valid is not None:
                read = read & tokens.valid
            count = max(int(read.sum(1).max()), 1)
            index = torch.argsort((~read).to(torch.int8), dim=1, stable=True)[:, :count]
            chosen = gather_stream(tokens, index)
            inputs[name] = StreamInputs(self.input_adapters[name](chosen), chosen.coords, torch.gather(read, 1, index),
                                        index)
        return inputs

    @staticmethod
    def laid_out(codes: dict[str, Tensor], inputs: dict[str, StreamInputs], batch: Batch) -> Tensor:
        """Per-stream codes -> [B, num_visible, W] in the mask's ids_keep order (zeros at a row's
        spare slots), the layout every decoder and objective reads."""
        first = next(iter(codes.values()))
        b, total = batch.mask.ids_restore.shape
        full = first.new_zeros(b, total, first.shape[-1])
        for name, span in batch.layout.items():
            part = inputs[name]
            values = codes[name] * part.keys[..., None].to(codes[name].dtype)
            full.scatter_(1, (part.index + span.start)[..., None].expand(-1, -1, full.shape[-1]), values)
        return gather_tokens(full, batch.mask.ids_keep)

    def encode(self, batch: Batch) -> tuple[Tensor, dict[int, Tensor]]:
        latent, _ = self.encode_both(batch)
        return latent, {}

    def encode_both(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(joint, unimodal) codes [B, num_visible, W] under the batch's mask."""
        if batch.mask.substitute is not None:
            raise ConfigError("model.encoder croma reads visible tokens only; a masker that substitutes hidden "
                              "tokens (BERT-style) needs the vit encoder")
        inputs = self.read_tokens(batch, masked=True)
        unimodal, joint = self.encoder(inputs)
        return self.laid_out(joint, inputs, batch), self.laid_out(unimodal, inputs, batch)

    def forward(self, batch: Batch) -> Outputs:
        latent, unimodal = self.encode_both(batch)
        streams = {name: decoder(latent, 0, batch, name, {}) for name, decoder in self.decoders.items()}
        return Outputs(streams, latent, unimodal=unimodal)

    def stream_codes(self, batch: Batch, which: str = "joint") -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """Unmasked: {stream: (codes [B, N_s', W], keys [B, N_s'], index into the stream's tokens)}
        of every real token, `which` "joint" or "unimodal"."""
        inputs = self.read_tokens(batch, masked=False)
        unimodal, joint = self.encoder(inputs)
        codes = joint if which == "joint" else unimodal
        return {name: (codes[name], part.keys, part.index) for name, part in inputs.items()}

    def features(self, batch: Batch) -> Tensor:
        parts = self.stream_codes(batch).values()
        codes = torch.cat([c for c, _, _ in parts], 1)
        weights = torch.cat([k for _, k, _ in parts], 1)[..., None].to(codes.dtype)
        return (codes * weights).sum(1) / weights.sum(1).clamp_min(1)


def build_croma(modalities: dict, decoders: dict[str, DecoderConfig], config: ModelConfig,
                taps: tuple[int, ...] = ()) -> CromaAutoencoder:
    """Input adapters without position encodings (the modality's own embedding, position "none"),
    CromaEncoder, and each stream's decoder as its modality builds it (with model.position)."""
    cfg = config.resolved()
    if taps:
        raise ConfigError(f"model.encoder croma: a head or objective reads encoder layers {list(taps)}; the croma "
                          "encoder has no single stack of layers to tap")
    try:
        options = CromaOptions(**cfg.encoder_options)
    except TypeError as error:
        raise ConfigError(f"model.encoder_options of croma: {error}") from None
    unplaced = replace(cfg, position="none")
    adapters = {name: modality.input_adapter(cfg.width, unplaced) for name, modality in modalities.items()}
    heads = {name: modality.decoder(decoders[name], cfg.width, cfg) for name, modality in modalities.items()}
    return CromaAutoencoder(adapters, CromaEncoder(list(modalities), cfg, options), heads, cfg)


ENCODERS.register("croma", build_croma)
