"""Maskers: exact counts, the one mask convention, the argsort idiom, seeding,
and the spatial character of block and ColorMAE masks (measured, not assumed).

Tokens come from a real photo (scikit-image's astronaut) patchified on a
14x14 grid (ViT-B/16 at 224px) and on a non-square 8x12 grid.
"""
from __future__ import annotations

import copy
import functools
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import polymae.modalities  # noqa: F401  (registers every installed modality and its maskers)
from polymae.modalities.image.tokenizer import grid_coords, patchify
from polymae.shared.masking import COLOUR_FILTERS, build_masker, colour_noise_bank
from polymae.shared.registry import MASKERS
from polymae.shared.tokens import AS_ITSELF, Mask, Tokens, hidden_count

skimage_data = pytest.importorskip("skimage.data")


MASKER_NAMES = MASKERS.names()
GENERIC_MASKERS = {"random", "block", "red", "blue", "green", "purple"}  # shared/masking.py
GRIDS = [(14, 14), (8, 12)]
RATIOS = [0.4, 0.75, 0.9]
PATCH = 16


@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    """uint8 [3, 512, 512] -> float in [0, 1]."""
    return torch.from_numpy(skimage_data.astronaut()).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def image_tokens(astronaut) -> dict[tuple[int, int], Tokens]:
    out = {}
    for h, w in GRIDS:
        crop = astronaut[:, 40:40 + h * PATCH, 100:100 + w * PATCH]  # a real crop: face and helmet
        out[(h, w)] = patchify(crop, PATCH)
    return out


def blank_tokens(h: int, w: int) -> Tokens:
    """Maskers read only the grid; for the large-grid statistics the values do not matter."""
    return Tokens(values=torch.zeros(h * w, 1), coords=grid_coords(h, w), grid=(h, w))


@functools.cache
def cached_masker(name: str, ratio: float):
    """Maskers are plain functions of (tokens, rng) and `ratio`; a colour masker's bank costs an FFT to
    build, so each masker is built once and copied for the other ratios (sharing its bank)."""
    if ratio == 0.75 or name not in COLOUR_FILTERS:
        return build_masker(name, ratio)
    masker = copy.copy(cached_masker(name, 0.75))
    masker.ratio = ratio
    return masker


def make(name: str, ratio: float, tokens: Tokens):
    """The masker `name` at `ratio`, checked to apply to `tokens`.

    The generic maskers must work on any 2D token grid. A modality's own masker
    (registered by importing polymae.modalities) may need more than image
    tokens carry (a 3D grid, occupancy, ...), or facts only its modality gives
    when it builds it (`Modality.masker`: a tokenizer's mask id); if it says so
    with a ValueError, as maskers do, it is skipped here: its modality's tests cover it."""
    try:
        masker = cached_masker(name, ratio)
        masker(tokens, torch.Generator().manual_seed(0))
    except ValueError as err:
        if name in GENERIC_MASKERS:
            raise
        pytest.skip(f"masker {name!r} does not apply to 2D image tokens: {err}")
    return masker


def masks_of(name: str, ratio: float, tokens: Tokens, seeds) -> torch.Tensor:
    masker = cached_masker(name, ratio)
    h, w = tokens.grid
    return torch.stack([masker(tokens, torch.Generator().manual_seed(s)).hidden.view(h, w) for s in seeds])


def same_neighbour_fraction(on: torch.Tensor) -> float:
    """on [K, H, W] bool: of all in-grid 4-neighbours of `on` cells, the fraction that are also `on`.

    For a mask that picks a fraction r of cells at random this is ~r; clustered
    masks score higher, anti-clustered ones lower.
    """
    on = on.float()
    pairs = [(on[:, :, 1:], on[:, :, :-1]), (on[:, 1:, :], on[:, :-1, :])]  # horizontal and vertical edges
    both = sum(float((a * b).sum()) for a, b in pairs)            # edges with both ends on
    ends = sum(float((a + b).sum()) for a, b in pairs)            # (on cell, neighbour) pairs
    return 2 * both / ends


# Radial power spectrum, in bands of radial frequency f (cycles per token).
LOW_BAND, MID_BAND, HIGH_BAND = (0.0, 0.05), (0.10, 0.20), (0.40, 0.50)


def band_powers(fields: torch.Tensor) -> dict[str, float]:
    """fields [K, S, S]: mean power per band of the zero-mean fields, relative to
    the mean power over 0 < f < 0.5 (a white field scores ~1 in every band)."""
    x = fields.float() - fields.float().mean(dim=(-2, -1), keepdim=True)
    size = x.shape[-1]
    power = torch.fft.fft2(x).abs().pow(2).mean(0)
    freq = torch.fft.fftfreq(size)
    f = torch.sqrt(freq.view(-1, 1) ** 2 + freq.view(1, -1) ** 2)
    overall = power[(f > 0) & (f < 0.5)].mean()

    def band(lo, hi):
        return float(power[(f >= lo) & (f < hi) & (f > 0)].mean() / overall)

    return {"low": band(*LOW_BAND), "mid": band(*MID_BAND), "high": band(*HIGH_BAND)}


# -- every masker: count, polarity, argsort idiom, seeding ---------------------

@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", MASKER_NAMES)
def test_masker_contract(name, ratio, grid, image_tokens):
    tokens = image_tokens[grid]
    n = tokens.num_tokens
    masker = make(name, ratio, tokens)
    mask = masker(tokens, torch.Generator().manual_seed(1234))
    expected_hidden = int(round(ratio * n))

    # exact count, the same for every sample
    assert mask.hidden.shape == (n,) and mask.hidden.dtype == torch.bool
    assert int(mask.hidden.sum()) == expected_hidden
    if masker.encoder_reads_hidden:  # BERT-style (GraphMAE): every token enters the encoder, hidden ones corrupted
        assert mask.num_visible == n and torch.equal(mask.ids_keep, torch.arange(n))
        assert mask.substitute is not None and bool((mask.substitute[mask.hidden] != AS_ITSELF).all())
    else:
        assert mask.num_visible == n - expected_hidden
        assert mask.ids_keep.shape == (n - expected_hidden,) and mask.ids_hidden.shape == (expected_hidden,)
        # polarity: True = hidden
        assert bool(mask.hidden[mask.ids_hidden].all())
        assert not bool(mask.hidden[mask.ids_keep].any())

    # ids_shuffle is a permutation and ids_restore is its inverse
    assert torch.equal(torch.sort(mask.ids_shuffle).values, torch.arange(n))
    assert torch.equal(mask.ids_shuffle[mask.ids_restore], torch.arange(n))
    shuffled = tokens.values[mask.ids_shuffle]
    restored = torch.gather(shuffled, 0, mask.ids_restore.unsqueeze(-1).expand_as(shuffled))
    assert torch.equal(restored, tokens.values)
    if masker.encoder_reads_hidden:
        return
    # and in MAE's batched form: encoder part + mask tokens, unshuffled
    visible = tokens.values[mask.ids_keep]
    filler = torch.full((expected_hidden, tokens.values.shape[-1]), -7.0)
    decoder_in = torch.gather(torch.cat([visible, filler])[None], 1,
                              mask.ids_restore[None, :, None].expand(1, n, tokens.values.shape[-1]))[0]
    assert torch.equal(decoder_in[~mask.hidden], tokens.values[~mask.hidden])
    assert bool((decoder_in[mask.hidden] == -7.0).all())


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("name", MASKER_NAMES)
def test_masker_seeding(name, grid, image_tokens):
    tokens = image_tokens[grid]
    masker = make(name, 0.75, tokens)
    first = masker(tokens, torch.Generator().manual_seed(7))
    again = masker(tokens, torch.Generator().manual_seed(7))
    other = masker(tokens, torch.Generator().manual_seed(8))
    assert torch.equal(first.hidden, again.hidden)
    assert torch.equal(first.ids_shuffle, again.ids_shuffle)
    assert not torch.equal(first.hidden, other.hidden)
    # a fresh masker object (as in another data worker) gives the same mask for the same seed, and so
    # does a pickled copy (as a data worker that is spawned, not forked, receives it)
    assert torch.equal(build_masker(name, 0.75)(tokens, torch.Generator().manual_seed(7)).hidden, first.hidden)
    shipped = pickle.loads(pickle.dumps(masker))
    assert torch.equal(shipped(tokens, torch.Generator().manual_seed(7)).ids_shuffle, first.ids_shuffle)


@pytest.mark.parametrize("name", MASKER_NAMES)
def test_masker_keeps_one_visible_token(name):
    tokens = blank_tokens(2, 2)
    masker = make(name, 0.9, tokens)  # round(0.9 * 4) = 4 would hide everything
    mask = masker(tokens, torch.Generator().manual_seed(0))
    assert int(mask.hidden.sum()) == 3 and mask.num_visible == (4 if masker.encoder_reads_hidden else 1)


@pytest.mark.parametrize("name", MASKER_NAMES)
def test_masker_rejects_bad_ratio(name):
    if name not in GENERIC_MASKERS:
        try:
            build_masker(name, 0.5)
        except ValueError as err:
            pytest.skip(f"masker {name!r} is built by its modality (Modality.masker), not from a ratio alone: {err}")
    for ratio in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            build_masker(name, ratio)


# -- Mask.from_scores and hidden_count --------------------------------------------

def test_from_scores_hides_highest_scores():
    scores = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.7])
    mask = Mask.from_scores(scores, 2)
    assert mask.hidden.tolist() == [False, True, False, False, True]
    assert set(mask.ids_hidden.tolist()) == {1, 4} and set(mask.ids_keep.tolist()) == {0, 2, 3}
    batched = Mask.from_scores(torch.stack([scores, -scores]), 2)
    assert batched.hidden.tolist() == [[False, True, False, False, True], [True, False, True, False, False]]
    assert torch.equal(torch.gather(batched.ids_shuffle, 1, batched.ids_restore), torch.arange(5).expand(2, 5))


def test_from_scores_edges_and_impossible_counts():
    scores = torch.rand(6, generator=torch.Generator().manual_seed(0))
    assert not bool(Mask.from_scores(scores, 0).hidden.any())
    assert bool(Mask.from_scores(scores, 6).hidden.all())
    for bad in (-1, 7, 100):
        with pytest.raises(ValueError, match=f"cannot hide {bad} of 6"):
            Mask.from_scores(scores, bad)


def test_hidden_count():
    assert hidden_count(196, 0.75) == 147
    assert hidden_count(196, 0.4) == round(0.4 * 196) == 78
    assert hidden_count(96, 0.9) == 86
    assert hidden_count(196, 0.0) == 0
    # at least one token stays visible, however high the ratio and however few the tokens
    for n in (1, 2, 3, 4, 10, 196):
        for ratio in (0.5, 0.9, 0.99, 0.999999):
            k = hidden_count(n, ratio)
            assert 0 <= k <= n - 1
            assert k == min(round(ratio * n), n - 1)
    for bad in (1.0, -0.01, 2.0):
        with pytest.raises(ValueError, match="ratio"):
            hidden_count(10, bad)


# -- block masking: rectangles cluster --------------------------------------------

@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_block_masks_are_clustered(grid):
    # measured: block ~0.83 (14x14) / ~0.78 (8x12) hidden-neighbour fraction vs random ~0.40 at ratio 0.4
    tokens = blank_tokens(*grid)
    block = same_neighbour_fraction(masks_of("block", 0.4, tokens, range(24)))
    random = same_neighbour_fraction(masks_of("random", 0.4, tokens, range(24)))
    assert abs(random - 0.4) < 0.05
    assert block > random + 0.2


def test_block_mask_covers_rectangles():
    """Each hidden token at ratio 0.4 on 14x14 sits in a hidden 2x2 square far more often than at random."""
    tokens = blank_tokens(14, 14)

    def in_square(masks):
        m = masks.float()[:, None]
        squares = F.avg_pool2d(m, 2, stride=1).eq(1).float()  # [K, 1, 13, 13]: 2x2 square at (r, c) all hidden
        full = F.max_pool2d(squares, 2, stride=1, padding=1)[:, 0]  # [K, 14, 14]: cell lies in such a square
        return float((full * masks.float()).sum() / masks.float().sum())

    block = in_square(masks_of("block", 0.4, tokens, range(24)))
    random = in_square(masks_of("random", 0.4, tokens, range(24)))
    assert block > 2 * random


# -- ColorMAE: the spectra of the noise bank and of the binary masks ----------------

BIG = 64  # token grid for mask statistics


@pytest.fixture(scope="module")
def colour_masks() -> dict[str, torch.Tensor]:
    tokens = blank_tokens(BIG, BIG)
    return {name: masks_of(name, 0.75, tokens, range(16)) for name in ["random", *COLOUR_FILTERS]}


def test_colour_filters_cover_the_four_colours():
    assert set(COLOUR_FILTERS) == {"red", "blue", "green", "purple"}
    assert GENERIC_MASKERS <= set(MASKER_NAMES)
    with pytest.raises(ValueError, match="unknown noise colour"):
        colour_noise_bank("orange")


@pytest.mark.parametrize("colour", sorted(COLOUR_FILTERS))
def test_noise_bank_is_normalised_and_deterministic(colour):
    bank = colour_noise_bank(colour, count=4, size=64)
    assert bank.shape == (4, 64, 64)
    assert torch.allclose(bank.mean(dim=(1, 2)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(bank.std(dim=(1, 2)), torch.ones(4), atol=1e-5)
    assert torch.equal(bank, colour_noise_bank(colour, count=4, size=64))
    assert not torch.equal(bank, colour_noise_bank(colour, count=4, size=64, seed=1))


def test_noise_bank_spectra():
    # measured (bands low 0-0.05, mid 0.1-0.2, high 0.4-0.5 cycles/token, relative to the mean):
    #   red    low ~7.7   mid ~0.1   high ~0
    #   blue   low ~0.001 mid ~0.16  high ~2.4
    #   green  low ~0.13  mid ~2.5   high ~0.08
    #   purple low ~1.8   mid ~0.19  high ~1.8
    p = {c: band_powers(colour_noise_bank(c)) for c in COLOUR_FILTERS}
    red, blue, green, purple = p["red"], p["blue"], p["green"], p["purple"]
    assert red["low"] > 3 and red["low"] > 100 * red["high"] and red["low"] > 10 * red["mid"], red
    assert blue["high"] > 1.5 and blue["high"] > 100 * blue["low"] and blue["high"] > 5 * blue["mid"], blue
    assert green["mid"] > 1.5 and green["mid"] > 5 * green["low"] and green["mid"] > 5 * green["high"], green
    assert purple["low"] > 4 * purple["mid"] and purple["high"] > 4 * purple["mid"], purple
    # green's peak is strictly inside the spectrum, away from both ends
    x = colour_noise_bank("green", size=128)
    power = torch.fft.fft2(x).abs().pow(2).mean(0)
    freq = torch.fft.fftfreq(128)
    f = torch.sqrt(freq.view(-1, 1) ** 2 + freq.view(1, -1) ** 2)
    edges = torch.linspace(0, 0.5, 26)
    radial = torch.stack([power[(f >= lo) & (f < hi)].mean() for lo, hi in zip(edges[:-1], edges[1:])])
    peak = float(edges[int(radial.argmax())] + 0.01)
    assert 0.06 < peak < 0.25


def test_random_mask_spectrum_is_flat(colour_masks):
    # the measuring stick itself: random (white) masks have the same power in every band
    p = band_powers(colour_masks["random"])
    assert all(0.85 < v < 1.15 for v in p.values()), p


def test_colour_mask_spectra(colour_masks):
    # measured on binary masks at ratio 0.75 on a 64x64 token grid (16 masks):
    #   red    low ~6.6  mid ~0.36 high ~0.02
    #   blue   low ~0.68 mid ~0.67 high ~1.5
    #   green  low ~0.63 mid ~1.9  high ~0.32
    #   purple low ~1.39 mid ~0.63 high ~1.34
    p = {c: band_powers(colour_masks[c]) for c in COLOUR_FILTERS}
    red, blue, green, purple = p["red"], p["blue"], p["green"], p["purple"]
    assert red["low"] > 3 and red["low"] > 5 * red["mid"] and red["low"] > 50 * red["high"], red
    assert blue["high"] > 1.2 and blue["high"] > 1.5 * blue["low"] and blue["high"] > 1.5 * blue["mid"], blue
    assert green["mid"] > 1.3 and green["mid"] > 2 * green["low"] and green["mid"] > 3 * green["high"], green
    assert purple["low"] > 1.4 * purple["mid"] and purple["high"] > 1.4 * purple["mid"], purple


def test_colour_masks_cluster_red_and_spread_blue(colour_masks):
    # measured at ratio 0.75, 64x64: hidden-hidden neighbour fraction random ~0.75, red ~0.96, blue ~0.72;
    # visible-visible: random ~0.25, red ~0.87, blue ~0.15
    hidden = {c: same_neighbour_fraction(m) for c, m in colour_masks.items()}
    visible = {c: same_neighbour_fraction(~m) for c, m in colour_masks.items()}
    assert abs(hidden["random"] - 0.75) < 0.02 and abs(visible["random"] - 0.25) < 0.03
    assert hidden["red"] > hidden["random"] + 0.12
    assert visible["red"] > 2 * visible["random"]
    assert hidden["blue"] < hidden["random"] - 0.01
    assert visible["blue"] < 0.8 * visible["random"]
    # green (mid-size clusters) lies between random and red
    assert hidden["random"] + 0.04 < hidden["green"] < hidden["red"] - 0.04


def test_colour_masker_rejects_a_grid_larger_than_its_bank():
    with pytest.raises(ValueError, match="bank"):
        build_masker("red", 0.75, bank_size=32)(blank_tokens(40, 40), torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["block", *sorted(COLOUR_FILTERS)])
def test_structured_maskers_need_a_2d_grid(name):
    flat = Tokens(values=torch.zeros(10, 3), coords=torch.arange(10.0)[:, None])
    with pytest.raises(ValueError, match="2D grid"):
        cached_masker(name, 0.5)(flat, torch.Generator().manual_seed(0))


def test_unknown_masker_names_the_known_ones():
    with pytest.raises(KeyError, match="random"):
        build_masker("nope", 0.5)
    with pytest.raises(ValueError, match="masker 'random'"):
        build_masker("random", 0.5, bogus_option=1)


def test_masks_of_real_digits_images_batch_densely():
    """Masks from every masker on real 8x8 digits (patch 2 -> 4x4 grid) hide the same count, so they stack."""
    from sklearn.datasets import load_digits

    from polymae.shared.tokens import collate

    images = torch.from_numpy(load_digits().images[:6]).float()[:, None]
    items = []
    for i, name in enumerate(sorted(GENERIC_MASKERS)):
        tokens = patchify(images[i % 6], 2)
        mask = cached_masker(name, 0.75)(tokens, torch.Generator().manual_seed(i))
        items.append(({"image": tokens}, {"image": mask}, i, f"d{i}"))
    batch = collate(items)
    assert batch.mask.hidden.shape == (len(items), 16)
    assert batch.mask.hidden.sum(1).tolist() == [12] * len(items)
    np.testing.assert_array_equal(batch.tokens.values[0].numpy(), patchify(images[0], 2).values.numpy())


@pytest.mark.parametrize("name", MASKER_NAMES)
def test_a_batch_masked_at_once_is_each_sample_masked_alone(name, image_tokens):
    """The data stream masks a one-stream batch in one `Masker.stacked` call. For a masker that
    only scores, on real photo patches of one grid, that must be bit for bit what collating
    each sample's own mask gives, at any batch size; maskers with their own batching (or none)
    are checked by their modality's tests."""
    from polymae.shared.tokens import collate

    tokens = image_tokens[(8, 12)]
    masker = make(name, 0.75, tokens)
    for size in (1, 5, 16):
        seeds = [100 + 3 * i for i in range(size)]
        stacked = masker.stacked([tokens] * size, [torch.Generator().manual_seed(s) for s in seeds])
        if stacked is None:
            assert name not in GENERIC_MASKERS  # shared/masking.py's maskers only score: they all batch
            pytest.skip(f"{name} batches its own way or not at all")
        alone = collate([({"image": tokens}, {"image": masker(tokens, torch.Generator().manual_seed(s))}, None, str(s))
                         for s in seeds])
        together = collate([({"image": tokens}, None, None, str(s)) for s in seeds], mask=stacked)
        for part in ("hidden", "ids_shuffle", "ids_restore", "keep_valid", "decode", "substitute"):
            a, b = getattr(alone.mask, part), getattr(together.mask, part)
            assert (a is None and b is None) or torch.equal(a, b), (part, size)
        assert alone.mask.num_visible == together.mask.num_visible
        if size > 1:
            assert not torch.equal(together.mask.hidden[0], together.mask.hidden[1])  # each sample its own draw
