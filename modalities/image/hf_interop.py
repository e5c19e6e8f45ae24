"""Hugging Face ViTMAE interop: import a `ViTMAEForPreTraining` into polymae and export back.

    from_hf_vitmae(hf_model_or_state_dict, hf_config) -> MaskedAutoencoder
    to_hf_vitmae(model)                                 -> ViTMAEForPreTraining state dict
    to_hf_vitmae(model, encoder_only=True)              -> ViTMAEModel state dict
    hf_config_for(model, **config_overrides)            -> a matching ViTMAEConfig
    hf_noise_to_mask(noise, mask_ratio)                 -> the Mask HF's forward(noise=...) makes
    fill_hf_sincos_tables(hf_model)                     -> fixed tables for a model built from a config
    read_hf_folder(folder)                              -> (state dict, ViTMAEConfig) of a local checkpoint
    load_hf_weights(model, folder)                      -> a built polymae model starts from HF weights
    save_hf_folder(model, folder, encoder_only=False)   -> a folder `from_pretrained` loads

The two models are the same network written two ways:

- patch embedding: HF's Conv2d weight [D, C, p, p] over [C, H, W] pixels is
  polymae's Linear weight [D, p*p*C] over patchified tokens laid out
  (dy, dx, c): `W_lin = W_conv.permute(0, 2, 3, 1).reshape(D, -1)`;
- attention: HF's separate q/k/v projections are polymae's fused `qkv` (rows q, k, v);
- positions: HF's fixed 2D sin-cos tables, [sin x | cos x | sin y | cos y] per
  row-major patch with x = column, are exactly polymae's `SinCosPosition` on
  coords (x, y) = (col, row); a table that is not sin-cos imports as a learned one;
- the cls token: HF adds the (zero) row 0 of its table to it; polymae folds it in;
- masking: HF keeps the `int(N * (1 - mask_ratio))` lowest-noise patches, as
  `Mask.from_scores(noise, N - that)` does (it hides the highest scores).
  polymae's maskers hide `round(ratio * N)`: the same count at 0.75 (147 of
  196), one more visible token at 0.9 (HF keeps 19, polymae 20).

`transformers` is an optional extra: it is imported inside functions only.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from polymae.shared.checkpoint import hf_model_type as folder_model_type  # noqa: F401  (used by the modality)
from polymae.shared.errors import ConfigError
from polymae.shared.model import DecoderConfig, MaskedAutoencoder, ModelConfig, build_vit_mae
from polymae.shared.position import LearnedPosition, SinCosPosition
from polymae.shared.tokens import Mask

# polymae block key suffix -> HF layer key suffix (one-to-one renames; qkv is split separately)
_BLOCK_RENAMES = {
    "norm1.weight": "layernorm_before.weight", "norm1.bias": "layernorm_before.bias",
    "norm2.weight": "layernorm_after.weight", "norm2.bias": "layernorm_after.bias",
    "attn.proj.weight": "attention.o_proj.weight", "attn.proj.bias": "attention.o_proj.bias",
    "mlp.0.weight": "mlp.fc1.weight", "mlp.0.bias": "mlp.fc1.bias",
    "mlp.2.weight": "mlp.fc2.weight", "mlp.2.bias": "mlp.fc2.bias",
}


# polymae decoder key suffix -> HF decoder key suffix
DECODER_RENAMES = {"embed.weight": "decoder_embed.weight", "embed.bias": "decoder_embed.bias",
                   "norm.weight": "decoder_norm.weight", "norm.bias": "decoder_norm.bias",
                   "mask_token": "mask_token", "head.weight": "decoder_pred.weight", "head.bias": "decoder_pred.bias"}


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))


def grid_coords(grid: tuple[int, int]) -> Tensor:
    """Row-major patch coords (x, y) = (col, row), as the image tokenizer makes them."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return torch.stack([cols.flatten(), rows.flatten()], dim=-1).float()


def _mlp_ratio(hidden: int, width: int, where: str) -> float:
    ratio = hidden / width
    if int(width * ratio) != hidden:
        raise ValueError(f"{where}: an MLP of {hidden} for width {width} is not expressible as a ratio")
    return ratio


def stream_of(model: MaskedAutoencoder) -> str:
    """The one (image) stream of a model that ViTMAE can describe."""
    if len(model.streams) != 1:
        raise ValueError(f"HF ViTMAE has one image stream; this model has {model.streams}")
    return model.streams[0]


def image_mae(d_in: int, grid: tuple[int, int], config: ModelConfig, stream: str = "image") -> MaskedAutoencoder:
    """A one-stream image MAE for `grid` = (w, h) extents of the (x, y) coords and tokens of `d_in` values."""
    from .modality import ImageModality

    p, c = infer_patch(d_in)
    w, h = grid
    modality = ImageModality({"image_size": (h * p, w * p), "patch_size": p, "channels": c})
    return build_vit_mae({stream: modality}, {stream: DecoderConfig()}, config)


def model_kwargs_from_hf(hf_config: Any) -> dict:
    """ViTMAEConfig -> keyword arguments of `image_mae` (d_in, config, grid)."""
    c = hf_config
    if getattr(c, "hidden_act", "gelu") != "gelu":
        raise ValueError(f"polymae blocks use exact GELU; the HF config has hidden_act={c.hidden_act!r}")
    image, patch = _pair(c.image_size), _pair(c.patch_size)
    if patch[0] != patch[1]:
        raise ValueError(f"polymae image tokens use square patches; the HF config has patch_size={c.patch_size}")
    grid = (image[0] // patch[0], image[1] // patch[1])
    config = ModelConfig(
        width=c.hidden_size, depth=c.num_hidden_layers, heads=c.num_attention_heads,
        mlp_ratio=_mlp_ratio(c.intermediate_size, c.hidden_size, "intermediate_size"),
        decoder_width=c.decoder_hidden_size, decoder_depth=c.decoder_num_hidden_layers,
        decoder_heads=c.decoder_num_attention_heads,
        decoder_mlp_ratio=_mlp_ratio(c.decoder_intermediate_size, c.decoder_hidden_size, "decoder_intermediate_size"),
        position="sincos", cls_token=True, layer_norm_eps=c.layer_norm_eps)
    # the model's grid is the extent of each coord: (x, y) runs over (w, h)
    return {"d_in": patch[0] * patch[1] * c.num_channels, "config": config, "grid": grid[::-1]}


def _table_kind(table: Tensor, grid: tuple[int, int]) -> str:
    """'sincos' when an HF position table (without its cls row) is polymae's fixed sin-cos encoding."""
    expected = SinCosPosition(table.shape[-1], 2)(grid_coords(grid))
    return "sincos" if torch.allclose(table.float(), expected, atol=1e-5) else "learned"


def _learned_rows(position: nn.Module, grid: tuple[int, int]) -> Tensor:
    """Indices into a LearnedPosition table of the row-major patches."""
    coords = grid_coords(grid)
    return (coords.round().long() * position.strides).sum(-1)


def token_grid(model: MaskedAutoencoder) -> tuple[int, int]:
    """(h, w) of an image model, whose input adapter's `grid` holds the extents of its (x, y) coords."""
    return tuple(model.input_adapters[stream_of(model)].grid[::-1])


def token_width(model: MaskedAutoencoder) -> int:
    return model.decoders[stream_of(model)].head.out_features


def _state_dict_of(hf_model_or_state_dict) -> dict[str, Tensor]:
    """An HF model's (or a state dict's) tensors under ViTMAEForPreTraining's keys: a ViTMAEModel's
    encoder keys come without the "vit." prefix."""
    if isinstance(hf_model_or_state_dict, nn.Module):
        hf = hf_model_or_state_dict.state_dict()
    else:
        hf = dict(hf_model_or_state_dict)
    if not any(k.startswith("vit.") for k in hf):
        hf = {f"vit.{k}": v for k, v in hf.items()}
    return hf


def from_hf_vitmae(hf_model_or_state_dict, hf_config: Any = None, *, kwargs_only: bool = False, **overrides):
    """A `ViTMAEForPreTraining` (model or state dict) -> a polymae `MaskedAutoencoder` with the same weights.

    `hf_config` defaults to the model's own config. With `kwargs_only=True`
    returns just the `MaskedAutoencoder` keyword arguments. `overrides` set
    ModelConfig fields that HF has no notion of (`pool`, `kernels`). A
    `ViTMAEModel` (encoder only) imports too: the decoder keeps its fresh init.
    """
    if hf_config is None:
        hf_config = getattr(hf_model_or_state_dict, "config", None)
        if hf_config is None:
            raise ValueError("from_hf_vitmae needs the ViTMAEConfig when given a bare state dict")
    kwargs = model_kwargs_from_hf(hf_config)
    hf = _state_dict_of(hf_model_or_state_dict)
    grid = kwargs["grid"][::-1]  # (h, w) of the token grid
    pos = hf["vit.embeddings.position_embeddings"][0]
    encoder_kind = _table_kind(pos[1:], grid)
    has_decoder = "decoder.decoder_embed.weight" in hf
    decoder_kind = _table_kind(hf["decoder.decoder_pos_embed"][0, 1:], grid) if has_decoder else "sincos"
    if has_decoder and hf["decoder.decoder_pos_embed"][0, 0].abs().max() > 0:
        raise ValueError("the HF decoder position table has a non-zero cls row; polymae adds no position to "
                         "the decoder's cls token, so this model cannot be represented exactly")
    config = kwargs["config"]
    kwargs["config"] = ModelConfig(**{**config.__dict__, "position": encoder_kind, **overrides})
    if kwargs_only:
        return kwargs
    model = image_mae(**kwargs)
    if decoder_kind != encoder_kind:  # the config has one `position`; the decoder's table can differ
        model.decoders["image"].position = (LearnedPosition(config.decoder_width, kwargs["grid"])
                                            if decoder_kind == "learned" else SinCosPosition(config.decoder_width, 2))
    model.load_state_dict(state_dict_from_hf(hf, model), strict=has_decoder)
    return model


def state_dict_from_hf(hf: dict[str, Tensor], model: MaskedAutoencoder) -> dict[str, Tensor]:
    """HF ViTMAEForPreTraining keys -> polymae keys for `model` (built by `from_hf_vitmae`)."""
    out: dict[str, Tensor] = {}
    grid = token_grid(model)
    s = stream_of(model)
    adapter, decoder = model.input_adapters[s], model.decoders[s]
    conv = hf["vit.embeddings.patch_embeddings.projection.weight"]              # [D, C, p, p]
    out[f"input_adapters.{s}.embed.weight"] = conv.permute(0, 2, 3, 1).reshape(conv.shape[0], -1).clone()
    out[f"input_adapters.{s}.embed.bias"] = hf["vit.embeddings.patch_embeddings.projection.bias"].clone()
    pos = hf["vit.embeddings.position_embeddings"][0]
    out["encoder.cls_token"] = (hf["vit.embeddings.cls_token"] + pos[0]).clone()
    if isinstance(adapter.position, LearnedPosition):
        table = torch.zeros_like(adapter.position.table)
        table[_learned_rows(adapter.position, grid)] = pos[1:]
        out[f"input_adapters.{s}.position.table"] = table
    out.update(_blocks_from_hf(hf, "vit.layers", "encoder.blocks", model.config.depth))
    out["encoder.norm.weight"] = hf["vit.layernorm.weight"].clone()
    out["encoder.norm.bias"] = hf["vit.layernorm.bias"].clone()
    if "decoder.decoder_embed.weight" not in hf:
        return out
    for ours, theirs in DECODER_RENAMES.items():
        out[f"decoders.{s}.{ours}"] = hf[f"decoder.{theirs}"].clone()
    if isinstance(decoder.position, LearnedPosition):
        table = torch.zeros_like(decoder.position.table)
        table[_learned_rows(decoder.position, grid)] = hf["decoder.decoder_pos_embed"][0, 1:]
        out[f"decoders.{s}.position.table"] = table
    out.update(_blocks_from_hf(hf, "decoder.decoder_layers", f"decoders.{s}.blocks", model.config.decoder_depth))
    return out


def _blocks_from_hf(hf: dict, src: str, dst: str, depth: int) -> dict[str, Tensor]:
    out = {}
    for i in range(depth):
        s, d = f"{src}.{i}", f"{dst}.{i}"
        for ours, theirs in _BLOCK_RENAMES.items():
            out[f"{d}.{ours}"] = hf[f"{s}.{theirs}"].clone()
        q = [hf[f"{s}.attention.{n}_proj.weight"] for n in "qkv"]
        out[f"{d}.attn.qkv.weight"] = torch.cat(q, dim=0)
        biases = [hf.get(f"{s}.attention.{n}_proj.bias") for n in "qkv"]
        out[f"{d}.attn.qkv.bias"] = torch.cat([b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype)
                                               for b, w in zip(biases, q)])
    return out


def _blocks_to_hf(ours: dict, src: str, dst: str, depth: int) -> dict[str, Tensor]:
    out = {}
    for i in range(depth):
        s, d = f"{src}.{i}", f"{dst}.{i}"
        for mine, theirs in _BLOCK_RENAMES.items():
            out[f"{d}.{theirs}"] = ours[f"{s}.{mine}"].clone()
        for name, part in zip("qkv", ours[f"{s}.attn.qkv.weight"].chunk(3, dim=0)):
            out[f"{d}.attention.{name}_proj.weight"] = part.clone()
        for name, part in zip("qkv", ours[f"{s}.attn.qkv.bias"].chunk(3, dim=0)):
            out[f"{d}.attention.{name}_proj.bias"] = part.clone()
    return out


def infer_patch(d_in: int, channels: int | None = None) -> tuple[int, int]:
    """(patch_size, channels) with p*p*C = d_in, trying RGB first, then grey."""
    for c in ([channels] if channels else [3, 1]):
        p = math.isqrt(d_in // c)
        if p * p * c == d_in:
            return p, c
    raise ValueError(f"token width {d_in} is not patch_size^2 * channels; pass patch_size and channels")


def _check_exportable(model: MaskedAutoencoder) -> None:
    s = stream_of(model)
    adapter = model.input_adapters[s]
    if getattr(model.encoder, "cls_token", None) is None:
        raise ValueError("HF ViTMAE has a cls token; this polymae model was built with cls_token=False")
    if adapter.grid is None or len(adapter.grid) != 2:
        raise ValueError("export needs the model's 2D token grid (an image stream's)")
    if not isinstance(adapter.embed, nn.Linear):
        raise ValueError("export needs a Linear token embedding (the image input adapter's)")
    for name, blocks in (("the encoder", model.encoder.blocks), ("the decoder", model.decoders[s].blocks)):
        if len({tuple(b.mlp[0].weight.shape) for b in blocks}) > 1:
            raise ValueError(f"HF ViTMAE needs one MLP width across {name}")


def to_hf_vitmae(model: MaskedAutoencoder, *, encoder_only: bool = False, patch_size: int | None = None,
                 channels: int | None = None) -> dict[str, Tensor]:
    """A polymae image MAE -> state dict for `ViTMAEForPreTraining` (or `ViTMAEModel` with encoder_only).

    Position tables are written from the model's own position modules at the
    row-major grid coords, with a zero cls row, so any polymae position
    encoding exports; HF uses them as a fixed table.
    """
    _check_exportable(model)
    s = stream_of(model)
    p, c = (patch_size, channels) if patch_size and channels else infer_patch(token_width(model), channels)
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    coords = grid_coords(token_grid(model))
    out: dict[str, Tensor] = {}
    weight = ours[f"input_adapters.{s}.embed.weight"]
    out["vit.embeddings.patch_embeddings.projection.weight"] = (
        weight.reshape(weight.shape[0], p, p, c).permute(0, 3, 1, 2).contiguous())
    out["vit.embeddings.patch_embeddings.projection.bias"] = ours[f"input_adapters.{s}.embed.bias"].clone()
    out["vit.embeddings.cls_token"] = ours["encoder.cls_token"].clone()
    with torch.no_grad():
        enc = model.input_adapters[s].position(coords).float()
        out["vit.embeddings.position_embeddings"] = torch.cat([enc.new_zeros(1, enc.shape[-1]), enc])[None]
        dec = model.decoders[s].position(coords).float()
    out.update(_blocks_to_hf(ours, "encoder.blocks", "vit.layers", model.config.depth))
    out["vit.layernorm.weight"] = ours["encoder.norm.weight"].clone()
    out["vit.layernorm.bias"] = ours["encoder.norm.bias"].clone()
    if encoder_only:
        return {k[len("vit."):]: v for k, v in out.items()}
    for mine, theirs in DECODER_RENAMES.items():
        out[f"decoder.{theirs}"] = ours[f"decoders.{s}.{mine}"].clone()
    out["decoder.decoder_pos_embed"] = torch.cat([dec.new_zeros(1, dec.shape[-1]), dec])[None]
    out.update(_blocks_to_hf(ours, f"decoders.{s}.blocks", "decoder.decoder_layers", model.config.decoder_depth))
    return out


def hf_config_for(model: MaskedAutoencoder, patch_size: int | None = None, channels: int | None = None,
                  **overrides):
    """A `ViTMAEConfig` with `model`'s architecture (mask_ratio, norm_pix_loss etc. via overrides)."""
    from transformers import ViTMAEConfig

    _check_exportable(model)
    p, c = (patch_size, channels) if patch_size and channels else infer_patch(token_width(model), channels)
    h, w = token_grid(model)
    decoder_blocks = model.decoders[stream_of(model)].blocks
    if h != w:
        raise ValueError(f"HF ViTMAE needs a square token grid; this model's is {h}x{w}")
    cfg = model.config
    return ViTMAEConfig(**{
        "hidden_size": cfg.width, "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.heads,
        "intermediate_size": (model.encoder.blocks[0].mlp[0].out_features if cfg.depth
                              else int(cfg.width * cfg.mlp_ratio)),
        "decoder_hidden_size": cfg.decoder_width, "decoder_num_hidden_layers": cfg.decoder_depth,
        "decoder_num_attention_heads": cfg.decoder_heads,
        "decoder_intermediate_size": (decoder_blocks[0].mlp[0].out_features if cfg.decoder_depth
                                      else int(cfg.decoder_width * cfg.decoder_mlp_ratio)),
        "layer_norm_eps": cfg.layer_norm_eps, "image_size": h * p, "patch_size": p, "num_channels": c,
        "hidden_act": "gelu", "qkv_bias": True, **overrides})


def fill_hf_sincos_tables(hf_model) -> None:
    """Write the fixed 2D sin-cos tables (zero cls row) into a ViTMAEModel / ViTMAEForPreTraining.

    transformers 5.x leaves both tables at zero in a model built from a config
    (its post-init marks the patch projection initialised before the embedding
    module gets to fill the table, then zeroes the decoder's); pretrained
    checkpoints carry the right tables. The values are HF's own definition
    (tests/test_hf_interop.py checks them against HF's initialiser).
    """
    base = getattr(hf_model, "vit", hf_model)
    image, patch = _pair(base.config.image_size), _pair(base.config.patch_size)
    coords = grid_coords((image[0] // patch[0], image[1] // patch[1]))
    tables = [base.embeddings.position_embeddings]
    if hasattr(hf_model, "decoder"):
        tables.append(hf_model.decoder.decoder_pos_embed)
    with torch.no_grad():
        for table in tables:
            values = SinCosPosition(table.shape[-1], 2)(coords)
            table.copy_(torch.cat([values.new_zeros(1, values.shape[-1]), values])[None].to(table.dtype))


def hf_noise_to_mask(noise: Tensor, mask_ratio: float):
    """The polymae Mask that HF's `random_masking(noise)` makes for `mask_ratio`."""
    n = noise.shape[-1]
    keep = int(n * (1 - mask_ratio))
    return Mask.from_scores(noise, n - keep)


# -- checkpoint folders on disk ---------------------------------------------------------------------


def read_hf_folder(folder: str | Path) -> tuple[dict[str, Tensor], Any]:
    """(state dict, ViTMAEConfig) of a local Hugging Face ViTMAE checkpoint folder, read by
    transformers itself (which renames the keys of its on-disk layout); never downloads.
    A `ViTMAEModel` checkpoint (its config's architectures say so) gives the encoder only."""
    import transformers

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "vit_mae":
        raise ConfigError(f"{folder}: a Hugging Face {config.get('model_type')!r} checkpoint; "
                          "polymae imports ViTMAE ('vit_mae')")
    encoder_only = config.get("architectures") == ["ViTMAEModel"]
    cls = transformers.ViTMAEModel if encoder_only else transformers.ViTMAEForPreTraining
    try:
        hf = cls.from_pretrained(str(folder), local_files_only=True)
    except OSError as error:  # no weights file next to config.json
        raise ConfigError(f"{folder}: cannot load its weights ({str(error).splitlines()[0]})") from None
    return hf.state_dict(), hf.config


def load_hf_weights(model: MaskedAutoencoder, folder: str | Path) -> None:
    """Load a local HF ViTMAE checkpoint into an already built polymae model (a recipe's).

    The recipe must describe the checkpoint's architecture; when it does not,
    the ConfigError lists the `model.*` settings that would."""
    state, hf_config = read_hf_folder(folder)
    hf = _state_dict_of(state)
    expected = from_hf_vitmae(hf, hf_config, kwargs_only=True)
    want, have = expected["config"], model.config
    fields = ("width", "depth", "heads", "mlp_ratio", "decoder_width", "decoder_depth", "decoder_heads",
              "decoder_mlp_ratio", "position", "cls_token", "layer_norm_eps")
    if not any(k.startswith("decoder.") for k in hf):
        fields = fields[:4] + fields[-3:]   # an encoder-only ViTMAEModel says nothing of the decoder
    wrong = [f"model.{f}={getattr(want, f)}" for f in fields if getattr(want, f) != getattr(have, f)]
    if expected["d_in"] != token_width(model) or tuple(expected["grid"]) != tuple(token_grid(model)[::-1]):
        h, w = expected["grid"][::-1]
        wrong.append(f"modality_options: {h}x{w} patches of {expected['d_in']} values "
                     f"(image_size {hf_config.image_size}, patch_size {hf_config.patch_size}, "
                     f"{hf_config.num_channels} channels)")
    if wrong:
        raise ConfigError(f"model.init_from {folder}: the checkpoint's architecture differs from the recipe's; "
                          f"set {', '.join(wrong)}")
    if "decoder.decoder_pos_embed" in hf:  # the recipe has one `position` for both tables
        kind = _table_kind(hf["decoder.decoder_pos_embed"][0, 1:], token_grid(model))
        have_kind = "learned" if isinstance(model.decoders[stream_of(model)].position, LearnedPosition) else "sincos"
        if kind != have_kind:
            raise ConfigError(f"model.init_from {folder}: the checkpoint's decoder position table is {kind}, its "
                              f"encoder's is {want.position}; polymae recipes use one kind for both "
                              "(from_hf_vitmae imports such a model as it is)")
    model.load_state_dict(state_dict_from_hf(hf, model), strict="decoder.decoder_embed.weight" in hf)


def save_hf_folder(model: MaskedAutoencoder, folder: str | Path, *, encoder_only: bool = False,
                   **config_overrides) -> Path:
    """Write `model` as a Hugging Face checkpoint folder, through transformers' own `save_pretrained`
    (its on-disk layout): `ViTMAEForPreTraining.from_pretrained(folder)` (or `ViTMAEModel`, with
    encoder_only) loads it offline."""
    import transformers

    config = hf_config_for(model, **config_overrides)
    hf = (transformers.ViTMAEModel if encoder_only else transformers.ViTMAEForPreTraining)(config)
    hf.load_state_dict(to_hf_vitmae(model, encoder_only=encoder_only), strict=True)
    hf.save_pretrained(str(folder))
    return Path(folder)
