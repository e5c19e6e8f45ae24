"""Data-parallel pretraining under torchrun (gloo on CPU), on real shards of unequal size."""
from __future__ import annotations

import json
import os
from collections import Counter
import subprocess
import sys
from pathlib import Path

import pytest

from polymae.pipelines.pretrain import batches_per_rank
from polymae.shared.config import load_config
from polymae.shared.errors import ConfigError

SMALL_MODEL = ["model.depth=2", "model.width=64", "model.heads=2", "model.decoder_depth=1",
               "model.decoder_width=32", "model.decoder_heads=2"]


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    import polymae.modalities  # noqa: F401
    from polymae.pipelines.shards import shard_source
    from polymae.shared.registry import MODALITIES

    out = tmp_path_factory.mktemp("uneven")
    modality = MODALITIES.get("image")({"image_size": [8, 8], "patch_size": 2, "channels": 1})
    manifests = shard_source(modality, "digits", out, val_fraction=0.2, max_count=300)
    counts = [shard["count"] for shard in manifests["train"]["shards"]]
    assert len(set(counts)) > 1, counts  # the point of the test: shards of different sizes
    return out


def torchrun(cwd, *arguments):
    """`torchrun --standalone --nproc_per_node 2 --no-python polymae pretrain ...`, as the README documents it."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    command = [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python", "polymae",
               "pretrain", *arguments]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def torchrun_pretrain(cwd, shards, *overrides):
    return torchrun(cwd, "trainer.log_every=2", "data.batch_size=64", "data.num_workers=1", f"data.shards={shards}",
                    "data.source=null", "probe.enabled=false", *SMALL_MODEL, *overrides)


def test_the_default_recipe_runs_on_two_ranks_of_two_workers_from_its_one_built_in_shard(tmp_path):
    """`torchrun --standalone --nproc_per_node 2 --no-python polymae pretrain`: the built-in digits are
    one train shard, and 2 ranks x 2 workers share it by record index. Before: "1 shards cannot feed
    2 ranks x 2 workers", exit 1."""
    result = torchrun(tmp_path, "trainer.max_steps=14")  # the recipe otherwise as shipped (2 workers, probe on)
    run = tmp_path / "runs" / "digits_mae"
    manifest = json.loads((tmp_path / "runs" / "data" / "digits" / "train-manifest.json").read_text())
    assert len(manifest["shards"]) == 1  # the case this test is about: fewer shards than readers
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps_per_rank"] == [14, 14]
    assert len(set(summary["parameter_digests"])) == 1  # both replicas end with the same parameters
    assert summary["skipped"] == {}  # nothing lost, nothing counted twice
    assert "2 rank(s)" in result.stdout and "pretrained" in result.stdout  # trained, then probed on rank 0


def test_two_ranks_run_the_same_steps_and_end_identical(tmp_path, uneven_shards):
    # 14 steps of 64 per rank cross the end of an epoch (1,4xx records / (2 x 64) = 11 batches per rank)
    result = torchrun_pretrain(tmp_path, uneven_shards, "trainer.max_steps=14")
    summary = json.loads((tmp_path / "runs" / "digits_mae" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["steps_per_rank"] == [14, 14]
    assert len(set(summary["parameter_digests"])) == 1  # both replicas hold the same parameters
    assert (tmp_path / "runs" / "digits_mae" / "checkpoints" / "step-000014" / "model.safetensors").is_file()
    assert "2 rank(s)" in result.stdout


def test_fsdp_shards_parameters_and_checkpoints_them_whole(tmp_path, uneven_shards):
    from safetensors.torch import load_file

    from polymae.pipelines.runs import build_parts

    torchrun_pretrain(tmp_path, uneven_shards, "trainer.max_steps=4", "trainer.strategy=fsdp")
    run_dir = tmp_path / "runs" / "digits_mae"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_per_rank"] == [4, 4]
    assert len(set(summary["parameter_digests"])) == 2  # each rank holds its own shard of the parameters
    weights = load_file(str(run_dir / "checkpoints" / "step-000004" / "model.safetensors"))
    fresh = build_parts(load_config(run_dir / "config.yaml")).module.state_dict()  # model and objective
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in fresh.items()}  # whole, not shards


def test_batches_per_rank_come_from_the_manifests_however_few_the_shards(uneven_shards):
    """Fewer shards than ranks x workers is no error (readers share shards); each rank's batches per
    epoch are the manifests' records over ranks x batch size. Resampled data needs them given."""
    from polymae.pipelines.shards import resolve_shards

    config = load_config(None, [f"data.shards={uneven_shards}", "data.source=null", "data.num_workers=2"])
    shards = resolve_shards(uneven_shards, prefix="train")
    records = json.loads((uneven_shards / "train-manifest.json").read_text())["total"]
    assert len(shards) < 4 * 2
    for world_size in (2, 4):
        assert batches_per_rank(config, shards, world_size) == records // (world_size * config.data.batch_size)
    resampled = load_config(None, [f"data.shards={uneven_shards}", "data.source=null", "data.resampled=true"])
    with pytest.raises(ConfigError, match="needs data.batches_per_epoch"):
        batches_per_rank(resampled, shards, world_size=2)


def test_quota_mode_gives_exactly_the_quota_even_when_a_workers_shards_are_missing(digits_shards, tmp_path):
    """Equal batches per rank: a worker whose only shard is missing fills its share from the
    rank's other shards; the missing shard is counted once, not once per re-read."""
    from polymae.pipelines.shards import resolve_shards
    from polymae.pipelines.stream import Loader, ShardStream, StreamSpec
    from polymae.shared.masking import build_masker
    from polymae.shared.registry import MODALITIES

    modality = MODALITIES.get("image")({"image_size": [8, 8], "patch_size": 2, "channels": 1})
    good = resolve_shards(digits_shards, prefix="train")[0]
    streams = [StreamSpec("image", modality, build_masker("random", 0.75))]
    stream = ShardStream([good, str(tmp_path / "gone.tar")], streams, batch_size=64,
                         batches_per_epoch=20)  # 20 x 64 > one shard: forces re-reading
    batches = list(Loader(stream, num_workers=2))
    assert len(batches) == 20 and all(len(batch) == 64 for batch in batches)
    skipped = sum((Counter(batch.skipped) for batch in batches), Counter())
    assert skipped == {"missing_shard": 1}
