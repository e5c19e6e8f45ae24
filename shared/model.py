"""The model protocol every modality shares: `model(batch) -> Outputs`.

    per stream: input adapter (embed values or ids + position)         ModuleDict by stream
      -> the encoder inputs of all streams, gathered by Mask.ids_keep
      -> [cls] + those tokens -> encoder (ViT by default; ENCODERS)     visible tokens only
      -> per stream: decoder or head                                   ModuleDict by stream
         transformer: mask tokens at the stream's hidden places, unshuffled by ids_restore
         mlp / vocab: a head on the encoder's output (BERT-style streams, whose hidden
                      tokens entered the encoder as the mask token)
      -> Outputs: per-stream predictions, the encoder's output, chosen layers' hidden states

The encoder never sees a hidden token of an MAE-style stream: that is MAE's
whole saving. Hidden positions are only known to the decoder, through
`ids_restore` and coords. `features(batch)` pools the encoder over every real
token (probing); `encode(batch)` is the encoder's output under the batch's mask.

Linear layers and attention go through shared/kernels.py, which picks faster
CPU kernels for the same maths (`ModelConfig.kernels = "torch"` turns that off).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .kernels import KERNELS, attention, linear, self_attention
from .position import POSITIONS, build_position
from .registry import DECODERS, ENCODERS, MODEL_SIZES
from .tokens import AS_MASK_TOKEN, Batch, Tokens

for _name, _width, _depth, _heads in [("tiny", 192, 12, 3), ("small", 384, 12, 6), ("base", 768, 12, 12),
                                      ("large", 1024, 24, 16), ("huge", 1280, 32, 16)]:
    MODEL_SIZES.register(_name, {"width": _width, "depth": _depth, "heads": _heads})


@dataclass
class ModelConfig:
    size: str = "tiny"
    width: int | None = None        # None: from `size`
    depth: int | None = None
    heads: int | None = None
    mlp_ratio: float = 4.0
    encoder: str = "vit"            # a name in the ENCODERS registry (vit; sparse_cnn from the voxel modality)
    causal: bool = False            # causal self-attention in the encoder (decoder-only LMs: MEAP)
    norm_first: bool = True         # pre-norm blocks (ViT, MAE); False: post-norm (BERT), no final norm
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    position: str = "sincos"        # sincos | learned | mlp
    cls_token: bool = True
    layer_norm_eps: float = 1e-6
    pool: str = "mean"              # features for probing: mean of tokens or cls
    kernels: str = "auto"           # auto: oneDNN linears + short-sequence attention on CPU; torch: plain ops
    init_from: str | None = None    # start from these weights: a polymae run/checkpoint or a local HF folder
    encoder_options: dict = field(default_factory=dict)  # options of an ENCODERS entry that takes them (a GNN's)
    drop_path: float = 0.0          # stochastic depth: the last block's drop rate, rising from 0 at the first
    #                                 (off in pretraining as MAE's; its fine-tuning uses 0.1)
    streams_attend: str = "joint"   # joint: the streams' tokens attend each other in the encoder and the
    #                                 decoders (M3AE, MultiMAE); apart: a token attends only its own stream's,
    #                                 one encoder with shared weights run on each stream alone (a siamese
    #                                 encoder: streams that are views of a sample, aligned by a contrastive
    #                                 term, must not see each other)

    def __post_init__(self):
        if self.position not in POSITIONS:
            raise ConfigError(f"model.position must be one of {', '.join(POSITIONS)}; got {self.position!r}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"model.drop_path must be in [0, 1); got {self.drop_path}")
        if self.size not in MODEL_SIZES:
            raise ConfigError(f"model.size must be one of {', '.join(MODEL_SIZES.names())}; got {self.size!r}")
        if self.pool not in ("mean", "cls"):
            raise ConfigError(f"model.pool must be mean or cls; got {self.pool!r}")
        if self.kernels not in KERNELS:
            raise ConfigError(f"model.kernels must be one of {', '.join(KERNELS)}; got {self.kernels!r}")
        if self.streams_attend not in ("joint", "apart"):
            raise ConfigError(f"model.streams_attend must be joint or apart; got {self.streams_attend!r}")

    def resolved(self) -> "ModelConfig":
        base = MODEL_SIZES.get(self.size)
        return replace(self, width=self.width or base["width"], depth=self.depth or base["depth"],
                       heads=self.heads or base["heads"])


@dataclass
class DecoderConfig:
    """One stream's decoder or head (`streams.<name>.decoder` in a recipe)."""
    kind: str | None = None         # transformer | cross | mlp | vocab (DECODERS); None: the modality's default
    layer: int | None = None        # encoder depth it reads (1-based); None: the last, normalised
    width: int | None = None        # transformer decoder width (None: model.decoder_width)
    depth: int | None = None
    heads: int | None = None
    rows: str = "targets"           # mlp / vocab heads while training: predict at the stream's targets only
    #                                 (a masked LM scores 15% of places: 85% of its vocabulary projection is
    #                                 waste) or at every place ("all": next-token prediction needs them)

    def __post_init__(self):
        if self.rows not in ("targets", "all"):
            raise ConfigError(f"decoder.rows must be targets or all; got {self.rows!r}")


# -- building blocks ----------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, kernels: str = "auto"):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads, self.kernels = heads, kernels
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        """`attn_mask`: bool key-padding mask [B, 1, 1, N] (True = attend); `bias`: an additive
        float bias [B or 1, heads, N, N] on the scores (2D-ALiBi, `position.distance_bias`)."""
        b, n, c = x.shape
        qkv = linear(x, self.qkv, self.kernels).view(b, n, 3, self.heads, c // self.heads)
        if bias is None:
            return linear(self_attention(qkv, attn_mask, self.kernels), self.proj, self.kernels)
        # the fused self-attention kernel takes a bool key mask only: a bias goes through attention()
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, biased_mask(bias, attn_mask, q.dtype), self.kernels)
        return linear(out.transpose(1, 2).reshape(b, n, c), self.proj, self.kernels)


def biased_mask(bias: Tensor, keys: Tensor | None, dtype: torch.dtype) -> Tensor:
    """An additive attention mask: `bias` where `keys` (bool, True = attend) allows, the dtype's
    lowest value where not (not -inf: a row with no key left stays finite, as with a bool mask)."""
    bias = bias.to(dtype)
    return bias if keys is None else bias.masked_fill(~keys, torch.finfo(dtype).min)


class Block(nn.Module):
    """Transformer block: pre-norm (ViT: x + f(norm(x))) or, with `norm_first=False`,
    post-norm (BERT: norm(x + f(x)))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, eps: float, kernels: str = "auto",
                 norm_first: bool = True, drop_path: float = 0.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.kernels, self.norm_first, self.drop_path = kernels, norm_first, drop_path
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads, kernels)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def feed_forward(self, x: Tensor) -> Tensor:
        fc1, act, fc2 = self.mlp
        return linear(act(linear(x, fc1, self.kernels)), fc2, self.kernels)

    def residual(self, x: Tensor, update: Tensor) -> Tensor:
        """x + update, the update dropped for whole samples at rate `drop_path` while training
        (stochastic depth, "Deep Networks with Stochastic Depth"; kept ones scaled up to keep the mean)."""
        if not (self.drop_path and self.training):
            return x + update
        keep = 1.0 - self.drop_path
        kept = torch.empty(x.shape[0], *[1] * (x.dim() - 1), device=x.device, dtype=update.dtype).bernoulli_(keep)
        return x + update * (kept / keep)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        if not self.norm_first:
            x = self.norm1(self.residual(x, self.attn(x, attn_mask, bias)))
            return self.norm2(self.residual(x, self.feed_forward(x)))
        x = self.residual(x, self.attn(self.norm1(x), attn_mask, bias))
        return self.residual(x, self.feed_forward(self.norm2(x)))


class InputAdapter(nn.Module):
    """One stream's token embedding plus position encoding: a Linear on `values`, or an
    Embedding on `ids` (`vocab_size` given). `grid`: the extent of each coordinate (what a
    learned table spans). `mask_token` (with `mask_token=True`) is what a hidden token of
    a BERT-style value stream enters the encoder as (Mask.substitute == AS_MASK_TOKEN)."""

    def __init__(self, d_in: int, width: int, num_coords: int, position: str = "sincos",
                 grid: tuple[int, ...] | None = None, embed: nn.Module | None = None, kernels: str = "auto",
                 vocab_size: int | None = None, mask_token: bool = False):
        super().__init__()
        self.kernels, self.grid = kernels, tuple(grid) if grid is not None else None
        if embed is None:
            embed = nn.Embedding(vocab_size, width) if vocab_size else nn.Linear(d_in, width)
        self.embed = embed
        self.position = build_position(position, width, num_coords, grid)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width)) if mask_token else None

    def forward(self, tokens: Tokens) -> Tensor:
        if isinstance(self.embed, nn.Embedding):
            x = self.embed(tokens.ids)
        elif isinstance(self.embed, nn.Linear):
            x = linear(tokens.values, self.embed, self.kernels)
        else:
            x = self.embed(tokens.values)
        return x + self.position(tokens.coords).to(x.dtype)


def gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """x [B, N, C], ids [B, M] -> [B, M, C]."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def gather_stream(tokens: Tokens, ids: Tensor) -> Tokens:
    """The tokens at `ids` [B, M] of a stream (values or ids, coords, fields)."""
    def take(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        return gather_tokens(t, ids) if t.dim() == 3 else torch.gather(t, 1, ids)
    return Tokens(values=take(tokens.values), ids=take(tokens.ids), coords=take(tokens.coords),
                  valid=take(tokens.valid), grid=tokens.grid)


def stream_groups(batch: Batch) -> Tensor:
    """long [B, N_total]: the index of each token's stream, in the batch's layout."""
    b = batch.mask.hidden.shape[0]
    return torch.cat([torch.full((b, span.stop - span.start), index, dtype=torch.long, device=batch.mask.hidden.device)
                      for index, span in enumerate(batch.layout.values())], dim=1)


def within_groups(groups: Tensor, prefix: int, keys: Tensor | None) -> Tensor:
    """bool [B, 1, N, N] (prefix + tokens): a token attends only tokens of its own group
    (`groups` [B, N_tokens]); the prefix ([cls]) attends every token and none attends it,
    so nothing passes between groups."""
    g = torch.cat([groups.new_full((groups.shape[0], prefix), -1), groups], dim=1)
    allowed = (g[:, :, None] == g[:, None, :]) | (g[:, :, None] < 0)
    allowed = allowed[:, None]
    return allowed if keys is None else allowed & keys


def causal_mask(length: int, prefix: int, keys: Tensor | None, device: torch.device) -> Tensor:
    lower = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    lower[:, :prefix] = True
    lower = lower[None, None]
    return lower if keys is None else lower & keys


class ViTEncoder(nn.Module):
    """[cls] + tokens -> transformer blocks -> LayerNorm (pre-norm blocks; post-norm blocks end
    normalised already); returns the output and the raw output of the layers asked for (1-based)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.width, self.depth, self.causal = cfg.width, cfg.depth, cfg.causal
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width)) if cfg.cls_token else None
        rates = torch.linspace(0.0, cfg.drop_path, cfg.depth).tolist()  # deeper blocks are dropped more often
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.layer_norm_eps, cfg.kernels,
                                          cfg.norm_first, rate) for rate in rates)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps) if cfg.norm_first else nn.Identity()

    @property
    def num_prefix(self) -> int:
        return 1 if self.cls_token is not None else 0

    def forward(self, x: Tensor, valid: Tensor | None = None, layers: tuple[int, ...] = (),
                groups: Tensor | None = None) -> tuple[Tensor, dict[int, Tensor]]:
        """`groups` [B, N]: tokens attend only tokens of their own group (`within_groups`)."""
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        keys = None
        if valid is not None:
            keys = torch.cat([valid.new_ones(valid.shape[0], self.num_prefix), valid], dim=1)[:, None, None, :]
        mask = causal_mask(x.shape[1], self.num_prefix, keys, x.device) if self.causal else keys
        if groups is not None:
            mask = within_groups(groups, self.num_prefix, mask)
        taps = {}
        for depth, block in enumerate(self.blocks, start=1):
            x = block(x, mask)
            if depth in layers:
                taps[depth] = x
        return self.norm(x), taps




# -- decoders and heads ---------------------------------------------------------------------------------


class TransformerDecoder(nn.Module):
    """MAE's decoder for one stream: the encoder's output projected to the decoder width,
    mask tokens at the stream's hidden places, its own position encoding, blocks, norm and
    a linear head. Tokens of the other streams that the encoder read come along as context
    (a joint decoder, as M3AE's); their predictions are not made here.

    `remask`: a stream whose encoder read its hidden tokens (as a mask token) gets the
    decoder's mask token at those places instead of their codes, so the decoder must
    reconstruct them from their neighbours (GraphMAE's re-mask). `position`: the decoder's
    position encoding when not the model's (`ModelConfig.position`)."""

    def __init__(self, encoder_width: int, d_out: int, num_coords: int, cfg: ModelConfig, dec: DecoderConfig,
                 grid: tuple[int, ...] | None = None, position: str | None = None, remask: bool = False):
        super().__init__()
        width, depth, heads = dec.width or cfg.decoder_width, dec.depth or cfg.decoder_depth, \
            dec.heads or cfg.decoder_heads
        self.kernels, self.remask, self.apart = cfg.kernels, remask, cfg.streams_attend == "apart"
        self.embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.position = build_position(position or cfg.position, width, num_coords, grid)
        self.blocks = nn.ModuleList(Block(width, heads, cfg.decoder_mlp_ratio, cfg.layer_norm_eps, cfg.kernels)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(width, d_out)

    def stream_queries(self, x: Tensor, prefix: int, batch: Batch, stream: str, everything: bool = False):
        """The stream's own decoder inputs [B, N_s, width] from the projected encoder output `x`:
        its codes where the encoder read them, the mask token elsewhere, plus its position
        encoding; with `everything`, also every token's place filled ([B, N_total, width]) and
        which of them the encoder read (`entered_positions`)."""
        entered = x[:, prefix:]
        mask = batch.mask
        b, n = mask.ids_restore.shape
        filler = self.mask_token.to(x.dtype).expand(b, n - entered.shape[1], -1)
        full = gather_tokens(torch.cat([entered, filler], dim=1), mask.ids_restore)  # [B, N_total, width]
        span = batch.layout[stream]
        is_input = entered_positions(batch)
        own = full[:, span]
        if is_input is not None:  # rows with fewer encoder inputs hold other tokens' codes at their spare slots
            own = torch.where(is_input[:, span, None], own, self.mask_token.to(x.dtype))
        if self.remask:  # hidden tokens the encoder read (as its mask token) are masked again (GraphMAE)
            own = torch.where(mask.hidden[:, span, None], self.mask_token.to(x.dtype), own)
        own = own + self.position(batch.streams[stream].coords).to(x.dtype)
        return (own, full, is_input) if everything else own

    def inputs(self, latent: Tensor, prefix: int, batch: Batch, stream: str) -> tuple[Tensor, Tensor | None]:
        """The decoder's input sequence [B, prefix + N_total, width]: the encoder's prefix codes,
        the stream's own tokens (`stream_queries`), then the other streams' tokens as context;
        and which of them attention reads (bool, same length; None: all)."""
        x = linear(latent, self.embed, self.kernels)
        head = x[:, :prefix]
        own, full, is_input = self.stream_queries(x, prefix, batch, stream, everything=True)
        tokens, b = batch.streams[stream], x.shape[0]
        parts, keys = [head, own], [tokens.valid]
        for other, other_span in batch.layout.items():
            if other != stream and not self.apart:  # apart: the other streams are no context
                parts.append(full[:, other_span])
                keys.append(is_input[:, other_span] if is_input is not None else
                            torch.ones(b, other_span.stop - other_span.start, dtype=torch.bool, device=x.device))
        x = torch.cat(parts, dim=1)
        valid = None
        if any(k is not None for k in keys):
            valid = torch.cat([k if k is not None else torch.ones(b, own.shape[1], dtype=torch.bool, device=x.device)
                               for k in keys], dim=1)
        return x, None if valid is None else torch.cat([valid.new_ones(b, prefix), valid], 1)

    def run_blocks(self, x: Tensor, attended: Tensor | None) -> Tensor:
        attn = None if attended is None else attended[:, None, None, :]
        for block in self.blocks:
            x = block(x, attn)
        return x

    def features(self, latent: Tensor, prefix: int, batch: Batch, stream: str) -> Tensor:
        """The decoder's normalised output at the stream's tokens [B, N_s, width], before `head`."""
        x = self.run_blocks(*self.inputs(latent, prefix, batch, stream))
        span = batch.layout[stream]
        return self.norm(x)[:, prefix:prefix + span.stop - span.start]

    def decoded_subset(self, latent: Tensor, prefix: int, batch: Batch, stream: str) -> Tensor:
        """The prediction [B, N_s, d_out] under a decode subset (`Mask.decode`), read from only
        the tokens that subset leaves: every stream's encoder inputs and decoded places (a
        decoder that rebuilds a share of the hidden tokens), so the blocks' cost falls with the
        decoded share. Hidden tokens
        not decoded are dropped from the sequence, the kept ones gathered to the front of each
        row (rows with fewer padded, the padding out of attention); the head runs on the
        stream's decoded tokens only. Zeros everywhere else (the loss weighs only hidden and
        decoded tokens, `Batch.target_weights`). With every hidden token decoded, it is the
        full decoder's prediction at the hidden places."""
        x, attended = self.inputs(latent, prefix, batch, stream)
        span, mask = batch.layout[stream], batch.mask
        n = span.stop - span.start
        columns = torch.cat([torch.arange(span.start, span.stop)] + [torch.arange(s.start, s.stop) for name, s in
                                                                      batch.layout.items()
                                                                      if name != stream and not self.apart])
        columns = columns.to(x.device)
        hidden, decode = mask.hidden[:, columns], mask.decode[:, columns]
        kept = ~hidden | decode
        if attended is not None:
            kept = kept & attended[:, prefix:]
        own = (torch.arange(columns.numel(), device=x.device) < n)[None, :]
        targets = kept & own & hidden
        # the stream's decoded tokens first, then its encoder inputs, the other streams' kept tokens, the rest
        rank = torch.where(targets, 0, torch.where(kept & own, 1, torch.where(kept, 2, 3))).to(torch.uint8)
        counts = kept.sum(1)
        longest = int(counts.max()) if counts.numel() else 0
        order = torch.argsort(rank, dim=1, stable=True)[:, :longest]
        x = torch.cat([x[:, :prefix], gather_tokens(x[:, prefix:], order)], dim=1)
        keys = None
        if bool((counts < longest).any()):
            real = torch.arange(longest, device=x.device)[None, :] < counts[:, None]
            keys = torch.cat([real.new_ones(real.shape[0], prefix), real], dim=1)
        x = self.run_blocks(x, keys)
        decoded = targets.sum(1)
        most = int(decoded.max()) if decoded.numel() else 0
        rows = linear(self.norm(x[:, prefix:prefix + most]), self.head, self.kernels)   # [B, most, d_out]
        place = torch.where(torch.arange(most, device=x.device)[None, :] < decoded[:, None], order[:, :most], n)
        pred = rows.new_zeros(rows.shape[0], n + 1, rows.shape[-1])    # column n: where padding rows go
        return pred.scatter(1, place[..., None].expand(-1, -1, rows.shape[-1]), rows)[:, :n]

    reads_decode_subset = True   # under Mask.decode the blocks read the visible and decoded tokens only

    def forward(self, latent: Tensor, prefix: int, batch: Batch, stream: str, taps: dict[int, Tensor]) -> dict:
        if batch.mask.decode is not None and self.reads_decode_subset:
            return {"pred": self.decoded_subset(latent, prefix, batch, stream)}
        return {"pred": linear(self.features(latent, prefix, batch, stream), self.head, self.kernels)}


class CrossAttentionDecoder(TransformerDecoder):
    """MultiMAE's decoder for one stream: the stream's own tokens (its encoder codes where the
    encoder read them, the mask token elsewhere, plus its position encoding) are the queries of
    one cross-attention over everything the encoder read (every stream's codes and the [cls]
    token), then `depth` self-attention blocks over the stream's tokens alone, norm and head.
    The other streams reach it only through the cross-attention, so a stream the encoder saw
    nothing of (its whole budget went elsewhere) is still reconstructed from the others."""

    def __init__(self, encoder_width: int, d_out: int, num_coords: int, cfg: ModelConfig, dec: DecoderConfig,
                 grid: tuple[int, ...] | None = None, position: str | None = None, remask: bool = False):
        super().__init__(encoder_width, d_out, num_coords, cfg, dec, grid, position, remask)
        width, heads = dec.width or cfg.decoder_width, dec.heads or cfg.decoder_heads
        self.query_norm = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.context_norm = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.cross = nn.MultiheadAttention(width, heads, batch_first=True)

    reads_decode_subset = False  # every token of the stream is a query: a decode subset narrows the loss only

    def features(self, latent: Tensor, prefix: int, batch: Batch, stream: str) -> Tensor:
        context = linear(latent, self.embed, self.kernels)
        own = self.stream_queries(context, prefix, batch, stream)
        valid = MaskedAutoencoder.inputs_valid(batch)
        ignored = None if valid is None else ~torch.cat([valid.new_ones(valid.shape[0], prefix), valid], 1)
        attended, _ = self.cross(self.query_norm(own), self.context_norm(context), self.context_norm(context),
                                 key_padding_mask=ignored, need_weights=False)
        x = own + attended
        keys = batch.streams[stream].valid
        attn = None if keys is None else keys[:, None, None, :]
        for block in self.blocks:
            x = block(x, attn)
        return self.norm(x)


def entered_positions(batch: Batch) -> Tensor | None:
    """bool [B, N_total]: the tokens the encoder read, or None when that is exactly each row's
    first `num_visible` in shuffle order (no row has spare slots)."""
    mask = batch.mask
    if mask.keep_valid is None:
        return None
    return torch.gather(torch.cat([mask.keep_valid, mask.keep_valid.new_zeros(
        mask.keep_valid.shape[0], mask.ids_restore.shape[1] - mask.num_visible)], 1), 1, mask.ids_restore)


def restore_stream(latent: Tensor, prefix: int, batch: Batch, stream: str) -> Tensor:
    """The encoder's codes put back at a stream's token places [B, N_s, W] (zeros where the
    encoder read nothing)."""
    entered = latent[:, prefix:]
    b, n = batch.mask.ids_restore.shape
    full = torch.cat([entered, entered.new_zeros(b, n - entered.shape[1], entered.shape[2])], dim=1)
    return gather_tokens(full, batch.mask.ids_restore)[:, batch.layout[stream]]


class MLPHead(nn.Module):
    """A head on the encoder's codes of a stream's own tokens (BERT's MLM transform:
    Linear -> GELU -> LayerNorm -> Linear), read at `layer` (a normalising LayerNorm
    first when that is not the encoder's last, normalised output).

    With `targets_only` it predicts, while training, at the stream's target places only
    (`Batch.target_weights`): `pred` is then [K, d_out] for the K targets in row-major
    order and `rows` [B, N] says where they are. In eval mode it predicts everywhere."""

    def __init__(self, encoder_width: int, d_out: int, eps: float, layer: int | None, kernels: str = "auto",
                 targets_only: bool = False):
        super().__init__()
        self.layer, self.kernels, self.targets_only = layer, kernels, targets_only
        self.input_norm = nn.LayerNorm(encoder_width, eps=eps) if layer is not None else None
        self.dense = nn.Linear(encoder_width, encoder_width)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(encoder_width, eps=eps)
        self.head = nn.Linear(encoder_width, d_out)

    def transform(self, x: Tensor) -> Tensor:
        if self.input_norm is not None:
            x = self.input_norm(x)
        return self.norm(self.act(linear(x, self.dense, self.kernels)))

    def forward(self, latent: Tensor, prefix: int, batch: Batch, stream: str, taps: dict[int, Tensor]) -> dict:
        source = latent if self.layer is None else taps[self.layer]
        codes = restore_stream(source, prefix, batch, stream)
        if self.training and self.targets_only:
            rows = batch.target_weights(stream).bool()
            return {"pred": linear(self.transform(codes[rows]), self.head, self.kernels), "rows": rows}
        return {"pred": linear(self.transform(codes), self.head, self.kernels)}


DECODERS.register("transformer", TransformerDecoder)
DECODERS.register("cross", CrossAttentionDecoder)
DECODERS.register("mlp", MLPHead)
DECODERS.register("vocab", MLPHead)  # an MLP head over a vocabulary (ids streams), tied to the input embedding


# -- the model ----------------------------------------------------------------------------------------


@dataclass
class Outputs:
    """What the model gives: per-stream decoder outputs (`pred` [B, N_s, d] always; a
    modality's decoder may add more, e.g. point groups' `occupancy`), the encoder's
    normalised output [B, prefix + M, W] and the raw output of chosen encoder layers."""
    streams: dict[str, dict[str, Tensor]]
    latent: Tensor
    hidden_states: dict[int, Tensor] = field(default_factory=dict)
    unimodal: Tensor | None = None  # a model with an encoder per stream before fusing them (CROMA):
    #                                 their codes, laid out as `latent`

    def pred(self, stream: str) -> Tensor:
        return self.streams[stream]["pred"]

    def map(self, fn: Callable[[Tensor], Tensor]) -> "Outputs":
        return Outputs({s: {k: fn(v) for k, v in out.items()} for s, out in self.streams.items()}, fn(self.latent),
                       {k: fn(v) for k, v in self.hidden_states.items()},
                       None if self.unimodal is None else fn(self.unimodal))


def init_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform linears, zero biases, unit layer norms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


class MaskedAutoencoder(nn.Module):
    """Input adapters and decoders keyed by stream name around one encoder (see the module docstring).

    `taps`: encoder layers whose raw output Outputs.hidden_states carries (for heads that read
    an earlier depth and for objectives such as distillation or Starbucks)."""

    def __init__(self, input_adapters: dict[str, nn.Module], encoder: nn.Module, decoders: dict[str, nn.Module],
                 config: ModelConfig, taps: tuple[int, ...] = ()):
        super().__init__()
        self.config = config.resolved()
        self.input_adapters = nn.ModuleDict(input_adapters)
        self.encoder = encoder
        self.decoders = nn.ModuleDict(decoders)
        self.taps = tuple(sorted(set(taps) | {d.layer for d in decoders.values() if getattr(d, "layer", None)}))
        for layer in self.taps:
            if not 1 <= layer <= self.config.depth:
                raise ConfigError(f"a head or objective reads encoder layer {layer}; the encoder has layers "
                                  f"1..{self.config.depth}")
        self.apply(init_weights)
        for name, param in self.named_parameters():
            if name.endswith("_token"):
                nn.init.normal_(param, std=0.02)

    @property
    def num_prefix(self) -> int:
        return self.encoder.num_prefix

    @property
    def streams(self) -> list[str]:
        return list(self.input_adapters)

    def embed(self, batch: Batch) -> tuple[Tensor, Tensor | None]:
        """The encoder's input tokens [B, num_visible, W] under the batch's mask, and their validity."""
        mask = batch.mask
        names = list(batch.streams)
        if len(names) == 1 and mask.substitute is None:  # embed the visible tokens only (no wasted work)
            name = names[0]
            tokens = gather_stream(batch.streams[name], mask.ids_keep)
            return self.input_adapters[name](tokens), self.inputs_valid(batch)
        embedded = [self.input_adapters[name](self.entering(batch, name)) for name in names]
        x = torch.cat([e.to(embedded[0].dtype) for e in embedded], dim=1) if len(embedded) > 1 else embedded[0]
        if mask.substitute is not None:
            x = self.substitute_mask_tokens(x, batch)
        return gather_tokens(x, mask.ids_keep), self.inputs_valid(batch)

    @staticmethod
    def inputs_valid(batch: Batch) -> Tensor | None:
        """Which encoder inputs are real: the mask's `keep_valid`, and never padding, even in a
        hand-made mask that puts padding among the visible tokens (maskers never do)."""
        valids = [t.valid for t in batch.streams.values()]
        if all(v is None for v in valids):
            return batch.mask.keep_valid
        device = batch.mask.ids_keep.device
        full = torch.cat([v if v is not None else torch.ones(t.primary.shape[:2], dtype=torch.bool, device=device)
                          for v, t in zip(valids, batch.streams.values())], dim=1)
        kept = torch.gather(full, 1, batch.mask.ids_keep)
        return kept if batch.mask.keep_valid is None else kept & batch.mask.keep_valid

    def entering(self, batch: Batch, name: str) -> Tokens:
        """A stream's tokens as the encoder reads them: ids replaced where Mask.substitute names one."""
        tokens = batch.streams[name]
        if batch.mask.substitute is None:
            return tokens
        substitute = batch.mask.substitute[:, batch.layout[name]]
        if tokens.ids is not None:
            return replace(tokens, ids=torch.where(substitute >= 0, substitute, tokens.ids))
        if bool((substitute >= 0).any()):  # a value stream entering as another token's values (GraphMAE)
            source = torch.where(substitute >= 0, substitute, torch.arange(substitute.shape[1],
                                                                           device=substitute.device))
            return replace(tokens, values=gather_tokens(tokens.values, source))
        return tokens

    def substitute_mask_tokens(self, x: Tensor, batch: Batch) -> Tensor:
        for name, span in batch.layout.items():
            adapter = self.input_adapters[name]
            token = getattr(adapter, "mask_token", None)
            as_mask = batch.mask.substitute[:, span] == AS_MASK_TOKEN
            if bool(as_mask.any()):
                if token is None:
                    raise ValueError(f"stream {name!r}: its masker has hidden tokens enter the encoder as the mask "
                                     "token, and its input adapter has none")
                part = torch.where(as_mask[..., None], token.to(x.dtype), x[:, span])
                x = torch.cat([x[:, :span.start], part, x[:, span.stop:]], dim=1)
        return x

    def apart(self, batch: Batch) -> bool:
        return self.config.streams_attend == "apart" and len(batch.streams) > 1

    def encode(self, batch: Batch) -> tuple[Tensor, dict[int, Tensor]]:
        """The encoder's normalised output [B, prefix + num_visible, W] and its tapped layers."""
        x, valid = self.embed(batch)
        if self.apart(batch):
            groups = torch.gather(stream_groups(batch), 1, batch.mask.ids_keep)
            return self.encoder(x, valid, self.taps, groups=groups)
        return self.encoder(x, valid, self.taps)

    def forward(self, batch: Batch) -> Outputs:
        latent, taps = self.encode(batch)
        streams = {name: decoder(latent, self.num_prefix, batch, name, taps)
                   for name, decoder in self.decoders.items()}
        return Outputs(streams, latent, taps)

    def features(self, batch: Batch) -> Tensor:
        """One vector per sample from the encoder on every real token of every stream: what a probe
        reads (under no_grad) and a fine-tuned head trains on (with gradients)."""
        names = list(batch.streams)
        embedded = [self.input_adapters[name](batch.streams[name]) for name in names]
        x = torch.cat(embedded, dim=1)
        valids = [batch.streams[n].valid for n in names]
        valid = None
        if any(v is not None for v in valids):
            valid = torch.cat([v if v is not None else torch.ones(e.shape[:2], dtype=torch.bool, device=e.device)
                               for v, e in zip(valids, embedded)], dim=1)
        latent, _ = self.encoder(x, valid, groups=stream_groups(batch)) if self.apart(batch) else self.encoder(x, valid)
        if self.config.pool == "cls" and self.num_prefix:
            return latent[:, 0]
        tokens = latent[:, self.num_prefix:]
        readout = readout_tokens(batch)
        if readout is not None:  # the sample is about these tokens (the seeds a subgraph was cut around)
            valid = readout if valid is None else valid & readout
        if valid is None:
            return tokens.mean(1)
        weights = valid.unsqueeze(-1).to(tokens.dtype)
        return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1)


def readout_tokens(batch: Batch) -> Tensor | None:
    """bool [B, N_total]: the tokens a sample's feature vector is read from, where a stream
    names them in its field "readout" (the other streams' tokens then count too); None: all."""
    if not any("readout" in t.fields for t in batch.streams.values()):
        return None
    return torch.cat([t.fields["readout"].bool() if "readout" in t.fields else
                      torch.ones(t.primary.shape[:2], dtype=torch.bool, device=t.primary.device)
                      for t in batch.streams.values()], dim=1)


def build_vit_mae(modalities: dict, decoders: dict[str, DecoderConfig], config: ModelConfig,
                  taps: tuple[int, ...] = ()) -> MaskedAutoencoder:
    """The default model: each stream's modality gives its input adapter and its decoder
    (`Modality.input_adapter`, `Modality.decoder`) around one ViT encoder. A `vocab` head
    shares its output matrix with the stream's input embedding (BERT's tied weights)."""
    cfg = config.resolved()
    if cfg.encoder_options:
        raise ConfigError(f"model.encoder_options {sorted(cfg.encoder_options)}: the vit encoder takes none (its "
                          "settings are model.width, depth, heads, ...)")
    adapters = {name: modality.input_adapter(cfg.width, cfg) for name, modality in modalities.items()}
    heads = {name: modality.decoder(decoders[name], cfg.width, cfg) for name, modality in modalities.items()}
    model = MaskedAutoencoder(adapters, ViTEncoder(cfg), heads, cfg, taps)
    for name, dec in decoders.items():
        embed = getattr(adapters[name], "embed", None)
        if (dec.kind or modalities[name].default_decoder) == "vocab" and isinstance(embed, nn.Embedding):
            model.decoders[name].head.weight = embed.weight
    return model


ENCODERS.register("vit", build_vit_mae)


def build_model(modalities: dict, decoders: dict[str, DecoderConfig], config: ModelConfig,
                taps: tuple[int, ...] = ()) -> nn.Module:
    """The model a recipe names: `model.encoder` looked up in ENCODERS (a function of the
    streams' modalities, their decoder settings and the model config)."""
    from . import fusion  # noqa: F401  (registers the croma encoder; imported here, it imports this module)
    try:
        builder = ENCODERS.get(config.encoder)
    except KeyError as error:
        raise ConfigError(f"model.encoder: {error.args[0]}") from None
    return builder(modalities, decoders, config, taps)
