"""The decoded-record cache (pipelines/record_cache.py) on real data: scikit-learn's digits
in shards, with corrupt records and a shard whose manifest promises more than it holds.
A stream that keeps decoded records must give, epoch for epoch, exactly the batches and
skip counts of one that reads and decodes everything again, while decoding each record
once; the default recipe must train to the same weights with and without it."""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from polymae.modalities.image import ImageModality
from polymae.pipelines.record_cache import DecodedCache
from polymae.pipelines.shards import resolve_shards, write_shards
from polymae.pipelines.stream import Loader, ShardStream, StreamSpec
from polymae.shared.masking import build_masker

MAX_COUNT = 300
BIG = 64 * 2 ** 20


class CountingImages(ImageModality):
    """The image modality, counting its decodes (in this process: the streams here run without workers)."""
    decodes = 0

    def decode(self, sample):
        CountingImages.decodes += 1
        return super().decode(sample)


@pytest.fixture(scope="module")
def modality() -> CountingImages:
    return CountingImages({"image_size": [8, 8], "patch_size": 2, "channels": 1, "crop_scale": [0.6, 1.0]})


@pytest.fixture(scope="module")
def shards(tmp_path_factory, modality) -> list[str]:
    """The digits with two undecodable records planted, in shards of 300; the last shard's manifest
    promises 5 more records than it holds (a shard that lost its tail)."""
    out = tmp_path_factory.mktemp("cached-digits")
    good = list(modality.read_source("digits"))
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    cut_png = buffer.getvalue()[:30]
    samples = good[:400] + [{"__key__": "cut_png", "png": cut_png, "cls": b"1"}] + good[400:] \
        + [{"__key__": "not_png", "png": b"not an image at all" * 4, "cls": b"2"}]
    manifest = write_shards(samples, out, max_count=MAX_COUNT)  # no validation: the bad ones are written
    manifest_path = next(out.glob("*manifest.json"))
    manifest["shards"][-1]["count"] += 5
    manifest_path.write_text(json.dumps(manifest))
    return resolve_shards(out)


def stream_of(modality, shards, cache_bytes, **options) -> ShardStream:
    defaults = dict(batch_size=64, train=True, shuffle_buffer=300, seed=3)
    return ShardStream(shards, [StreamSpec("image", modality, build_masker("random", 0.6))],
                       cache_bytes=cache_bytes, **{**defaults, **options})


def epoch_of(stream: ShardStream, epoch: int, num_workers: int = 0) -> list:
    """Everything a pass hands the trainer: keys, pixels, masks, labels and skip counts, batch by batch."""
    stream.set_epoch(epoch)
    return [(b.keys, b.tokens.values.clone() if len(b) else None, b.mask.hidden.clone(),
             None if b.labels is None else b.labels.clone(), dict(b.skipped))
            for b in Loader(stream, num_workers)]


def assert_same_epochs(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (keys, values, hidden, labels, skipped), (keys2, values2, hidden2, labels2, skipped2) in zip(a, b):
        assert keys == keys2 and skipped == skipped2
        assert (values is None and values2 is None) or torch.equal(values, values2)
        assert torch.equal(hidden, hidden2)
        assert (labels is None and labels2 is None) or torch.equal(labels, labels2)


def test_kept_records_give_the_same_batches_and_counts_and_are_decoded_once(modality, shards):
    plain, cached = stream_of(modality, shards, 0), stream_of(modality, shards, BIG)
    for epoch in range(3):
        CountingImages.decodes = 0
        reference = epoch_of(plain, epoch)
        decodes_plain = CountingImages.decodes
        CountingImages.decodes = 0
        assert_same_epochs(epoch_of(cached, epoch), reference)
        skipped = sum((Counter(b[-1]) for b in reference), Counter())
        assert skipped["corrupt_image"] == 2                                # the bad records, every epoch
        assert sum(v for k, v in skipped.items() if k.startswith("missing_records")) == 5
        # the first pass decodes what it reads; later ones only the shard that lost records (never kept)
        last_shard_records = json.loads(next(Path(shards[0]).parent.glob("*manifest.json")).read_text())[
            "shards"][-1]["count"] - 5
        expected = decodes_plain if epoch == 0 else last_shard_records
        assert CountingImages.decodes == expected, (epoch, CountingImages.decodes, decodes_plain)
    assert cached.cache.enabled and 0 < cached.cache.used <= BIG
    assert len(cached.cache.shards) == len(shards) - 1


def test_further_passes_and_workers_give_what_reading_again_gives(modality, shards):
    """The per-rank quota re-reads shards in further passes within an epoch (draw-marked copies of
    kept records: fresh randomness each pass); persistent workers keep their own caches."""
    for options in ({"batches_per_epoch": 45}, {"resampled": True, "batches_per_epoch": 30}):
        plain, cached = stream_of(modality, shards, 0, **options), stream_of(modality, shards, BIG, **options)
        for epoch in range(2):
            assert_same_epochs(epoch_of(cached, epoch), epoch_of(plain, epoch))
    plain, cached = stream_of(modality, shards, 0), stream_of(modality, shards, BIG)
    for epoch in range(2):
        assert_same_epochs(epoch_of(cached, epoch, num_workers=2), epoch_of(plain, epoch, num_workers=2))


@pytest.mark.parametrize("share", [0.02, 0.6])
def test_a_budget_too_small_changes_nothing(modality, shards, share):
    """With a budget of 2% of what the whole set takes kept, no shard of 300 digits fits (none is kept,
    none held while read); with 60%, those that fit are kept and the rest read as usual. Either way
    the batches are those of reading everything, and the budget holds."""
    whole = stream_of(modality, shards, BIG)
    epoch_of(whole, 0)
    budget = int(share * whole.cache.used)
    plain, cached = stream_of(modality, shards, 0), stream_of(modality, shards, budget)
    for epoch in range(2):
        assert_same_epochs(epoch_of(cached, epoch), epoch_of(plain, epoch))
        assert cached.cache.used <= budget
    assert (len(cached.cache.shards) > 0) == (share > 0.1)
    assert len(cached.cache.shards) < len(whole.cache.shards)


def test_only_modalities_that_leave_decoded_payloads_alone_are_cached(shards):
    class Writing(ImageModality):
        decoded_cacheable = False

    stream = stream_of(Writing({"image_size": [8, 8], "patch_size": 2, "channels": 1}), shards, BIG)
    assert not stream.cache.enabled
    epoch_of(stream, 0)
    assert not stream.cache.shards


def test_the_cache_holds_no_shard_it_could_not_keep_whole():
    cache = DecodedCache(budget=10_000)
    records = [{"__key__": f"k{i}", "png": bytes(400)} for i in range(40)]  # 16 kB: more than the budget
    read: list | None = []
    for record in records:
        read = cache.collect(read, record) if read is not None else None
    assert read is None and cache.used == 0 and not any("__decoded_slot__" in r for r in records)
    small = [{"__key__": f"s{i}", "png": bytes(100)} for i in range(5)]
    read = []
    for record in small:
        read = cache.collect(read, record)
    cache.store(small[0], {"image": torch.zeros(10, dtype=torch.uint8)})
    cache.keep(("shard", (0, 1)), read, complete=False)  # lost records: not kept, its decoded bytes returned
    assert cache.used == 0 and not cache.shards and cache.decoded(small[0]) is None


def test_the_default_recipe_trains_to_the_same_weights_with_and_without_the_cache(tmp_path, digits_shards):
    """Three epochs of the shipped recipe on the digits (2 workers, the second and third epochs read
    from the workers' caches) end bitwise where the same run reading everything again ends."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    def run(name: str, cache_mb: int) -> dict:
        overrides = [f"data.shards={digits_shards}", "data.source=null", f"out_dir={tmp_path}", f"name={name}",
                     "trainer.max_steps=66", "trainer.ckpt_every=66", "trainer.max_minutes=null",
                     "data.batch_size=64", "data.num_workers=2", "probe.enabled=false", f"data.cache_mb={cache_mb}"]
        done = subprocess.run([sys.executable, "-m", "polymae.pipelines.cli", "pretrain", *overrides],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        losses = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                  if "loss" in line]
        return {"losses": losses, **load_file(str(tmp_path / name / "checkpoints" / "step-000066" /
                                                  "model.safetensors"))}

    cached, plain = run("cached", 256), run("plain", 0)
    assert cached["losses"] == plain["losses"] and len(plain["losses"]) > 3
    assert cached.keys() == plain.keys()
    assert all(torch.equal(cached[k], plain[k]) for k in plain if k != "losses")
