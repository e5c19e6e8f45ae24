"""Maskers over sub-words: BERT, whole-word, span (SpanBERT) and MEAP's input masking.

Every one is "scores, then keep the lowest" (shared/masking.py) over the
maskable tokens: special tokens ([CLS], [SEP]) score -inf, so they are never
hidden, and the count is `round(ratio * maskable)` (at least one), as BERT's
data collator counts. The encoder reads every token (BERT-style streams,
`encoder_reads_hidden`): a hidden token enters as what `Mask.substitute`
names: BERT's 80% [MASK], 10% a random sub-word, 10% itself.

`mask_id`, `vocab_size` and `first_regular_id` (the random replacements are
drawn from regular sub-words only) come from the stream's tokenizer: the
text modality builds its maskers with them (`TextModality.masker`).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from polymae.shared.masking import Masker, counter_uniforms
from polymae.shared.registry import MASKERS
from polymae.shared.tokens import AS_ITSELF, Mask, Tokens

# the substitute draws' counters sit far above any position's, so the two never share a draw
SUBSTITUTE_COUNTERS = np.uint64(1 << 32)


class SubwordMasker(Masker):
    modalities = ("text",)
    """Base of the text maskers: exact counts over maskable tokens, BERT's substitutions.

    A masker whose scores are plain uniform noise (`uniform_scores`: BERT, MEAP) takes a
    fast path for texts without padding, alone or a whole batch at once (`stacked`): one
    counter-based float64 draw per position ranks the maskable ones (the lowest `num_hidden`
    are hidden: the same uniform choice of a subset the scores give) and one more picks a
    hidden one's substitute; numpy over the batch, where a torch call per text costs
    several microseconds each."""

    encoder_reads_hidden = True
    uniform_scores = False  # scores() is i.i.d. uniform noise: the fast path draws the same choice

    def __init__(self, ratio: float = 0.15, *, mask_id: int, vocab_size: int, first_regular_id: int = 0,
                 mask_share: float = 0.8, random_share: float = 0.1):
        super().__init__(ratio)
        if not (0 <= mask_share and 0 <= random_share and mask_share + random_share <= 1):
            raise ValueError(f"mask_share ({mask_share}) + random_share ({random_share}) must lie in [0, 1]")
        self.mask_id, self.vocab_size, self.first_regular_id = mask_id, vocab_size, first_regular_id
        self.mask_share, self.random_share = mask_share, random_share

    @staticmethod
    def maskable(tokens: Tokens) -> Tensor:
        special = tokens.fields.get("special")
        maskable = torch.ones(tokens.num_tokens, dtype=torch.bool) if special is None else ~special
        return maskable if tokens.valid is None else maskable & tokens.valid

    def count(self, maskable, num_hidden=None):
        """How many of `maskable` sub-words to hide: round(ratio x maskable), at least one, as
        BERT's data collator counts (or the caller's `num_hidden`, at most `maskable`). Ints,
        or numpy arrays of them (a batch's rows)."""
        if num_hidden is None:
            num_hidden = np.where(maskable > 0, np.maximum(1, np.rint(self.ratio * maskable)), 0)
        return np.minimum(num_hidden, maskable).astype(np.int64)

    def __call__(self, tokens: Tokens, generator: torch.Generator, num_hidden: int | None = None) -> Mask:
        if self.uniform_scores and tokens.valid is None and tokens.ids is not None and tokens.ids.dim() == 1:
            return self.uniform_mask(tokens, generator, num_hidden)
        maskable = self.maskable(tokens)
        count = int(self.count(int(maskable.sum()), num_hidden))
        scores = self.scores(tokens, generator).float().masked_fill(~maskable, -math.inf)
        mask = Mask.from_scores(scores, count, tokens.valid, encoder_reads_hidden=True)
        chosen = mask.hidden.nonzero().flatten().numpy()
        substitute = np.full(tokens.num_tokens, AS_ITSELF, dtype=np.int64)
        substitute[chosen] = self.substitute_ids(torch.rand(len(chosen), generator=generator, dtype=torch.float64).numpy())
        mask.substitute = torch.from_numpy(substitute)
        return mask

    def uniform_mask(self, tokens: Tokens, generator: torch.Generator, num_hidden: int | None) -> Mask:
        """The fast path (see the class docstring) for one unpadded text: `uniform_batch` of it alone."""
        n = tokens.num_tokens
        special = tokens.fields.get("special")
        maskable = np.ones((1, n), dtype=bool) if special is None else ~special.numpy()[None]
        counts = None if num_hidden is None else np.array([num_hidden])
        hidden, substitute = self.uniform_batch(maskable, np.array([generator.initial_seed()], dtype=np.uint64),
                                                counts)
        order = torch.from_numpy(np.arange(n))  # every token an encoder input, in order: its own inverse
        return Mask(hidden=torch.from_numpy(hidden[0]), ids_shuffle=order, ids_restore=order, num_visible=n,
                    substitute=torch.from_numpy(substitute[0]))

    def stacked(self, tokens: list[Tokens], generators: list[torch.Generator],
                num_hidden: list[int] | None = None) -> Mask | None:
        """A one-stream batch of unpadded texts masked at once (`Masker.stacked`): the [B, N_max]
        arrays `collate` would stack of each text's `uniform_mask`, bit for bit, in a few
        vectorised passes for the batch instead of a dozen small array calls per text."""
        if not self.uniform_scores or any(t.valid is not None or t.ids is None or t.ids.dim() != 1 for t in tokens):
            return None
        lengths = np.array([t.num_tokens for t in tokens])
        rows, width = len(tokens), int(lengths.max())
        real = np.arange(width)[None, :] < lengths[:, None]
        maskable = np.zeros((rows, width), dtype=bool)
        if "special" in tokens[0].fields:
            maskable[real] = ~torch.cat([t.fields["special"] for t in tokens]).numpy()
        else:
            maskable[real] = True
        seeds = np.array([g.initial_seed() for g in generators], dtype=np.uint64)
        hidden, substitute = self.uniform_batch(maskable, seeds, None if num_hidden is None else np.array(num_hidden))
        order = torch.arange(width).expand(rows, width)  # `collate` copies it into the batch's block
        keep_valid = None if lengths.min() == width else torch.from_numpy(real)
        return Mask(hidden=torch.from_numpy(hidden), ids_shuffle=order, ids_restore=order,
                    num_visible=width, keep_valid=keep_valid, substitute=torch.from_numpy(substitute))

    def uniform_batch(self, maskable: np.ndarray, seeds: np.ndarray,
                      num_hidden: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(hidden, substitute) [B, N] of texts whose maskable sub-words are `maskable` [B, N]:
        in each row the `count` maskable positions of lowest draw are hidden (a uniformly
        random subset of that size) and each hidden one gets BERT's substitute. The draws are
        counter-based (`counter_uniforms`) on the row's seed (its generator's `initial_seed()`,
        set by the stream per sample and epoch) and the position, so a text's mask does not
        depend on the batch it is in, nor on how long the batch's longest text is."""
        rows, width = maskable.shape
        positions = np.arange(width, dtype=np.uint64)[None, :]
        draws = np.where(maskable, counter_uniforms(seeds[:, None], positions), np.inf)  # never a special token
        count = self.count(maskable.sum(1), num_hidden)
        # hidden: a row's `count` lowest draws, at or under its count-th smallest (53-bit draws do not tie)
        threshold = np.sort(draws, axis=1)[np.arange(rows), np.maximum(count, 1) - 1]
        hidden = (draws <= threshold[:, None]) & (count > 0)[:, None]
        substitute = np.full((rows, width), AS_ITSELF, dtype=np.int64)
        row, column = hidden.nonzero()
        substitute[row, column] = self.substitute_ids(
            counter_uniforms(seeds[row], column.astype(np.uint64) + SUBSTITUTE_COUNTERS))
        return hidden, substitute

    def substitute_ids(self, u: np.ndarray) -> np.ndarray:
        """BERT's corruption of hidden tokens from one uniform draw `u` each (any shape): the
        [MASK] id below mask_share, then a random regular sub-word for the next random_share
        (the draw's place in that interval picks it, uniformly: a float64 draw has 53 bits, far
        more than a vocabulary needs), else AS_ITSELF (the token enters as itself)."""
        as_mask, as_random, first = self.mask_share, self.mask_share + self.random_share, self.first_regular_id
        scale = (self.vocab_size - first) / max(self.random_share, 1e-300)
        randoms = np.minimum(first + np.clip((u - as_mask) * scale, 0, None).astype(np.int64), self.vocab_size - 1)
        return np.where(u < as_mask, self.mask_id, np.where(u < as_random, randoms, AS_ITSELF)).astype(np.int64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio}, mask_id={self.mask_id})"


@MASKERS.register("bert")
class BertMasker(SubwordMasker):
    """BERT: a uniformly random 15% of the sub-words."""

    uniform_scores = True

    def scores(self, tokens, generator):
        return torch.rand(tokens.num_tokens, generator=generator)


@MASKERS.register("whole_word")
class WholeWordMasker(SubwordMasker):
    """Whole-word masking (BERT's later release): words are drawn at random and all their
    sub-words hidden together; the exact count may cut the last word drawn."""

    def scores(self, tokens, generator):
        words = tokens.fields["word_ids"]
        per_word = torch.rand(int(words.max()) + 2 if words.numel() else 1, generator=generator)
        # a word's sub-words share its score; the tiny per-token term orders ties within a word
        return per_word[words.clamp_min(-1) + 1] + 1e-6 * torch.rand(tokens.num_tokens, generator=generator)


@MASKERS.register("span")
class SpanMasker(SubwordMasker):
    """SpanBERT: contiguous spans of whole words, lengths drawn from Geometric(p) clipped at
    `max_span` words, until the budget is covered; spans rank first, then the rest at random."""

    def __init__(self, ratio: float = 0.15, *, p: float = 0.2, max_span: int = 10, **options):
        super().__init__(ratio, **options)
        self.p, self.max_span = p, max_span

    def scores(self, tokens, generator):
        words = tokens.fields["word_ids"]
        n = tokens.num_tokens
        budget = max(1, int(round(self.ratio * int(self.maskable(tokens).sum()))))
        num_words = int(words.max()) + 1 if words.numel() and int(words.max()) >= 0 else 0
        in_span = torch.zeros(n, dtype=torch.bool)
        for _ in range(100):  # bounded: a short text reaches the budget in a few draws
            if num_words == 0 or int(in_span.sum()) >= budget:
                break
            u = float(torch.rand((), generator=generator))
            length = min(self.max_span, 1 + int(math.log(max(1 - u, 1e-12)) / math.log(1 - self.p)))
            first = int(torch.randint(0, num_words, (1,), generator=generator))
            in_span |= (words >= first) & (words < first + length)
        return in_span.float() + torch.rand(n, generator=generator)

    def __repr__(self) -> str:
        return f"SpanMasker(ratio={self.ratio}, p={self.p}, max_span={self.max_span})"


@MASKERS.register("meap")
class MeapMasker(SubwordMasker):
    """MEAP (mask-enhanced autoregressive prediction): a small random share of the input
    sub-words enters a causal decoder as [MASK]; the objective stays next-token prediction
    over every position, so training costs what plain next-token prediction costs. No
    random or kept substitutes: every hidden token is [MASK]."""

    uniform_scores = True

    def __init__(self, ratio: float = 0.15, **options):
        options.update(mask_share=1.0, random_share=0.0)
        super().__init__(ratio, **options)

    def scores(self, tokens, generator):
        return torch.rand(tokens.num_tokens, generator=generator)
