"""The shared MaskedAutoencoder on real image tokens: shapes, the encoder seeing
visible tokens only, MAE's 2D sin-cos table, and key-padding masks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from polymae.modalities.image.hf_interop import image_mae
from polymae.modalities.image.tokenizer import grid_coords, patchify
from polymae.shared.masking import build_masker
from polymae.shared.model import ModelConfig
from polymae.shared.position import SinCosPosition, sincos_1d
from polymae.shared.objectives import PixelLoss, normalise_per_token
from polymae.shared.tokens import Batch, Mask, Tokens, collate

skimage_data = pytest.importorskip("skimage.data")


PATCH = 8
SMALL = ModelConfig(width=32, depth=2, heads=2, decoder_width=32, decoder_depth=2, decoder_heads=2)


@pytest.fixture(scope="module")
def batch():
    """Two real 64x96 photo crops (astronaut, coffee) as 8x12 tokens of 8x8x3, random-masked at 0.75."""
    images = [skimage_data.astronaut()[100:164, 150:246], skimage_data.coffee()[120:184, 200:296]]
    items = []
    for i, array in enumerate(images):
        image = torch.from_numpy(array).permute(2, 0, 1).float() / 255
        tokens = patchify(image, PATCH)
        mask = build_masker("random", 0.75)(tokens, torch.Generator().manual_seed(i))
        items.append(({"image": tokens}, {"image": mask}, None, f"img{i}"))
    return collate(items)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return image_mae(PATCH * PATCH * 3, (12, 8), SMALL).eval()


def as_batch(values, coords, mask, valid=None, grid=(8, 12)):
    """One image stream of these tokens under `mask`, as the model reads a batch."""
    return Batch(streams={"image": Tokens(values=values, coords=coords, valid=valid, grid=grid)}, mask=mask)


def run(model, values, coords, mask, valid=None):
    with torch.no_grad():
        return model(as_batch(values, coords, mask, valid))


def encode_all(model, values, coords, valid=None):
    """The encoder's output on every given token ([cls] + tokens), with `valid` as its key-padding mask."""
    with torch.no_grad():
        return model.encoder(model.input_adapters["image"](Tokens(values=values, coords=coords)), valid)[0]


def test_output_shapes(model, batch):
    values, coords, mask = batch.tokens.values, batch.tokens.coords, batch.mask
    out = run(model, values, coords, mask)
    b, n, d = values.shape
    assert (b, n, d) == (2, 96, 192)
    assert out.pred("image").shape == (b, n, d)
    assert mask.num_visible == 96 - 72
    # the encoder got [cls] + the visible tokens only
    assert out.latent.shape == (b, 1 + mask.num_visible, SMALL.width)
    assert torch.isfinite(out.pred("image")).all()


def test_no_cls_token(batch):
    torch.manual_seed(0)
    model = image_mae(192, (12, 8), ModelConfig(width=32, depth=1, heads=2, decoder_width=32, decoder_depth=1,
                                                decoder_heads=2, cls_token=False)).eval()
    out = run(model, batch.tokens.values, batch.tokens.coords, batch.mask)
    assert out.latent.shape == (2, batch.mask.num_visible, 32)
    assert out.pred("image").shape == (2, 96, 192)


def test_encoder_never_sees_hidden_tokens(model, batch):
    values, coords, mask = batch.tokens.values, batch.tokens.coords, batch.mask
    base = run(model, values, coords, mask)

    hidden_i = int(mask.ids_hidden[0, 0])
    changed = values.clone()
    changed[0, hidden_i] = torch.rand(values.shape[-1], generator=torch.Generator().manual_seed(1)) * 10 - 5
    changed[1, mask.ids_hidden[1]] = 0.0  # wipe every hidden token of the second sample
    out = run(model, changed, coords, mask)
    assert torch.equal(out.latent, base.latent)
    # the decoder only knows hidden places through mask tokens and positions, so predictions don't change either
    assert torch.equal(out.pred("image"), base.pred("image"))

    visible_i = int(mask.ids_keep[0, 3])
    changed = values.clone()
    changed[0, visible_i] += 0.5
    out = run(model, changed, coords, mask)
    assert not torch.allclose(out.latent[0], base.latent[0])
    assert torch.equal(out.latent[1], base.latent[1])  # samples don't mix
    assert not torch.allclose(out.pred("image")[0], base.pred("image")[0])


def test_visible_positions_matter(model, batch):
    """The encoder reads the visible tokens' coords: moving one visible token changes the latent."""
    values, coords, mask = batch.tokens.values, batch.tokens.coords, batch.mask
    base = run(model, values, coords, mask)
    moved = coords.clone()
    moved[0, int(mask.ids_keep[0, 0])] += torch.tensor([1.0, 0.0])
    assert not torch.allclose(run(model, values, moved, mask).latent[0], base.latent[0])


def test_latent_is_the_encoding_of_the_visible_tokens(model, batch):
    values, coords, mask = batch.tokens.values, batch.tokens.coords, batch.mask
    ids = mask.ids_keep
    visible = torch.gather(values, 1, ids.unsqueeze(-1).expand(-1, -1, values.shape[-1]))
    visible_coords = torch.gather(coords, 1, ids.unsqueeze(-1).expand(-1, -1, 2))
    latent = encode_all(model, visible, visible_coords)
    torch.testing.assert_close(run(model, values, coords, mask).latent, latent)


# -- 2D sin-cos position encoding --------------------------------------------------------

def mae_2d_sincos_reference(width: int, h: int, w: int) -> np.ndarray:
    """MAE's fixed 2D table for an h x w grid, tokens in row-major order, written from its definition:
    each coordinate gets width/2 channels, omega = 1 / 10000 ** (arange(width/4) / (width/4)),
    sin(pos * omega) then cos(pos * omega); the x (column) part comes first, then the y (row) part."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")

    def one(pos):
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([one(cols), one(rows)], axis=1)


@pytest.mark.parametrize("width,h,w", [(192, 14, 14), (64, 8, 12), (32, 5, 3)])
def test_sincos_2d_equals_mae_table(width, h, w):
    table = SinCosPosition(width, 2)(grid_coords(h, w))
    assert table.shape == (h * w, width) and table.dtype == torch.float32
    np.testing.assert_allclose(table.numpy(), mae_2d_sincos_reference(width, h, w), atol=1e-6, rtol=0)
    # spot values: the first channel is sin(x), the first y channel is sin(y)
    i = 2 * w + 1  # row 2, col 1
    assert table[i, 0] == pytest.approx(np.sin(1.0), abs=1e-6)
    assert table[i, width // 4] == pytest.approx(np.cos(1.0), abs=1e-6)
    assert table[i, width // 2] == pytest.approx(np.sin(2.0), abs=1e-6)


def test_sincos_reads_batched_coords_and_checks_width():
    coords = grid_coords(4, 6)
    table = SinCosPosition(64, 2)(coords)
    torch.testing.assert_close(SinCosPosition(64, 2)(torch.stack([coords, coords])), torch.stack([table, table]))
    torch.testing.assert_close(sincos_1d(torch.arange(5.0), 8)[:, :4], torch.sin(torch.arange(5.0)[:, None]
                               * (1 / 10000 ** (torch.arange(4) / 4.0))))
    with pytest.raises(ValueError, match="even parts"):
        SinCosPosition(30, 2)
    with pytest.raises(ValueError, match="even"):
        sincos_1d(torch.arange(3.0), 7)


def test_model_adds_the_sincos_table_to_the_embedding(batch):
    torch.manual_seed(0)
    model = image_mae(192, (12, 8), SMALL)
    values, coords = batch.tokens.values[0], batch.tokens.coords[0]
    adapter = model.input_adapters["image"]
    with torch.no_grad():
        got = adapter(Tokens(values=values, coords=coords))
        expected = adapter.embed(values) + torch.from_numpy(mae_2d_sincos_reference(32, 8, 12)).float()
    torch.testing.assert_close(got, expected)


# -- key padding --------------------------------------------------------------------------

def test_padding_tokens_do_not_influence_valid_tokens(model, batch):
    values, coords = batch.tokens.values[:1], batch.tokens.coords[:1]
    n_valid, n_pad = 60, 36
    real_values, real_coords = values[:, :n_valid], coords[:, :n_valid]

    def padded(fill):
        g = torch.Generator().manual_seed(fill)
        pad_values = torch.randn(1, n_pad, values.shape[-1], generator=g) * 3
        pad_coords = torch.randint(0, 50, (1, n_pad, 2), generator=g).float()
        return torch.cat([real_values, pad_values], 1), torch.cat([real_coords, pad_coords], 1)

    valid = torch.cat([torch.ones(1, n_valid, dtype=torch.bool), torch.zeros(1, n_pad, dtype=torch.bool)], 1)
    alone = encode_all(model, real_values, real_coords)                  # no padding at all
    v1, c1 = padded(1)
    v2, c2 = padded(2)
    with_pad_1 = encode_all(model, v1, c1, valid)
    with_pad_2 = encode_all(model, v2, c2, valid)
    unmasked = encode_all(model, v1, c1)                                 # padding left visible to attention
    keep = slice(0, 1 + n_valid)  # cls + valid tokens
    torch.testing.assert_close(with_pad_1[:, keep], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_pad_2[:, keep], with_pad_1[:, keep], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked[:, keep], alone, atol=1e-3)  # the check is sensitive


def test_padding_in_the_full_forward(model, batch):
    """Through forward (encoder on visible tokens, decoder on all): padding content changes no valid output.
    The second sample has 70 real tokens, padded to the batch's 96: its mask (made on its real tokens)
    has fewer encoder inputs, so its spare `ids_keep` slots are marked by `keep_valid`."""
    values, coords = batch.tokens.values, batch.tokens.coords
    short = Tokens(values=values[1, :70], coords=coords[1, :70])
    masker = build_masker("random", 0.75)
    items = [({"image": Tokens(values=values[0], coords=coords[0])},
              {"image": masker(Tokens(values=values[0], coords=coords[0]), torch.Generator().manual_seed(0))},
              None, "full"),
             ({"image": short}, {"image": masker(short, torch.Generator().manual_seed(1))}, None, "short")]
    padded = collate(items)
    mask, valid = padded.mask, padded.tokens.valid
    assert valid[0].all() and valid[1].sum() == 70
    assert mask.keep_valid is not None and mask.keep_valid[1].sum() < mask.keep_valid[0].sum()
    assert not (~valid[1])[mask.ids_keep[1][mask.keep_valid[1]]].any()  # padding is never visible
    values, coords = padded.tokens.values.clone(), padded.tokens.coords.clone()

    base = run(model, values, coords, mask, valid)
    values[1, 70:] = torch.randn(26, 192, generator=torch.Generator().manual_seed(3)) * 4
    coords[1, 70:] = 99.0
    out = run(model, values, coords, mask, valid)
    latent_keep = torch.cat([torch.ones(2, 1, dtype=torch.bool), mask.keep_valid], 1)
    torch.testing.assert_close(out.latent[latent_keep], base.latent[latent_keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pred("image")[valid], base.pred("image")[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pred("image")[0], base.pred("image")[0])  # the unpadded sample is untouched


def test_features_pool_over_valid_tokens(model, batch):
    values, coords = batch.tokens.values, batch.tokens.coords
    feats = model.features(as_batch(values, coords, batch.mask))
    assert feats.shape == (2, SMALL.width)
    valid = torch.ones(2, 96, dtype=torch.bool)
    valid[1, 50:] = False
    padded = values.clone()
    padded[1, 50:] = 7.0
    got = model.features(as_batch(padded, coords, batch.mask, valid))
    alone = model.features(as_batch(values[1:, :50], coords[1:, :50], batch.mask))
    torch.testing.assert_close(got[1], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], feats[0])


def test_gradients_reach_encoder_and_decoder(batch):
    torch.manual_seed(0)
    model = image_mae(192, (12, 8), SMALL)
    out = model(batch)
    loss = (out.pred("image") - batch.tokens.values).pow(2)[batch.mask.hidden].mean()
    loss.backward()
    for name in ("input_adapters.image.embed.weight", "encoder.blocks.0.attn.qkv.weight", "encoder.cls_token",
                 "decoders.image.mask_token", "decoders.image.head.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_learned_position_on_a_square_grid(batch):
    """A learned table gives every patch of a square grid its own row."""
    torch.manual_seed(0)
    model = image_mae(192, (8, 8), ModelConfig(width=32, depth=1, heads=2, decoder_width=32, decoder_depth=1,
                                               decoder_heads=2, position="learned")).eval()
    square = patchify(batch.tokens.values.new_zeros(3, 64, 64), PATCH)  # an 8x8 grid
    one = build_masker("random", 0.75)(square, torch.Generator().manual_seed(0))
    mask = collate([({"image": square}, {"image": one}, None, key) for key in "ab"]).mask
    with torch.no_grad():
        out = model(as_batch(batch.tokens.values[:, :64], grid_coords(8, 8).expand(2, 64, 2), mask, grid=(8, 8)))
    assert out.pred("image").shape == (2, 64, 192)
    rows = model.input_adapters["image"].position(grid_coords(8, 8))
    assert torch.unique(rows, dim=0).shape[0] == 64


def test_learned_position_on_a_non_square_grid(batch):
    """An 8x12 token grid: coords (x, y) run over (12, 8), the model's grid; every token owns one table row."""
    torch.manual_seed(0)
    model = image_mae(192, (12, 8), ModelConfig(width=32, depth=1, heads=2, decoder_width=32, decoder_depth=1,
                                                decoder_heads=2, position="learned")).eval()
    out = run(model, batch.tokens.values, batch.tokens.coords, batch.mask)
    assert out.pred("image").shape == (2, 96, 192)
    position = model.input_adapters["image"].position
    rows = (batch.tokens.coords[0].round().long() * position.strides).sum(-1)
    assert sorted(rows.tolist()) == list(range(96))


def with_decode(mask, decode):
    import dataclasses
    return dataclasses.replace(mask, decode=decode)


def test_a_decode_subset_decoder_reads_only_visible_and_decoded_tokens(model, batch):
    """Under a decode subset (VideoMAE V2's decoder masking) the transformer decoder's prediction
    at each decoded place is what the full decoder predicts for a sample made of exactly the
    visible and decoded tokens (the other hidden tokens removed); zeros at every other place.
    Rows decode different counts, so the shorter one is padded inside the decoder."""
    values, coords, mask = batch.tokens.values, batch.tokens.coords, batch.mask
    decode = torch.zeros_like(mask.hidden)
    for row, count in enumerate((30, 17)):
        chosen = torch.randperm(int(mask.hidden[row].sum()), generator=torch.Generator().manual_seed(row))[:count]
        decode[row, mask.ids_hidden[row][chosen]] = True
    subset = run(model, values, coords, with_decode(mask, decode)).pred("image")
    assert bool((subset[~decode] == 0).all()) and bool((subset[decode] != 0).all())
    for row in range(2):
        kept = torch.cat([mask.ids_keep[row], decode[row].nonzero().flatten()])
        order = torch.arange(len(kept))
        alone = Mask(hidden=order[None] >= mask.num_visible, ids_shuffle=order[None], ids_restore=order[None],
                     num_visible=mask.num_visible)   # the visible tokens in the same encoder order
        reference = run(model, values[row:row + 1, kept], coords[row:row + 1, kept], alone).pred("image")[0]
        torch.testing.assert_close(subset[row, kept[mask.num_visible:]], reference[mask.num_visible:],
                                   rtol=1e-5, atol=1e-5)


def test_without_a_decode_subset_the_loss_is_the_full_decoders(model, batch):
    """No decode subset: every hidden token is predicted by the decoder over all tokens, and the
    pixel loss is the mean over hidden tokens of that prediction's error; naming every hidden
    token as decoded goes through the subset path and gives the same loss."""
    values, coords, mask = batch.tokens.values, batch.tokens.coords, batch.mask
    term = PixelLoss("image", norm_pix=True)
    full_batch, every_batch = as_batch(values, coords, mask), as_batch(values, coords, with_decode(mask, mask.hidden))
    with torch.no_grad():
        full, every = model(full_batch), model(every_batch)
    by_hand = (full.pred("image") - normalise_per_token(values)).pow(2).mean(-1)[mask.hidden].mean()
    torch.testing.assert_close(term(full, full_batch), by_hand)
    torch.testing.assert_close(term(every, every_batch), term(full, full_batch), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(every.pred("image")[mask.hidden], full.pred("image")[mask.hidden],
                               rtol=1e-5, atol=1e-5)
