"""Generic maskers: random (MAE), block-wise (BEiT) and ColorMAE's filtered noise.

A masker is called on one stream of one sample (its Tokens) with a
`torch.Generator` and returns a `Mask` hiding exactly `hidden_count(N, ratio)`
of the real tokens (padding, `Tokens.valid` False, is never visible and
never hidden), or exactly `num_hidden` when the caller decides the count
(MultiMAE's shared visible budget, `split_visible_budget`). Each masker only
has to score tokens (higher = hide first); `Mask.from_scores` does the rest,
so every masker shares the exact-count guarantee and the `ids_restore`
idiom. Maskers run in the data workers; they are plain functions of
(tokens, rng).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError
from .registry import MASKERS
from .tokens import Mask, Tokens, hidden_count


class Masker:
    """Base class: subclasses implement `scores(tokens, generator) -> [N]`.

    `encoder_reads_hidden`: the encoder reads hidden tokens too, as the stream's mask
    token (BERT-style maskers), instead of never seeing them (MAE)."""

    encoder_reads_hidden = False
    # the modalities whose tokens carry what this masker reads (its own coordinates' meaning, fields
    # or ids); empty: any stream's tokens. Checked where a stream's masker is made.
    modalities: tuple[str, ...] = ()

    def __init__(self, ratio: float = 0.75):
        hidden_count(2, ratio)  # validates the ratio once, at construction
        self.ratio = ratio

    def scores(self, tokens: Tokens, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def __call__(self, tokens: Tokens, generator: torch.Generator, num_hidden: int | None = None) -> Mask:
        if num_hidden is None:
            num_hidden = hidden_count(tokens.num_real, self.ratio)
        return Mask.from_scores(self.scores(tokens, generator), num_hidden, tokens.valid, self.encoder_reads_hidden)

    def many(self, tokens: list[Tokens], generators: list[torch.Generator],
             num_hidden: list[int] | None = None) -> list[Mask]:
        """One mask per record of a group, each drawn from its own record's generator, exactly as
        `__call__` makes them one at a time (the data stream masks a whole batch at once).
        A masker whose per-record work is a few tiny ops (samples of tens of tokens, where each
        op's fixed cost is the whole cost) overrides it to work on the group at once."""
        counts = num_hidden if num_hidden is not None else [None] * len(tokens)
        return [self(t, g, c) for t, g, c in zip(tokens, generators, counts)]

    def stacked(self, tokens: list[Tokens], generators: list[torch.Generator],
                num_hidden: list[int] | None = None) -> Mask | None:
        """A one-stream batch's masks already stacked as `collate` stacks the records' own
        ([B, N_max]: padding never hidden, entering as itself, at its own index), or None: the
        stream then stacks what `many` makes. A masker that draws a batch at once overrides it
        to write the stacked arrays directly instead of a mask per record.

        Here: a masker that only scores (no `__call__` or `many` of its own), on records of one
        token count without padding (an image stream's fixed grid), has each record's scores
        drawn from its own generator as `__call__` draws them, then ranked in one batched
        `Mask.from_scores`: row for row the same stable sort, so the same masks, for a dozen
        torch calls per batch instead of per record."""
        cls = type(self)
        if cls.__call__ is not Masker.__call__ or cls.many is not Masker.many:
            return None
        n = tokens[0].num_tokens
        if any(t.valid is not None or t.num_tokens != n for t in tokens):
            return None
        counts = set(num_hidden) if num_hidden is not None else {hidden_count(n, self.ratio)}
        if len(counts) != 1:
            return None
        scores = torch.stack([self.scores(t, g) for t, g in zip(tokens, generators)])
        return Mask.from_scores(scores, counts.pop(), None, self.encoder_reads_hidden)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio})"


_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def counter_uniforms(seeds: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """Uniform float64s in [0, 1), one per (seed, counter) pair (uint64 arrays): the splitmix64 hash
    of the pair, counter-based as Random123 and JAX draw. A batch masker draws every record's
    numbers in one vectorised pass, each still a function of its record's own seed (its
    generator's `initial_seed()`, which the data stream sets per sample and epoch) and nothing
    else; one torch generator call per record cost more than the rest of a small sample's mask."""
    with np.errstate(over="ignore"):  # wrapping uint64 arithmetic is the hash
        z = seeds + (counters + np.uint64(1)) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / 2 ** 53)


def grid_2d(tokens: Tokens, masker: str) -> tuple[int, int]:
    if tokens.grid is None or len(tokens.grid) != 2:
        raise ValueError(f"the {masker} masker needs tokens on a 2D grid, got grid={tokens.grid}")
    return tokens.grid


@MASKERS.register("random")
class RandomMasker(Masker):
    """MAE: hide a uniformly random subset."""

    def scores(self, tokens, generator):
        return torch.rand(tokens.num_tokens, generator=generator)


@MASKERS.register("block")
class BlockMasker(Masker):
    """BEiT block-wise masking: add random rectangles (area >= min_block tokens,
    aspect ratio in [1/max_aspect, max_aspect]) until the ratio is reached;
    the exact count then comes from ranking block tokens first, at random
    within and outside the blocks."""

    def __init__(self, ratio: float = 0.4, min_block: int = 4, max_aspect: float = 3.0, max_attempts: int = 100):
        super().__init__(ratio)
        self.min_block, self.log_aspect, self.max_attempts = min_block, math.log(max_aspect), max_attempts

    def scores(self, tokens, generator):
        h, w = grid_2d(tokens, "block")
        target = hidden_count(h * w, self.ratio)
        in_block = torch.zeros(h, w, dtype=torch.bool)
        for _ in range(self.max_attempts):
            missing = target - int(in_block.sum())
            if missing <= 0:
                break
            u = torch.rand(3, generator=generator).tolist()
            area = self.min_block + u[0] * max(missing - self.min_block, 0)
            aspect = math.exp((2 * u[1] - 1) * self.log_aspect)
            bh = min(h, max(1, round(math.sqrt(area * aspect))))
            bw = min(w, max(1, round(math.sqrt(area / aspect))))
            top = int(torch.randint(0, h - bh + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - bw + 1, (1,), generator=generator))
            in_block[top:top + bh, left:left + bw] = True
        return in_block.flatten().float() + torch.rand(h * w, generator=generator)


# ColorMAE ------------------------------------------------------------------
# Binary masks made by filtering white noise. Filters act on the radial
# frequency f (cycles per token, 0 .. ~0.7); a Gaussian G(f; s) = exp(-f^2 / 2s^2).
LOW, HIGH = 0.06, 0.22  # the two corner frequencies (cycles per token)


def _gaussian(f: Tensor, s: float) -> Tensor:
    return torch.exp(-0.5 * (f / s) ** 2)


COLOUR_FILTERS = {
    "red": lambda f: _gaussian(f, LOW),                                # low-pass: blobs
    "blue": lambda f: 1 - _gaussian(f, HIGH),                          # high-pass: fine grain
    "green": lambda f: _gaussian(f, HIGH) - _gaussian(f, LOW),         # band-pass: mid-size clusters
    "purple": lambda f: 1 - (_gaussian(f, HIGH) - _gaussian(f, LOW)),  # band-stop: blobs + grain
}


def colour_noise_bank(colour: str, count: int = 8, size: int = 128, seed: int = 0) -> Tensor:
    """`count` square patterns of `size`^2 coloured noise, each zero-mean unit-variance."""
    if colour not in COLOUR_FILTERS:
        raise ValueError(f"unknown noise colour {colour!r}; one of {sorted(COLOUR_FILTERS)}")
    white = torch.randn(count, size, size, generator=torch.Generator().manual_seed(seed))
    fy = torch.fft.fftfreq(size).view(-1, 1)
    fx = torch.fft.rfftfreq(size).view(1, -1)
    response = COLOUR_FILTERS[colour](torch.sqrt(fx ** 2 + fy ** 2))
    noise = torch.fft.irfft2(torch.fft.rfft2(white) * response, s=(size, size))
    noise = noise - noise.mean(dim=(1, 2), keepdim=True)
    return noise / noise.std(dim=(1, 2), keepdim=True)


class ColourNoiseMasker(Masker):
    """ColorMAE: hide the tokens where a crop of precomputed coloured noise is highest.

    The bank is filtered once at construction and held in its four flips; each
    sample takes a random pattern in a random flip and a random crop of the
    token-grid size (one draw of three numbers), so a colour mask costs a crop
    and a sort, as random masking costs a sort.
    """

    def __init__(self, ratio: float = 0.75, *, colour: str, bank_count: int = 8, bank_size: int = 128,
                 seed: int = 0):
        super().__init__(ratio)
        if colour not in COLOUR_FILTERS:
            raise ValueError(f"noise colour must be one of {', '.join(COLOUR_FILTERS)}; got {colour!r}")
        self.colour = colour
        bank = colour_noise_bank(colour, bank_count, bank_size, seed)
        self.bank = torch.cat([bank, bank.flip(1), bank.flip(2), bank.flip(1, 2)])

    def scores(self, tokens, generator):
        h, w = grid_2d(tokens, f"{self.colour} noise")
        count, size, _ = self.bank.shape
        if h > size or w > size:
            raise ValueError(f"token grid {h}x{w} is larger than the {size}^2 noise bank; raise bank_size")
        pattern, top, left = (min(int(u * n), n - 1) for u, n in
                              zip(torch.rand(3, generator=generator).tolist(), (count, size - h + 1, size - w + 1)))
        return self.bank[pattern, top:top + h, left:left + w].reshape(-1)

    def __repr__(self) -> str:
        return f"ColourNoiseMasker(ratio={self.ratio}, colour={self.colour!r})"


# one class, registered per colour with the colour bound: every masker is an instance of a class
# the module names, so a stream holding one pickles to DataLoader workers that are spawned
# rather than forked (macOS, CUDA runs)
for _colour in COLOUR_FILTERS:
    MASKERS.register(_colour, functools.partial(ColourNoiseMasker, colour=_colour))


def build_masker(name: str, ratio: float, **options) -> Masker:
    try:
        return MASKERS.get(name)(ratio=ratio, **options)
    except TypeError as err:
        raise ConfigError(f"mask.options: masker {name!r}: {err}") from None


def split_visible_budget(real_tokens: list[int], visible: int, alpha: float,
                         generator: torch.Generator, sample_streams: bool = False) -> list[int]:
    """MultiMAE's shared token budget: `visible` encoder tokens split across streams by a
    Dirichlet(alpha) draw per sample -> how many tokens each stream hides.

    Shares are rounded by largest remainder so the visible counts add up to exactly
    `visible`; a stream cannot show more tokens than it has (nor fewer than none), and
    what it cannot take goes to the others in proportion. alpha=1 is MultiMAE's default
    (every split equally likely); large alpha tends to an even split.

    `sample_streams` (MultiMAE's uniform sampling of the tasks present): first a uniformly
    random non-empty subset of the streams that have tokens is drawn; the others show
    nothing (every token hidden: a target reconstructed from the rest) and the budget is
    split over the chosen ones, all of it when they hold that many tokens, else all they hold."""
    total = sum(real_tokens)
    if not 0 < visible <= total:
        raise ValueError(f"a visible budget of {visible} tokens does not fit samples of {total} real tokens")
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    rng = np.random.default_rng(seed)
    present = np.ones(len(real_tokens), dtype=bool)
    if sample_streams:
        candidates = [i for i, n in enumerate(real_tokens) if n > 0]
        choice = int(rng.integers(1, 2 ** len(candidates)))  # a non-empty subset, each equally likely
        present[:] = False
        present[[c for bit, c in enumerate(candidates) if choice >> bit & 1]] = True
        visible = min(visible, int(np.asarray(real_tokens)[present].sum()))
    shares = rng.dirichlet([alpha] * len(real_tokens)) * present
    capacity = np.where(present, np.asarray(real_tokens, dtype=np.float64), 0.0)
    counts = np.zeros(len(real_tokens), dtype=np.int64)
    left = visible
    while left > 0:  # pour the budget by share; full streams drop out and the rest share what is left
        open_ = counts < capacity
        weights = np.where(open_, shares, 0.0)
        weights = weights / weights.sum() if weights.sum() > 0 else open_ / open_.sum()
        ideal = np.minimum(weights * left, capacity - counts)
        whole = np.floor(ideal).astype(np.int64)
        remainder = left - int(whole.sum())
        order = np.argsort(-(ideal - whole), kind="stable")
        for i in order[:remainder]:
            if counts[i] + whole[i] < capacity[i]:
                whole[i] += 1
        if whole.sum() == 0:  # rounding left nothing: give one token to the open stream with the largest share
            whole[int(np.argmax(weights))] = 1
        counts += whole
        left = visible - int(counts.sum())
    return [int(n - c) for n, c in zip(real_tokens, counts)]
