"""Shared fixtures. Tests use real data shipped inside packages (scikit-learn's
digits and photos, scikit-image's photos) and never reach a model hub."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tests' models and tensors are tiny: one intra-op thread is faster than two, and far
# faster when another process shares the 2 cores (the pipeline's own runs set their threads).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    """scikit-learn's digits, sharded once per session into train/val splits."""
    import polymae.modalities  # noqa: F401
    from polymae.pipelines.shards import shard_source
    from polymae.shared.registry import MODALITIES

    out = tmp_path_factory.mktemp("digits-shards")
    modality = MODALITIES.get("image")({"image_size": [8, 8], "patch_size": 2, "channels": 1})
    shard_source(modality, "digits", out, val_fraction=0.2, seed=0, max_count=500)
    return out
