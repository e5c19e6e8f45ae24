"""Hugging Face VideoMAE interop: import a `VideoMAEForPreTraining` into polymae and export back.

    from_hf_videomae(hf_model)                  -> (MaskedAutoencoder, VideoModality) with its weights
    to_hf_videomae(model, modality)             -> VideoMAEForPreTraining state dict
    hf_config_for(model, modality, **overrides) -> a matching VideoMAEConfig
    mask_from_hf(bool_masked_pos)               -> the polymae Mask of HF's boolean mask
    load_hf_weights(model, folder, modality)    -> a recipe's model starts from a local HF folder
    save_hf_folder(model, folder, modality)     -> a folder `from_pretrained` loads

The two models are the same network written two ways (as modalities/image/hf_interop.py
does for ViTMAE, whose block renames this module follows):

- tubelet embedding: HF's Conv3d weight [D, C, t, p, p] over [C, T, H, W] is polymae's
  Linear over tubelets laid out (dt, dy, dx, c): `W_lin = W_conv.permute(0, 2, 3, 4, 1)`;
- attention: HF's query/key/value (no key bias) are polymae's fused `qkv`. A key bias
  adds the same q.b to every score of a query, which softmax cancels: it exports as nothing;
- positions: HF's fixed 1-D sinusoid table over the flattened tubelet index, in encoder and
  decoder alike, is the video modality's `positions: videomae` (`VideoMAETablePosition`);
  a model with 3-D sin-cos positions has no HF counterpart and does not export;
- no [cls] token (model.cls_token: false), a bias-free encoder-to-decoder projection (the
  video decoder has none either), the decoder's final LayerNorm at eps 1e-5 (HF's fixed one);
- `use_mean_pooling: true` checkpoints have no final encoder LayerNorm: they import with
  an identity there (from_hf_videomae) but cannot start a recipe's model (load_hf_weights);
- the loss: HF's MSE against per-channel normalised tubelets is the `videomae_pixel`
  term (modalities/video/objectives.py).

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
from polymae.shared.tokens import Mask

HF_DECODER_NORM_EPS = 1e-5  # VideoMAEDecoder's nn.LayerNorm(decoder_hidden_size): torch's default eps

_BLOCK_RENAMES = {
    "norm1.weight": "layernorm_before.weight", "norm1.bias": "layernorm_before.bias",
    "norm2.weight": "layernorm_after.weight", "norm2.bias": "layernorm_after.bias",
    "attn.proj.weight": "attention.output.dense.weight", "attn.proj.bias": "attention.output.dense.bias",
    "mlp.0.weight": "intermediate.dense.weight", "mlp.0.bias": "intermediate.dense.bias",
    "mlp.2.weight": "output.dense.weight", "mlp.2.bias": "output.dense.bias",
}
_DECODER_RENAMES = {"embed.weight": "encoder_to_decoder.weight", "mask_token": "mask_token",
                    "norm.weight": "decoder.norm.weight", "norm.bias": "decoder.norm.bias",
                    "head.weight": "decoder.head.weight", "head.bias": "decoder.head.bias"}


def videomae_table(num_positions: int, width: int) -> Tensor:
    """HF VideoMAE's (and the original's) fixed table: position n, dim j -> n / 10000^(2 (j // 2) / width),
    sine at even j, cosine at odd j; computed in float64, kept as float32."""
    positions = torch.arange(num_positions, dtype=torch.float64)[:, None]
    exponent = 2 * (torch.arange(width) // 2).to(torch.float64) / width
    angles = positions / torch.pow(torch.tensor(10000.0, dtype=torch.float64), exponent)
    table = torch.where(torch.arange(width) % 2 == 0, torch.sin(angles), torch.cos(angles))
    return table.float()


class VideoMAETablePosition(nn.Module):
    """VideoMAE's fixed 1-D table over the flattened (t, row, col) tubelet index; no parameters
    (the table is made from the grid, as HF makes it, so checkpoints do not carry it)."""

    def __init__(self, width: int, grid: tuple[int, int, int]):
        super().__init__()
        self.grid = tuple(grid)
        self.register_buffer("table", videomae_table(math.prod(self.grid), width), persistent=False)
        _, h, w = self.grid
        self.register_buffer("strides", torch.tensor([h * w, w, 1]), persistent=False)

    def forward(self, coords: Tensor) -> Tensor:
        return self.table[(coords.round().long() * self.strides).sum(-1)]


def hf_config_kwargs(modality, config: ModelConfig, **overrides) -> dict:
    o = modality.options
    if o.image_size[0] != o.image_size[1]:
        raise ConfigError(f"HF VideoMAE has square frames; this model's are {o.image_size}")
    d = config.decoder_width
    return {"image_size": o.image_size[0], "patch_size": o.patch_size, "num_channels": 3,
            "num_frames": o.num_frames, "tubelet_size": o.tubelet_size, "hidden_size": config.width,
            "num_hidden_layers": config.depth, "num_attention_heads": config.heads,
            "intermediate_size": int(config.width * config.mlp_ratio), "hidden_act": "gelu",
            "qv_bias": True, "decoder_hidden_size": d, "decoder_num_hidden_layers": config.decoder_depth,
            "decoder_num_attention_heads": config.decoder_heads,
            "decoder_intermediate_size": int(d * config.decoder_mlp_ratio), "use_mean_pooling": False,
            "layer_norm_eps": config.layer_norm_eps, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0, **overrides}


def hf_config_for(model: MaskedAutoencoder, modality, **overrides):
    import transformers

    check_exportable(model, modality)
    return transformers.VideoMAEConfig(**hf_config_kwargs(modality, model.config, **overrides))


def parts_from_hf_config(c: Any) -> tuple[dict, ModelConfig]:
    """VideoMAEConfig -> (video modality options, polymae ModelConfig)."""
    if getattr(c, "hidden_act", "gelu") != "gelu":
        raise ValueError(f"polymae blocks use exact GELU; the HF config has hidden_act={c.hidden_act!r}")
    if c.num_channels != 3:
        raise ValueError(f"the video modality reads RGB; the HF config has num_channels={c.num_channels}")
    options = {"image_size": c.image_size, "patch_size": c.patch_size, "num_frames": c.num_frames,
               "tubelet_size": c.tubelet_size, "positions": "videomae"}
    config = ModelConfig(width=c.hidden_size, depth=c.num_hidden_layers, heads=c.num_attention_heads,
                         mlp_ratio=c.intermediate_size / c.hidden_size, decoder_width=c.decoder_hidden_size,
                         decoder_depth=c.decoder_num_hidden_layers, decoder_heads=c.decoder_num_attention_heads,
                         decoder_mlp_ratio=c.decoder_intermediate_size / c.decoder_hidden_size,
                         cls_token=False, layer_norm_eps=c.layer_norm_eps, position="sincos")
    return options, config


def from_hf_videomae(hf_model, **overrides):
    """A `VideoMAEForPreTraining` -> (polymae MaskedAutoencoder with the same weights, its VideoModality).
    `overrides` set ModelConfig fields HF has no notion of (`pool`, `kernels`)."""
    from .modality import VideoModality

    options, config = parts_from_hf_config(hf_model.config)
    config = ModelConfig(**{**config.__dict__, **overrides})
    modality = VideoModality(options)
    model = build_vit_mae({"video": modality}, {"video": DecoderConfig()}, config)
    if hf_model.config.use_mean_pooling:  # VideoMAEModel then has no final LayerNorm
        model.encoder.norm = nn.Identity()
    model.load_state_dict(state_dict_from_hf(hf_model.state_dict(), model), strict=not hf_model.config.use_mean_pooling)
    return model, modality


def state_dict_from_hf(hf: dict[str, Tensor], model: MaskedAutoencoder) -> dict[str, Tensor]:
    s = only_stream(model)
    out: dict[str, Tensor] = {}
    conv = hf["videomae.embeddings.patch_embeddings.projection.weight"]          # [D, C, t, p, p]
    out[f"input_adapters.{s}.embed.weight"] = conv.permute(0, 2, 3, 4, 1).reshape(conv.shape[0], -1).clone()
    out[f"input_adapters.{s}.embed.bias"] = hf["videomae.embeddings.patch_embeddings.projection.bias"].clone()
    out.update(blocks_from_hf(hf, "videomae.encoder.layer", "encoder.blocks", model.config.depth))
    if "videomae.layernorm.weight" in hf:
        out["encoder.norm.weight"] = hf["videomae.layernorm.weight"].clone()
        out["encoder.norm.bias"] = hf["videomae.layernorm.bias"].clone()
    if "encoder_to_decoder.weight" not in hf:  # an encoder-only VideoMAEModel
        return out
    for ours, theirs in _DECODER_RENAMES.items():
        out[f"decoders.{s}.{ours}"] = hf[theirs].clone()
    out.update(blocks_from_hf(hf, "decoder.decoder_layers", f"decoders.{s}.blocks", model.config.decoder_depth))
    return out


def blocks_from_hf(hf: dict, src: str, dst: str, depth: int) -> dict[str, Tensor]:
    out = {}
    for i in range(depth):
        s, d = f"{src}.{i}", f"{dst}.{i}"
        for ours, theirs in _BLOCK_RENAMES.items():
            out[f"{d}.{ours}"] = hf[f"{s}.{theirs}"].clone()
        weights = [hf[f"{s}.attention.attention.{n}.weight"] for n in ("query", "key", "value")]
        out[f"{d}.attn.qkv.weight"] = torch.cat(weights)
        biases = [hf.get(f"{s}.attention.attention.{n}.bias") for n in ("query", "key", "value")]
        out[f"{d}.attn.qkv.bias"] = torch.cat([b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype)
                                               for b, w in zip(biases, weights)])
    return out


def blocks_to_hf(ours: dict, src: str, dst: str, depth: int) -> dict[str, Tensor]:
    out = {}
    for i in range(depth):
        s, d = f"{src}.{i}", f"{dst}.{i}"
        for mine, theirs in _BLOCK_RENAMES.items():
            out[f"{d}.{theirs}"] = ours[f"{s}.{mine}"].clone()
        for name, part in zip(("query", "key", "value"), ours[f"{s}.attn.qkv.weight"].chunk(3)):
            out[f"{d}.attention.attention.{name}.weight"] = part.clone()
        q_bias, _, v_bias = ours[f"{s}.attn.qkv.bias"].chunk(3)  # the key bias: cancelled by softmax
        out[f"{d}.attention.attention.query.bias"] = q_bias.clone()
        out[f"{d}.attention.attention.value.bias"] = v_bias.clone()
    return out


def only_stream(model: MaskedAutoencoder) -> str:
    if len(model.streams) != 1:
        raise ConfigError(f"HF VideoMAE has one video stream; this model has {model.streams}")
    return model.streams[0]


def check_exportable(model: MaskedAutoencoder, modality) -> None:
    s = only_stream(model)
    if getattr(model.encoder, "cls_token", None) is not None:
        raise ConfigError("HF VideoMAE has no [cls] token; this model was built with model.cls_token=true")
    if modality.options.positions != "videomae":
        raise ConfigError("HF VideoMAE uses a fixed 1-D position table; this model was trained with 3-D sin-cos "
                         "positions and would change in export (train with modality_options.positions=videomae)")
    if model.decoders[s].embed.bias is not None:
        raise ConfigError("HF VideoMAE's encoder-to-decoder projection has no bias; this decoder's has one")


def to_hf_videomae(model: MaskedAutoencoder, modality) -> dict[str, Tensor]:
    """A polymae video MAE -> `VideoMAEForPreTraining` state dict."""
    check_exportable(model, modality)
    s = only_stream(model)
    o = modality.options
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    weight = ours[f"input_adapters.{s}.embed.weight"]
    out = {"videomae.embeddings.patch_embeddings.projection.weight":
           weight.reshape(weight.shape[0], o.tubelet_size, o.patch_size, o.patch_size, 3)
           .permute(0, 4, 1, 2, 3).contiguous(),
           "videomae.embeddings.patch_embeddings.projection.bias": ours[f"input_adapters.{s}.embed.bias"].clone(),
           "videomae.layernorm.weight": ours["encoder.norm.weight"].clone(),
           "videomae.layernorm.bias": ours["encoder.norm.bias"].clone()}
    out.update(blocks_to_hf(ours, "encoder.blocks", "videomae.encoder.layer", model.config.depth))
    for mine, theirs in _DECODER_RENAMES.items():
        out[theirs] = ours[f"decoders.{s}.{mine}"].clone()
    out.update(blocks_to_hf(ours, f"decoders.{s}.blocks", "decoder.decoder_layers", model.config.decoder_depth))
    return out


def mask_from_hf(bool_masked_pos: Tensor) -> Mask:
    """HF's boolean mask [B, N] (True = masked, the same count per row) -> the polymae Mask
    that hides the same tubelets (visible ones first in index order, as HF keeps them)."""
    counts = bool_masked_pos.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("HF VideoMAE needs the same number of masked tubelets in every row")
    return Mask.from_scores(bool_masked_pos.float(), int(counts[0]))


def load_hf_weights(model: MaskedAutoencoder, folder: str | Path, modality) -> None:
    """`model.init_from` a local VideoMAEForPreTraining (or VideoMAEModel) folder; the recipe must
    describe its architecture, else the ConfigError lists the settings that would."""
    import transformers

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    encoder_only = config.get("architectures") == ["VideoMAEModel"]
    cls = transformers.VideoMAEModel if encoder_only else transformers.VideoMAEForPreTraining
    try:
        hf = cls.from_pretrained(str(folder), local_files_only=True)
    except OSError as error:
        raise ConfigError(f"{folder}: cannot load its weights ({str(error).splitlines()[0]})") from None
    state = hf.state_dict()
    if encoder_only:
        state = {f"videomae.{k}": v for k, v in state.items()}
    options, want = parts_from_hf_config(hf.config)
    have, o = model.config, modality.options
    fields = ["width", "depth", "heads", "mlp_ratio", "cls_token"]
    if not encoder_only:
        fields += ["decoder_width", "decoder_depth", "decoder_heads", "decoder_mlp_ratio"]
    wrong = [f"model.{f}={getattr(want, f)}" for f in fields if getattr(want, f) != getattr(have, f)]
    wrong += [f"modality_options.{k}={v}" for k, v in options.items()
              if (tuple(o.image_size) != (v, v) if k == "image_size" else getattr(o, k) != v)]
    if hf.config.use_mean_pooling:
        wrong.append("(a checkpoint with use_mean_pooling=true has no final encoder LayerNorm, which polymae's "
                     "encoder always has: import it with hf_interop.from_hf_videomae instead)")
    if wrong:
        raise ConfigError(f"model.init_from {folder}: the checkpoint's architecture differs from the recipe's; "
                          f"set {', '.join(wrong)}")
    model.load_state_dict(state_dict_from_hf(state, model), strict=not encoder_only)


def save_hf_folder(model: MaskedAutoencoder, folder: str | Path, modality, *, encoder_only: bool = False,
                   **config_overrides) -> Path:
    """`model` as a Hugging Face folder (transformers' own save_pretrained layout) that
    `VideoMAEForPreTraining.from_pretrained` (or `VideoMAEModel`, with encoder_only) loads offline."""
    import transformers

    config = hf_config_for(model, modality, **config_overrides)
    hf = transformers.VideoMAEForPreTraining(config)
    hf.load_state_dict(to_hf_videomae(model, modality), strict=True)
    (hf.videomae if encoder_only else hf).save_pretrained(str(folder))
    return Path(folder)
