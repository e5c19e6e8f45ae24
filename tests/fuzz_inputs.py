"""A bounded fuzz run over the three kinds of input issue 17 attacked: config values, file names and
damaged files (real data: the digits, laspy's scans, a digits shard). `fuzz(count, seed)` returns its
counts: inputs tried, tracebacks (an exception that is not the one-line error kind of its layer:
ConfigError for config values, BadInput for files), hangs (an input that outlives its time budget)
and silent losses (a damaged shard read without a word while records its manifest lists are missing).

    python tests/fuzz_inputs.py 2000     # a longer run; tests/test_reliability.py runs a short one
"""
from __future__ import annotations

import os
import random
from collections import Counter
import sys
import tempfile
from pathlib import Path

import yaml

HANG_SECONDS = 20
VALUES = ["0", "-1", "-3", "1.5", "1e9", ".inf", ".nan", "abc", "''", "[]", "[0]", "[1, 2]", "[a, b]", "{a: 1}",
          "true", "null", "nosuch", "../x", "\"\\x00\""]


def schema_keys() -> list[str]:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_reliability import schema_leaves

    return [key for key, _, _ in schema_leaves()] + [
        "modality_options.patch_size", "modality_options.image_size", "modality_options.std", "modality_options.mean",
        "modality_options.crop_scale", "modality_options.max_pixels", "objective.pixel.weight",
        "objective.pixel.norm_pix", "objective.pixel.bogus", "mask.options.bogus"]


def damaged(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    how = rng.choice(["cut", "flip", "both", "zero_tail"])
    if how in ("flip", "both"):
        for _ in range(rng.randint(1, 16)):
            data[rng.randrange(len(data))] ^= rng.randint(1, 255)
    if how in ("cut", "both"):
        data = data[: rng.randrange(len(data))]
    if how == "zero_tail":
        start = rng.randrange(len(data))
        data[start:] = bytes(len(data) - start)
    return bytes(data)


def fuzz(count: int = 200, seed: int = 0) -> dict:
    import polymae.modalities  # noqa: F401
    from polymae.modalities.image.adapters import read_digits
    from polymae.modalities.pointcloud.adapters import decode_points, fetch_laspy_test_scans
    from polymae.pipelines.runs import build_parts
    from polymae.pipelines.shards import stable_hash, write_shards
    from polymae.pipelines.stream import ShardStream, StreamSpec
    from polymae.shared.masking import build_masker
    from polymae.shared.config import load_config
    from polymae.shared.errors import BadInput, ConfigError
    from polymae.shared.registry import MODALITIES
    from polymae.shared.sources import RecordTooSlow, sample_key, time_budget

    rng = random.Random(seed)
    counts = {"inputs": 0, "tracebacks": 0, "hangs": 0, "silent_losses": 0}
    found: list[str] = []
    keys = schema_keys()
    image = MODALITIES.get("image")({"channels": 1, "image_size": [8, 8], "patch_size": 2})
    digits = [sample for _, sample in zip(range(40), read_digits())]
    scans = fetch_laspy_test_scans()
    points = [(scans / name).read_bytes() for name in ("simple.las", "simple.laz", "autzen.las")]
    with tempfile.TemporaryDirectory() as folder:
        manifest = write_shards(digits, folder, max_count=40)
        shard = (Path(folder) / manifest["shards"][0]["name"]).read_bytes()

        def attempt(what: str, run, expected) -> None:
            counts["inputs"] += 1
            try:
                with time_budget(HANG_SECONDS):
                    run()
            except expected:
                pass
            except RecordTooSlow:
                counts["hangs"] += 1
                found.append(f"hang: {what}")
            except Exception as error:  # noqa: BLE001
                counts["tracebacks"] += 1
                found.append(f"traceback: {what}: {type(error).__name__}: {error}")

        for i in range(count):
            kind = i % 5
            if kind == 0:  # a config value
                key, text = rng.choice(keys), rng.choice(VALUES)
                overrides = ["data.source=null", "data.shards=x", "model.depth=1", "model.width=32",
                             "model.heads=2", f"{key}={text}"]
                attempt(f"{key}={text}", lambda: build_parts(load_config(None, overrides)), ConfigError)
            elif kind == 1:  # a file name: any bytes give a key, and distinct bytes distinct keys
                name = bytes(rng.randrange(1, 256) for _ in range(rng.randint(1, 12))).replace(b"/", b"_")
                other = name + b"\xe9"

                def keyed():
                    a, b = sample_key(os.fsdecode(name)), sample_key(os.fsdecode(other))
                    stable_hash(0, a)
                    assert a and "." not in a and a != b, (name, a, b)
                attempt(f"name {name!r}", keyed, ())
            elif kind == 2:  # a damaged image
                data = damaged(rng.choice(digits)["image.png"], rng)
                attempt("damaged png", lambda: image.decode({"__key__": "d", "image.png": data}), BadInput)
            elif kind == 3:  # a damaged point file
                data = damaged(rng.choice(points), rng)
                attempt("damaged las/laz", lambda: decode_points(data, ".laz" if data[:4] == b"LASF" and
                                                                 rng.random() < 0.5 else ".las", "p"), BadInput)
            else:  # a damaged shard: what it cannot deliver is said, never dropped
                data = damaged(shard, rng)
                path = Path(folder) / manifest["shards"][0]["name"]  # in the manifest's place: it says what is missing
                path.write_bytes(data)

                def read():  # through the training stream's own reader and its counts
                    skipped = Counter()
                    stream = ShardStream([str(path)], [StreamSpec("image", image, build_masker("random", 0.75))], 8)
                    got = len(list(stream.shard_records(str(path), skipped)))
                    if got < len(digits) and not skipped:
                        counts["silent_losses"] += 1
                        found.append(f"silent loss: a damaged shard gave {got} of {len(digits)} records, nothing counted")
                attempt("damaged shard", read, ())
    counts["found"] = found
    return counts


if __name__ == "__main__":
    result = fuzz(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
    print(yaml.safe_dump(result, sort_keys=False))
