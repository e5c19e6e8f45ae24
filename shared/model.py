"""The MAE-shaped encoder-decoder that every modality shares.

    values, coords --gather visible--> input adapter (embed + position)
      -> [cls] + visible tokens -> ViT encoder -> norm          (visible only)
      -> decoder_embed -> append mask tokens, unshuffle by ids_restore
      -> + decoder position -> ViT decoder -> norm -> head    -> pred [B, N, d_in]

The encoder never sees a hidden token: that is MAE's whole saving. Hidden
positions are only known to the decoder, through `ids_restore` and coords.

Linear layers and attention go through shared/kernels.py, which picks faster
CPU kernels for the same maths (`ModelConfig.kernels = "torch"` turns that off).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .kernels import KERNELS, linear, self_attention
from .position import build_position
from .registry import MODEL_SIZES
from .tokens import Mask

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
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    position: str = "sincos"        # sincos | learned | mlp
    cls_token: bool = True
    layer_norm_eps: float = 1e-6
    pool: str = "mean"              # features for probing: mean of tokens or cls
    kernels: str = "auto"           # auto: oneDNN linears + short-sequence attention on CPU; torch: plain ops
    init_from: str | None = None    # start from these weights: a polymae run/checkpoint or a local HF ViTMAE folder

    def __post_init__(self):
        if self.size not in MODEL_SIZES:
            raise ConfigError(f"model.size must be one of {', '.join(MODEL_SIZES.names())}; got {self.size!r}")
        if self.pool not in ("mean", "cls"):
            raise ConfigError(f"model.pool must be mean or cls; got {self.pool!r}")
        if self.kernels not in KERNELS:
            raise ConfigError(f"model.kernels must be one of {', '.join(KERNELS)}; got {self.kernels!r}")

    def resolved(self) -> "ModelConfig":
        base = MODEL_SIZES.get(self.size)
        return ModelConfig(**{**self.__dict__, "width": self.width or base["width"],
                              "depth": self.depth or base["depth"], "heads": self.heads or base["heads"]})


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, kernels: str = "auto"):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads, self.kernels = heads, kernels
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        b, n, c = x.shape
        qkv = linear(x, self.qkv, self.kernels).view(b, n, 3, self.heads, c // self.heads)
        return linear(self_attention(qkv, attn_mask, self.kernels), self.proj, self.kernels)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, eps: float, kernels: str = "auto"):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.kernels = kernels
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads, kernels)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), attn_mask)
        fc1, act, fc2 = self.mlp
        return x + linear(act(linear(self.norm2(x), fc1, self.kernels)), fc2, self.kernels)


class InputAdapter(nn.Module):
    """Token embedding plus position encoding for one modality."""

    def __init__(self, d_in: int, width: int, num_coords: int, position: str = "sincos",
                 grid: tuple[int, ...] | None = None, embed: nn.Module | None = None, kernels: str = "auto"):
        super().__init__()
        self.kernels = kernels
        self.embed = embed if embed is not None else nn.Linear(d_in, width)
        self.position = build_position(position, width, num_coords, grid)

    def forward(self, values: Tensor, coords: Tensor) -> Tensor:
        return linear(values, self.embed, self.kernels) + self.position(coords)


def gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """x [B, N, C], ids [B, M] -> [B, M, C]."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def key_padding_mask(valid: Tensor | None, with_cls: bool) -> Tensor | None:
    """valid [B, M] -> boolean attention mask [B, 1, 1, M(+1)] that ignores padding keys."""
    if valid is None:
        return None
    if with_cls:
        valid = torch.cat([valid.new_ones(valid.shape[0], 1), valid], dim=1)
    return valid[:, None, None, :]


class MaskedAutoencoder(nn.Module):
    """`grid`: the extent of each coordinate in coords order (what a learned position table
    spans; `Modality.coord_extents` gives it), None for tokens off a fixed grid."""

    def __init__(self, d_in: int, num_coords: int, config: ModelConfig = ModelConfig(),
                 grid: tuple[int, ...] | None = None, input_adapter: nn.Module | None = None):
        super().__init__()
        self.config = cfg = config.resolved()
        self.d_in = d_in
        self.grid = tuple(grid) if grid is not None else None
        self.input_adapter = input_adapter or InputAdapter(d_in, cfg.width, num_coords, cfg.position, grid,
                                                           kernels=cfg.kernels)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width)) if cfg.cls_token else None
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.layer_norm_eps, cfg.kernels)
                                    for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

        self.decoder_embed = nn.Linear(cfg.width, cfg.decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_width))
        self.decoder_position = build_position(cfg.position, cfg.decoder_width, num_coords, grid)
        self.decoder_blocks = nn.ModuleList(
            Block(cfg.decoder_width, cfg.decoder_heads, cfg.decoder_mlp_ratio, cfg.layer_norm_eps, cfg.kernels)
            for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(cfg.decoder_width, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.decoder_width, d_in)
        self.apply(self._init_weights)
        for token in (self.cls_token, self.mask_token):
            if token is not None:
                nn.init.normal_(token, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def num_prefix(self) -> int:
        return 1 if self.cls_token is not None else 0

    def encode(self, values: Tensor, coords: Tensor, valid: Tensor | None = None) -> Tensor:
        """Encode the tokens given (callers pass visible tokens only) -> [B, prefix + M, width]."""
        x = self.input_adapter(values, coords)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        attn_mask = key_padding_mask(valid, self.cls_token is not None)
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.norm(x)

    def decode(self, latent: Tensor, mask: Mask, coords: Tensor, valid: Tensor | None = None) -> Tensor:
        """Visible encodings + mask tokens at hidden places -> predictions [B, N, d_in]."""
        return linear(self.decode_features(latent, mask, coords, valid), self.head, self.config.kernels)

    def decode_features(self, latent: Tensor, mask: Mask, coords: Tensor, valid: Tensor | None = None) -> Tensor:
        """The decoder's normalised output per token [B, N, decoder_width], before `head`
        (extra heads, e.g. a point modality's occupancy head, read it too)."""
        x = linear(latent, self.decoder_embed, self.config.kernels)
        prefix, visible = x[:, : self.num_prefix], x[:, self.num_prefix:]
        b, n = mask.ids_restore.shape
        filler = self.mask_token.to(x.dtype).expand(b, n - visible.shape[1], -1)
        x = gather_tokens(torch.cat([visible, filler], dim=1), mask.ids_restore)
        x = torch.cat([prefix, x + self.decoder_position(coords).to(x.dtype)], dim=1)
        attn_mask = key_padding_mask(valid, self.cls_token is not None)
        for block in self.decoder_blocks:
            x = block(x, attn_mask)
        return self.decoder_norm(x)[:, self.num_prefix:]

    def forward(self, values: Tensor, coords: Tensor, mask: Mask, valid: Tensor | None = None) -> dict[str, Tensor]:
        ids_keep = mask.ids_keep
        visible_valid = None if valid is None else torch.gather(valid, 1, ids_keep)
        latent = self.encode(gather_tokens(values, ids_keep), gather_tokens(coords, ids_keep), visible_valid)
        return {"pred": self.decode(latent, mask, coords, valid), "latent": latent}

    @torch.no_grad()
    def features(self, values: Tensor, coords: Tensor, valid: Tensor | None = None) -> Tensor:
        """One vector per sample from the encoder on all tokens (for probing)."""
        latent = self.encode(values, coords, valid)
        if self.config.pool == "cls" and self.cls_token is not None:
            return latent[:, 0]
        tokens = latent[:, self.num_prefix:]
        if valid is None:
            return tokens.mean(1)
        weights = valid.unsqueeze(-1).to(tokens.dtype)
        return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1)
