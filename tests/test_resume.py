"""Exact resume: a run killed with SIGKILL (also mid-checkpoint) and resumed reaches the
same loss at the same step as an uninterrupted run, bitwise on CPU."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from polymae.shared.checkpoint import checkpoint_dirs, latest_checkpoint, load_state, save_checkpoint

CLI = [sys.executable, "-m", "polymae.pipelines.cli", "pretrain"]


def overrides(shards, out_dir):
    return [f"data.shards={shards}", "data.source=null", f"out_dir={out_dir}", "trainer.max_steps=24",
            "trainer.ckpt_every=4", "trainer.log_every=1", "trainer.warmup_steps=4", "trainer.max_minutes=null",
            "data.batch_size=32", "data.num_workers=2", "probe.enabled=false", "model.depth=2", "model.width=64",
            "model.heads=2", "model.decoder_depth=1", "model.decoder_width=32", "model.decoder_heads=2"]


def losses_by_step(run_dir) -> dict[int, float]:
    """The last logged loss of every step (a resumed run logs the replayed steps again)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def test_killed_and_resumed_run_matches_an_uninterrupted_one_bitwise(tmp_path, digits_shards):
    reference = subprocess.run([*CLI, *overrides(digits_shards, tmp_path / "a")], capture_output=True, text=True,
                               timeout=600)
    assert reference.returncode == 0, reference.stderr[-2000:]
    run_a = tmp_path / "a" / "digits_mae"

    # Kill the second run with SIGKILL: as soon as it is caught writing a checkpoint after step 8,
    # or, failing that, once the step-12 checkpoint exists.
    run_b = tmp_path / "b" / "digits_mae"
    process = subprocess.Popen([*CLI, *overrides(digits_shards, tmp_path / "b")], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline, caught_mid_write = time.time() + 300, False
    while time.time() < deadline and process.poll() is None:
        checkpoints = run_b / "checkpoints"
        done = checkpoint_dirs(run_b)
        if done and int(done[-1].name[5:]) >= 8 and any(checkpoints.glob(".tmp-*")):
            caught_mid_write = True
            break
        if done and int(done[-1].name[5:]) >= 12:
            break
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = int(latest_checkpoint(run_b).name[5:])
    assert killed_at < 24, "the run finished before it could be killed"

    resumed = subprocess.run([*CLI, "--resume", str(run_b)], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {run_b / 'checkpoints'}" in resumed.stdout
    expected, got = losses_by_step(run_a), losses_by_step(run_b)
    assert sorted(got) == list(range(1, 25))
    assert got == expected, f"killed at step {killed_at} (mid-checkpoint: {caught_mid_write})"
    final_a = load_file(str(run_a / "checkpoints" / "step-000024" / "model.safetensors"))
    final_b = load_file(str(run_b / "checkpoints" / "step-000024" / "model.safetensors"))
    assert final_a.keys() == final_b.keys()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    assert not list((run_b / "checkpoints").glob(".tmp-*"))  # the half-written one is gone
    # the kernel paths the run measured travel with its checkpoints, for a resume elsewhere to take them
    assert load_state(latest_checkpoint(run_b))["kernel_paths"]


def test_a_half_written_checkpoint_is_never_loaded(tmp_path):
    weights = {"w": torch.arange(4.0)}
    save_checkpoint(tmp_path, 4, weights, {"step": 4}, "name: x\n", keep_last=3)
    # what a kill leaves: a temporary folder with a truncated file, never renamed into place
    writer = subprocess.Popen(["true"])
    writer.wait()  # a writer that is gone: its temporary folder is abandoned
    partial = tmp_path / "checkpoints" / f".tmp-step-000008-{writer.pid}"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00" * 10)
    # and a final-named folder missing its state (never produced by save_checkpoint, but never trusted)
    (tmp_path / "checkpoints" / "step-000012").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-000004"
    save_checkpoint(tmp_path, 16, weights, {"step": 16}, "name: x\n", keep_last=3)
    assert latest_checkpoint(tmp_path).name == "step-000016"
    assert not partial.exists()


def test_only_the_last_k_checkpoints_are_kept(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, {"step": step}, "", keep_last=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-000004", "step-000005"]


TWO_VIEWS = """\
name: two_views
streams:
  left:  {modality: image, keys: [image.png], options: {image_size: [8, 8], patch_size: 2, channels: 1, hflip: false},
          mask: {ratio: 0.5}}
  right: {modality: image, keys: [image.png], options: {image_size: [8, 8], patch_size: 2, channels: 1, hflip: false},
          mask: {ratio: 0.75}}
model: {width: 32, depth: 2, heads: 2, decoder_width: 32, decoder_depth: 1, decoder_heads: 2}
objective:
  left_pixel: {term: pixel, stream: left, norm_pix: false}
  right_pixel: {term: pixel, stream: right, norm_pix: false}
  align: {term: contrastive, stream: left, other: right, dim: 16, weight: 0.5}
"""


def test_a_loss_term_with_its_own_parameters_trains_checkpoints_and_resumes_bitwise(tmp_path, digits_shards):
    """Two streams of each digit (two masked views) and an InfoNCE term with its own projection
    heads and temperature: the term's parameters change with training, live in the checkpoint
    beside the model's, and a run stopped at step 6 and resumed ends bitwise equal to one
    that was never stopped."""
    recipe = tmp_path / "two_views.yaml"
    recipe.write_text(TWO_VIEWS)
    common = [f"data.shards={digits_shards}", "data.source=null", "trainer.ckpt_every=6", "trainer.log_every=1",
              "trainer.warmup_steps=2", "trainer.max_minutes=null", "data.batch_size=32", "data.num_workers=0",
              "probe.enabled=false", "trainer.max_steps=12"]
    whole = subprocess.run([*CLI, str(recipe), *common, f"out_dir={tmp_path}/a"], capture_output=True, text=True,
                           timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    run_a, run_b = tmp_path / "a" / "two_views", tmp_path / "b" / "two_views"
    process = subprocess.Popen([*CLI, str(recipe), *common, f"out_dir={tmp_path}/b"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not checkpoint_dirs(run_b):
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert checkpoint_dirs(run_b) and int(latest_checkpoint(run_b).name[5:]) < 12, "not stopped before the end"
    resumed = subprocess.run([*CLI, "--resume", str(run_b)], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses_by_step(run_a) == losses_by_step(run_b)
    first = load_file(str(run_a / "checkpoints" / "step-000006" / "model.safetensors"))
    final_a = load_file(str(run_a / "checkpoints" / "step-000012" / "model.safetensors"))
    final_b = load_file(str(run_b / "checkpoints" / "step-000012" / "model.safetensors"))
    own = [k for k in final_a if k.startswith("objective.terms.align.")]
    assert sorted(own) == ["objective.terms.align.log_scale", "objective.terms.align.project.left.bias",
                           "objective.terms.align.project.left.weight", "objective.terms.align.project.right.bias",
                           "objective.terms.align.project.right.weight"]
    assert not torch.equal(first["objective.terms.align.project.left.weight"],
                           final_a["objective.terms.align.project.left.weight"])   # optimised, not frozen
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    records = [json.loads(line) for line in (run_a / "metrics.jsonl").read_text().splitlines()]
    assert "loss/align" in records[-1]
