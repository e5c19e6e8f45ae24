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

from polymae.shared.masking import Masker
from polymae.shared.registry import MASKERS
from polymae.shared.tokens import AS_ITSELF, Mask, Tokens


class SubwordMasker(Masker):
    modalities = ("text",)
    """Base of the text maskers: exact counts over maskable tokens, BERT's substitutions.

    A masker whose scores are plain uniform noise (`uniform_scores`: BERT, MEAP) takes a
    fast path for a text without padding: one float64 draw per maskable token ranks them
    (the lowest `num_hidden` draws are hidden: the same uniform choice of a subset the
    scores give) and one per hidden token picks its substitute; the index work is numpy
    on a few dozen sub-words, where a torch call costs several microseconds each."""

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

    def count(self, maskable: int, num_hidden: int | None) -> int:
        """How many of `maskable` sub-words to hide: round(ratio x maskable), at least one, as
        BERT's data collator counts (or the caller's `num_hidden`, at most `maskable`)."""
        if num_hidden is None:
            num_hidden = max(1, int(round(self.ratio * maskable))) if maskable else 0
        return min(num_hidden, maskable)

    def __call__(self, tokens: Tokens, generator: torch.Generator, num_hidden: int | None = None) -> Mask:
        if self.uniform_scores and tokens.valid is None and tokens.ids is not None and tokens.ids.dim() == 1:
            return self.uniform_mask(tokens, generator, num_hidden)
        maskable = self.maskable(tokens)
        count = self.count(int(maskable.sum()), num_hidden)
        scores = self.scores(tokens, generator).float().masked_fill(~maskable, -math.inf)
        mask = Mask.from_scores(scores, count, tokens.valid, encoder_reads_hidden=True)
        chosen = mask.hidden.nonzero().flatten().numpy()
        u = torch.rand(len(chosen), generator=generator, dtype=torch.float64).numpy()
        mask.substitute = torch.from_numpy(self.substitutes(tokens.num_tokens, chosen, u))
        return mask

    def uniform_mask(self, tokens: Tokens, generator: torch.Generator, num_hidden: int | None) -> Mask:
        """The fast path (see the class docstring) for one unpadded text."""
        n = tokens.num_tokens
        special = tokens.fields.get("special")
        positions = np.arange(n) if special is None else (~special.numpy()).nonzero()[0]
        maskable = len(positions)
        count = self.count(maskable, num_hidden)
        draws = torch.rand(maskable + count, generator=generator, dtype=torch.float64).numpy()
        if count < maskable:  # the `count` lowest draws: a uniformly random subset of that size
            positions = positions[np.argpartition(draws[:maskable], count)[:count]] if count else positions[:0]
        hidden = np.zeros(n, dtype=bool)
        hidden[positions] = True
        order = torch.from_numpy(np.arange(n))  # every token an encoder input, in order: its own inverse
        return Mask(hidden=torch.from_numpy(hidden), ids_shuffle=order, ids_restore=order, num_visible=n,
                    substitute=torch.from_numpy(self.substitutes(n, positions, draws[maskable:])))

    def substitutes(self, n: int, chosen: np.ndarray, u: np.ndarray) -> np.ndarray:
        """BERT's corruption of the hidden tokens `chosen` (indices), from one uniform draw
        `u` each: [MASK] below mask_share, then a random regular sub-word for the next
        random_share (the draw's place in that interval picks it, uniformly: a float64 draw
        has 53 bits, far more than a vocabulary needs), else the token itself.
        Returns long [n]: AS_ITSELF everywhere but at the [MASK] and random ones. (A text
        hides a handful of sub-words: a Python loop over them beats numpy's per-call cost.)"""
        substitute = np.empty(n, dtype=np.int64)
        substitute.fill(AS_ITSELF)
        if len(chosen):
            as_mask, as_random, mask_id = self.mask_share, self.mask_share + self.random_share, self.mask_id
            first, scale = self.first_regular_id, (self.vocab_size - self.first_regular_id) / max(self.random_share, 1e-300)
            last = self.vocab_size - 1
            substitute[chosen] = [mask_id if x < as_mask else
                                  min(first + int((x - as_mask) * scale), last) if x < as_random else AS_ITSELF
                                  for x in u.tolist()]
        return substitute

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
