"""One checkpoint format: a folder per step, written whole or not at all, and checked before it is loaded.

    <run>/checkpoints/step-000500/
        model.safetensors   weights (safetensors: loadable without pickle)
        state.pt            optimizer, scheduler, scaler, step, RNG states, data position
        config.yaml         the run's config, so a checkpoint stands alone
        checksums.json      size and SHA-256 of each file above, written last

A checkpoint is written into a temporary folder and renamed into place, so a
run killed mid-write leaves either the previous checkpoints or the new one,
never a half-written folder under a final name. Only the last `keep_last`
are kept.

The rename protects against a crash, not against what happens to the files
afterwards (a disk that truncates them, a copy cut short, a flipped byte, a
hand that deletes one). `checkpoint_damage` checks every file against
checksums.json, so a damaged checkpoint is never loaded: `newest_intact`
passes over it, naming it and the reason, to the newest one that is intact.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, ConfigError, writing

STEP_PREFIX = "step-"
CHECKSUMS = "checksums.json"
CHECKED_FILES = ("model.safetensors", "state.pt", "config.yaml")
TEMPORARY_PREFIX = ".tmp-"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The checkpoint folders of a run (published under a final name, intact or not), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    published = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)
                 and p.name[len(STEP_PREFIX):].isdigit()]
    return sorted(published, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def checkpoint_damage(checkpoint: Path) -> str | None:
    """Why `checkpoint` must not be loaded (a file missing, of another size or another SHA-256
    than checksums.json says), or None when every file is as it was written."""
    checkpoint = Path(checkpoint)
    try:
        recorded = json.loads((checkpoint / CHECKSUMS).read_text())["files"]
    except FileNotFoundError:
        return f"{CHECKSUMS} is missing (the checkpoint cannot be checked)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{CHECKSUMS} is unreadable ({type(error).__name__})"
    if not isinstance(recorded, dict) or set(recorded) != set(CHECKED_FILES):
        return f"{CHECKSUMS} does not list {', '.join(CHECKED_FILES)}"
    for name in CHECKED_FILES:
        path, expected = checkpoint / name, recorded[name]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        if size != expected.get("bytes"):
            return f"{name} holds {size} bytes, {expected.get('bytes')} were written (truncated or replaced)"
        if file_digest(path) != expected.get("sha256"):
            return f"{name} does not match its SHA-256 in {CHECKSUMS} (its bytes changed after it was written)"
    return None


def newest_intact(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest checkpoint that passes `checkpoint_damage` or None, [(newer damaged one, why), ...])."""
    skipped = []
    for checkpoint in reversed(checkpoint_dirs(run_dir)):
        damage = checkpoint_damage(checkpoint)
        if damage is None:
            return checkpoint, skipped
        skipped.append((checkpoint, damage))
    return None, skipped


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest intact checkpoint of a run (None: there is none)."""
    return newest_intact(run_dir)[0]


def process_is_running(pid: int) -> bool:
    """Whether process `pid` exists on this machine (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_abandoned_temporaries(root: Path) -> None:
    """Temporary checkpoint folders whose writer is gone (killed mid-write): never loaded, removed.
    One whose writer still runs is left alone: it is another process's checkpoint in the making."""
    for temporary in root.glob(f"{TEMPORARY_PREFIX}*"):
        writer = temporary.name.rsplit("-", 1)[-1]
        if writer.isdigit() and int(writer) != os.getpid() and process_is_running(int(writer)):
            continue
        shutil.rmtree(temporary, ignore_errors=True)


def fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def intact_checkpoint_kept(run_dir: Path) -> str:
    """What a write that found the disk full leaves a run (the DiskFull message's second half)."""
    return (f"the last intact checkpoint ({latest_checkpoint(run_dir) or 'none yet'}) is kept; free space "
            "and continue with --resume")


def save_checkpoint(run_dir: Path, step: int, weights: dict[str, torch.Tensor], state: dict, config_text: str,
                    keep_last: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{STEP_PREFIX}{step:06d}"
    remove_abandoned_temporaries(root)
    tmp = root / f"{TEMPORARY_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(f"checkpoint {final}", lambda: intact_checkpoint_kept(run_dir)):
            write_checkpoint_files(tmp, weights, state, config_text, step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written folder only takes the space the next one needs
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(root)  # the rename itself, on disk
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_checkpoint_files(tmp: Path, weights: dict[str, torch.Tensor], state: dict, config_text: str,
                           step: int) -> None:
    tmp.mkdir()
    save_file(distinct_tensors(weights), str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    (tmp / "config.yaml").write_text(config_text)
    # The checksums are taken from the files as they are on disk, and written last: a folder
    # with checksums.json is a folder whose other files were complete when it was written.
    checksums = {name: {"bytes": (tmp / name).stat().st_size, "sha256": file_digest(tmp / name)}
                 for name in CHECKED_FILES}
    (tmp / CHECKSUMS).write_text(json.dumps({"step": step, "files": checksums}, indent=1))
    for path in tmp.iterdir():  # the rename below publishes only what is on disk
        fsync_path(path)


def distinct_tensors(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights on the CPU, each in memory of its own: safetensors refuses tensors that share
    memory, and tied weights (a vocabulary head sharing its input embedding) do."""
    seen, out = set(), {}
    for name, tensor in weights.items():
        tensor = tensor.detach().contiguous().cpu()
        if tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def load_weights(checkpoint: Path, module: torch.nn.Module, prefix: str = "") -> None:
    """A checkpoint's weights into `module`; with `prefix` ("model."), only the weights under it."""
    weights = load_file(str(Path(checkpoint) / "model.safetensors"))
    if prefix:
        weights = {name[len(prefix):]: tensor for name, tensor in weights.items() if name.startswith(prefix)}
    module.load_state_dict(weights)


def load_state(checkpoint: Path) -> dict:
    return torch.load(Path(checkpoint) / "state.pt", map_location="cpu", weights_only=False)


def describe_skipped(skipped: list[tuple[Path, str]]) -> list[str]:
    return [f"skipped checkpoint {checkpoint}: {why}" for checkpoint, why in skipped]


def resolve_checkpoint(path: str | Path, log=print) -> Path:
    """A run folder (its newest intact checkpoint) or a checkpoint folder (checked) -> the checkpoint
    folder. A damaged one is never returned: CheckpointError says why; newer damaged checkpoints of a
    run passed over for an older intact one are logged."""
    path = Path(path)
    if (path / "model.safetensors").is_file() or (path / CHECKSUMS).is_file():
        damage = checkpoint_damage(path)
        if damage is not None:
            raise CheckpointError(f"checkpoint {path} is damaged: {damage}")
        return path
    if not checkpoint_dirs(path):
        raise FileNotFoundError(f"{path} is neither a checkpoint folder nor a run folder with checkpoints")
    checkpoint, skipped = newest_intact(path)
    if checkpoint is None:
        raise CheckpointError(f"{path}: no intact checkpoint ("
                              + "; ".join(f"{c.name}: {why}" for c, why in skipped) + ")")
    for line in describe_skipped(skipped):
        log(line)
    return checkpoint


def hf_model_type(folder: str | Path) -> str | None:
    """The `model_type` of a local Hugging Face folder's config.json ("vit_mae", "bert"; None:
    not such a folder): the modality whose interop reads that type imports it."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError):
        raise ConfigError(f"{path}: not a valid Hugging Face config.json") from None
