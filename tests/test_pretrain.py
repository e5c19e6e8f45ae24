"""Pretraining end to end on real images: the loss goes down, and `polymae pretrain`
with its default recipe runs through shard -> train -> checkpoint -> picture -> probe."""
from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image

from polymae.pipelines.pretrain import pretrain
from polymae.pipelines.reconstruct import reconstruct
from polymae.shared.checkpoint import checkpoint_dirs
from polymae.shared.config import load_config


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_few_steps_on_real_images_lower_the_loss(tmp_path, digits_shards):
    config = load_config(None, [f"data.shards={digits_shards}", "data.source=null", f"out_dir={tmp_path}",
                                "trainer.max_steps=60", "trainer.log_every=5", "trainer.warmup_steps=10",
                                "trainer.max_minutes=null", "probe.enabled=false", "data.batch_size=64",
                                "data.num_workers=1"])
    summary = pretrain(config)
    run_dir = tmp_path / "digits_mae"
    curve = losses(run_dir)
    assert summary["steps"] == 60 and len(curve) == 12
    assert sum(curve[-3:]) / 3 < 0.8 * sum(curve[:2]) / 2, curve
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step-000060"]
    assert Image.open(run_dir / "reconstruction.png").size[0] > 0

    picture = reconstruct(run_dir, tmp_path / "recon.png", rows=4)
    image = Image.open(picture)
    # 4 rows x (original | masked | reconstruction), 96-px cells (8 px x 12) with 4-px gaps
    assert image.size == (3 * 96 + 4 * 4, 4 * 96 + 5 * 4)


def test_default_pretrain_command_runs_end_to_end(tmp_path):
    """`polymae pretrain` with no config, only a step override, from an empty folder."""
    result = subprocess.run([sys.executable, "-m", "polymae.pipelines.cli", "pretrain", "trainer.max_steps=15",
                             "trainer.log_every=5"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "digits_mae"
    assert (tmp_path / "runs" / "data" / "digits" / "train-manifest.json").is_file()
    assert (run_dir / "checkpoints" / "step-000015" / "model.safetensors").is_file()
    assert (run_dir / "reconstruction.png").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    for features in ("raw", "random_init", "pretrained"):
        assert 0.0 <= summary["probe"][features]["linear"] <= 1.0
        assert summary["probe"][features]["val_samples"] > 300
    assert "pretrained" in result.stdout and "kNN" in result.stdout


def test_gradient_accumulation_takes_accum_steps_batches_per_step(tmp_path, digits_shards):
    config = load_config(None, [f"data.shards={digits_shards}", "data.source=null", f"out_dir={tmp_path}",
                                "trainer.max_steps=5", "trainer.accum_steps=3", "data.batch_size=32",
                                "data.num_workers=0", "probe.enabled=false", "model.depth=2"])
    summary = pretrain(config)
    assert summary["steps"] == 5
    assert summary["records_seen"] == 5 * 3 * 32
