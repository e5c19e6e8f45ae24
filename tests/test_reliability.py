"""Reliability under attack (issue 17), one class of failure per section, each on real data
(scikit-learn's digits, sharded by the session fixture):

1. checkpoints carry checksums: a damaged one is never loaded; resume falls back to the newest
   intact one, naming what it skipped and why, and ends bitwise where an undamaged run ends;
2. one process at a time in a run folder: a live holder is named and the newcomer refused, a dead
   holder's lock is taken over with a message, one run's clean-up never touches another's
   temporary files, and a run name cannot leave out_dir;
3. `--resume RUN key=value`: changes to what the run trains are refused, listing them; the others
   (the schema marks them RESUMABLE) are recorded with the step they took effect, and config.yaml
   stays the recipe the run started with;
4. keys from any byte string: file names that are not UTF-8 shard (each its own key) and train,
   from a folder and from a tar written by another tool;
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from polymae.pipelines.pretrain import pretrain
from polymae.pipelines.runs import LOCK_FILE, RunLock, load_run
from polymae.shared.checkpoint import checkpoint_damage, checkpoint_dirs, resolve_checkpoint, save_checkpoint
from polymae.shared.config import load_config
from polymae.shared.errors import CheckpointError

CLI = [sys.executable, "-m", "polymae.pipelines.cli"]
TINY = ["model.depth=1", "model.width=32", "model.heads=2", "model.decoder_depth=1", "model.decoder_width=32",
        "model.decoder_heads=2", "data.source=null", "probe.enabled=false", "trainer.precision=fp32",
        "trainer.device=cpu", "trainer.max_minutes=null", "trainer.warmup_steps=2", "data.batch_size=16",
        "data.num_workers=0", "trainer.log_every=1"]


def tiny_run_overrides(shards: Path, out_dir: Path, *more: str) -> list[str]:
    return [f"data.shards={shards}", f"out_dir={out_dir}", *TINY, "trainer.max_steps=6", "trainer.ckpt_every=2",
            "trainer.keep_last=3", *more]


def one_line_error(result: subprocess.CompletedProcess, command: str = "pretrain") -> str:
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"polymae {command}: error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


@pytest.fixture(scope="module")
def finished_run(digits_shards, tmp_path_factory) -> Path:
    """A real 6-step run on the digits with checkpoints at steps 2, 4 and 6."""
    out = tmp_path_factory.mktemp("finished")
    pretrain(load_config(None, tiny_run_overrides(digits_shards, out)))
    run = out / "digits_mae"
    assert [p.name for p in checkpoint_dirs(run)] == ["step-000002", "step-000004", "step-000006"]
    return run


def copy_run(run: Path, where: Path) -> Path:
    copy = where / run.name
    shutil.copytree(run, copy)
    return copy


def xor_bytes(path: Path, start: int, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def damage(checkpoint: Path, how: str) -> None:
    weights, state = checkpoint / "model.safetensors", checkpoint / "state.pt"
    if how == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "zero_length_state":
        state.write_bytes(b"")
    elif how == "xored_weights":  # 16 bytes inside the tensor data: safetensors itself loads this silently
        xor_bytes(weights, weights.stat().st_size // 2)
    elif how == "bad_header":  # the 8-byte header length of safetensors
        xor_bytes(weights, 0, 8)
    elif how == "missing_state":
        state.unlink()
    elif how == "missing_checksums":
        (checkpoint / "checksums.json").unlink()
    else:
        raise AssertionError(how)


DAMAGES = ["truncated_weights", "zero_length_state", "xored_weights", "bad_header", "missing_state",
           "missing_checksums"]


@pytest.mark.parametrize("how", DAMAGES)
def test_resume_passes_over_a_damaged_newest_checkpoint_and_ends_bitwise_as_the_undamaged_run(
        finished_run, digits_shards, tmp_path, capsys, how):
    run = copy_run(finished_run, tmp_path)
    newest = run / "checkpoints" / "step-000006"
    damage(newest, how)
    assert checkpoint_damage(newest) is not None and checkpoint_damage(run / "checkpoints" / "step-000004") is None
    capsys.readouterr()
    summary = pretrain(load_config(None, tiny_run_overrides(digits_shards, tmp_path)), resume=run)
    out = capsys.readouterr().out
    assert f"skipped checkpoint {newest}: " in out, out
    assert f"resumed from {run / 'checkpoints' / 'step-000004'} at step 4" in out, out
    assert summary["steps"] == 6
    # steps 5 and 6 trained again from the intact step-4 checkpoint: the very weights of the undamaged run
    expected = load_file(str(finished_run / "checkpoints" / "step-000006" / "model.safetensors"))
    got = load_file(str(newest / "model.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_damaged_checkpoint_is_never_loaded_by_probe_export_or_init_from(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    damage(run / "checkpoints" / "step-000006", "xored_weights")
    with pytest.raises(CheckpointError, match="step-000006 is damaged: model.safetensors does not match its SHA-256"):
        resolve_checkpoint(run / "checkpoints" / "step-000006")
    parts, checkpoint = load_run(run)  # the run folder: its newest intact checkpoint
    assert checkpoint.name == "step-000004"
    assert "skipped checkpoint" in capsys.readouterr().out


def test_resume_with_no_intact_checkpoint_is_one_line(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    for checkpoint, how in zip(checkpoint_dirs(run), ["truncated_weights", "missing_state", "xored_weights"]):
        damage(checkpoint, how)
    result = subprocess.run([*CLI, "pretrain", "--resume", str(run)], capture_output=True, text=True, timeout=300)
    error = one_line_error(result)
    assert "no intact checkpoint to resume from" in error
    for name in ("step-000002", "step-000004", "step-000006"):
        assert name in error


# == 2. the run-folder lock ============================================================================


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_live_run_holds_its_folder_and_a_dead_ones_lock_is_taken_over(digits_shards, tmp_path):
    long_run = tiny_run_overrides(digits_shards, tmp_path, "trainer.max_steps=100000", "trainer.ckpt_every=2")
    holder = subprocess.Popen([*CLI, "pretrain", *long_run], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "digits_mae"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not checkpoint_dirs(run):
            assert holder.poll() is None, "the first run ended early"
            time.sleep(0.05)
        assert (run / LOCK_FILE).read_text().strip() == str(holder.pid)
        for second in (["pretrain", "--resume", str(run)], ["pretrain", *long_run[:-2], f"out_dir={tmp_path}",
                                                              "trainer.max_steps=4"]):
            result = subprocess.run([*CLI, *second], capture_output=True, text=True, timeout=300)
            if "--resume" in second:  # the same folder: refused, naming the holder
                error = one_line_error(result)
                assert f"is in use by process {holder.pid}" in error and str(run) in error
            else:  # a fresh run of the same name: a folder of its own, never the live one
                assert result.returncode == 0, result.stderr[-2000:]
                assert "digits_mae-2" in result.stdout
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    # SIGKILL left its pid in the lock file; the kernel dropped the lock itself
    assert (run / LOCK_FILE).read_text().strip() == str(holder.pid)
    logged = []
    with RunLock(run, log=logged.append):
        assert (run / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert logged == [f"taking over the stale lock of {run} left by process {holder.pid} (no longer running)"]


def test_resume_takes_over_a_stale_lock_with_a_message(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    gone = dead_pid()
    (run / LOCK_FILE).write_text(f"{gone}\n")
    result = subprocess.run([*CLI, "pretrain", "--resume", str(run)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"taking over the stale lock of {run} left by process {gone} (no longer running)" in result.stdout
    assert (run / LOCK_FILE).read_text() == ""  # released cleanly: nothing left to call stale


def test_one_runs_checkpoint_clean_up_never_touches_another_live_writers_temporary_folder(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    live = subprocess.Popen(["sleep", "60"])
    try:
        theirs = checkpoints / f".tmp-step-000008-{live.pid}"
        abandoned = checkpoints / f".tmp-step-000004-{dead_pid()}"
        for folder in (theirs, abandoned):
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"\0" * 10)
        save_checkpoint(tmp_path, 2, {"w": torch.ones(2)}, {"step": 2}, "", keep_last=3)
        assert theirs.is_dir() and (theirs / "model.safetensors").is_file()
        assert not abandoned.exists()
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("name", ["../../../x", "a/b", "..", "/abs"])
def test_a_run_name_that_leaves_out_dir_is_refused(tmp_path, name):
    result = subprocess.run([*CLI, "pretrain", f"name={name}", f"out_dir={tmp_path / 'runs'}", "data.source=null",
                             "data.shards=nowhere"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    error = one_line_error(result)
    assert "name must be one folder name inside out_dir" in error and repr(name) in error
    assert not (tmp_path / "runs").exists()


# == 3. what a resumed run may change ==================================================================


def resume_cli(run: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "pretrain", "--resume", str(run), *overrides], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("overrides, listed", [
    (["mask.ratio=0.5", "trainer.lr=0.001"], ["mask.ratio 0.75 -> 0.5", "trainer.lr 0.0015 -> 0.001"]),
    (["mask.name=block"], ["mask.name 'random' -> 'block'"]),
    (["data.seed=3", "data.batch_size=8"], ["data.seed 0 -> 3", "data.batch_size 16 -> 8"]),
    (["trainer.seed=1", "trainer.warmup_steps=5"], ["trainer.seed 0 -> 1", "trainer.warmup_steps 2 -> 5"]),
    (["model.depth=2"], ["model.depth 1 -> 2"]),   # was a `Missing optimizer state` traceback
    (["objective.pixel.weight=2.0"], ["objective.pixel.weight 1.0 -> 2.0"]),
])
def test_resume_refuses_changes_to_what_the_run_trains_listing_them(finished_run, tmp_path, overrides, listed):
    run = copy_run(finished_run, tmp_path)
    recipe_before = (run / "config.yaml").read_text()
    error = one_line_error(resume_cli(run, *overrides, "trainer.max_steps=8"))
    assert "--resume cannot change what the run trains" in error
    for difference in listed:
        assert difference in error, error
    assert "trainer.max_steps" not in error.split("may change only")[0]  # allowed: not among the refused
    assert (run / "config.yaml").read_text() == recipe_before
    assert not (run / "config_changes.jsonl").exists() and checkpoint_dirs(run)[-1].name == "step-000006"


def test_resume_records_the_changes_it_may_make_with_their_step(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    recipe_before = (run / "config.yaml").read_text()
    extended = resume_cli(run, "trainer.max_steps=8", "trainer.log_every=2", "trainer.ckpt_every=4",
                          "probe.knn_k=5")
    assert extended.returncode == 0, extended.stderr[-2000:]
    (announced,) = [line for line in extended.stdout.splitlines() if line.startswith("from step 6 on: ")]
    for change in ("trainer.max_steps 6 -> 8", "trainer.log_every 1 -> 2", "trainer.ckpt_every 2 -> 4",
                   "probe.knn_k 20 -> 5", "config_changes.jsonl"):
        assert change in announced, announced
    assert [p.name for p in checkpoint_dirs(run)] == ["step-000004", "step-000006", "step-000008"]
    assert (run / "config.yaml").read_text() == recipe_before  # the recipe the run started with
    (record,) = [json.loads(line) for line in (run / "config_changes.jsonl").read_text().splitlines()]
    assert record["step"] == 6 and record["changes"] == {"trainer.max_steps": [6, 8], "trainer.log_every": [1, 2],
                                                         "trainer.ckpt_every": [2, 4], "probe.knn_k": [20, 5]}
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6, 8]   # every step, then every 2nd from step 6 on

    # resumed again with no override: the run's recorded changes hold (max_steps stays 8) and
    # nothing new is recorded; changing a recorded value back is a change like any other
    again = resume_cli(run)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "from step" not in again.stdout
    assert len((run / "config_changes.jsonl").read_text().splitlines()) == 1
    refused = one_line_error(resume_cli(run, "trainer.max_steps=10", "data.shuffle_buffer=7"))
    assert "data.shuffle_buffer" in refused and "trainer.max_steps" not in refused.split("may change only")[0]


# == 4. keys from any byte string ======================================================================

NOT_UTF8 = [b"caf\xe9", b"caf\xe8", b"\xff\xfe"]  # Latin-1 names, and bytes no encoding reads


@pytest.fixture(scope="module")
def digit_pngs() -> list[tuple[bytes, bytes]]:
    from polymae.modalities.image.adapters import read_source

    return [(sample["image.png"], sample["cls"]) for sample in read_source("digits")][:80]


def tiny_train(shards: Path, out_dir: Path, *more: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "pretrain", f"data.shards={shards}", f"out_dir={out_dir}", *TINY,
                           "data.num_workers=1", "trainer.max_steps=3", "trainer.ckpt_every=3", *more],
                          capture_output=True, text=True, timeout=300)


def test_file_names_that_are_not_utf8_shard_with_a_val_split_each_under_its_own_key_and_train(
        tmp_path, digit_pngs):
    folder = tmp_path / "photos"
    folder.mkdir()
    names = [prefix + b"%02d.png" % i for i in range(20) for prefix in NOT_UTF8]
    names += [b"caf\xe9.png", b"caf\xe8.png"]  # the same readable part: "caf_" twice
    for name, (png, _) in zip(names, digit_pngs):
        (folder / os.fsdecode(name)).write_bytes(png)
    shards = tmp_path / "shards"
    result = subprocess.run([*CLI, "shard", "image", str(folder), str(shards), "--val-fraction", "0.3",
                             "--option", "channels=1", "--option", "image_size=[8,8]", "--option", "patch_size=2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    manifests = {split: json.loads((shards / f"{split}-manifest.json").read_text()) for split in ("train", "val")}
    assert all(manifest["rejected"] == [] for manifest in manifests.values()), manifests
    assert sum(manifest["total"] for manifest in manifests.values()) == len(names)  # none merged, none lost
    trained = tiny_train(shards, tmp_path / "runs")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "trained 3 steps" in trained.stdout


def test_a_tar_written_by_another_tool_with_non_utf8_member_names_trains(tmp_path, digit_pngs):
    """WebDataset takes the key from the member name, which tarfile gives with its undecodable
    bytes as lone surrogates: the per-sample seed hashed it with str.encode and the DataLoader
    worker died with UnicodeEncodeError."""
    shard = tmp_path / "hand-made.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:  # raw bytes in the names, as GNU tar writes
        for i, (png, label) in enumerate(digit_pngs[:40]):
            for suffix, data in ((".png", png), (".cls", label)):
                member = tarfile.TarInfo(os.fsdecode(b"caf\xe9%02d" % i + suffix.encode()))
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    trained = tiny_train(shard, tmp_path / "runs")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "trained 3 steps" in trained.stdout and "skipped" not in trained.stdout


def test_a_key_hashes_whatever_its_bytes_and_valid_text_hashes_as_before():
    from polymae.pipelines.shards import in_validation_split, stable_hash

    odd = os.fsdecode(b"caf\xe9")
    assert stable_hash(0, odd) != stable_hash(0, os.fsdecode(b"caf\xe8"))
    assert isinstance(in_validation_split(odd, 0.5, 0), bool)
    assert isinstance(stable_hash("\ud800"), int)  # a lone surrogate no file system gives
    # valid text: the very hash of before, so existing splits and masks do not move
    assert stable_hash(0, "digit00001") == 16182951792141268371
