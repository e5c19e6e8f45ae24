"""The voxel modality on REAL grids: nilearn's MNI152 brain template (density)
and the coloured airborne LiDAR scans of laspy 2.7.0's test data, voxelised
into RGB + density tiles. Adapters and their bad-input kinds, 3D patchify
and its inverse, voxelisation, voxel-aware masking, the opacity-weighted
radiance objective, spconv sparse convolution against dense conv3d, and a
few training steps of the ViT and the SparK sparse encoder."""
from __future__ import annotations

import dataclasses
import io
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import polymae.modalities  # noqa: F401  (registers the modalities)
from polymae.modalities.pointcloud.packaged import LASPY_VERSION, fetch_laspy_test_scans
from polymae.modalities.voxel import adapters
from polymae.modalities.voxel.masking import VoxelAwareMasker, class_split
from polymae.modalities.voxel.modality import VoxelModality, crop_or_pad
from polymae.modalities.voxel.objectives import RadianceLoss
from polymae.modalities.voxel.tokenizer import grid_coords_3d, patch_occupancy, patchify_3d, unpatchify_3d
from polymae.shared.errors import BadInput, ConfigError
from polymae.shared.masking import build_masker
from polymae.shared.model import DecoderConfig, ModelConfig, Outputs, build_model
from polymae.shared.objectives import LossTerms
from polymae.shared.packaged_data import PackagedDataError
from polymae.shared.registry import MASKERS, MODALITIES, OBJECTIVES
from polymae.shared.tokens import Batch, Tokens, collate, hidden_count

LIDAR_TILE = (32, 32, 16)


# -- real data ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def brain_samples() -> list[dict]:
    pytest.importorskip("nilearn", reason="nilearn (the voxel extra) ships the MNI152 template")
    return adapters.read_mni152()


@pytest.fixture(scope="module")
def scan_folder():
    try:
        return fetch_laspy_test_scans()
    except PackagedDataError as error:
        pytest.skip(f"pip could not fetch laspy {LASPY_VERSION}'s sdist (its tests/data holds the "
                    f"scans): {error}")


@pytest.fixture(scope="module")
def lidar_samples(scan_folder) -> list[dict]:
    return list(adapters.read_source("laspy-lidar", adapters.Voxelisation(grid_size=LIDAR_TILE, channels=4)))


@pytest.fixture(scope="module")
def lidar() -> VoxelModality:
    return MODALITIES.get("voxel")({"grid_size": list(LIDAR_TILE), "patch_size": 4, "channels": 4,
                                    "density_channel": 3})


@pytest.fixture(scope="module")
def brain() -> VoxelModality:
    return MODALITIES.get("voxel")({"grid_size": [32, 32, 32], "patch_size": 4, "channels": 1,
                                    "density_channel": 0, "occupancy_threshold": 0.05})


def grid_of(sample: dict) -> np.ndarray:
    return adapters.decode_grid(sample["grid.npz"], sample["__key__"])


def lidar_batch(modality, samples, masker, count=8, seed=0) -> Batch:
    items = []
    for i, sample in enumerate(samples[:count]):
        generator = torch.Generator().manual_seed(seed + i)
        tokens = modality.tokenize(modality.decode(sample), generator, train=False)
        items.append(({"voxel": tokens}, {"voxel": masker(tokens, generator)}, None, sample["__key__"]))
    return collate(items)


def voxel_model(modality: VoxelModality, config: ModelConfig):
    """The model of one voxel stream (`model.encoder` picks the ViT or SparK's sparse CNN)."""
    return build_model({"voxel": modality}, {"voxel": DecoderConfig()}, config)


def with_values(batch: Batch, values: torch.Tensor) -> Batch:
    """The same batch (mask and coords) with other token values."""
    return dataclasses.replace(batch, streams={"voxel": dataclasses.replace(batch.tokens, values=values)})


# -- built-in sources ------------------------------------------------------------------------------------

def test_mni152_source_gives_real_brain_density_grids(brain_samples):
    assert len(brain_samples) == 24                       # 3 templates x 8 corner sub-volumes
    assert len({s["__key__"] for s in brain_samples}) == 24
    for sample in brain_samples:
        grid = grid_of(sample)
        assert grid.shape == (1, 64, 64, 64) and grid.dtype == np.float32
        assert 0.0 <= grid.min() and grid.max() <= 1.0 + 1e-6
        assert (grid > 0.05).mean() > 0.05               # every sub-volume holds brain
        assert "." not in sample["__key__"]
        assert json.loads(sample["meta.json"])["channels"] == ["density"]


def test_laspy_lidar_source_gives_rgb_density_tiles(lidar_samples):
    assert len(lidar_samples) > 50
    scans = {json.loads(s["meta.json"])["source"].rsplit("/", 1)[-1] for s in lidar_samples}
    assert "autzen_trim.laz" in scans
    for sample in lidar_samples[:20]:
        grid = grid_of(sample)
        meta = json.loads(sample["meta.json"])
        assert grid.shape == (4, *LIDAR_TILE)
        occupied = grid[3] > 0
        assert np.expm1(grid[3]).sum() == pytest.approx(meta["points"], rel=1e-4)
        assert meta["points"] >= 64
        rgb = grid[:3][:, occupied]
        assert 0 <= rgb.min() and rgb.max() <= 1 and rgb.std() > 0.01   # real colours, not a constant
        assert (grid[:3][:, ~occupied] == 0).all()                      # empty space has no colour


def test_builtin_sources_check_the_channel_count():
    with pytest.raises(BadInput, match="channels: 1") as error:
        adapters.read_source("mni152", adapters.Voxelisation(channels=4))
    assert error.value.kind == "missing_source"
    with pytest.raises(BadInput, match="channels: 4"):
        adapters.read_source("laspy-lidar", adapters.Voxelisation(channels=1))
    assert set(VoxelModality().sources()) == {"mni152", "laspy-lidar"}


# -- voxelisation ---------------------------------------------------------------------------------------

def test_voxelisation_puts_every_point_of_a_real_scan_in_the_right_voxel(scan_folder):
    path = scan_folder / "autzen_trim.laz"
    xyz, rgb = adapters.read_points(path)
    settings = adapters.Voxelisation(grid_size=LIDAR_TILE, channels=4, min_points=64)
    samples = adapters.scan_samples(path, "autzen", settings)
    metas = [json.loads(s["meta.json"]) for s in samples]
    voxel_size, origin = metas[0]["voxel_size"], np.array(metas[0]["scan_origin"])
    assert np.allclose(origin, xyz.min(axis=0))
    g = adapters.voxel_indices(xyz, origin, voxel_size)
    owner = np.full(len(xyz), -1)
    for t, (sample, meta) in enumerate(zip(samples, metas)):
        local = g - np.array(meta["voxel_offset"])
        inside = ((local >= 0) & (local < np.array(LIDAR_TILE))).all(axis=1)
        assert (owner[inside] == -1).all()                 # tiles do not overlap
        owner[inside] = t
        assert inside.sum() == meta["points"]
        grid = grid_of(sample)
        linear = np.ravel_multi_index(local[inside].T, LIDAR_TILE)
        counts = np.bincount(linear, minlength=math.prod(LIDAR_TILE))
        assert np.array_equal(np.rint(np.expm1(grid[3].reshape(-1))).astype(int), counts)
        for c in range(3):                                 # mean colour of exactly the points in each voxel
            sums = np.bincount(linear, weights=rgb[inside, c], minlength=counts.size)
            mean = np.divide(sums, counts, out=np.zeros(counts.size), where=counts > 0)
            assert np.allclose(grid[c].reshape(-1), mean, atol=1e-6)
        # geometrically: each point lies in its voxel's box [origin + v * size, origin + (v + 1) * size)
        corner = np.array(meta["tile_origin"]) + local[inside] * voxel_size
        assert (xyz[inside] >= corner - 1e-6).all() and (xyz[inside] < corner + voxel_size + 1e-6).all()
    kept = (owner >= 0).sum()
    assert kept == sum(m["points"] for m in metas)
    assert kept + metas[0]["points_in_left_out_tiles"] == len(xyz) == metas[0]["scan_points"]


def test_voxelise_a_box_keeps_the_points_inside(scan_folder):
    xyz, rgb = adapters.read_points(scan_folder / "simple1_4.las")
    origin, size, shape = np.percentile(xyz, 30, axis=0), 2.0, (16, 16, 16)
    grid, inside = adapters.voxelise(xyz, rgb, origin, size, shape)
    box = ((xyz >= origin) & (xyz < origin + size * np.array(shape))).all(axis=1)
    assert np.array_equal(inside, box) and 0 < inside.sum() < len(xyz)
    assert np.rint(np.expm1(grid[3])).sum() == inside.sum()
    assert adapters.voxelise(xyz, None, origin, size, shape)[0].shape == (1, *shape)


def test_auto_voxel_size_gives_a_few_points_per_column(scan_folder):
    xyz, _ = adapters.read_points(scan_folder / "autzen_trim.laz")
    size = adapters.auto_voxel_size(xyz)
    columns = len(np.unique(np.floor((xyz[:, :2] - xyz[:, :2].min(0)) / size).astype(int), axis=0))
    assert 2.5 < len(xyz) / columns < 6


# -- adapters: grids and bad input --------------------------------------------------------------------------

def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def npy_bytes(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_decode_npz_and_npy_grids(brain_samples):
    grid = grid_of(brain_samples[0])
    assert np.array_equal(adapters.decode_grid(adapters.encode_grid(grid), "a"), grid)
    assert np.array_equal(adapters.decode_grid(npy_bytes(grid[0].astype(np.float64)), "b.npy", ".npy"), grid)
    assert np.array_equal(adapters.decode_grid(npz_bytes(volume=grid[0]), "c"), grid)   # the only array
    four = np.concatenate([grid] * 4)
    assert adapters.decode_grid(npz_bytes(grid=four, extra=np.zeros(3)), "d").shape == (4, 64, 64, 64)


@pytest.mark.parametrize("case,kind", [
    ("empty_bytes", "empty_grid"), ("garbage", "corrupt_grid"), ("truncated", "corrupt_grid"),
    ("two_arrays", "missing_array"), ("2d", "wrong_ndim"), ("5d", "wrong_ndim"), ("zero_size", "empty_grid"),
    ("nan", "nonfinite_grid"), ("inf", "nonfinite_grid"), ("strings", "wrong_dtype")])
def test_bad_grids_are_bad_input_naming_the_file(brain_samples, case, kind):
    real = grid_of(brain_samples[3])[0, :8, :8, :8]
    broken = real.copy()
    broken[2, 3, 4] = np.nan if case == "nan" else np.inf
    data = {
        "empty_bytes": b"", "garbage": b"this is not a grid at all" * 10,
        "truncated": adapters.encode_grid(real)[:200],
        "two_arrays": npz_bytes(a=real, b=real), "2d": npz_bytes(grid=real[0]),
        "5d": npz_bytes(grid=real[None, None]), "zero_size": npz_bytes(grid=np.zeros((4, 0, 8, 8), np.float32)),
        "nan": npz_bytes(grid=broken), "inf": npz_bytes(grid=broken),
        "strings": npz_bytes(grid=np.array([["a", "b"], ["c", "d"]])),
    }[case]
    with pytest.raises(BadInput) as error:
        adapters.decode_grid(data, f"scene_{case}.grid.npz")
    assert error.value.kind == kind
    assert error.value.source == f"scene_{case}.grid.npz"
    assert f"scene_{case}.grid.npz" in str(error.value)


def test_modality_decode_checks_channels_and_payload(brain_samples, lidar):
    with pytest.raises(BadInput) as error:
        lidar.decode(brain_samples[0])                      # 1-channel brain into an RGB + density modality
    assert error.value.kind == "wrong_channels" and brain_samples[0]["__key__"] in str(error.value)
    with pytest.raises(BadInput) as error:
        lidar.decode({"__key__": "k", "image.png": b""})
    assert error.value.kind == "missing_payload"


def test_folder_source_voxelises_scans_and_rejects_bad_files(tmp_path, brain_samples, scan_folder):
    from polymae.pipelines.shards import shard_source

    folder = tmp_path / "scenes"
    folder.mkdir()
    (folder / "brain.npz").write_bytes(brain_samples[0]["grid.npz"])
    np.save(folder / "brain_wm.npy", grid_of(brain_samples[-1])[0])
    (folder / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    shutil.copy(scan_folder / "simple1_4.las", folder / "facade.las")
    shutil.copy(scan_folder / "simple1_1.las", folder / "no_colour.las")      # point format 1: no RGB
    (folder / "corrupt.laz").write_bytes((scan_folder / "simple.laz").read_bytes()[:500])

    rgb = VoxelModality({"grid_size": [16, 16, 16], "patch_size": 4, "channels": 4, "min_points": 16})
    manifest = shard_source(rgb, str(folder), tmp_path / "rgb")["train"]
    rejected = {(r["source"] or "").rsplit("/", 1)[-1]: r["kind"] for r in manifest["rejected"]}
    assert rejected == {"brain.npz": "wrong_channels", "brain_wm.npy": "wrong_channels",
                        "broken.npz": "corrupt_grid", "no_colour.las": "missing_colour",
                        "corrupt.laz": "unreadable_points"}
    assert manifest["total"] > 10                                           # the facade's tiles

    density = VoxelModality({"grid_size": [16, 16, 16], "patch_size": 4, "channels": 1, "min_points": 16})
    manifest = shard_source(density, str(folder), tmp_path / "density")["train"]
    rejected = {(r["source"] or "").rsplit("/", 1)[-1]: r["kind"] for r in manifest["rejected"]}
    assert rejected == {"broken.npz": "corrupt_grid", "corrupt.laz": "unreadable_points"}

    with pytest.raises(BadInput) as error:
        adapters.read_source(str(tmp_path / "nowhere"))
    assert error.value.kind == "missing_source" and "nowhere" in str(error.value)


def test_voxel_options_are_validated():
    for options, match in [({"grid_size": [30, 32, 16], "patch_size": 4}, "multiple of patch_size"),
                           ({"channels": 4, "density_channel": 4}, "density_channel"),
                           ({"grid_size": [8, 8]}, "3 values")]:
        with pytest.raises(ConfigError, match=match):
            VoxelModality(options)
    assert VoxelModality({"channels": 4, "density_channel": -1}).options.density_channel == 3


# -- 3D patchify ----------------------------------------------------------------------------------------

def reference_patch(grid: torch.Tensor, p: int, x: int, y: int, z: int) -> torch.Tensor:
    return grid[:, x * p:(x + 1) * p, y * p:(y + 1) * p, z * p:(z + 1) * p].permute(1, 2, 3, 0).reshape(-1)


@pytest.mark.parametrize("which,crop,patch", [
    ("brain", (64, 64, 64), 8), ("brain", (64, 64, 64), 16), ("brain", (24, 40, 8), 8), ("brain", (5, 3, 7), 1),
    ("lidar", (32, 32, 16), 4), ("lidar", (32, 16, 8), 8), ("lidar", (12, 6, 9), 3)])
def test_patchify_3d_is_exact(brain_samples, lidar_samples, which, crop, patch):
    source = brain_samples[5] if which == "brain" else max(lidar_samples[:10], key=lambda s: len(s["grid.npz"]))
    grid = torch.from_numpy(grid_of(source))[:, :crop[0], :crop[1], :crop[2]].contiguous()
    tokens = patchify_3d(grid, patch)
    gx, gy, gz = (s // patch for s in crop)
    c = grid.shape[0]
    assert tokens.grid == (gx, gy, gz)
    assert tokens.values.shape == (gx * gy * gz, patch ** 3 * c)
    assert torch.equal(tokens.coords, grid_coords_3d(gx, gy, gz))
    for n in [0, 1, gx * gy * gz // 2, gx * gy * gz - 1]:
        x, y, z = tokens.coords[n].long().tolist()
        assert n == (x * gy + y) * gz + z
        assert torch.equal(tokens.values[n], reference_patch(grid, patch, x, y, z))
    assert torch.equal(unpatchify_3d(tokens.values, tokens.grid, patch), grid)
    batch = torch.stack([grid, grid.flip(1)])
    batched = patchify_3d(batch, patch)
    assert batched.values.shape == (2, gx * gy * gz, patch ** 3 * c) and batched.coords.shape == (2, gx * gy * gz, 3)
    assert torch.equal(unpatchify_3d(batched.values, batched.grid, patch), batch)


def test_patchify_rejects_a_grid_not_a_multiple_of_the_patch():
    with pytest.raises(ValueError, match="multiple of patch size 4"):
        patchify_3d(torch.zeros(1, 8, 8, 6), 4)


def test_tokenize_untokenize_round_trip_and_occupancy(brain_samples, brain, lidar_samples, lidar):
    grid = torch.from_numpy(grid_of(brain_samples[0]))
    tokens = brain.tokenize(grid, torch.Generator().manual_seed(0), train=False)   # centre crop of 64^3 -> 32^3
    assert tokens.values.shape == (512, 64) and tokens.grid == (8, 8, 8)
    assert torch.equal(brain.untokenize(tokens), grid[:, 16:48, 16:48, 16:48])
    occupied = tokens.values.amax(dim=-1) > 0.05
    assert torch.equal(tokens.fields["foreground"], occupied) and 0 < occupied.sum() < 512

    tile = torch.from_numpy(grid_of(lidar_samples[0]))
    tokens = lidar.tokenize(tile, torch.Generator().manual_seed(0), train=False)
    assert torch.equal(lidar.untokenize(tokens), tile)
    assert torch.equal(tokens.fields["foreground"], patch_occupancy(tokens.values, 4, 3, 0.0))
    assert torch.equal(tokens.fields["foreground"], tokens.values.view(256, 64, 4)[..., 3].amax(-1) > 0)

    trained = [brain.tokenize(grid, torch.Generator().manual_seed(s), train=True).values for s in range(4)]
    assert any(not torch.equal(trained[0], other) for other in trained[1:])          # random crops and flips
    assert torch.equal(trained[1], brain.tokenize(grid, torch.Generator().manual_seed(1), train=True).values)


def test_crop_or_pad(brain_samples):
    grid = torch.from_numpy(grid_of(brain_samples[2]))[:, :20, :40, :33]
    out = crop_or_pad(grid, (32, 32, 32), None)
    assert out.shape == (1, 32, 32, 32)
    assert torch.equal(out[:, :20, :, :], grid[:, :, 4:36, :32])                   # y centre-cropped
    assert (out[:, 20:] == 0).all()                                                # x zero-padded
    assert out.shape == crop_or_pad(grid, (32, 32, 32), torch.Generator().manual_seed(3)).shape


# -- voxel-aware masking -----------------------------------------------------------------------------------

def real_tokens(lidar, lidar_samples, count=12) -> list[Tokens]:
    samples = sorted(lidar_samples, key=lambda s: json.loads(s["meta.json"])["points"])
    picked = samples[:: max(1, len(samples) // count)][:count]
    return [lidar.tokenize(lidar.decode(s), torch.Generator().manual_seed(0), train=False) for s in picked]


@pytest.mark.parametrize("ratio,foreground_ratio", [(0.9, 0.75), (0.75, 0.5), (0.99, 0.95), (0.99, None),
                                                    (0.5, 0.0), (0.8, 1.0)])
def test_voxel_aware_masker_exact_count_and_foreground_ratio(lidar, lidar_samples, ratio, foreground_ratio):
    masker = build_masker("voxel_aware", ratio, foreground_ratio=foreground_ratio)
    target = ratio if foreground_ratio is None else foreground_ratio
    for i, tokens in enumerate(real_tokens(lidar, lidar_samples)):
        mask = masker(tokens, torch.Generator().manual_seed(i))
        n, fg = tokens.num_tokens, tokens.fields["foreground"]
        total = hidden_count(n, ratio)
        assert mask.hidden.sum() == total == n - mask.num_visible
        assert mask.num_visible >= 1
        n_fg, n_bg = int(fg.sum()), int((~fg).sum())
        hidden_fg, hidden_bg = int((mask.hidden & fg).sum()), int((mask.hidden & ~fg).sum())
        want = round(target * n_fg)
        if total - n_bg <= want <= min(n_fg, total):                 # the foreground ratio fits: exact
            assert hidden_fg == want
        else:                                                        # moved as little as the total needs
            assert hidden_fg == min(max(want, total - n_bg, 0), n_fg, total)
        assert hidden_bg == total - hidden_fg
        assert torch.equal(mask.ids_keep.sort().values, (~mask.hidden).nonzero().flatten())


def test_voxel_aware_masker_background_ratio(lidar, lidar_samples):
    masker = build_masker("voxel_aware", 0.9, background_ratio=0.98)
    for i, tokens in enumerate(real_tokens(lidar, lidar_samples)):
        mask = masker(tokens, torch.Generator().manual_seed(i))
        bg = ~tokens.fields["foreground"]
        want, total = round(0.98 * int(bg.sum())), hidden_count(tokens.num_tokens, 0.9)
        if want <= total and total - want <= int(tokens.fields["foreground"].sum()):
            assert int((mask.hidden & bg).sum()) == want
        assert mask.hidden.sum() == total


def test_voxel_aware_masks_favour_occupied_patches_and_batch(lidar, lidar_samples):
    """At 99% overall with 90% of occupied patches hidden, the few visible patches are mostly
    occupied (random masking would leave mostly empty ones), and masks of real tiles batch densely."""
    tokens = real_tokens(lidar, lidar_samples, count=8)
    aware = build_masker("voxel_aware", 0.99, foreground_ratio=0.9)
    plain = build_masker("random", 0.99)
    items, fg_aware, fg_random = [], 0, 0
    for i, t in enumerate(tokens):
        mask = aware(t, torch.Generator().manual_seed(i))
        fg_aware += int((~mask.hidden & t.fields["foreground"]).sum())
        fg_random += int((~plain(t, torch.Generator().manual_seed(i)).hidden & t.fields["foreground"]).sum())
        items.append(({"voxel": t}, {"voxel": mask}, None, str(i)))
    assert fg_aware > 2 * fg_random
    batch = collate(items)
    assert batch.mask.hidden.shape == (8, 256) and batch.mask.num_visible == 256 - hidden_count(256, 0.99) == 3
    assert batch.tokens.fields["foreground"].shape == (8, 256)


def test_voxel_aware_masker_seeding_and_values_fallback(lidar, lidar_samples):
    tokens = real_tokens(lidar, lidar_samples, count=3)[2]
    masker = MASKERS.get("voxel_aware")(ratio=0.9, foreground_ratio=0.6)
    first = masker(tokens, torch.Generator().manual_seed(7))
    assert torch.equal(first.hidden, masker(tokens, torch.Generator().manual_seed(7)).hidden)
    assert not torch.equal(first.hidden, masker(tokens, torch.Generator().manual_seed(8)).hidden)
    bare = Tokens(values=tokens.values, coords=tokens.coords, grid=tokens.grid)      # no Tokens.foreground
    with pytest.raises(ValueError, match="occupancy"):
        masker(bare, torch.Generator().manual_seed(7))
    from_values = MASKERS.get("voxel_aware")(ratio=0.9, foreground_ratio=0.6, channels=4, density_channel=3)
    assert torch.equal(from_values(bare, torch.Generator().manual_seed(7)).hidden, first.hidden)


def test_voxel_aware_masker_rejects_bad_options():
    with pytest.raises(ValueError, match="not both"):
        VoxelAwareMasker(0.9, foreground_ratio=0.5, background_ratio=0.9)
    with pytest.raises(ValueError, match="foreground_ratio"):
        VoxelAwareMasker(0.9, foreground_ratio=1.5)
    with pytest.raises(ValueError, match="mask ratio"):
        VoxelAwareMasker(1.0)
    with pytest.raises(ValueError, match="masker 'voxel_aware'"):
        build_masker("voxel_aware", 0.9, colour="red")


def test_class_split_keeps_the_total():
    assert class_split(10, 4, 20, 0.5) == (2, 8)
    assert class_split(10, 4, 3, 0.0) == (4, 6)     # the background cannot absorb: 7 > 3 -> fg takes 4
    assert class_split(3, 10, 50, 1.0) == (3, 0)    # the total caps the foreground
    for total, a, b, r in [(0, 5, 5, 0.5), (9, 0, 10, 0.9), (9, 10, 0, 0.2)]:
        first, second = class_split(total, a, b, r)
        assert first + second == total and 0 <= first <= a and 0 <= second <= b


# -- the radiance objective -------------------------------------------------------------------------------

def test_radiance_objective_weights_colour_by_opacity(lidar, lidar_samples):
    masker = build_masker("voxel_aware", 0.75, foreground_ratio=0.5)
    batch = lidar_batch(lidar, lidar_samples, masker, count=4)
    values = batch.tokens.values
    voxels = values.view(4, 256, 64, 4)

    def loss(pred, **options):
        term = RadianceLoss("voxel", **{"channels": 4, "density_channel": 3, **options})
        return term(Outputs({"voxel": {"pred": pred}}, latent=torch.empty(0)), batch).item()

    assert loss(values.clone()) == 0.0
    hidden = batch.mask.hidden
    b, n = (hidden & batch.tokens.fields["foreground"]).nonzero()[0].tolist()       # a hidden, occupied patch
    density = voxels[b, n, :, 3]
    empty_v, dense_v = int((density == 0).nonzero()[0]), int(density.argmax())
    n_hidden = int(hidden.sum())

    def perturbed(v, channel, delta=0.5, token=n):
        pred = values.clone().view(4, 256, 64, 4)
        pred[b, token, v, channel] += delta
        return pred.view_as(values)

    assert loss(perturbed(empty_v, 0)) == 0.0                              # colour of empty space: free
    sigma = float(density[dense_v])
    expected = (1 - math.exp(-sigma)) * 0.5 ** 2 / 3 / 64 / n_hidden      # alpha * mean over 3 colours
    assert loss(perturbed(dense_v, 1)) == pytest.approx(expected, rel=1e-5)
    assert loss(perturbed(empty_v, 3)) == pytest.approx(0.5 ** 2 / 64 / n_hidden, rel=1e-5)   # density counts
    assert loss(perturbed(empty_v, 0), alpha="none") == pytest.approx(0.5 ** 2 / 3 / 64 / n_hidden, rel=1e-5)
    peak = float(voxels[b, :, :, 3].max())
    assert loss(perturbed(dense_v, 1), alpha="density") == pytest.approx(sigma / peak * 0.5 ** 2 / 3 / 64 / n_hidden,
                                                                         rel=1e-5)
    assert loss(perturbed(dense_v, 1), colour_weight=0.0) == 0.0
    visible = int((~hidden[b]).nonzero()[0])
    assert loss(perturbed(0, 3, token=visible)) == 0.0                     # visible patches cost nothing
    with pytest.raises(ValueError, match="channels"):
        loss(values, channels=3)
    assert OBJECTIVES.get("radiance") is RadianceLoss
    assert lidar.default_objective == {"radiance": {"weight": 1.0, "channels": 4, "density_channel": 3,
                                                    "alpha": "opacity", "step": 1.0}}


def test_radiance_objective_on_density_only_grids_is_mse(brain_samples, brain):
    items = []
    for i, sample in enumerate(brain_samples[:2]):
        tokens = brain.tokenize(brain.decode(sample), torch.Generator().manual_seed(i), train=False)
        mask = build_masker("random", 0.6)(tokens, torch.Generator().manual_seed(i))
        items.append(({"voxel": tokens}, {"voxel": mask}, None, str(i)))
    batch = collate(items)
    noise = torch.randn(batch.tokens.values.shape, generator=torch.Generator().manual_seed(0))
    pred = batch.tokens.values + 0.1 * noise
    got = RadianceLoss("voxel", channels=1, density_channel=0)(Outputs({"voxel": {"pred": pred}}, torch.empty(0)),
                                                               batch)
    per_token = (pred - batch.tokens.values).pow(2).mean(-1)
    assert got.item() == pytest.approx(per_token[batch.mask.hidden].mean().item(), rel=1e-5)


# -- spconv: sparse convolution against dense conv3d ------------------------------------------------

@pytest.fixture(scope="module")
def spconv_parts():
    pytest.importorskip("spconv", reason="the sparse encoder needs spconv (the voxel extra)")
    from polymae.modalities.voxel import sparse

    return sparse


def occupied_sites(grids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real sparse input: the occupied voxels of real tiles -> (indices [K, 4], features [K, C])."""
    indices = (grids[:, -1] > 0).nonzero()          # a transposed view: spconv must get it made contiguous
    features = grids.permute(0, 2, 3, 4, 1)[tuple(indices.T)]
    return indices, features


def dense_at(dense: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return dense.permute(0, 2, 3, 4, 1)[tuple(indices.long().T)]


@pytest.mark.parametrize("train_mode", [True, False])
def test_sparse_convolutions_equal_dense_conv3d_on_active_sites(spconv_parts, lidar_samples, train_mode):
    sparse = spconv_parts
    torch.manual_seed(0)
    grids = torch.stack([torch.from_numpy(grid_of(s)) for s in lidar_samples[:3]])   # [3, 4, 32, 32, 16]
    indices, features = occupied_sites(grids)
    assert 100 < len(indices) < 0.2 * grids[:, 0].numel()
    dense_input = grids * (grids[:, 3:] > 0)

    subm = sparse.submanifold_conv(4, 8).train(train_mode)
    out = subm(sparse.sparse_tensor(features, indices, LIDAR_TILE, 3))
    assert torch.equal(out.indices.long(), indices)                          # submanifold: same sites, same order
    weight = subm.conv.weight.permute(0, 4, 1, 2, 3)                          # spconv KRSC [out, kx, ky, kz, in]
    reference = F.conv3d(dense_input, weight, subm.bias, padding=1)
    assert torch.allclose(out.features, dense_at(reference, indices), atol=1e-5)

    strided = sparse.strided_conv(4, 8).train(train_mode)
    out = strided(sparse.sparse_tensor(features, indices, LIDAR_TILE, 3))
    reference = F.conv3d(dense_input, strided.conv.weight.permute(0, 4, 1, 2, 3), strided.bias, stride=2, padding=1)
    assert tuple(out.spatial_shape) == (16, 16, 8) == tuple(reference.shape[2:])
    reach = F.max_pool3d((grids[:, 3:] > 0).float(), 3, stride=2, padding=1)[:, 0] > 0   # any active input in window
    assert set(map(tuple, out.indices.long().tolist())) == set(map(tuple, reach.nonzero().tolist()))
    assert torch.allclose(out.features, dense_at(reference, out.indices), atol=1e-5)


def test_sparse_gradients_match_dense(spconv_parts, lidar_samples):
    sparse = spconv_parts
    grids = torch.stack([torch.from_numpy(grid_of(s)) for s in lidar_samples[3:5]])
    indices, features = occupied_sites(grids)
    conv = sparse.submanifold_conv(4, 6)
    out = conv(sparse.sparse_tensor(features, indices, LIDAR_TILE, 2))
    out.features.pow(2).sum().backward()
    weight = conv.conv.weight.detach().permute(0, 4, 1, 2, 3).clone().requires_grad_(True)
    reference = dense_at(F.conv3d(grids * (grids[:, 3:] > 0), weight, None, padding=1), indices) + conv.bias.detach()
    reference.pow(2).sum().backward()
    assert torch.allclose(conv.conv.weight.grad, weight.grad.permute(0, 2, 3, 4, 1), rtol=1e-4, atol=1e-4)


def small_config(width: int, **extra) -> ModelConfig:
    return ModelConfig(size="tiny", width=width, depth=2, heads=4, decoder_width=width, decoder_depth=1,
                       decoder_heads=4, **extra)


def test_sparse_autoencoder_never_sees_hidden_patches(spconv_parts, brain_samples):
    modality = VoxelModality({"grid_size": [32, 32, 32], "patch_size": 4, "channels": 1})
    torch.manual_seed(0)
    model = voxel_model(modality, small_config(16, encoder="sparse_cnn")).eval()
    items = []
    for i, sample in enumerate(brain_samples[:2]):
        tokens = modality.tokenize(modality.decode(sample), torch.Generator().manual_seed(i), train=False)
        mask = build_masker("random", 0.6)(tokens, torch.Generator().manual_seed(i))
        items.append(({"voxel": tokens}, {"voxel": mask}, None, str(i)))
    batch = collate(items)
    values, mask = batch.tokens.values, batch.mask
    out = model(batch)
    assert out.pred("voxel").shape == values.shape
    assert out.latent.shape == (2, mask.num_visible, 16)
    scrambled = torch.where(mask.hidden.unsqueeze(-1), torch.rand_like(values), values)
    assert torch.allclose(model(with_values(batch, scrambled)).pred("voxel"), out.pred("voxel"), rtol=0, atol=1e-6)
    changed = torch.where(mask.hidden.unsqueeze(-1), values, values + 0.5)
    assert not torch.allclose(model(with_values(batch, changed)).pred("voxel"), out.pred("voxel"))
    assert model.features(batch).shape == (2, 32)


def test_encoder_choice_and_3d_position_encodings(brain, brain_samples):
    from polymae.shared.model import MaskedAutoencoder
    from polymae.shared.position import LearnedPosition, SinCosPosition

    model = voxel_model(brain, small_config(48))
    assert isinstance(model, MaskedAutoencoder) and isinstance(model.input_adapters["voxel"].position, SinCosPosition)
    with pytest.raises(ConfigError, match="multiple of 6"):
        voxel_model(brain, small_config(64))
    with pytest.raises(ConfigError, match="unknown encoder 'swin'.*sparse_cnn.*vit"):
        voxel_model(brain, small_config(48, encoder="swin"))
    tokens = brain.tokenize(brain.decode(brain_samples[0]), torch.Generator().manual_seed(0), train=False)
    table = model.input_adapters["voxel"].position(tokens.coords)                 # [512, 48]: 16 dims per axis
    same_xy = (tokens.coords[:, 0] == 3) & (tokens.coords[:, 1] == 5)   # a column of tokens along z
    column = table[same_xy]
    assert torch.equal(column[:, :32], column[:1, :32].expand(len(column), -1))   # x and y parts constant
    assert len(set(map(tuple, column[:, 32:].tolist()))) == len(column)           # z part differs

    learned = voxel_model(brain, small_config(48, position="learned"))
    position = learned.input_adapters["voxel"].position
    assert isinstance(position, LearnedPosition) and position.table.shape[0] == 512
    rows = position(tokens.coords)                                         # coords (x, y, z) index the table
    assert torch.equal(rows, position.table)                                # ... in token order, exactly once


# -- training on real grids ---------------------------------------------------------------------------------

def train_steps(modality, model, batch, objective, steps, lr):
    terms = LossTerms(objective, ["voxel"])

    def loss_of():
        return terms(model(batch), batch)[0]

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    with torch.no_grad():
        before = loss_of().item()
    for _ in range(steps):
        loss = loss_of()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = loss_of().item()
    return before, after


@pytest.mark.parametrize("encoder", ["vit", "sparse_cnn"])
def test_a_few_steps_on_real_lidar_grids_lower_the_loss(lidar_samples, encoder):
    if encoder == "sparse_cnn":
        pytest.importorskip("spconv", reason="the sparse encoder needs spconv (the voxel extra)")
    modality = VoxelModality({"grid_size": list(LIDAR_TILE), "patch_size": 4, "channels": 4})
    masker = build_masker("voxel_aware", 0.9, foreground_ratio=0.75)
    batch = lidar_batch(modality, lidar_samples, masker, count=6)
    torch.manual_seed(0)
    model = voxel_model(modality, small_config(48 if encoder == "vit" else 16, encoder=encoder))
    before, after = train_steps(modality, model, batch, modality.default_objective, steps=15, lr=2e-3)
    assert math.isfinite(after) and after < 0.7 * before, (before, after)


@pytest.mark.parametrize("encoder", ["vit", "sparse_cnn"])
def test_a_few_steps_on_real_brain_grids_lower_the_loss(brain_samples, encoder):
    if encoder == "sparse_cnn":
        pytest.importorskip("spconv", reason="the sparse encoder needs spconv (the voxel extra)")
    modality = VoxelModality({"grid_size": [32, 32, 32], "patch_size": 8, "channels": 1,
                              "occupancy_threshold": 0.05})
    items = []
    for i, sample in enumerate(brain_samples[::4]):
        tokens = modality.tokenize(modality.decode(sample), torch.Generator().manual_seed(i), train=True)
        mask = build_masker("random", 0.6)(tokens, torch.Generator().manual_seed(i))
        items.append(({"voxel": tokens}, {"voxel": mask}, None, str(i)))
    batch = collate(items)
    torch.manual_seed(0)
    model = voxel_model(modality, small_config(48 if encoder == "vit" else 16, encoder=encoder))
    before, after = train_steps(modality, model, batch, modality.default_objective, steps=15, lr=2e-3)
    assert math.isfinite(after) and after < 0.7 * before, (before, after)


# -- pictures -----------------------------------------------------------------------------------------------

def test_render_draws_original_masked_and_reconstruction(lidar, lidar_samples, brain, brain_samples):
    masker = build_masker("voxel_aware", 0.9, foreground_ratio=0.5)
    batch = lidar_batch(lidar, lidar_samples, masker, count=3)
    picture = lidar.render(batch.tokens, batch.stream_mask("voxel")[0], batch.tokens.values.clone(), rows=2)
    array = np.asarray(picture)
    assert picture.mode == "RGB" and array.shape[0] > 50 and array.shape[1] > 3 * array.shape[0] / 2
    from polymae.modalities.voxel.render import GAP_PANEL

    panel = (array.shape[1] - 2 * GAP_PANEL * 3) // 3           # three panels, drawn at 3x (96 px / 32 voxels)
    original, reconstruction = array[:, :panel], array[:, -panel:]
    assert original.std() > 5                              # real colours drawn
    assert np.abs(original.astype(int) - reconstruction.astype(int)).mean() < 1   # perfect prediction -> same

    tokens = brain.tokenize(brain.decode(brain_samples[1]), torch.Generator().manual_seed(0), train=False)
    mask = build_masker("random", 0.6)(tokens, torch.Generator().manual_seed(0))
    one = collate([({"voxel": tokens}, {"voxel": mask}, None, "b")])
    picture = brain.render(one.tokens, one.stream_mask("voxel")[0], torch.zeros_like(one.tokens.values))
    assert np.asarray(picture).std() > 10


def test_shipped_voxel_recipes_build(tmp_path):
    from polymae.pipelines.runs import build_parts
    from polymae.shared.config import load_config

    for recipe, model_kind, masker_kind in [("voxel/nerf_mae.yaml", "MaskedAutoencoder", "VoxelAwareMasker"),
                                            ("voxel/spark_sparse.yaml", "SparseMaskedAutoencoder", "RandomMasker")]:
        if model_kind.startswith("Sparse"):
            pytest.importorskip("spconv", reason="the sparse encoder needs spconv (the voxel extra)")
        config = load_config(recipe, [f"data.shards={tmp_path / 'none'}"])
        parts = build_parts(config)
        (spec,) = parts.streams
        assert type(parts.model).__name__ == model_kind and type(spec.masker).__name__ == masker_kind
        assert spec.modality.name == "voxel" and list(parts.objective) == ["radiance"]
        assert sum(p.numel() for p in parts.model.parameters()) < 2_000_000
        with pytest.raises(ConfigError, match="encoder_options"):  # options meant for another encoder (a GNN's)
            build_parts(load_config(recipe, [f"data.shards={tmp_path / 'none'}", "model.encoder_options.dropout=0.1"]))
