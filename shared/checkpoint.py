"""One checkpoint format: a folder per step, written whole or not at all.

    <run>/checkpoints/step-000500/
        model.safetensors   weights (safetensors: loadable without pickle)
        state.pt            optimizer, scheduler, scaler, step, RNG states, data position
        config.yaml         the run's config, so a checkpoint stands alone

A checkpoint is written into a temporary folder and renamed into place, so a
run killed mid-write leaves either the previous checkpoints or the new one,
never a half-written folder under a final name. Only the last `keep_last`
are kept.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import ConfigError

STEP_PREFIX = "step-"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)
            and (p / "model.safetensors").is_file() and (p / "state.pt").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoint_dirs(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, weights: dict[str, torch.Tensor], state: dict, config_text: str,
                    keep_last: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{STEP_PREFIX}{step:06d}"
    for stale in root.glob(".tmp-*"):  # left by a run killed mid-write; never loaded, now removed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    save_file(distinct_tensors(weights), str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    (tmp / "config.yaml").write_text(config_text)
    for path in tmp.iterdir():  # the rename below publishes only what is on disk
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (its latest checkpoint) or a checkpoint folder -> the checkpoint folder."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint folder nor a run folder with checkpoints")
    return latest


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
