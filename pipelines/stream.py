"""Reading shards as a training stream.

    shard list -> split by node -> split by DataLoader worker -> per-epoch shard shuffle
    -> tar records -> shuffle buffer -> per stream: decode -> tokenize -> (a batch of them) mask -> Batch

With fewer shards than readers (ranks x workers) readers share a shard by record index
(reader j of k keeps the records whose index is j modulo k), so one shard feeds any number
of ranks and workers and every record is still read once per epoch.

A record may feed several streams (an image and its caption): each stream's
modality decodes its own payload and tokenizes it; each stream's masker
masks it, with its own ratio or with the stream's share of one visible
budget drawn per sample (MultiMAE's Dirichlet split). A record one of whose
streams is bad is skipped as a whole, counted by the kind of that error.

A worker keeps the records of the shards it read whole, decoded, within `cache_bytes`
(pipelines/record_cache.py), and replays them on later passes: a small dataset is read and
decoded once, the batches are those of reading it again.

Masking runs here, in the data workers, so the accelerator never waits on it, and
on a whole batch at once (as I-JEPA masks in its collate function), each record
still from its own generator.

Determinism. The shard order is shuffled by an rng seeded with (seed, epoch)
only, so every rank agrees on it before taking its slice. The shuffle buffer
is seeded with (seed, epoch, rank, worker). Each sample's augmentation and
mask come from a torch.Generator seeded with (seed, epoch, key): they are a
function of the sample and the epoch, not of which worker happened to read
it. With `resampled=True` (an infinite stream, shards drawn with
replacement) the draw number joins that seed, so a sample drawn twice is
augmented and masked differently each time.

Bad records never crash a run. A BadInput from decoding, tokenizing or
labelling a record (Modality.payload raises kind "missing_payload" for a
record without the modality's file), a shard that cannot be opened
("missing_shard"), or a tar that is truncated or corrupt ("bad_shard":
the records before the damage are still delivered) is skipped and counted
by kind; so is a tar of no record ("empty_shard"). Records that a shard's
manifest, or its own `__shard__` header, lists and reading did not deliver
are counted as records (`missing_records:<shard>`). The counts since a worker's previous batch travel in the next
batch's `Batch.skipped`. At the end of a worker's stream the last (partial)
batch carries the remaining counts; a worker that has counts but no samples
left yields a skip report: an empty Batch (`len(batch) == 0`) whose only
content is `skipped`. Consumers sum `batch.skipped` for every batch and
skip empty ones for compute (the trainer, probe and reconstruct do).

In the non-resampled mode every worker yields its final partial batch, so
one epoch delivers every readable sample exactly once.

Equal batches per rank. Under torchrun, ranks whose shards hold different
record counts would run out at different steps and the collectives would
hang. With `batches_per_epoch` set (pretrain sets it from the manifests:
records // (ranks x batch size)), every rank yields exactly that many full
batches per epoch: each worker takes its share and, if its shards run dry
first, reads them again in a new pass (with fresh per-sample randomness), as
open_clip does. Skip counts then always ride on a full batch.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing
import random
import tarfile
import time
import zlib
from collections import Counter
from typing import Any, Callable, Generator, Iterator, NamedTuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import gopen
from webdataset.tariterators import base_plus_ext

from polymae.shared.errors import BadInput, failed, no_usable_records
from polymae.shared.masking import Masker, split_visible_budget
from polymae.shared.memory import release_free_memory, reuse_freed_memory
from polymae.shared.modality import Modality, label_of
from polymae.shared.tokens import Batch, Mask, Tokens, collate

from .record_cache import DecodedCache
from .shards import SHARD_HEADER, header_count, shard_counts, stable_hash
from .transport import BatchRing, RingFeed, WorkerStopped

log = logging.getLogger(__name__)

MISSING_SHARD, BAD_SHARD, EMPTY_SHARD, DECODE_ERROR = "missing_shard", "bad_shard", "empty_shard", "decode_error"
MISSING_RECORDS = "missing_records"  # per shard: `missing_records:<shard>` (describe_skipped names them)
LOGGED_KINDS: set[str] = set()  # the kinds of bad record this process has logged one example of
PREPARE_GROUP = 8  # records decoded and tokenized stage by stage (bounded: 8 decoded photos in memory)


# -- reading one shard ------------------------------------------------------------------------------


class DamagedTar(Exception):
    """A tar that ends inside a header or holds a corrupt one."""


class StrictTarInfo(tarfile.TarInfo):
    """Streaming tarfile treats a header cut short, or a garbage header after the
    first, as a quiet end of the archive, so a shard truncated at a member
    boundary would lose its tail without a word. A complete tar ends with a
    zero block; anything else ending the stream is damage, raised here."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        if len(buf) < tarfile.BLOCKSIZE:
            raise DamagedTar(f"ends before a complete member header ({len(buf)} of {tarfile.BLOCKSIZE} "
                             "bytes): the file is truncated or empty")
        try:
            return super().frombuf(buf, encoding, errors)
        except tarfile.InvalidHeaderError as error:
            raise DamagedTar(f"corrupt member header ({error})") from None


@dataclasses.dataclass
class ShardTally:
    """What reading a shard found besides the records it yields: how many records the tar held
    (every reader's, when readers share it) and how many its `__shard__` header promises."""
    records: int = 0
    promised: int | None = None


def read_shard(url: str, part: tuple[int, int] = (0, 1), tally: ShardTally | None = None) -> Iterator[dict]:
    """The records of one shard: dicts of `__key__`, `__url__` and one entry per
    file extension, as WebDataset groups them. Damage raises BadInput after the
    records before it have been yielded (kind "missing_shard" or "bad_shard").

    part (j, k): only the records whose index in the shard is j modulo k, the others'
    payloads passed over unread (k readers sharing one shard, each of its records read by one).

    A shard `polymae shard` wrote states its record count in its `__shard__` header
    (pipelines/shards.py): one that delivers fewer records raises BadInput at its end (a
    tail zeroed at a member boundary reads as a clean end of archive), and `tally.promised`
    says how many were promised. A tar written elsewhere (a foreign WebDataset shard, or one
    written before the header) has no header: what damage took from it can be counted only
    against a manifest; without one, a tail lost at a member boundary goes uncounted."""
    try:
        stream = gopen(url, "rb")
    except OSError as error:
        raise BadInput(url, f"cannot open shard ({error})", MISSING_SHARD) from None
    tally = tally if tally is not None else ShardTally()
    mine, readers = part
    finished, header_damaged = False, False
    try:
        sample, key_now = None, None
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=StrictTarInfo)
        for member in tar:
            if not member.isreg():
                continue
            if member.name == SHARD_HEADER:
                tally.promised = header_count(tar.extractfile(member).read())
                header_damaged = tally.promised is None
                continue
            key, suffix = base_plus_ext(member.name)
            if key is None or key.rsplit("/", 1)[-1].startswith("__"):
                tar.members = []
                continue  # a file that is not part of a record (no extension, or metadata)
            if key != key_now:
                key_now, tally.records = key, tally.records + 1
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url} if (tally.records - 1) % readers == mine else None
            if sample is None:  # another reader's record: its payload is skipped over, not read
                tar.members = []
                continue
            data = tar.extractfile(member).read()
            tar.members = []  # streaming mode would otherwise keep every header of the shard
            suffix = suffix.lower()
            if suffix in sample:
                raise DamagedTar(f"record {key!r} holds two '{suffix}' files")
            sample[suffix] = data
        if sample is not None:
            yield sample
        finished = True
        if header_damaged:
            raise BadInput(url, f"its {SHARD_HEADER} header is damaged (not a record count)", BAD_SHARD)
        if tally.promised is not None and tally.records != tally.promised:
            raise BadInput(url, f"holds {tally.records} records where its {SHARD_HEADER} header states "
                           f"{tally.promised}: the shard is damaged", BAD_SHARD)
    except (tarfile.TarError, DamagedTar, EOFError, OSError, zlib.error) as error:
        raise BadInput(url, f"unreadable tar ({type(error).__name__}: {error})", BAD_SHARD) from None
    finally:
        try:
            stream.close()  # a `pipe:` stream reports its command's failure here
        except Exception as error:  # noqa: BLE001
            if finished:
                raise BadInput(url, f"shard stream failed ({error})", BAD_SHARD) from None


# -- where this process sits --------------------------------------------------------------------------


class ShardPart(NamedTuple):
    """A shard, or the part of it one reader takes when readers share it: `part` (j, k) is the
    records whose index in the shard is j modulo k (see ShardStream.assigned_shards)."""
    url: str
    part: tuple[int, int] = (0, 1)


class StreamPosition(NamedTuple):
    rank: int
    world_size: int
    worker: int
    num_workers: int


def stream_position(split_by_rank: bool = True) -> StreamPosition:
    """(rank, world size) from torch.distributed when it is initialised (and asked for), else (0, 1);
    (worker, workers) from the DataLoader worker, else (0, 1)."""
    distributed = split_by_rank and dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    info = get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return StreamPosition(rank, world_size, worker, num_workers)


# -- batches --------------------------------------------------------------------------------------------


class StreamSpec(NamedTuple):
    """One stream of the samples: its name, the modality that reads it, its masker."""
    name: str
    modality: Modality
    masker: Masker


def skip_report(skipped: dict[str, int], names: list[str]) -> Batch:
    """An empty Batch carrying only skip counts: a worker's last word when it has
    counts to deliver and no samples left to put them on."""
    empty = torch.empty(0, 0, 0)
    no_ids = torch.empty(0, 0, dtype=torch.long)
    mask = Mask(hidden=torch.empty(0, 0, dtype=torch.bool), ids_shuffle=no_ids, ids_restore=no_ids, num_visible=0)
    return Batch(streams={name: Tokens(values=empty, coords=empty) for name in names}, mask=mask,
                 skipped=dict(skipped))


def shuffled(samples: Iterator[dict], buffer_size: int, rng: random.Random) -> Iterator[dict]:
    """A shuffle buffer: once `buffer_size` samples are held, each new one
    replaces a random held one, which is yielded; the rest drain at the end."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        index = rng.randrange(buffer_size)
        buffer[index], sample = sample, buffer[index]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


class ShardStream(IterableDataset):
    """Batches of masked tokens streamed from WebDataset shards (see the module docstring).

    shards: paths or URLs, as `resolve_shards` gives them.
    train: augment, shuffle shards and use the shuffle buffer; False reads in
        order without augmentation (evaluation, probing, pictures).
    resampled: an infinite stream drawing shards with replacement; a shard
        that fails to read is counted once and not drawn again.
    batches_per_epoch: per-rank quota of full batches (see "Equal batches per rank").
    split_by_rank: False reads every shard in this process even under torchrun
        (rank 0 probing or drawing after training).
    `stage_seconds` accumulates decode/tokenize/mask/collate time in the
    process that iterates (with `num_workers=0`, the caller's).
    """

    def __init__(self, shards: list[str], streams: list[StreamSpec], batch_size: int, train: bool = True,
                 shuffle_buffer: int = 1000, seed: int = 0, resampled: bool = False, epoch: int = 0,
                 batches_per_epoch: int | None = None, split_by_rank: bool = True,
                 visible_budget: int | None = None, budget_alpha: float = 1.0, budget_sample_streams: bool = False,
                 label_reader: Callable[[dict], Any] = label_of, cache_bytes: int = 0):
        super().__init__()
        if not shards:
            raise ValueError("ShardStream needs at least one shard")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not streams:
            raise ValueError("ShardStream needs at least one stream")
        self.shards = [str(shard) for shard in shards]
        self.streams, self.batch_size = list(streams), batch_size
        self.visible_budget, self.budget_alpha = visible_budget, budget_alpha
        self.budget_sample_streams = budget_sample_streams  # MultiMAE's random subset of streams shown
        self.label_reader = label_reader  # a record -> its label (Batch.labels): its `cls` class by default
        self.train, self.shuffle_buffer, self.seed = train, shuffle_buffer, seed
        self.resampled, self.batches_per_epoch = resampled, batches_per_epoch
        # shared with the DataLoader's workers, which keep running from one epoch to the next
        # (forking them again each epoch costs a small dataset's run a fifth of its time)
        self.shared_epoch = multiprocessing.Value("i", epoch, lock=False)
        self.split_by_rank = split_by_rank
        self.stage_seconds: Counter = Counter()
        self.records_read = self.usable_records = 0  # in the current pass, in this process
        self.expected = shard_counts(self.shards)  # what each shard's manifest says it holds
        self.missing_counted: set[str] = set()
        self.allocate = None  # where batches are stacked: the Loader gives each worker its ring (transport.py)
        # decoded records each worker keeps for its later passes, within cache_bytes (record_cache.py); only
        # where every stream's modality promises its tokenizer leaves decoded payloads alone, and no
        # record is read as several samples (a part's decode may differ from its siblings')
        cacheable = all(spec.modality.decoded_cacheable and type(spec.modality).samples_per_record is
                        Modality.samples_per_record for spec in self.streams)
        self.cache = DecodedCache(cache_bytes if cacheable else 0)

    @property
    def epoch(self) -> int:
        return self.shared_epoch.value

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shard order, buffer order and per-sample randomness, from the
        next pass over a Loader on, in this process and in its (persistent) workers alike."""
        self.shared_epoch.value = epoch

    # -- records ---------------------------------------------------------------
    def assigned_shards(self, position: StreamPosition, whole_rank: bool = False) -> list[ShardPart]:
        """This rank's slice of the epoch's shard order, then this worker's slice of that
        (or the rank's whole slice: a quota worker whose own shards are all unreadable).

        With fewer shards than readers (ranks x workers), readers share a shard by record
        index: each shard becomes k = ceil(readers / shards) parts, part j the records whose
        index is j modulo k, and the parts are dealt out as shards are. Every record is still
        read once per epoch across ranks and workers, and the default's one built-in shard
        feeds 2 ranks x 2 workers."""
        order = list(self.shards)
        if self.train:
            random.Random(stable_hash("shards", self.seed, self.epoch)).shuffle(order)
        share = -(-position.world_size * position.num_workers // len(order))
        parts = [ShardPart(url, (j, share)) for url in order for j in range(share)]
        for_rank = parts[position.rank::position.world_size]
        return for_rank if whole_rank else for_rank[position.worker::position.num_workers]

    def shard_records(self, url: str, skipped: Counter, draw: int | None = None,
                      part: tuple[int, int] = (0, 1)) -> Generator[dict, None, bool]:
        """One shard's records (marked with the resampled `draw` number), or its `part` (j, k) of
        them; returns False, after counting, when the shard is missing or damaged. A shard's own
        failure is counted by its part 0 only (all its readers meet it); each part counts its own
        missing records."""
        replay = self.cache.replay((url, part), draw)
        if replay is not None:  # kept whole by this worker's cache (record_cache.py): read before, to its end
            for sample in replay:
                self.records_read += 1
                yield sample
            return True
        delivered, tally = 0, ShardTally()
        read = [] if self.cache.enabled else None  # what the cache may keep once the shard is read to its end
        whole = False
        try:
            for sample in read_shard(url, part, tally):
                if read is not None:  # collected while the cache could still take the shard so far
                    read = self.cache.collect(read, sample)
                if draw is not None:
                    sample["__draw__"] = draw
                self.records_read += 1
                delivered += 1
                yield sample
            whole = True
        except BadInput as error:
            if part[0] == 0:
                self.count_skip(error, skipped)
            self.count_missing(url, part, delivered, tally, skipped)
            return False
        finally:
            if read and not whole:  # damaged, or the reader left early: nothing to keep
                self.cache.discard(read)
        # not when the reader leaves early: only a shard read to its end
        self.count_missing(url, part, delivered, tally, skipped)
        if tally.records == 0 and part[0] == 0:  # a tar of no record: nothing to train on and no error to say so
            skipped[EMPTY_SHARD] += 1
        if read:  # kept only whole: then replaying it is reading it again, counts included
            promised = self.promised(url, part, tally)
            self.cache.keep((url, part), read, complete=promised is None or delivered >= promised)
        return True

    def promised(self, url: str, part: tuple[int, int], tally: ShardTally) -> int | None:
        """How many records reading `part` of the shard must deliver, as its manifest (or, without
        one, its `__shard__` header) says; None for a foreign tar that says nothing."""
        expected = self.expected.get(url, tally.promised)
        return None if expected is None else len(range(part[0], expected, part[1]))

    def count_missing(self, url: str, part: tuple[int, int], delivered: int, tally: ShardTally,
                      skipped: Counter) -> None:
        """Records a shard's manifest (or, without one, its `__shard__` header) promises that reading
        this part of it did not deliver (a shard truncated, zeroed or missing): counted as records,
        per shard (`missing_records:<shard>`, the parts' counts adding up), where they would
        otherwise be one bad shard (3 shards cut at 5% trained on 27 of 600 records within a 10%
        limit). Once per part and pass: a further read of it loses the same records again."""
        promised = self.promised(url, part, tally)
        if promised is None:
            return  # a foreign tar no manifest lists: nothing to count against
        if delivered >= promised or (url, part) in self.missing_counted:
            return
        self.missing_counted.add((url, part))
        skipped[f"{MISSING_RECORDS}:{url}"] += promised - delivered
        log.warning("%s: %d of the %d records its %s lists are missing%s", url, promised - delivered, promised,
                    "manifest" if url in self.expected else f"{SHARD_HEADER} header",
                    f" (reader {part[0]} of the {part[1]} sharing it)" if part[1] > 1 else "")

    def records(self, position: StreamPosition, skipped: Counter, repeat: int = 0,
                whole_rank: bool = False) -> Iterator[dict]:
        """This worker's records; `repeat` > 0 is a further pass over its shards (quota mode)."""
        if not self.resampled:
            for url, part in self.assigned_shards(position, whole_rank):
                yield from self.shard_records(url, skipped, repeat or None, part)
            return
        rng = random.Random(stable_hash("resample", self.seed, self.epoch, *position))
        readable, drawn = list(self.shards), set()
        covered_at = None  # records read when every readable shard had been read once
        # records that may still wait in the shuffle buffer or a group, not yet prepared
        in_flight = self.shuffle_buffer + PREPARE_GROUP + self.batch_size
        for draw in itertools.count():
            url = rng.choice(readable)
            before = self.records_read
            readable_shard = yield from self.shard_records(url, skipped, draw)
            if not readable_shard or self.records_read == before:  # (a tar of no record is counted as empty_shard)
                readable.remove(url)  # counted once; drawing it again would only count it again
                drawn.discard(url)
                if not readable:
                    raise no_usable_records(f"drawing each of the {len(self.shards)} shards (first: "
                                            f"{self.shards[0]})", self.usable_records, skipped)
            else:
                drawn.add(url)
            if covered_at is None and len(drawn) == len(readable):
                covered_at = self.records_read
            # an endless stream never ends an epoch, where the trainer would see that nothing was usable:
            # every shard read once and all of it through decoding, and still nothing, is the same news
            if covered_at is not None and self.usable_records == 0 and self.records_read - covered_at > in_flight:
                raise no_usable_records(f"reading every one of the {len(readable)} readable shards at least once "
                                        f"({self.records_read} records)", 0, skipped)

    # -- samples ---------------------------------------------------------------
    def clips_of(self, records: Iterator[dict]) -> Iterator[dict]:
        """Each record as the samples its streams make of it per epoch (`Modality.samples_per_record`:
        a long video gives several clips): the record repeated with `__part__` = (i, count), which
        the modality reads, under the key `<key>_part<i>` (so each part has its own seed)."""
        for record in records:
            count = max(spec.modality.samples_per_record(record) for spec in self.streams)
            if count == 1:
                yield record
                continue
            for part in range(count):
                yield {**record, "__key__": f"{record['__key__']}_part{part}", "__part__": (part, count)}

    def sample_generator(self, sample: dict) -> torch.Generator:
        """Randomness that depends on the sample, the epoch and (resampled) the draw, never the worker."""
        parts = (self.seed, self.epoch, sample["__key__"]) + ((sample["__draw__"],) if "__draw__" in sample else ())
        return torch.Generator().manual_seed(stable_hash(*parts))

    def count_skip(self, error: BadInput, skipped: Counter) -> None:
        skipped[error.kind] += 1
        if error.kind not in LOGGED_KINDS:  # once per process: evaluation re-reads the same records
            LOGGED_KINDS.add(error.kind)
            log.warning("skipping %s; further '%s' records are counted in Batch.skipped, not logged", error,
                        error.kind)

    def decode(self, sample: dict) -> dict:
        """Each stream's `modality.decode`, with a decoding library's own exception on odd bytes
        (it can raise more than OSError) turned into a BadInput, so one strange file cannot stop a run.
        A record the worker's cache holds decodes to what it did the first time, error included."""
        kept = self.cache.decoded(sample)
        if isinstance(kept, BadInput):
            raise kept
        if kept is not None:
            return kept
        decoded = {}
        try:
            for spec in self.streams:
                try:
                    decoded[spec.name] = spec.modality.decode(sample)
                except BadInput:
                    raise
                except Exception as error:  # noqa: BLE001
                    raise failed(f"{sample.get('__url__', '?')}:{sample['__key__']}", f"{spec.name} decoder "
                                 "failed", error, DECODE_ERROR) from None
        except BadInput as error:
            self.cache.store(sample, error)
            raise
        self.cache.store(sample, decoded)
        return decoded

    def mask_group(self, tokens: list[dict[str, Tokens]], generators: list[torch.Generator]) -> list[dict[str, Mask]]:
        """Each record's mask per stream, at its masker's ratio or its share of the visible budget:
        one `Masker.many` call per stream for the batch. Each record's generator serves the
        budget split, then its streams in the streams' order, as it would alone."""
        counts: dict[str, list[int] | None] = {spec.name: None for spec in self.streams}
        if self.visible_budget is not None:
            hidden = []
            for record, generator in zip(tokens, generators):
                real = [record[spec.name].num_real for spec in self.streams]
                hidden.append(split_visible_budget(real, min(self.visible_budget, sum(real)), self.budget_alpha,
                                                   generator, self.budget_sample_streams))
            counts = {spec.name: [h[s] for h in hidden] for s, spec in enumerate(self.streams)}
        masks: list[dict[str, Mask]] = [{} for _ in tokens]
        for spec in self.streams:
            made = spec.masker.many([record[spec.name] for record in tokens], generators, counts[spec.name])
            for record_masks, mask in zip(masks, made):
                record_masks[spec.name] = mask
        return masks

    def prepare(self, samples: list[dict], skipped: Counter) -> list[tuple]:
        """(tokens, generator, label, key) for each good record of `samples`, stage by stage: all
        decoded, then all tokenized. One stage's code and tables stay in cache over the group:
        0.56-0.59 -> 0.51 ms per 224px image in one process (benchmarks/pipeline.py). A bad
        record is counted and left out at the stage that finds it. Masks are made per batch
        (`make_batch`), each record's generator carried there."""
        def decode(sample):
            return sample, self.label_reader(sample), self.decode(sample)

        def tokenize(record):
            sample, label, _, generator, tokens = record
            for result in tokens.values():  # the first stream's BadInput, as tokenizing alone raises it
                if isinstance(result, BadInput):
                    raise result
            return tokens, generator, label, sample["__key__"]

        start = time.perf_counter()
        decoded = self.good_ones(samples, decode, skipped)
        after_decode = time.perf_counter()
        items = self.good_ones(self.tokenize_group(decoded), tokenize, skipped)
        self.stage_seconds.update(decode=after_decode - start, tokenize=time.perf_counter() - after_decode)
        return items

    def tokenize_group(self, decoded: list[tuple]) -> list[tuple]:
        """The decoded records with their generators and {stream: Tokens or BadInput}: one
        `Modality.tokenize_many` call per stream for the group (the `tokenize` stage raises a
        record's BadInput). Each record's generator serves its streams in the streams' order."""
        if not decoded:
            return decoded
        generators = [self.sample_generator(sample) for sample, _, _ in decoded]
        tokens: list[dict] = [{} for _ in decoded]
        for spec in self.streams:
            made = spec.modality.tokenize_many([payloads[spec.name] for _, _, payloads in decoded], generators,
                                               self.train)
            for record_tokens, result in zip(tokens, made):
                record_tokens[spec.name] = result
        return [(*record, generator, record_tokens) for record, generator, record_tokens in
                zip(decoded, generators, tokens)]

    def good_ones(self, records: list, stage, skipped: Counter) -> list:
        """`stage(record)` for each record; one whose stage raises BadInput is counted and left out."""
        done = []
        for record in records:
            try:
                done.append(stage(record))
            except BadInput as error:
                self.count_skip(error, skipped)
        return done

    def make_batch(self, items: list[tuple], skipped: Counter) -> Batch:
        """The prepared records masked, all at once as I-JEPA masks in its collate function (one
        `Masker.many` per stream: a molecule's mask alone is a few tiny ops, where each op's fixed
        cost was the whole cost; a one-stream batch's masker may give them stacked already,
        `Masker.stacked`), then `collate`d."""
        start = time.perf_counter()
        tokens, generators = [t for t, _, _, _ in items], [g for _, g, _, _ in items]
        stacked = None
        if len(self.streams) == 1 and self.visible_budget is None:
            spec = self.streams[0]
            stacked = spec.masker.stacked([t[spec.name] for t in tokens], generators)
        masks = self.mask_group(tokens, generators) if stacked is None else [None] * len(items)
        after_mask = time.perf_counter()
        batch = collate([(t, mask, label, key) for (t, _, label, key), mask in zip(items, masks)],
                        skipped, self.allocate, mask=stacked)
        self.stage_seconds.update(mask=after_mask - start, collate=time.perf_counter() - after_mask)
        skipped.clear()
        return batch

    def worker_quota(self, position: StreamPosition) -> int | None:
        """This worker's share of the rank's `batches_per_epoch` (the DataLoader takes workers in turn)."""
        if self.batches_per_epoch is None:
            return None
        share, extra = divmod(self.batches_per_epoch, position.num_workers)
        return share + (1 if position.worker < extra else 0)

    def passes(self, position: StreamPosition, skipped: Counter,
               whole_rank: bool = False) -> Iterator[tuple[Iterator[dict], Counter]]:
        """(samples, where to count their skips) for one pass over this worker's shards, or
        endless passes in quota mode. A bad record is counted on the first pass only: the
        counts are of bad records, not of reads of them."""
        for repeat in itertools.count():
            # a rank-wide fallback pass reads shards that other workers count already
            counter = skipped if repeat == 0 and not whole_rank else Counter()
            samples = self.clips_of(self.records(position, counter, repeat, whole_rank))
            if self.train and self.shuffle_buffer > 1:
                rng = random.Random(stable_hash("buffer", self.seed, self.epoch, position.rank, position.worker,
                                                repeat))
                samples = shuffled(samples, self.shuffle_buffer, rng)
            yield samples, counter
            if self.batches_per_epoch is None:
                return

    def full_batches(self, samples: Iterator[dict], counter: Counter, skipped: Counter, items: list,
                     limit: int | None = None) -> Generator[Batch, None, tuple[int, int]]:
        """Up to `limit` full batches from `samples`, prepared PREPARE_GROUP records at a time,
        `items` keeping the remainder; returns (usable samples, batches made)."""
        usable = made = 0
        group = []
        for sample in samples:
            group.append(sample)
            if len(group) < min(PREPARE_GROUP, self.batch_size - len(items)):
                continue
            prepared = self.prepare(group, counter)
            group.clear()
            usable += len(prepared)
            self.usable_records += len(prepared)
            items.extend(prepared)
            if len(items) == self.batch_size:  # bad records leave it short: read on
                yield self.make_batch(items, skipped)
                items.clear()
                made += 1
                if made == limit:
                    break
        if group:  # the last records of the pass, short of a group
            prepared = self.prepare(group, counter)
            usable += len(prepared)
            self.usable_records += len(prepared)
            items.extend(prepared)
        return usable, made

    def fill_quota(self, position: StreamPosition, skipped: Counter, quota: int,
                   whole_rank: bool) -> Generator[Batch, None, int]:
        """Exactly `quota` full batches, re-reading the shards as often as needed; returns how
        many it made (fewer only when a whole pass finds nothing usable)."""
        items, produced = [], 0
        for samples, counter in self.passes(position, skipped, whole_rank):
            usable, made = yield from self.full_batches(samples, counter, skipped, items, quota - produced)
            produced += made
            if produced == quota or usable == 0:
                return produced
        return produced

    def __iter__(self) -> Iterator[Batch]:
        position = stream_position(self.split_by_rank)
        self.records_read = self.usable_records = 0  # this pass's, in this process
        self.missing_counted = set()
        quota = self.worker_quota(position)
        skipped: Counter = Counter()  # since the previous batch; records() and prepare() add to it
        if quota is None:  # one pass: every readable sample once, the last batch partial
            items = []
            samples, counter = next(self.passes(position, skipped))
            yield from self.full_batches(samples, counter, skipped, items)
            if items:
                yield self.make_batch(items, skipped)
            elif skipped:
                yield skip_report(skipped, [spec.name for spec in self.streams])
            return
        produced = yield from self.fill_quota(position, skipped, quota, whole_rank=False)
        if produced < quota:  # this worker's own shards are all unreadable: use the rank's others
            produced += yield from self.fill_quota(position, skipped, quota - produced, whole_rank=True)
        if produced < quota:
            raise no_usable_records(f"rank {position.rank}, worker {position.worker} cannot fill its {quota} "
                                    f"batches per epoch: a whole pass over its rank's shards", 0, skipped)


def single_threaded_worker(worker_id: int) -> None:
    """Workers decode in parallel with each other; torch's own threads would oversubscribe the cores."""
    torch.set_num_threads(1)


class Loader:
    """A DataLoader over the stream's ready-made batches that hands each one over finished:
    moved to `device` (when given) and through `Modality.finish` there, so a tokenizer's
    compact values (uint8 image patches) cross from the workers and to the accelerator
    at a quarter of float32's size. Workers stack their batches into shared memory that
    is reused from batch to batch (pipelines/transport.py); what reaches the caller is
    its own, to keep as long as it likes.

    Iterate it once per epoch: its workers persist between passes and each pass reads the
    stream's current `set_epoch`. A pass left early (a resumed run skipping ahead, the
    last step) is drained by the next one. `start_method` ("fork", "spawn", "forkserver";
    None: the platform's default) is how the workers start."""

    def __init__(self, stream: ShardStream, num_workers: int, device: torch.device | str | None = None,
                 prefetch_factor: int = 4, start_method: str | None = None):
        reuse_freed_memory()  # what the batches are finished and copied into is reused, not faulted in afresh
        self.finishers = {spec.name: spec.modality.finish for spec in stream.streams}
        self.device = device
        workers = num_workers > 0
        # a worker has at most `prefetch_factor` batches in flight and one being handed over
        self.ring = BatchRing(num_workers, prefetch_factor + 2) if workers else None
        self.loader = DataLoader(RingFeed(stream, self.ring) if workers else stream, batch_size=None,
                                 num_workers=num_workers, persistent_workers=workers,
                                 worker_init_fn=single_threaded_worker if workers else None,
                                 prefetch_factor=prefetch_factor if workers else None,
                                 multiprocessing_context=start_method if workers else None)
        self.workers_started = not workers

    def __iter__(self) -> Iterator[Batch]:
        if not self.workers_started:  # the first pass forks the workers: share no free pages with them
            release_free_memory()
            self.workers_started = True
        for message in self.loader:
            if isinstance(message, WorkerStopped):  # the run's end, as one line, not a worker's traceback
                raise message.error
            batch, slot = self.ring.unpack(message) if self.ring is not None else (message, None)
            if self.device is not None:
                batch = batch.to(self.device)
            batch = dataclasses.replace(batch, streams={name: self.finishers[name](tokens)
                                                        for name, tokens in batch.streams.items()})
            yield self.ring.release(batch, slot) if slot is not None else batch
