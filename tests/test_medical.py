"""The medical modality on real files that packages ship: pydicom's test files, pydicom-data's
radiographs (fetched once through pip), nibabel's test volumes and nilearn's MNI152 templates.

DICOM display pipeline (rescale to HU, VOI LUT / window, MONOCHROME1, full bit depth, compressed
syntaxes decoding to the uncompressed pixels), bad files named and counted, the privacy of shard
records (with and without --keep-phi), a series ordered by ImagePositionPatient, NIfTI resampling,
NaNs and singular affines; 2D and 3D tokens; both modes pretrained end to end (held-out loss
below the random init's), the probe table, and the pictures.
"""
from __future__ import annotations

import json
import shutil
import struct
import tarfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from polymae.modalities.medical import adapters, dicom
from polymae.modalities.medical.modality import MedicalModality
from polymae.modalities.medical.volume import read_nifti, resampled, spacing_of, volumes_of
from polymae.pipelines.cli import main as cli
from polymae.pipelines.pretrain import pretrain
from polymae.pipelines.probe import heldout_losses
from polymae.pipelines.reconstruct import reconstruct
from polymae.pipelines.runs import build_parts, load_run
from polymae.pipelines.shards import samples_recording_errors
from polymae.shared.config import load_config
from polymae.shared.errors import BadInput, ConfigError
from polymae.shared.packaged_data import PackagedDataError

warnings.filterwarnings("ignore", module="pydicom")
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
TINY = ["model.size=tiny", "model.depth=2", "model.heads=2", "model.decoder_depth=1", "model.decoder_heads=2",
        "data.num_workers=0", "data.shuffle_buffer=32", "trainer.max_minutes=null", "trainer.log_every=5",
        "trainer.warmup_steps=3", "trainer.ckpt_every=1000", "trainer.picture_every=1000", "trainer.lr=2e-3"]


def every(source: str, **options) -> tuple[list[dict], list[BadInput]]:
    bad: list[BadInput] = []
    return list(samples_recording_errors(MedicalModality(options).read_source(source), bad.append)), bad


def display(path: str | Path, use_voi: bool = True) -> np.ndarray:
    return dicom.display_pixels(dicom.read_dataset(Path(path), str(path)), str(path), use_voi)


@pytest.fixture(scope="module")
def pydicom_data() -> Path:
    try:
        return adapters.fetch_pydicom_data()
    except PackagedDataError as error:
        pytest.skip(f"pydicom-data could not be fetched: {error}")


# -- DICOM pixels ------------------------------------------------------------------------------------

def test_ct_is_rescaled_to_hounsfield_units_and_windowed():
    path = get_testdata_file("693_J2KI.dcm")                  # CT head, JPEG 2000, intercept -1024, window 40/100
    ds = pydicom.dcmread(path)
    hu = dicom.apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    assert float(ds.RescaleIntercept) == -1024 and hu.min() < 0 < hu.max()
    shown = display(path)
    assert shown.shape == (1, 512, 512) and shown.dtype == np.float32
    centre, width = float(ds.WindowCenter), float(ds.WindowWidth)
    expected = np.clip((hu - (centre - 0.5)) / (width - 1) + 0.5, 0, 1)  # PS3.3 C.11.2.1.2.1, LINEAR
    np.testing.assert_allclose(shown[0], expected, atol=1e-5)
    assert not np.allclose(display(path, use_voi=False), shown, atol=1e-2)  # percentiles instead of its window


def test_radiograph_monochrome1_is_inverted_and_keeps_its_15_bits(pydicom_data):
    path = pydicom_data / "RG3_UNCR.dcm"
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.Modality == "CR"
    shown = display(path)[0]
    stored = ds.pixel_array.astype(np.float64)
    # MONOCHROME1: a high stored value is dark, so the display falls as the stored value rises
    assert np.corrcoef(stored.ravel()[::97], shown.ravel()[::97])[0, 1] < -0.9
    chest = display(pydicom_data / "RG1_UNCR.dcm")[0]
    assert chest.shape == (1955, 1841) and len(np.unique(chest)) > 1000        # 15-bit depth kept


def test_compressed_syntaxes_decode_to_the_uncompressed_pixels(pydicom_data):
    reference = display(get_testdata_file("MR_small.dcm"))
    for name in ("MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_jp2klossless.dcm"):
        np.testing.assert_array_equal(display(get_testdata_file(name)), reference, err_msg=name)
    np.testing.assert_array_equal(display(pydicom_data / "RG3_J2KR.dcm"), display(pydicom_data / "RG3_UNCR.dcm"))
    lossy = display(pydicom_data / "RG3_J2KI.dcm")                                 # JPEG 2000 lossy: close
    assert np.abs(lossy - display(pydicom_data / "RG3_UNCR.dcm")).mean() < 0.02


def test_voi_lut_sequence_and_modality_lut_are_applied(pydicom_data):
    ds = pydicom.dcmread(pydicom_data / "vlut_04.dcm")
    expected = pydicom.pixels.apply_voi_lut(ds.pixel_array, ds) / (2 ** 16 - 1)
    np.testing.assert_allclose(display(pydicom_data / "vlut_04.dcm")[0], expected, atol=1e-6)
    shown = display(pydicom_data / "mlut_18.dcm")[0]
    assert shown.shape == (512, 512) and 0 <= shown.min() < shown.max() <= 1


@pytest.mark.parametrize("name, kind", [("MR_truncated.dcm", "corrupt_dicom"),
                                        ("MR_small_jpeg_ls_lossless.dcm", "unsupported_syntax"),
                                        ("rtplan.dcm", "no_pixel_data"), ("no_meta.dcm", "not_dicom")])
def test_bad_dicom_is_bad_input_naming_the_file(name, kind):
    path = get_testdata_file(name)
    with pytest.raises(BadInput) as caught:
        display(path)
    assert caught.value.kind == kind and name in caught.value.source


def test_an_absurd_size_is_refused_before_any_pixel_is_decoded(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows, ds.NumberOfFrames = 16000, 5000
    ds.save_as(tmp_path / "huge.dcm")
    with pytest.raises(BadInput) as caught:
        display(tmp_path / "huge.dcm")
    assert caught.value.kind == "absurd_size" and "huge.dcm" in caught.value.source


def test_pydicom_test_files_shard_their_images_and_count_every_bad_file():
    samples, bad = every("pydicom-tests")
    kinds = {error.kind for error in bad}
    assert {"corrupt_dicom", "unsupported_syntax", "no_pixel_data", "not_dicom"} <= kinds
    modalities = {json.loads(s["json"]).get("modality") for s in samples}
    assert {"CT", "MR", "US", "NM", "CR"} <= modalities and len(samples) > 100
    modality = MedicalModality({"image_size": [32, 32], "patch_size": 8})
    for sample in samples[::7]:
        image = modality.decode(sample)
        assert image.dim() == 3 and image.shape[0] == 1 and 0 <= float(image.min()) <= float(image.max()) <= 1


# -- privacy ---------------------------------------------------------------------------------------

PHI = [b"CompressedSamples^CT1", b"CompressedSamples^MR1", b"JFK IMAGING CENTER", b"1CT1", b"4MR1", b"20040119"]


def shard_bytes(folder: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(folder.iterdir()))


def test_records_and_manifests_carry_no_patient_attributes_unless_keep_phi(tmp_path):
    source = tmp_path / "patients"
    source.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_truncated.dcm"):        # MR_truncated: listed as rejected
        shutil.copy(get_testdata_file(name), source / name)
    original = b"".join(p.read_bytes() for p in source.iterdir())
    assert all(value in original for value in PHI)                          # the files do name the patients
    assert cli(["shard", "medical", str(source), str(tmp_path / "private")]) == 0
    written = shard_bytes(tmp_path / "private")
    assert [value for value in PHI if value in written] == []
    manifest = json.loads((tmp_path / "private" / "train-manifest.json").read_text())
    assert manifest["total"] == 2 and [r["kind"] for r in manifest["rejected"]] == ["corrupt_dicom"]
    with tarfile.open(tmp_path / "private" / "train-000000.tar") as tar:
        record = tar.extractfile([m for m in tar.getmembers() if m.name.endswith(".dcm")][0]).read()
    ds = dicom.read_dataset(record, "record")
    assert "PatientName" not in ds and "PatientBirthDate" not in ds and "InstitutionName" not in ds
    assert ds.Modality == "CT" and ds.pixel_array.shape == (128, 128)         # still an image
    assert cli(["shard", "medical", str(source), str(tmp_path / "kept"), "--keep-phi"]) == 0
    assert all(value in shard_bytes(tmp_path / "kept") for value in PHI)
    assert cli(["shard", "medical", str(source), str(tmp_path / "x"), "--keep-phy"]) == 2  # a typo is refused


def test_a_key_that_spells_a_patient_id_is_replaced():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert adapters.private_key("ct/1CT1_scan", dicom.identifying_values(ds), keep_phi=False).startswith("anon-")
    assert adapters.private_key("ct/1CT1_scan", dicom.identifying_values(ds), keep_phi=True) == "ct_1CT1_scan"


# -- series and NIfTI volumes ---------------------------------------------------------------------------

def test_a_series_folder_becomes_a_volume_ordered_by_image_position(tmp_path):
    series = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "98892001" / "CT5N"
    files = sorted(series.iterdir())
    positions = {f: float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in files}
    shuffled = tmp_path / "series"
    shuffled.mkdir()
    for i, f in enumerate(sorted(files, key=lambda f: -positions[f])):        # names in reverse position order
        shutil.copy(f, shuffled / f"{i:02d}.dcm")
    samples, bad = every(str(shuffled), mode="3d")
    assert bad == [] and len(samples) == 1
    image = read_nifti(samples[0]["nii.gz"], "volume")
    volume, affine = volumes_of(image, "volume")[0]
    assert volume.shape == (16, 16, 5)
    by_z = sorted(files, key=lambda f: positions[f])
    for z, f in enumerate(by_z):
        ds = pydicom.dcmread(f)
        np.testing.assert_array_equal(volume[:, :, z], dicom.apply_modality_lut(ds.pixel_array, ds).T)
    # the affine places slice z at its ImagePositionPatient (LPS -> RAS: x and y negated)
    first, last = (np.array([float(v) for v in pydicom.dcmread(f).ImagePositionPatient]) for f in (by_z[0], by_z[-1]))
    np.testing.assert_allclose((affine @ [0, 0, 4, 1])[:3], last * [-1, -1, 1], atol=1e-4)
    np.testing.assert_allclose(affine[:3, 3], first * [-1, -1, 1], atol=1e-4)


def test_inconsistent_slice_spacing_is_bad_input():
    samples, bad = every("pydicom-tests", mode="3d")
    spacing = [e for e in bad if e.kind == "inconsistent_spacing"]
    assert len(spacing) == 1 and spacing[0].source.endswith("CT2") and "gaps" in spacing[0].problem
    assert any(json.loads(s["json"])["format"] == "dicom-series" for s in samples)


def test_nifti_volumes_resample_to_the_asked_spacing_and_keep_their_affine():
    image = nib.load(NIBABEL_DATA / "functional.nii")                        # 4 x 4 x 8 mm, 20 time points
    samples, bad = every("nibabel-volumes", mode="3d", spacing=[4.0, 4.0, 4.0])
    frames = [s for s in samples if s["__key__"].startswith("functional-t")]
    assert len(frames) == image.shape[3] == 20
    volume, affine = volumes_of(read_nifti(frames[0]["nii.gz"], "f"), "f")[0]
    assert spacing_of(affine) == pytest.approx((4.0, 4.0, 4.0))
    assert volume.shape[2] == pytest.approx(image.shape[2] * 2, abs=1)          # 8 mm -> 4 mm: twice the slices
    centre = affine @ [*(np.array(volume.shape) - 1) / 2, 1]
    original_centre = image.affine @ [*(np.array(image.shape[:3]) - 1) / 2, 1]
    np.testing.assert_allclose(centre[:3], original_centre[:3], atol=4.0)      # the same place in the world
    # a NIfTI with NaNs (nibabel's resampled_anat_moved.nii holds 153) is named and counted
    assert [(e.kind, Path(e.source).name) for e in bad] == [("not_finite", "resampled_anat_moved.nii")]


def test_a_singular_affine_is_bad_input(tmp_path):
    # nibabel refuses to write one, so nibabel's real anatomical.nii has its header's affine zeroed in place:
    # qform_code (byte 252) off, sform_code (254) on, srow_x/y/z (280-327) zeros
    raw = bytearray((NIBABEL_DATA / "anatomical.nii").read_bytes())
    order = ">" if nib.load(NIBABEL_DATA / "anatomical.nii").header.endianness == ">" else "<"
    struct.pack_into(f"{order}hh", raw, 252, 0, 2)
    struct.pack_into(f"{order}12f", raw, 280, *([0.0] * 12))
    (tmp_path / "flat.nii").write_bytes(bytes(raw))
    _, bad = every(str(tmp_path), mode="3d")
    assert [(e.kind, Path(e.source).name) for e in bad] == [("singular_affine", "flat.nii")]


def test_intensities_are_clipped_to_percentiles_and_scaled():
    modality = MedicalModality({"mode": "3d", "spacing": [4.0, 4.0, 4.0]})
    samples, _ = every("mni152", mode="3d", spacing=[4.0, 4.0, 4.0])
    volume = modality.decode(samples[0])
    assert volume.shape == (1, 50, 59, 48) and float(volume.min()) == 0.0 and float(volume.max()) == 1.0
    assert 0.004 < float((volume == 1.0).float().mean()) < 0.02                 # the top 0.5% clipped
    resampled_again, _ = resampled(volume[0].numpy(), read_nifti(samples[0]["nii.gz"], "v").affine, (4.0, 4.0, 4.0))
    assert resampled_again.shape == (50, 59, 48)                                # already at the spacing: as it is


# -- tokens -------------------------------------------------------------------------------------------

def test_2d_and_3d_tokens_round_trip_with_their_positions():
    generator = torch.Generator().manual_seed(0)
    flat = MedicalModality({"image_size": [32, 48], "patch_size": 8})
    image = torch.rand(1, 40, 50)
    tokens = flat.tokenize(image, generator, train=False)
    assert tokens.values.shape == (24, 64) and tokens.coords.shape == (24, 2) and tokens.grid == (4, 6)
    assert flat.untokenize(tokens).shape == (1, 32, 48)
    cropped = flat.tokenize(image, generator, train=True)
    assert cropped.values.shape == (24, 64) and not torch.allclose(cropped.values, tokens.values)
    deep = MedicalModality({"mode": "3d", "volume_size": [16, 16, 8], "patch": [8, 8, 4]})
    volume = torch.rand(1, 20, 12, 8)
    tokens = deep.tokenize(volume, generator, train=False)
    assert tokens.values.shape == (8, 256) and tokens.coords.shape == (8, 3) and tokens.grid == (2, 2, 2)
    back = deep.untokenize(tokens)[0]                                      # centre crop on x, zero pad on y
    torch.testing.assert_close(back[:, 2:14], volume[0, 2:18], atol=1e-6, rtol=0)
    assert float(back[:, :2].abs().max()) == 0 and float(back[:, 14:].abs().max()) == 0
    with pytest.raises(ConfigError, match="multiple of 6"):
        build_parts(load_config("medical/mae3d_volume.yaml", ["model.width=64", "model.heads=4"]))


# -- pretraining end to end -----------------------------------------------------------------------------

def heldout_pixel_loss(summary, trained: bool) -> float:
    """The pixel loss on the held-out split of the trained model, or of its random initialisation."""
    parts, _ = load_run(summary["run_dir"])
    parts = parts if trained else build_parts(parts.config)
    shards = sorted(str(p) for p in Path(parts.config.data.shards).glob("*-*.tar"))
    train, val = [s for s in shards if "train-" in s], [s for s in shards if "val-" in s]
    loss = heldout_losses(parts, train, val, torch.device("cpu"))["pixel"]["model"]
    print(f"held-out pixel loss, {'trained' if trained else 'random init'}: {loss:.4f}")
    return loss


def test_2d_pretraining_on_dicom_lowers_held_out_loss_probes_modality_and_draws(tmp_path):
    summary = pretrain(load_config("medical/thorax_mae.yaml", [
        "data.source=pydicom-tests", f"data.shards={tmp_path / 'shards'}", f"out_dir={tmp_path}",
        "modality_options.label=modality", "modality_options.image_size=[32,32]", "modality_options.patch_size=8",
        "data.val_fraction=0.3", "data.batch_size=16", "data.resampled=false", "model.width=64",
        "model.decoder_width=64", "trainer.max_steps=25", "probe.enabled=true", "probe.knn_k=5", *TINY]))
    assert summary["heldout"]["pixel"]["model"] < 0.9 * heldout_pixel_loss(summary, trained=False)
    probe = summary["probe"]
    print(probe)
    assert set(probe) == {"raw", "random_init", "pretrained"}
    assert all(0.0 <= row["linear"] <= 1.0 and 0.0 <= row["knn"] <= 1.0 for row in probe.values())
    picture = Image.open(reconstruct(summary["run_dir"], tmp_path / "dicom.png", rows=4))
    assert picture.height > 4 * 96 and picture.width > 3 * 96
    assert len(np.unique(np.asarray(picture.convert("L")))) > 50             # grey images, not flat panels


def test_3d_pretraining_on_brain_volumes_lowers_held_out_loss_and_draws_three_slices(tmp_path):
    summary = pretrain(load_config("medical/mae3d_volume.yaml", [
        "data.source=nibabel-volumes", f"data.shards={tmp_path / 'shards'}", f"out_dir={tmp_path}",
        "modality_options.spacing=[4,4,4]", "modality_options.volume_size=[16,16,8]", "modality_options.patch=[4,4,4]",
        "data.val_fraction=0.3", "data.batch_size=4", "model.width=48", "model.heads=2", "model.decoder_width=48",
        "trainer.max_steps=30", *TINY]))
    assert heldout_pixel_loss(summary, trained=True) < 0.9 * heldout_pixel_loss(summary, trained=False)
    picture = Image.open(reconstruct(summary["run_dir"], tmp_path / "volumes.png", rows=2))
    # each row: three panels of three orthogonal slices (16x16, 16x8, 16x8 voxels side by side)
    assert picture.width > 3 * picture.height and picture.height >= 2 * 16 * 2


def test_thorax_recipe_is_the_papers_and_trains_on_the_packaged_radiographs(tmp_path, pydicom_data):
    config = load_config("medical/thorax_mae.yaml")
    assert config.mask.ratio == 0.9 and config.modality_options["crop_scale"] == [0.5, 1.0]
    assert config.modality_options["image_size"] == [224, 224] and config.model.size == "base"
    folder = tmp_path / "radiographs"
    folder.mkdir()
    for name in ("RG1_UNCR.dcm", "RG3_UNCR.dcm", "RG3_J2KI.dcm"):
        shutil.copy(pydicom_data / name, folder / name)
    summary = pretrain(load_config("medical/thorax_mae.yaml", [
        f"data.source={folder}", f"data.shards={tmp_path / 'shards'}", f"out_dir={tmp_path}",
        "modality_options.image_size=[64,64]", "data.batch_size=3", "model.width=64", "model.decoder_width=64",
        "trainer.max_steps=4", *TINY]))
    assert np.isfinite(summary["final_loss"])
    picture = Image.open(reconstruct(summary["run_dir"], tmp_path / "chest.png", rows=3))
    assert picture.height >= 3 * 96
