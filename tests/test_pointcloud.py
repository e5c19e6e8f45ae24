"""The point-cloud modalities on REAL scans: laspy 2.7.0's LAS/LAZ test files
(fetched once through pip, from laspy's source distribution, and cached), a
PLY and a PCD written from them by open3d, and a KITTI-style .bin sweep made
from a scan's xyz + intensity.

Covers the adapters and every bad-input kind, tiling, open3d preprocessing,
farthest point sampling, kNN grouping, the tokenize/untokenize round trip,
the maskers (exact count, polarity, determinism; block and radial geometry),
the Chamfer and occupancy terms, rendering, sharding + streaming, and a few
training steps that lower the loss.
"""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch

from polymae.modalities.pointcloud import adapters
from polymae.modalities.pointcloud.adapters import (Cloud, decode_points, encode_npz, preprocess, read_source,
                                                    tile_cloud, write_open3d)
from polymae.modalities.pointcloud.masking import PointBlockMasker, RadialMasker
from polymae.modalities.pointcloud.modality import LidarModality, PointCloudModality
from polymae.modalities.pointcloud.objectives import ChamferLoss, OccupancyLoss, chamfer_distance, occupancy_target
from polymae.modalities.pointcloud.packaged import LASPY_VERSION, fetch_laspy_test_scans
from polymae.modalities.pointcloud.tokenizer import (farthest_point_sample, group, knn, tokenize_points,
                                                     untokenize_points)
from polymae.pipelines.shards import samples_recording_errors
from polymae.shared.errors import BadInput, ConfigError
from polymae.shared.masking import build_masker
from polymae.shared.model import DecoderConfig, ModelConfig, Outputs, build_model
from polymae.shared.objectives import LossTerms
from polymae.shared.packaged_data import PackagedDataError
from polymae.shared.registry import MASKERS, MODALITIES, OBJECTIVES
from polymae.shared.tokens import Batch, Tokens, collate, hidden_count

SMALL = ModelConfig(width=64, depth=2, heads=4, decoder_width=64, decoder_depth=1, decoder_heads=4, position="mlp")


# -- real data ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scans():
    try:
        return fetch_laspy_test_scans()
    except PackagedDataError as error:
        pytest.skip(f"laspy {LASPY_VERSION}'s test scans could not be fetched through pip: {error}")


def read(path) -> Cloud:
    return decode_points(path.read_bytes(), path.suffix, str(path))


@pytest.fixture(scope="module")
def simple(scans) -> Cloud:
    return read(scans / "simple.las")   # 1,065 airborne points with intensity and colour


@pytest.fixture(scope="module")
def autzen(scans) -> Cloud:
    return read(scans / "autzen_trim.laz")   # 110,000 points around Autzen stadium


def all_samples(iterator) -> tuple[list[dict], list[BadInput]]:
    errors: list[BadInput] = []
    return list(samples_recording_errors(iterator, errors.append)), errors


@pytest.fixture(scope="module")
def tile_samples(scans):
    samples, errors = all_samples(read_source("laspy-tiles"))
    return samples


@pytest.fixture(scope="module")
def sweep_samples(scans):
    samples, errors = all_samples(read_source("laspy-sweeps"))
    return samples


# -- adapters -------------------------------------------------------------------------------------------


def test_fetch_is_cached_and_holds_the_real_scans(scans):
    assert fetch_laspy_test_scans() == scans
    names = {p.name for p in scans.iterdir()}
    assert {"autzen_trim.laz", "simple.las", "simple.laz", "vegetation_1_3.las"} <= names


def test_las_and_laz_decode_to_the_same_points(scans, simple):
    laz = read(scans / "simple.laz")                   # lazrs decompression
    assert len(simple) == len(laz) == 1065
    np.testing.assert_array_equal(simple.xyz + simple.origin, laz.xyz + laz.origin)
    assert sorted(simple.features) == ["intensity", "rgb"]
    for values in simple.features.values():
        assert values.dtype == np.float32 and 0 <= values.min() and values.max() <= 1
    assert np.abs(simple.xyz).max() < 5000                # stored relative to the origin (float32-safe)


@pytest.mark.parametrize("suffix", [".ply", ".pcd"])
def test_open3d_formats_round_trip_a_real_scan(simple, tmp_path, suffix):
    path = tmp_path / f"simple{suffix}"
    write_open3d(simple, path)
    back = read(path)
    np.testing.assert_allclose(back.xyz + back.origin, simple.xyz + simple.origin, rtol=0, atol=1e-6)
    assert sorted(back.features) == ["intensity", "rgb"]
    np.testing.assert_allclose(back.features["intensity"], simple.features["intensity"], atol=1e-6)
    np.testing.assert_allclose(back.features["rgb"], simple.features["rgb"], atol=1 / 255)
    # UTM-sized coordinates are re-based, so the float32 shard record keeps millimetres
    assert np.abs(back.origin).max() > 1e5 and np.abs(back.xyz).max() < 1e4
    stored = decode_points(encode_npz(back), "points.npz", "record")
    np.testing.assert_allclose(stored.xyz + stored.origin, simple.xyz + simple.origin, rtol=0, atol=1e-3)


def test_kitti_bin_from_a_real_scan(simple, tmp_path):
    centred = simple.shifted(simple.origin + simple.xyz.mean(axis=0))
    sweep = np.concatenate([centred.xyz, centred.features["intensity"]], axis=1).astype(np.float32)
    (tmp_path / "000000.bin").write_bytes(sweep.tobytes())
    back = read(tmp_path / "000000.bin")
    np.testing.assert_array_equal(back.xyz, sweep[:, :3].astype(np.float64))
    np.testing.assert_array_equal(back.features["intensity"], sweep[:, 3:])


def test_numpy_formats(simple, tmp_path):
    columns = np.concatenate([simple.xyz, simple.features["intensity"], simple.features["rgb"]], axis=1)
    np.save(tmp_path / "c.npy", columns)                   # 7 columns: xyz, intensity, rgb
    back = read(tmp_path / "c.npy")
    np.testing.assert_allclose(back.xyz, simple.xyz)
    np.testing.assert_allclose(back.features["rgb"], simple.features["rgb"])
    back = decode_points(encode_npz(simple), "points.npz", "record")
    np.testing.assert_allclose(back.xyz + back.origin, simple.xyz + simple.origin, atol=1e-3)
    np.testing.assert_array_equal(back.origin, simple.origin)


def bad(data: bytes, kind: str, name: str) -> BadInput:
    with pytest.raises(BadInput) as caught:
        decode_points(data, name, f"/data/{name}")
    assert caught.value.kind == kind, caught.value
    assert f"/data/{name}" in str(caught.value)            # the error names the file
    return caught.value


def test_every_bad_input_kind_names_the_file(scans, simple):
    laz = (scans / "simple.laz").read_bytes()
    bad(b"", "empty_cloud", "a.ply")
    bad(b"ply\nformat ascii 1.0\nelement vertex 0\nproperty float x\nproperty float y\nproperty float z\n"
        b"end_header\n", "empty_cloud", "b.ply")
    bad(np.zeros((0, 4), np.float32).tobytes() or b"", "empty_cloud", "c.bin")
    bad(b"this is not a point cloud", "unreadable_points", "d.ply")
    bad(b"# .PCD v0.7\nnonsense", "unreadable_points", "e.pcd")
    bad(laz[: len(laz) // 2], "unreadable_points", "f.laz")       # a truncated real LAZ
    bad(laz[:100], "unreadable_points", "g.las")
    bad(b"\x00" * 15, "unreadable_points", "h.bin")                 # not whole float32 quadruples
    bad(b"garbage", "unreadable_points", "i.npy")
    bad(b"", "empty_cloud", "j.xyz")
    nan = np.concatenate([simple.xyz[:50], [[np.nan, 0, 0]]]).astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, nan)
    error = bad(buffer.getvalue(), "nan_coordinates", "k.npy")
    assert "1 of 51" in error.problem
    buffer = io.BytesIO()
    np.savez(buffer, xyz=simple.xyz[:40], intensity=np.full(40, np.inf))
    bad(buffer.getvalue(), "nan_features", "l.npz")
    with pytest.raises(BadInput) as caught:
        decode_points(b"\x00" * 16, "m.xyz", "/data/m.xyz")
    assert caught.value.kind == "unreadable_points"


def test_modality_decode_rejects_small_clouds_and_missing_features(simple):
    few = {"__key__": "few", "points.npz": encode_npz(simple.subset(np.arange(10)))}
    with pytest.raises(BadInput) as caught:
        PointCloudModality({"group_size": 32}).decode(few)
    assert caught.value.kind == "too_few_points" and "few.points.npz" in str(caught.value)
    sweep = {"__key__": "sweep", "lidar.bin": np.zeros((64, 4), np.float32).tobytes()}
    with pytest.raises(BadInput) as caught:
        PointCloudModality({"features": ["rgb"]}).decode(sweep)
    assert caught.value.kind == "missing_feature" and "drop it" in caught.value.problem
    with pytest.raises(BadInput) as caught:
        PointCloudModality().decode({"__key__": "x", "image.png": b""})
    assert caught.value.kind == "missing_payload"
    # normals estimated by open3d on the fly, and turned with the points by the rotation augmentation
    modality = PointCloudModality({"features": ["intensity", "normals"], "estimate_normals": True,
                                   "num_groups": 8, "group_size": 8, "scale_range": [1.0, 1.0]})
    cloud = modality.decode({"__key__": "simple", "points.npz": encode_npz(simple)})
    plain = modality.points(cloud, torch.Generator().manual_seed(0), train=False)
    turned = modality.points(cloud, torch.Generator().manual_seed(0), train=True)
    assert plain.shape[1] == 7 and modality.feature_column("normals") == 4
    rotation = torch.linalg.lstsq(plain[:, :3], turned[:, :3]).solution   # the augmentation's rotation
    torch.testing.assert_close(plain[:, 4:7] @ rotation, turned[:, 4:7], atol=1e-3, rtol=0)


def test_folder_source_shards_good_files_and_lists_bad_ones(simple, tmp_path):
    from polymae.pipelines.shards import shard_source

    folder = tmp_path / "scans"
    folder.mkdir()
    write_open3d(simple, folder / "good.ply")
    (folder / "broken.pcd").write_bytes(b"# .PCD v0.7\nnonsense")
    (folder / "empty.bin").write_bytes(b"")
    modality = PointCloudModality({"tile_points": 0})
    manifests = shard_source(modality, str(folder), tmp_path / "shards")
    train = manifests["train"]
    assert train["total"] == 1 and train["inputs"] == 3
    kinds = {r["source"].rsplit("/", 1)[-1]: r["kind"] for r in train["rejected"]}
    assert kinds == {"broken.pcd": "unreadable_points", "empty.bin": "empty_cloud"}
    with pytest.raises(BadInput) as caught:
        read_source(str(tmp_path / "nowhere"))
    assert caught.value.kind == "missing_source"


def test_tiles_keep_every_point_in_its_cell(autzen):
    size = adapters.auto_tile_size(autzen, 2048)
    pieces = list(tile_cloud(autzen, size, "square", split_above=4 * 2048))
    assert len(pieces) > 30
    assert sum(len(piece) for _, piece, _ in pieces) == len(autzen)   # nothing lost, nothing repeated
    low = autzen.xyz[:, :2].min(axis=0) + autzen.origin[:2]
    for label, piece, side in pieces[::7]:
        absolute = piece.xyz + piece.origin
        assert np.ptp(absolute[:, 0]) <= side + 1e-6 and np.ptp(absolute[:, 1]) <= side + 1e-6
        corner = piece.origin[:2]
        assert ((absolute[:, :2] >= corner - 1e-6) & (absolute[:, :2] <= corner + side + 1e-6)).all()
        assert np.all(np.round((corner - low) / side, 6) % 1 == 0)     # on the tile grid


def test_builtin_sources_give_many_real_samples(tile_samples, sweep_samples):
    assert len(tile_samples) >= 60 and len(sweep_samples) >= 30
    keys = [s["__key__"] for s in tile_samples + sweep_samples]
    assert len(set(keys)) == len(keys) and not any("." in key for key in keys)
    meta = json.loads(tile_samples[0]["meta.json"])
    assert meta["source"].split("#")[0].endswith((".las", ".laz")) and meta["points"] >= 256
    lidar = LidarModality()
    sweep = lidar.decode(sweep_samples[0])
    radius = json.loads(sweep_samples[0]["meta.json"])["tile_size"] / 2
    assert np.linalg.norm(sweep.xyz[:, :2], axis=1).max() <= radius + 1e-3   # a disc around the sensor


def test_open3d_preprocessing(autzen):
    cloud = autzen.subset(np.arange(0, len(autzen), 10))
    down = preprocess(cloud, voxel_size=5.0)
    assert 0 < len(down) < len(cloud) and sorted(down.features) == ["intensity", "rgb"]
    far = Cloud(np.concatenate([cloud.xyz, cloud.xyz.max(0) + [[500.0, 500.0, 500.0]]]),
                {}, cloud.origin)
    kept = preprocess(far, outlier_neighbors=16, outlier_std=2.0)
    assert len(kept) < len(far) and not np.isclose(kept.xyz, far.xyz[-1]).all(axis=1).any()
    with_normals = preprocess(cloud, estimate_normals=True)
    np.testing.assert_allclose(np.linalg.norm(with_normals.features["normals"], axis=1), 1.0, atol=1e-4)


# -- tokenizer -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tile_points(tile_samples) -> torch.Tensor:
    modality = PointCloudModality({"num_points": 1024})
    cloud = modality.decode(tile_samples[5])
    return modality.points(cloud, torch.Generator().manual_seed(0), train=False)


def min_pairwise(points: torch.Tensor) -> float:
    d = torch.cdist(points, points) + torch.eye(len(points)) * 1e9
    return float(d.min())


def test_fps_spreads_centres_more_than_random(tile_points):
    xyz = tile_points[:, :3]
    index = farthest_point_sample(xyz[None], 64)[0]
    assert len(set(index.tolist())) == 64
    fps_spread = min_pairwise(xyz[index])
    generator = torch.Generator().manual_seed(0)
    random_spread = max(min_pairwise(xyz[torch.randperm(len(xyz), generator=generator)[:64]]) for _ in range(5))
    assert fps_spread > 2 * random_spread
    # every point lies within the final covering radius of some centre
    assert torch.cdist(xyz, xyz[index]).min(1).values.max() <= fps_spread + 1e-6


def test_fps_and_knn_are_batched(tile_points):
    xyz = tile_points[:, :3]
    other = xyz.flip(0) * 0.5
    both = torch.stack([xyz, other])
    batched = farthest_point_sample(both, 16, torch.tensor([3, 7]))
    assert torch.equal(batched[0], farthest_point_sample(xyz[None], 16, torch.tensor([3]))[0])
    assert torch.equal(batched[1], farthest_point_sample(other[None], 16, torch.tensor([7]))[0])


def test_knn_matches_brute_force(tile_points):
    xyz = tile_points[:, :3]
    centres = xyz[farthest_point_sample(xyz[None], 32)[0]]
    index = knn(centres[None], xyz[None], 16)[0]
    brute = ((centres.numpy()[:, None] - xyz.numpy()[None]) ** 2).sum(-1)
    expected = np.sort(brute, axis=1)[:, :16]
    got = np.take_along_axis(brute, index.numpy(), axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)   # same distances, nearest first
    assert (index[:, 0] == farthest_point_sample(xyz[None], 32)[0]).all() or (got[:, 0] == 0).all()


def test_tokenize_untokenize_round_trip(tile_samples):
    modality = PointCloudModality({"features": ["intensity"], "num_groups": 32, "group_size": 16,
                                   "group_scale": 0.1})
    points = modality.points(modality.decode(tile_samples[3]), torch.Generator().manual_seed(1), train=False)
    tokens = modality.tokenize(modality.decode(tile_samples[3]), torch.Generator().manual_seed(1), train=False)
    assert tokens.values.shape == (32, 16 * 4) and tokens.coords.shape == (32, 3)
    assert modality.d_in == 64 and modality.num_coords == 3
    back = modality.untokenize(tokens)
    assert back.shape == (32 * 16, 4)
    # every point given back is one of the cloud's points, features included
    nearest = (back[:, None, :3] - points[None, :, :3]).norm(dim=-1).min(1)
    assert float(nearest.values.max()) < 1e-5
    torch.testing.assert_close(back[:, 3], points[nearest.indices, 3])
    # each group's first point is its centre (distance 0), and the group is its k nearest points
    groups = tokens.values.reshape(32, 16, 4)
    assert float(groups[:, 0, :3].abs().max()) < 1e-6
    assert float(groups[..., :3].norm(dim=-1).max()) * 0.1 < 1.0


def test_grouping_on_a_batch_equals_one_at_a_time(tile_points):
    pts = torch.stack([tile_points, tile_points.roll(100, 0)])
    groups, centres = group(pts, 16, 8, 1.0, torch.tensor([0, 5]))
    one = tokenize_points(tile_points.roll(100, 0), 16, 8, 1.0, start=5)
    torch.testing.assert_close(groups[1].reshape(16, -1), one.values)
    torch.testing.assert_close(untokenize_points(one.values, one.coords, 8), untokenize_points(
        groups[1].reshape(16, -1), centres[1], 8))


# -- maskers ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep_tokens(sweep_samples) -> Tokens:
    lidar = LidarModality({"num_groups": 96})
    return lidar.tokenize(lidar.decode(sweep_samples[2]), torch.Generator().manual_seed(0), train=False)


@pytest.mark.parametrize("name", ["random", "point_block", "radial"])
@pytest.mark.parametrize("ratio", [0.6, 0.9])
def test_maskers_exact_count_polarity_determinism(sweep_tokens, name, ratio):
    masker = build_masker(name, ratio)
    n = sweep_tokens.num_tokens
    mask = masker(sweep_tokens, torch.Generator().manual_seed(3))
    assert int(mask.hidden.sum()) == hidden_count(n, ratio) == round(ratio * n)
    assert mask.hidden[mask.ids_hidden].all() and not mask.hidden[mask.ids_keep].any()   # True = hidden
    assert torch.equal(mask.ids_shuffle[mask.ids_restore], torch.arange(n))
    again = masker(sweep_tokens, torch.Generator().manual_seed(3))
    assert torch.equal(again.hidden, mask.hidden)
    other = [masker(sweep_tokens, torch.Generator().manual_seed(s)).hidden for s in range(4, 8)]
    assert any(not torch.equal(o, mask.hidden) for o in other)


def test_point_block_hides_the_groups_nearest_a_seed(sweep_tokens):
    masker = PointBlockMasker(0.5)
    generator = torch.Generator().manual_seed(11)
    mask = masker(sweep_tokens, generator)
    seed = int(torch.randint(0, sweep_tokens.num_tokens, (1,), generator=torch.Generator().manual_seed(11)))
    distance = (sweep_tokens.coords - sweep_tokens.coords[seed]).norm(dim=-1)
    assert mask.hidden[seed]
    assert distance[mask.hidden].max() <= distance[~mask.hidden].min()


def sector_counts(masker: RadialMasker, tokens: Tokens, seed: int):
    mask = masker(tokens, torch.Generator().manual_seed(seed))
    rotation = masker.draw_rotation(torch.Generator().manual_seed(seed))  # the first draw scores make
    sector = masker.sectors(tokens.coords, rotation)
    hidden = torch.bincount(sector[mask.hidden], minlength=masker.num_sectors)
    total = torch.bincount(sector, minlength=masker.num_sectors)
    return mask, hidden, total


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_radial_masker_hides_whole_azimuth_sectors(sweep_tokens, ratio):
    masker = RadialMasker(ratio, num_sectors=12)
    for seed in range(5):
        mask, hidden, total = sector_counts(masker, sweep_tokens, seed)
        whole = (hidden == total) & (total > 0)
        partial = (hidden > 0) & (hidden < total)
        assert int(partial.sum()) <= 1                          # at most the last sector taken is cut
        assert int(mask.hidden.sum()) == round(ratio * sweep_tokens.num_tokens)
        assert int(total[whole].sum()) <= int(mask.hidden.sum()) <= int(total[whole | partial].sum())
        # hidden groups' azimuths lie inside the hidden sectors' angular ranges
        azimuth = torch.atan2(sweep_tokens.coords[:, 1], sweep_tokens.coords[:, 0])
        width = 2 * math.pi / 12
        rotation = masker.draw_rotation(torch.Generator().manual_seed(seed))
        inside = torch.remainder(azimuth[mask.hidden] - rotation, 2 * math.pi) // width
        assert set(inside.long().tolist()) <= set(torch.nonzero(hidden).flatten().tolist())


def test_radial_contiguous_wedge_and_range_bins(sweep_tokens):
    masker = RadialMasker(0.5, num_sectors=12, contiguous=True)
    mask, hidden, total = sector_counts(masker, sweep_tokens, 0)
    # going round the sectors that hold groups, the hidden ones form one circular run
    occupied = [s for s in range(12) if total[s] > 0]
    flags = [bool(hidden[s] > 0) for s in occupied]
    starts = sum(1 for i in range(len(flags)) if flags[i] and not flags[i - 1])
    assert starts == 1 and 0 < sum(flags) < len(flags)
    binned = RadialMasker(0.6, num_sectors=8, range_bins=3)
    mask = binned(sweep_tokens, torch.Generator().manual_seed(2))
    rotation = binned.draw_rotation(torch.Generator().manual_seed(2))
    cell = binned.sectors(sweep_tokens.coords, rotation) * 3 + binned.range_bin(sweep_tokens.coords)
    hidden, total = (torch.bincount(cell[mask.hidden], minlength=24), torch.bincount(cell, minlength=24))
    assert int(((hidden > 0) & (hidden < total)).sum()) <= 1
    assert int(mask.hidden.sum()) == round(0.6 * sweep_tokens.num_tokens)


def test_registries_and_lidar_defaults():
    assert {"pointcloud", "lidar"} <= set(MODALITIES.names())
    assert {"point_block", "radial"} <= set(MASKERS.names())
    assert {"chamfer", "occupancy"} <= set(OBJECTIVES.names())
    lidar = LidarModality()
    assert lidar.default_masker == "radial" and lidar.options.normalize == "sensor"
    assert set(lidar.default_objective) == {"chamfer", "occupancy"}
    assert PointCloudModality().default_objective == {"chamfer": {"weight": 1.0}}
    with pytest.raises(ConfigError):
        PointCloudModality({"features": ["colour"]})
    with pytest.raises(ConfigError):
        build_model({"pointcloud": PointCloudModality()}, {"pointcloud": DecoderConfig()},
                    ModelConfig(position="learned"))


# -- objectives ----------------------------------------------------------------------------------------------


def test_chamfer_identity_symmetry_and_brute_force(tile_points):
    xyz = tile_points[:, :3]
    a, b = xyz[:64].reshape(2, 32, 3), xyz[64:160].reshape(2, 48, 3)
    assert float(chamfer_distance(a, a[:, torch.randperm(32)]).abs().max()) == 0.0
    torch.testing.assert_close(chamfer_distance(a, b), chamfer_distance(b, a))
    for i in range(2):
        d = ((a[i].numpy()[:, None] - b[i].numpy()[None]) ** 2).sum(-1)
        expected = d.min(1).mean() + d.min(0).mean()
        assert math.isclose(float(chamfer_distance(a, b)[i]), expected, rel_tol=1e-5)
        l1 = np.sqrt(d)
        assert math.isclose(float(chamfer_distance(a, b, squared=False)[i]), l1.min(1).mean() + l1.min(0).mean(),
                            rel_tol=1e-5)


def make_batch(modality, samples, masker, seed=0, train=False) -> Batch:
    """One stream, named after the modality."""
    items = []
    for i, sample in enumerate(samples):
        generator = torch.Generator().manual_seed(seed + i)
        tokens = modality.tokenize(modality.decode(sample), generator, train)
        items.append(({modality.name: tokens}, {modality.name: masker(tokens, generator)}, None, sample["__key__"]))
    return collate(items)


def outputs(stream: str, **out) -> Outputs:
    """A decoder's output for one stream, as the objectives read it."""
    return Outputs({stream: out}, latent=torch.empty(0))


def test_chamfer_loss_reads_hidden_groups_only(tile_samples):
    modality = PointCloudModality({"num_groups": 16, "group_size": 8, "features": ["intensity"]})
    batch = make_batch(modality, tile_samples[:3], build_masker("random", 0.5))
    values = batch.tokens.values
    chamfer = ChamferLoss("pointcloud")
    assert float(ChamferLoss("pointcloud", point_dim=4)(outputs("pointcloud", pred=values.clone()), batch)) == 0.0
    noisy = values + torch.randn_like(values)
    out = outputs("pointcloud", points=noisy.reshape(3, 16, 8, 4))
    loss = chamfer(out, batch)
    visible_changed = torch.where(batch.mask.hidden.unsqueeze(-1), noisy, values + 5)
    assert float(chamfer(outputs("pointcloud", points=visible_changed.reshape(3, 16, 8, 4)), batch)) == float(loss)
    assert float(ChamferLoss("pointcloud", feature_weight=1.0)(out, batch)) > float(loss)


def test_occupancy_target_and_loss(tile_samples):
    lidar = LidarModality({"num_groups": 16, "group_size": 8})
    batch = make_batch(lidar, tile_samples[:2], build_masker("radial", 0.75))
    xyz = batch.tokens.values.reshape(2, 16, 8, 3)
    target = occupancy_target(xyz, 4)
    assert target.shape == (2, 16, 64) and ((target.sum(-1) >= 1) & (target.sum(-1) <= 8)).all()
    logits = torch.zeros(2, 16, 64, requires_grad=True)
    loss = OccupancyLoss("lidar")(outputs("lidar", occupancy=logits, pred=batch.tokens.values), batch)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-5)
    loss.backward()
    assert logits.grad[~batch.mask.hidden].abs().max() == 0 and logits.grad[batch.mask.hidden].abs().max() > 0
    with pytest.raises(ConfigError):
        OccupancyLoss("lidar")(outputs("lidar", pred=batch.tokens.values), batch)


# -- model, training, pictures, pipeline ---------------------------------------------------------------------------


def train_steps(modality, samples, masker_name, ratio, steps, lr=2e-3):
    torch.manual_seed(0)
    stream = modality.name
    model = build_model({stream: modality}, {stream: DecoderConfig()}, SMALL)
    objective = LossTerms(modality.default_objective, [stream])
    batch = make_batch(modality, samples, build_masker(masker_name, ratio))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        out = model(batch)
        loss, _ = objective(out, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model, batch, out, losses


def test_a_few_steps_on_real_tiles_lower_the_chamfer_loss(tile_samples):
    modality = PointCloudModality({"num_points": 512, "num_groups": 32, "group_size": 16, "group_scale": 0.1,
                                   "embed_hidden": 64})
    model, batch, out, losses = train_steps(modality, tile_samples[::6][:12], "random", 0.6, 30)
    assert out.pred("pointcloud").shape == batch.tokens.values.shape
    assert out.streams["pointcloud"]["points"].shape == (12, 32, 16, 3)
    assert losses[-1] < 0.5 * losses[0], losses
    picture = modality.render(batch.tokens, batch.stream_mask("pointcloud")[0], out.pred("pointcloud").detach(), rows=3)
    assert picture.size == (9 * 160, 3 * 160 + 14)
    pixels = np.asarray(picture)
    assert ((pixels[14:, 6 * 160:] == [220, 40, 40]).all(-1)).sum() > 100   # predicted points drawn in red


def test_a_few_steps_on_real_sweeps_lower_chamfer_plus_occupancy(sweep_samples):
    lidar = LidarModality({"num_points": 512, "num_groups": 32, "group_size": 16, "group_scale": 0.1,
                           "embed_hidden": 64, "features": ["intensity"]})
    model, batch, out, losses = train_steps(lidar, sweep_samples[::3][:12], "radial", 0.75, 30)
    assert out.streams["lidar"]["occupancy"].shape == (12, 32, 64)
    assert losses[-1] < 0.7 * losses[0], losses


def test_shards_stream_into_batches(tile_samples, tmp_path):
    from polymae.pipelines.shards import write_shards
    from polymae.pipelines.stream import ShardStream, StreamSpec

    modality = PointCloudModality({"num_groups": 16, "group_size": 8})
    manifest = write_shards(tile_samples[:10], tmp_path, validate=modality.decode, modality="pointcloud")
    assert manifest["total"] == 10
    stream = ShardStream([str(tmp_path / s["name"]) for s in manifest["shards"]],
                         [StreamSpec("pointcloud", modality, build_masker("point_block", 0.6))], batch_size=4,
                         train=True)
    batches = list(stream)
    assert sum(len(b) for b in batches) == 10
    assert batches[0].tokens.values.shape == (4, 16, 24) and int(batches[0].mask.hidden[0].sum()) == 10
