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
5. values that change results are refused where the schema declares the key: a walk over every
   key of the schema with values of each wrong type and just outside each key's bounds.
"""
from __future__ import annotations

import errno
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
import yaml
from safetensors.torch import load_file

from polymae.pipelines.pretrain import pretrain
from polymae.pipelines.runs import LOCK_FILE, RunLock, load_run
from polymae.shared.checkpoint import checkpoint_damage, checkpoint_dirs, resolve_checkpoint, save_checkpoint
from polymae.shared.config import load_config
from polymae.shared.errors import CheckpointError, ConfigError

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
    (["mask.ratio=0.5", "trainer.lr=0.001"], ["mask.ratio 0.6 -> 0.5", "trainer.lr 0.0015 -> 0.001"]),
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
    from polymae.pipelines.stream import read_shard

    keys = [record["__key__"] for split in ("train", "val") for shard in sorted(shards.glob(f"{split}-*.tar"))
            for record in read_shard(str(shard))]
    assert len(set(keys)) == len(names), "two files under one key: one mask seed, one split, merged when adjacent"
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


# == 5. every key checked where it is declared ========================================================


def schema_leaves(cls=None, where=""):
    """(dotted key, type, bounds) of every leaf key of the config schema, sections walked."""
    import dataclasses
    import typing

    from polymae.shared.config import FOREIGN_BOUNDS, Config

    cls = cls or Config
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from schema_leaves(kind, f"{where}{f.name}.")
        else:
            yield f"{where}{f.name}", kind, f.metadata.get("bounds") or FOREIGN_BOUNDS.get(cls, {}).get(f.name)


def wrong_types(kind) -> list[str]:
    """YAML texts of values of another type than `kind` allows."""
    import typing

    allowed = set(typing.get_args(kind)) or {kind}
    allowed = {typing.get_origin(a) or a for a in allowed}
    allowed = {a for a in allowed if isinstance(a, type)}  # a Literal's values are not types
    candidates = {int: ["1.5", "abc", "[1, 2]", "{a: 1}", "true"], float: ["abc", "[1, 2]", "{a: 1}", "true"],
                  bool: ["maybe", "3", "[true]"], str: ["3", "[a, b]", "{a: 1}"], dict: ["3", "abc", "[1]"],
                  tuple: ["3", "abc"]}
    texts = []
    for base in allowed & candidates.keys():
        texts += candidates[base]

    def wrong(text):  # an int is a number too, where a float is allowed
        value = yaml.safe_load(text)
        fits = [base for base in allowed if isinstance(value, base) and not (base is int and isinstance(value, bool))]
        return not fits and not (float in allowed and isinstance(value, int) and not isinstance(value, bool))
    return sorted({text for text in texts if wrong(text)})


def out_of_bounds(bounds) -> list[str]:
    if bounds is None:
        return []
    texts = [".inf", ".nan"]
    if bounds.low is not None:
        texts += [str(bounds.low - 1), str(bounds.low - 3)] + ([str(bounds.low)] if bounds.low_open else [])
    if bounds.high is not None:
        texts.append(str(bounds.high) if bounds.high_open else str(bounds.high + 1))
    return texts


CHOICE_KEYS = ["trainer.precision", "trainer.strategy", "trainer.device", "probe.protocol", "model.size",
               "model.pool", "model.kernels", "model.encoder", "mask.name", "decoder.kind", "decoder.rows"]
BAD_VALUES = sorted({(key, text) for key, kind, bounds in schema_leaves() for text in wrong_types(kind)
                     + out_of_bounds(bounds)} | {(key, "nosuch") for key in CHOICE_KEYS}
                    | {("model.heads", "7"), ("model.decoder_heads", "5")})


def test_the_walk_covers_the_issues_values():
    for case in [("model.depth", "0"), ("model.depth", "-2"), ("model.width", "0"), ("data.batches_per_epoch", "0"),
                 ("trainer.clip_grad", "0.0"), ("trainer.weight_decay", "-1.0"), ("trainer.max_bad_fraction", "2.0"),
                 ("mask.ratio", "0.0"), ("mask.ratio", "1.0"), ("trainer.lr", ".inf"), ("data.batch_size", "0")]:
        assert case in BAD_VALUES, case
    assert len(BAD_VALUES) > 150


def test_every_key_of_the_schema_refuses_bad_values_naming_the_key():
    """Each bad value is refused before any data is read or any model trained, by load_config or the
    checks pretrain makes next (each stream's modality and masker, the model), as a ConfigError
    naming the key; the CLI prints that as one line, exit 2."""
    from polymae.pipelines.runs import build_parts

    accepted, unnamed = [], []
    for key, text in BAD_VALUES:
        try:
            config = load_config(None, [*TINY, f"{key}={text}"])
            build_parts(config)
        except ConfigError as error:
            if key not in str(error) and key.rsplit(".", 1)[-1] not in str(error):
                unnamed.append((key, text, str(error)))
            continue
        accepted.append((key, text))
    assert not accepted, f"{len(accepted)} bad values accepted: {accepted}"
    assert not unnamed, unnamed


@pytest.mark.parametrize("override", ["model.depth=-2", "trainer.max_bad_fraction=2", "mask.ratio=1.5",
                                      "data.batches_per_epoch=-1", "model.heads=7"])
def test_a_bad_value_is_one_line_exit_2(tmp_path, override):
    result = subprocess.run([*CLI, "pretrain", override, f"out_dir={tmp_path}"], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    error = one_line_error(result)
    assert override.split("=")[0] in error
    assert not (tmp_path / "digits_mae").exists()


# -- 6. bad shard paths and manifests: one line, exit 2 -------------------------------------------------


def test_bad_shard_paths_and_manifests_and_position_names_are_one_line_errors(digits_shards, tmp_path, capsys):
    """Through the CLI's entry point in this process: a missing shard, a brace pattern matching
    nothing, an empty folder, a manifest that is not JSON, one naming a missing shard, and an
    unknown position encoding each print one line and exit 2 (they were ValueError tracebacks)."""
    from polymae.pipelines.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    shutil.copytree(digits_shards, broken)
    (broken / "train-manifest.json").write_text("not json {")
    gone = tmp_path / "gone"
    shutil.copytree(digits_shards, gone)
    next(gone.glob("train-*.tar")).unlink()
    cases = {f"data.shards={tmp_path / 'missing.tar'}": "does not exist",
             f"data.shards={tmp_path}/nothing-{{0..3}}.tar": "does not exist",
             f"data.shards={empty}": "holds no train-*.tar shards",
             f"data.shards={broken}": "is not a shard manifest",
             f"data.shards={gone}": "lists shards that are not there",
             "model.position=nosuch": "model.position must be one of sincos, learned, mlp"}
    for override, message in cases.items():
        code = main(["pretrain", override, "data.source=null", f"out_dir={tmp_path / 'runs'}", "trainer.max_steps=1",
                     "probe.enabled=false"])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (override, err)


# == 7. a stream of which nothing can be used ends, in every reading mode ==============================


class Hung(Exception):
    pass


def within(seconds: int):
    """Raise Hung in this (main) thread after `seconds`: a hang fails the test instead of stalling it."""
    import contextlib

    @contextlib.contextmanager
    def guard():
        def alarm(signum, frame):
            raise Hung(f"still running after {seconds} s")
        previous = signal.signal(signal.SIGALRM, alarm)
        signal.alarm(seconds)
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    return guard()


@pytest.fixture(scope="module")
def unusable_shards(digits_shards, tmp_path_factory) -> dict[str, str]:
    """Data no record of which can be used, each as `data.shards` names it."""
    from polymae.pipelines.shards import write_shards
    from polymae.pipelines.stream import read_shard

    where = tmp_path_factory.mktemp("unusable")
    (where / "random.tar").write_bytes(bytes(range(256)) * 20)  # not a tar, named .tar
    records = list(read_shard(str(next(digits_shards.glob("train-*.tar")))))[:40]
    cut = [{"__key__": r["__key__"], "image.png": r["image.png"][: len(r["image.png"]) // 3], "cls": r["cls"]} for r in records]
    write_shards(cut, where / "cut")  # real digits, each PNG cut to a third: none decodes
    return {"not_a_tar": str(where / "random.tar"), "pipe_false": "pipe:false",
            "unreachable_url": "http://127.0.0.1:9/x.tar", "undecodable": str(where / "cut"),
            "rejected_by_recipe": str(digits_shards)}


@pytest.mark.parametrize("data, mode", [
    ("not_a_tar", "quota"), ("pipe_false", "resampled"), ("unreachable_url", "quota"),
    ("undecodable", "resampled"), ("rejected_by_recipe", "quota"), ("rejected_by_recipe", "resampled"),
    ("not_a_tar", "resampled")])
def test_a_stream_no_record_of_which_can_be_used_stops_with_one_line_in_every_mode(
        unusable_shards, tmp_path, capsys, data, mode):
    """The one-pass epoch already stopped (tests/test_bad_input.py); an endless (resampled) stream
    spun forever on a readable shard of bad records, and a worker with a per-epoch quota (torchrun's
    mode, or data.batches_per_epoch) died with a ValueError traceback from inside the DataLoader."""
    from polymae.pipelines.cli import main

    modes = {"quota": ["data.batches_per_epoch=5"], "resampled": ["data.resampled=true"]}
    size = ["modality_options.image_size=[224,224]", "modality_options.patch_size=16"] \
        if data == "rejected_by_recipe" else ["modality_options.image_size=[8,8]", "modality_options.patch_size=2",
                                              "modality_options.channels=1"]
    with within(120):
        code = main(["pretrain", f"data.shards={unusable_shards[data]}", f"out_dir={tmp_path}", *TINY, *size,
                     "data.num_workers=1", "trainer.max_steps=20", *modes[mode]])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-3000:]
    (line,) = [line for line in err.splitlines() if line.startswith("polymae pretrain: error:")]
    assert "no record of the data could be used" in line and "0 usable records" in line, line
    kind = {"not_a_tar": "bad_shard=", "pipe_false": "bad_shard=", "unreachable_url": "bad_shard=",
            "undecodable": "corrupt_image=", "rejected_by_recipe": "too_small="}[data]
    assert kind in line, line


# == 8. point files whose headers promise more than they hold; the time budget behind the checks =======


@pytest.fixture(scope="module")
def damaged_point_files(tmp_path_factory) -> Path:
    """laspy's real scans (under the package's fetch helper) beside damaged ones: a 404-byte file of
    `LASF` and random bytes, a PLY whose header claims 100,000 vertices over 20 of a real scan, the
    same scan's header cut, and a string-typed .npy."""
    import numpy as np

    from polymae.modalities.pointcloud.adapters import fetch_laspy_test_scans, write_open3d, decode_points

    scans = fetch_laspy_test_scans()
    folder = tmp_path_factory.mktemp("points")
    shutil.copy(scans / "simple.las", folder / "simple.las")
    rng = np.random.default_rng(17)
    (folder / "lasf.las").write_bytes(b"LASF" + rng.bytes(400))
    (folder / "cut.las").write_bytes((scans / "simple.las").read_bytes()[:5000])
    cloud = decode_points((scans / "simple.las").read_bytes(), ".las", "simple.las")
    xyz = cloud.xyz[:20].astype(np.float32)
    header = (b"ply\nformat binary_little_endian 1.0\nelement vertex 100000\nproperty float x\nproperty float y\n"
              b"property float z\nend_header\n")
    (folder / "claims.ply").write_bytes(header + xyz.tobytes())
    ascii_rows = "".join(f"{x} {y} {z}\n" for x, y, z in xyz)
    (folder / "claims_ascii.ply").write_text("ply\nformat ascii 1.0\nelement vertex 100000\nproperty float x\n"
                                             f"property float y\nproperty float z\nend_header\n{ascii_rows}")
    buffer = io.BytesIO()
    np.save(buffer, np.array([["a", "b", "c"]] * 10))
    (folder / "strings.npy").write_bytes(buffer.getvalue())
    return folder


def test_point_files_promising_more_than_they_hold_are_rejected_at_once_and_the_rest_shards(
        damaged_point_files, tmp_path, capsys):
    """Before: the LASF file looped in laspy's VLR parsing (killed after 150 s), the PLY was read as
    99,980 points at the origin (102 s), the string .npy ended the shard command with a ValueError."""
    from polymae.pipelines.cli import main

    start = time.perf_counter()
    with within(60):
        code = main(["shard", "pointcloud", str(damaged_point_files), str(tmp_path / "shards")])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    assert time.perf_counter() - start < 30
    manifest = json.loads((tmp_path / "shards" / "train-manifest.json").read_text())
    reasons = {Path(r["source"]).name: r["reason"] for r in manifest["rejected"]}
    assert manifest["total"] == 1 and set(reasons) == {"lasf.las", "cut.las", "claims.ply", "claims_ascii.ply",
                                                        "strings.npy"}, manifest
    assert "do not fit a 404-byte file" in reasons["lasf.las"]
    assert "header promises 100000 vertices" in reasons["claims.ply"] and "240 bytes" in reasons["claims.ply"]
    assert "header promises 100000 vertices (one text line each)" in reasons["claims_ascii.ply"]
    assert "holds <U1 values" in reasons["strings.npy"]
    assert "header promises 1065 points" in reasons["cut.las"]
    for name in reasons:
        assert f"rejected {damaged_point_files / name}: " in out


def test_a_reader_looping_on_a_damaged_file_is_stopped_by_the_time_budget(damaged_point_files, tmp_path,
                                                                          monkeypatch):
    """The last guard, with the header checks taken away: a reader loops on the LASF file, and the
    shard writer's per-record budget rejects that file as too_slow and shards the real scan. The
    loop is one in Python standing in for laspy's: on this file laspy's own can end up allocating
    and filling gigabytes in native code (10 GB in one clean-clone run), where no signal reaches it."""
    import laspy

    from polymae.modalities.pointcloud import adapters
    from polymae.pipelines.shards import shard_source
    from polymae.shared.registry import MODALITIES

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("lasf.las", "simple.las"):
        shutil.copy(damaged_point_files / name, folder / name)
    damaged = (folder / "lasf.las").read_bytes()
    real_read = laspy.read

    def looping_read(source, *args, **kwargs):
        if source.getvalue() == damaged:
            while True:  # as laspy's VLR parsing looped on it
                pass
        return real_read(source, *args, **kwargs)

    monkeypatch.setattr(adapters, "check_las_header", lambda data, source: None)
    monkeypatch.setattr(laspy, "read", looping_read)
    start = time.perf_counter()
    with within(60):
        manifests = shard_source(MODALITIES.get("pointcloud")(), str(folder), tmp_path / "shards", record_seconds=2)
    assert time.perf_counter() - start < 20
    (rejected,) = manifests["train"]["rejected"]
    assert rejected["kind"] == "too_slow" and rejected["source"] == str(folder / "lasf.las")
    assert "longer than its time budget of 2 s" in rejected["reason"]
    assert manifests["train"]["total"] == 1


# == 9. a full disk ===================================================================================


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_at_a_checkpoint_is_one_line_naming_it_and_the_intact_one_is_kept(
        finished_run, digits_shards, tmp_path, capsys, monkeypatch):
    """Before: an OSError traceback from safetensors (exit 1), the half-written temporary folder left."""
    from polymae.pipelines.cli import main
    from polymae.shared import checkpoint

    run = copy_run(finished_run, tmp_path)
    monkeypatch.setattr(checkpoint, "save_file", no_space)
    code = main(["pretrain", "--resume", str(run), "trainer.max_steps=8"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-3000:]
    (line,) = [line for line in err.splitlines() if line.startswith("polymae pretrain: error:")]
    assert f"no space left on device writing checkpoint {run / 'checkpoints' / 'step-000008'}" in line, line
    assert f"the last intact checkpoint ({run / 'checkpoints' / 'step-000006'}) is kept" in line, line
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002", "step-000004", "step-000006"] \
        or sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004", "step-000006"]
    assert checkpoint_damage(run / "checkpoints" / "step-000006") is None


@pytest.mark.parametrize("full_at", ["lock", "changes", "metrics", "checkpoint"])
def test_a_resume_on_a_full_disk_is_one_line_naming_the_file_and_keeps_the_intact_checkpoint(
        finished_run, tmp_path, capsys, monkeypatch, full_at):
    """A resumed run's writes, in their order: its folder's lock (the holder's pid), the change log (a
    longer max_steps is recorded), the metrics, the first new checkpoint. Each one finding the disk full
    is one line naming it and the intact checkpoint kept, exit 2, the lock released: with room again,
    the same resume goes on from that checkpoint. Before: the lock's and the change log's ENOSPC were
    OSError tracebacks (exit 1)."""
    import builtins

    from polymae.pipelines.cli import main
    from polymae.pipelines.runs import CHANGES_FILE
    from polymae.shared import checkpoint

    run = copy_run(finished_run, tmp_path)
    target = {"lock": run / LOCK_FILE, "changes": run / CHANGES_FILE, "metrics": run / "metrics.jsonl",
              "checkpoint": run / "checkpoints" / "step-000008"}[full_at]
    real_open = builtins.open

    class FullFile:  # opens (the file exists, or its directory entry fits), but no byte more fits
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            no_space()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def __getattr__(self, name):
            return getattr(self.handle, name)

    def full_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        writes = any(flag in mode for flag in "wax+")
        return FullFile(handle) if writes and isinstance(file, (str, Path)) and Path(file) == target else handle

    monkeypatch.setattr(builtins, "open", full_open)
    if full_at == "checkpoint":
        monkeypatch.setattr(checkpoint, "save_file", no_space)
    command = ["pretrain", "--resume", str(run), "trainer.max_steps=8"]
    code = main(command)
    err = capsys.readouterr().err
    monkeypatch.undo()
    assert code == 2 and "Traceback" not in err, err[-3000:]
    (line,) = [line for line in err.splitlines() if line.startswith("polymae pretrain: error:")]
    assert "no space left on device writing" in line and str(target) in line, line
    assert str(run / "checkpoints" / "step-000006") in line, line  # says what is kept
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004", "step-000006"]
    assert checkpoint_damage(run / "checkpoints" / "step-000006") is None

    assert main(command) == 0  # room again: not locked out, and it resumes from the intact checkpoint
    assert f"resumed from {run / 'checkpoints' / 'step-000006'} at step 6" in "".join(capsys.readouterr())
    assert checkpoint_damage(run / "checkpoints" / "step-000008") is None


def test_a_full_disk_at_the_metrics_or_the_shards_is_one_line_naming_the_file(digits_shards, tmp_path, capsys,
                                                                              monkeypatch, digit_pngs):
    from polymae.pipelines import shards as shards_module
    from polymae.pipelines.cli import main
    from polymae.shared import trainer

    class FullFile:
        def __init__(self, path, mode="r", *args, **kwargs):
            self.handle = open(path, mode, *args, **kwargs)
            self.full = Path(path).name == "metrics.jsonl"

        def write(self, text):
            return no_space() if self.full else self.handle.write(text)

        def __getattr__(self, name):
            return getattr(self.handle, name)

    monkeypatch.setattr(trainer, "open", FullFile, raising=False)
    code = main(["pretrain", *tiny_run_overrides(digits_shards, tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-3000:]
    (line,) = [line for line in err.splitlines() if line.startswith("polymae pretrain: error:")]
    assert f"no space left on device writing {tmp_path / 'digits_mae' / 'metrics.jsonl'}" in line, line
    monkeypatch.undo()

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, (png, _) in enumerate(digit_pngs[:10]):
        (folder / f"d{i}.png").write_bytes(png)
    monkeypatch.setattr(shards_module.TarWriter, "write", no_space)
    code = main(["shard", "image", str(folder), str(tmp_path / "shards"), "--option", "channels=1",
                 "--option", "image_size=[8,8]", "--option", "patch_size=2"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert f"no space left on device writing {tmp_path / 'shards' / 'train-000000.tar'}" in err, err
    assert not list((tmp_path / "shards").glob(".*tmp*"))  # the half-written shard is gone


# == 10. records lost inside a damaged shard are counted as records ======================================


@pytest.fixture
def cut_shards(digits_shards, tmp_path) -> Path:
    """The digits in shards of 100 records, three of them cut to 5% of their bytes."""
    from polymae.pipelines.shards import write_shards
    from polymae.pipelines.stream import read_shard

    records = [{k: v for k, v in r.items() if k != "__url__"}
               for shard in sorted(digits_shards.glob("train-*.tar")) for r in read_shard(str(shard))]
    folder = tmp_path / "cut"
    manifest = write_shards(records, folder, max_count=100)
    for entry in manifest["shards"][:3]:
        path = folder / entry["name"]
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 20])
    return folder


def test_records_missing_from_truncated_shards_count_against_max_bad_fraction_and_are_named(
        cut_shards, tmp_path, capsys):
    """Before: each cut shard was one bad_shard, so 3 shards cut at 5% trained on the few records left
    within the 10% limit. Now the records their manifest lists and reading did not deliver count."""
    from polymae.pipelines.cli import main

    manifest = json.loads((cut_shards / "train-manifest.json").read_text())
    cut = [str(cut_shards / entry["name"]) for entry in manifest["shards"][:3]]
    code = main(["pretrain", f"data.shards={cut_shards}", f"out_dir={tmp_path}", *TINY, "data.num_workers=1",
                 "trainer.max_steps=40"])
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("polymae pretrain: error:")]
    assert code == 2 and "more than trainer.max_bad_fraction=0.1" in line, line
    assert "missing_records=" in line and all(f"{shard}: " in line for shard in cut), line

    # allowed by the recipe: the run trains, and its end-of-run report names the shards and their losses
    summary = pretrain(load_config(None, [f"data.shards={cut_shards}", f"out_dir={tmp_path}", *TINY,
                                          "data.num_workers=1", "trainer.max_steps=4", "trainer.max_bad_fraction=1"]))
    out = capsys.readouterr().out
    missing = {key: count for key, count in summary["skipped"].items() if key.startswith("missing_records:")}
    assert set(missing) == {f"missing_records:{shard}" for shard in cut}
    assert all(0 < count < 100 for count in missing.values())
    report = [line for line in out.splitlines() if line.startswith("skipped ")]
    assert report and all(shard in report[-1] for shard in cut), out[-2000:]


# == 11. every file of an image folder is read or listed as rejected; decoded size is capped ===========


def test_an_image_folder_reads_every_format_pil_reads_and_lists_the_other_files(tmp_path, digit_pngs, capsys):
    """Before: .gif .webp .bmp .tiff (and any other file) were passed over without a word, and a
    100-megapixel PNG of 100 kB was accepted, needing 1.3 GB to decode."""
    from PIL import Image

    from polymae.pipelines.cli import main
    from polymae.pipelines.stream import read_shard
    from polymae.shared.registry import MODALITIES

    folder = tmp_path / "photos"
    folder.mkdir()
    formats = {".gif": "GIF", ".webp": "WEBP", ".bmp": "BMP", ".tiff": "TIFF", ".tif": "TIFF", ".png": "PNG"}
    for i, (png, _) in enumerate(digit_pngs[:12]):
        suffix = list(formats)[i % len(formats)]
        Image.open(io.BytesIO(png)).save(folder / f"d{i:02d}{suffix}", format=formats[suffix],
                                         **({"lossless": True} if suffix == ".webp" else {}))
    (folder / "README.txt").write_text("twelve digits")
    Image.new("L", (10_000, 10_000)).save(folder / "huge.png")  # 100 megapixels, ~100 kB
    assert (folder / "huge.png").stat().st_size < 200_000
    with within(60):
        code = main(["shard", "image", str(folder), str(tmp_path / "shards"), "--option", "channels=1",
                     "--option", "image_size=[8,8]", "--option", "patch_size=2"])
    out = capsys.readouterr().out
    assert code == 0
    manifest = json.loads((tmp_path / "shards" / "train-manifest.json").read_text())
    assert manifest["inputs"] == 14 and manifest["total"] == 12, manifest
    reasons = {Path(r["source"]).name: (r["kind"], r["reason"]) for r in manifest["rejected"]}
    assert reasons["README.txt"][0] == "not_an_image" and ".txt" in reasons["README.txt"][1]
    assert reasons["huge.png"][0] == "too_large"
    assert "10000x10000 (100.0 megapixels" in reasons["huge.png"][1] and "max_pixels=40000000" in reasons["huge.png"][1]
    assert f"rejected {folder / 'README.txt'}" in out
    # what was written decodes to the digits' own pixels, whatever the file format
    modality = MODALITIES.get("image")({"channels": 1, "image_size": [8, 8], "patch_size": 2})
    pixels = {r["__key__"]: modality.decode(r) for shard in (tmp_path / "shards").glob("train-*.tar")
              for r in read_shard(str(shard))}
    for i, (png, _) in enumerate(digit_pngs[:12]):
        assert torch.equal(pixels[f"d{i:02d}"], modality.decode({"__key__": "x", "image.png": png})), i


# == 12. the keys declared outside the schema: modality options, objective terms, maskers, the file =====


def test_every_modality_option_refuses_bad_values_with_a_config_error():
    """Each registered modality's Options with values of each wrong type and just outside each
    declared bound: a ConfigError naming the key, never another exception (patch_size=0 was a
    ZeroDivisionError, image_size=[0,8] a RuntimeError from resize, std=[0] a run of NaN losses)."""
    import dataclasses
    import typing

    import polymae.modalities  # noqa: F401
    from polymae.shared.config import build
    from polymae.shared.registry import MODALITIES

    tried, crashed, accepted = 0, [], []
    for name in MODALITIES.names():
        options = MODALITIES.get(name).Options
        if not dataclasses.is_dataclass(options):
            continue
        hints = typing.get_type_hints(options)
        for f in dataclasses.fields(options):
            is_tuple = typing.get_origin(hints[f.name]) is tuple or tuple in map(typing.get_origin,
                                                                                 typing.get_args(hints[f.name]))
            for text in wrong_types(hints[f.name]) + out_of_bounds(f.metadata.get("bounds")):
                if is_tuple and text.startswith("["):
                    continue  # a list is what a tuple key takes
                tried += 1
                try:
                    build(options, {f.name: yaml.safe_load(text)}, "modality_options")
                    accepted.append((name, f.name, text))
                except ConfigError as error:
                    assert f.name in str(error), (name, f.name, text, str(error))
                except Exception as error:  # noqa: BLE001
                    crashed.append((name, f.name, text, repr(error)[:200]))
    assert tried > 400 and not crashed and not accepted, (crashed, accepted)
    for override in ("modality_options.patch_size=0", "modality_options.image_size=[0,8]",
                     "modality_options.std=[0]", "modality_options.max_pixels=0"):
        with pytest.raises(ConfigError, match=override.split("=")[0].split(".")[1]):
            from polymae.pipelines.runs import build_parts

            build_parts(load_config(None, [*TINY, override]))


@pytest.mark.parametrize("override, message", [
    ("objective.pixel.bogus=1", "unknown config key 'objective.pixel.bogus'; allowed: weight, term, stream, norm_pix"),
    ("objective.pixel.weight=-1", "objective.pixel.weight must be a number >= 0"),
    ("objective.pixel.norm_pix=maybe", "objective.pixel.norm_pix: expected true or false"),
    ("mask.name=radial", "mask.name: 'radial' masks pointcloud or lidar streams, not image ones"),
    ("mask.name=bert", "mask.name: 'bert' masks text streams, not image ones"),
    ("mask.options.bogus=1", "mask.options: masker 'random'"),
    ("modality_options.std=[0]", "modality_options.std must be each > 0"),
    ("modality_options.patch_size=0", "modality_options.patch_size must be >= 1"),
])
def test_values_of_keys_declared_outside_the_schema_are_one_line_exit_2(digits_shards, tmp_path, capsys, override,
                                                                        message):
    """Before: mask.name=radial trained on images, objective.pixel.weight=-1 trained towards a worse
    reconstruction, std=[0] ran NaN losses, patch_size=0 was a ZeroDivisionError traceback."""
    from polymae.pipelines.cli import main

    code = main(["pretrain", f"data.shards={digits_shards}", f"out_dir={tmp_path}", *TINY, "trainer.max_steps=1",
                 "modality_options.image_size=[8,8]", "modality_options.patch_size=2", "modality_options.channels=1",
                 override])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-2000:]
    assert message in err, err
    assert not (tmp_path / "digits_mae").exists()


def test_a_binary_or_non_yaml_recipe_file_is_one_line_exit_2(tmp_path, capsys, digit_pngs):
    from polymae.pipelines.cli import main

    cases = {"digit.yaml": digit_pngs[0][0], "nul.yaml": b"name: x\x00\n", "list.yaml": b"- 1\n- 2\n"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        code = main(["pretrain", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and str(tmp_path / name) in err, (name, err)


# == 13. a fuzz run over config values, file names and damaged files ===================================


def test_a_short_fuzz_run_finds_no_traceback_hang_or_silent_loss():
    """tests/fuzz_inputs.py (run it with a larger count by hand): every input either works or is the
    one-line error kind of its layer, within its time budget, and a damaged shard's losses are counted."""
    sys.path.insert(0, str(Path(__file__).parent))
    from fuzz_inputs import fuzz

    counts = fuzz(count=60, seed=1)
    assert counts["inputs"] == 60
    assert (counts["tracebacks"], counts["hangs"], counts["silent_losses"]) == (0, 0, 0), counts["found"]
