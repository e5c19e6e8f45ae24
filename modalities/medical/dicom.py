"""DICOM through pydicom: pixels in display order, de-identification, series -> volume.

Pixels follow the DICOM display pipeline (PS3.3 C.11) with pydicom's own functions:
stored values -> modality LUT (RescaleSlope/Intercept, or a Modality LUT Sequence:
CT Hounsfield units) -> VOI LUT (a VOI LUT Sequence, else WindowCenter/Width) ->
[0, 1], MONOCHROME1 inverted so that bright is dense everywhere. The values stay
floating point all the way: a 12- or 16-bit radiograph keeps its full depth until the
tokenizer normalises it (it is never squeezed through 8 bits). Colour images
(ultrasound, screen captures) are turned to grey by their luminance.

Compressed transfer syntaxes decode through the pixel-data handlers pydicom has here
(Pillow: JPEG baseline and JPEG 2000; pydicom itself: RLE, deflate); one that no
installed handler decodes (JPEG-LS, JPEG lossless without pylibjpeg or GDCM) is a
BadInput of kind "unsupported_syntax" naming the file and the syntax.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.uid import generate_uid

from polymae.shared.errors import BadInput

from .volume import percentile_scaled

# the most pixels one image or volume may have: a DICOM header claiming more is damaged or
# hostile (a 65535 x 65535 x 1000-frame header would ask for terabytes before failing)
MAX_PIXELS = 512 * 1024 * 1024
MAX_SIDE = 16384

# Patient-identifying attributes (after PS3.15 Annex E, the Basic Application Level
# Confidentiality Profile): removed from every record unless keep_phi. Every person-name
# (PN) element, nested ones included, and every private element go as well: private
# groups often repeat names and IDs (see pydicom's CT_small.dcm).
PHI_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientNames",
    "OtherPatientIDsSequence", "PatientBirthDate", "PatientBirthTime", "PatientBirthName",
    "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers", "PatientInsurancePlanCodeSequence",
    "MedicalRecordLocator", "MilitaryRank", "BranchOfService", "CountryOfResidence", "RegionOfResidence",
    "PatientComments", "AdditionalPatientHistory", "EthnicGroup", "Occupation", "PatientReligiousPreference",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "InstitutionCodeSequence",
    "ReferringPhysicianName", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord", "OperatorsName",
    "RequestingPhysician", "ScheduledPerformingPhysicianName", "AccessionNumber", "StudyID",
    "RequestedProcedureID", "ScheduledProcedureStepID", "PerformedProcedureStepID", "AdmissionID",
    "StationName", "DeviceSerialNumber", "PlateID", "DetectorID", "CassetteID", "GantryID",
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "InstanceCreationDate",
    "StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime", "InstanceCreationTime",
    "AcquisitionDateTime", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
)
# identifiers that link a record back to the archive: replaced by UIDs derived from them (the same
# original gives the same replacement, so the slices of one series still belong together)
LINKING_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
# header facts a record's metadata keeps (never identifying)
FACTS = {"Modality": "modality", "BodyPartExamined": "body_part", "PhotometricInterpretation": "photometric",
         "BitsStored": "bits_stored", "Rows": "rows", "Columns": "columns"}


def read_dataset(data: bytes | Path, source: str, header_only: bool = False) -> Dataset:
    """Bytes or a file -> a pydicom Dataset; not DICOM, or damaged -> BadInput naming `source`."""
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about fixable header oddities; damage still raises
            return pydicom.dcmread(stream, stop_before_pixels=header_only)
    except InvalidDicomError as error:
        raise BadInput(source, f"not a DICOM file ({error})".replace("Use force=True to force reading.", "")
                       .strip(), "not_dicom") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise BadInput(source, f"damaged DICOM file ({type(error).__name__}: {error})", "corrupt_dicom") from None


def check_image_header(ds: Dataset, source: str) -> int:
    """The number of frames of an image dataset; BadInput when it has no pixel data or
    absurd dimensions."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        kind = ds.get("Modality") or ds.get("SOPClassUID", "?")
        raise BadInput(source, f"DICOM file has no pixel data (a {kind} object, not an image)", "no_pixel_data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
            frames = int(ds.get("NumberOfFrames") or 1)
    except (ValueError, TypeError) as error:  # a damaged value (pydicom's badVR.dcm: NumberOfFrames "1A")
        raise BadInput(source, f"damaged image size attributes ({error})", "corrupt_dicom") from None
    if rows == 0 or columns == 0:
        raise BadInput(source, "DICOM image has no Rows / Columns (its size is unknown)", "corrupt_dicom")
    if not (1 <= rows <= MAX_SIDE and 1 <= columns <= MAX_SIDE and frames >= 1) \
            or rows * columns * frames > MAX_PIXELS:
        raise BadInput(source, f"DICOM image size {columns}x{rows} x {frames} frames is absurd (at most "
                       f"{MAX_SIDE} px a side and {MAX_PIXELS} pixels)", "absurd_size")
    return frames


def stored_pixels(ds: Dataset, source: str) -> np.ndarray:
    """`ds.pixel_array`, with a decoding failure turned into a BadInput that says why."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ds.pixel_array
    except (RuntimeError, NotImplementedError) as error:  # no handler, or one that failed
        text = str(error).splitlines()[0]
        if syntax is not None and syntax.is_compressed and ("Unable to decode" in text or "Unable to decompress"
                                                            in text or "plugin" in text):
            raise BadInput(source, f"cannot decode its {syntax.name} pixel data with the handlers installed "
                           f"here ({text[:160]}); install pylibjpeg or GDCM for it", "unsupported_syntax") from None
        raise BadInput(source, f"cannot decode its pixel data ({text[:200]})", "corrupt_dicom") from None
    except (ValueError, AttributeError, KeyError, TypeError, IndexError) as error:
        raise BadInput(source, f"cannot decode its pixel data ({type(error).__name__}: {str(error)[:200]})",
                       "corrupt_dicom") from None


def voi_output_range(ds: Dataset) -> tuple[float, float]:
    """The range pydicom's `apply_voi_lut` maps into: a VOI LUT's entries (0 .. 2^bits - 1), or
    for a window the stored range after the modality LUT (as pydicom's apply_windowing
    computes it), so that dividing by it puts any VOI result in [0, 1]."""
    if ds.get("VOILUTSequence"):
        descriptor = ds.VOILUTSequence[0].LUTDescriptor
        return 0.0, float(2 ** int(descriptor[2]) - 1)
    if ds.get("ModalityLUTSequence"):
        low, high = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        low, high = 0.0, float(2 ** int(ds.BitsStored) - 1)
    else:
        low, high = -float(2 ** (int(ds.BitsStored) - 1)), float(2 ** (int(ds.BitsStored) - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        low, high = low * float(slope) + float(intercept), high * float(slope) + float(intercept)
    return low, high


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114  # ITU-R BT.601, as PIL's "L"


def display_pixels(ds: Dataset, source: str, use_voi: bool = True) -> np.ndarray:
    """float32 [frames, H, W] in [0, 1]: modality LUT, VOI LUT or window (when the header has
    one and `use_voi`), MONOCHROME1 inverted; colour to grey. Without a VOI the values are
    scaled by their own 0.5 / 99.5 percentiles."""
    frames = check_image_header(ds, source)
    stored = stored_pixels(ds, source)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(ds.get("SamplesPerPixel", 1))
    if frames == 1:
        stored = stored[None]
    if photometric == "PALETTE COLOR":
        grey = luminance(apply_color_lut(stored, ds).astype(np.float64)) / (2 ** int(ds.BitsAllocated) - 1)
        return grey.astype(np.float32)
    if samples == 3:
        rgb = stored  # pydicom's pixel_array converts YCbCr (JPEG, JPEG 2000 colour) to RGB already
        peak = 255.0 if rgb.dtype == np.uint8 else float(np.iinfo(rgb.dtype).max if rgb.dtype.kind in "ui" else 1)
        return (luminance(rgb.astype(np.float64)) / peak).astype(np.float32)
    try:
        values = apply_modality_lut(stored, ds)  # integers stay integers: a VOI LUT is indexed by them
        has_voi = use_voi and (ds.get("VOILUTSequence") or ("WindowCenter" in ds and "WindowWidth" in ds))
        if has_voi:
            low, high = voi_output_range(ds)
            values = (apply_voi_lut(values, ds, prefer_lut=True).astype(np.float64) - low) / max(high - low, 1e-12)
        else:
            values = percentile_scaled(values.astype(np.float64))
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as error:
        raise BadInput(source, f"cannot apply its modality/VOI LUT ({type(error).__name__}: {error})",
                       "corrupt_dicom") from None
    values = np.clip(values, 0.0, 1.0)
    if photometric == "MONOCHROME1":  # 0 is white: invert so that every record has bright = dense
        values = 1.0 - values
    return values.astype(np.float32)


def header_facts(ds: Dataset) -> dict:
    """What a record's metadata says about the image (nothing that identifies a patient)."""
    facts = {}
    for keyword, name in FACTS.items():
        value = ds.get(keyword)
        if value not in (None, ""):
            facts[name] = value if isinstance(value, int) else str(value).strip().upper()
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if spacing:
        facts["pixel_spacing"] = [float(s) for s in spacing]
    return facts


def identifying_values(ds: Dataset) -> set[str]:
    """The patient's name parts and IDs as text: a record key that contains one is replaced."""
    values = set()
    for keyword in ("PatientName", "PatientID", "OtherPatientIDs", "AccessionNumber"):
        value = ds.get(keyword)
        if value:
            values.update(part for part in str(value).replace("^", " ").split() if len(part) >= 3)
    return values


def deidentify(ds: Dataset) -> Dataset:
    """Remove patient-identifying attributes in place (PHI_KEYWORDS, every PN element at any
    depth, private elements) and replace linking UIDs by ones derived from them."""
    ds.remove_private_tags()

    def strip(dataset: Dataset) -> None:
        for keyword in PHI_KEYWORDS:
            if keyword in dataset:
                delattr(dataset, keyword)
        for element in list(dataset):
            if element.VR == "PN":
                del dataset[element.tag]
            elif element.VR == "SQ":
                for item in element.value:
                    strip(item)

    strip(ds)
    for keyword in LINKING_UIDS:
        if keyword in ds:
            setattr(ds, keyword, generate_uid(entropy_srcs=[str(ds.data_element(keyword).value)]))
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def dataset_bytes(ds: Dataset) -> bytes:
    """A dataset written back as a DICOM file (pixel data as it was: compressed stays compressed)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    return buffer.getvalue()


# -- series -> volume ---------------------------------------------------------------------------------

def slice_geometry(ds: Dataset, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row direction, column direction, position) of one slice in patient space (LPS, mm)."""
    try:
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        position = np.array([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
    except (AttributeError, ValueError, TypeError):
        raise BadInput(source, "slice has no usable ImagePositionPatient / ImageOrientationPatient, so its "
                       "place in the volume is unknown", "no_slice_position") from None
    return orientation[:3], orientation[3:], position


def series_volume(slices: list[tuple[str, Dataset]], folder: str) -> tuple[np.ndarray, np.ndarray, Dataset]:
    """The slices of one series -> (values [X, Y, Z] after the modality LUT, RAS affine, first dataset).

    Slices are ordered by their ImagePositionPatient along the slice normal (not by file
    name or InstanceNumber, which scanners do not keep consistent). Columns run along x,
    rows along y, slices along z, as NIfTI converters lay a DICOM series out; the affine
    maps (x, y, z) voxel indices to RAS millimetres. BadInput when slices differ in size
    or orientation, two share a position, or the spacing between them is uneven."""
    if len(slices) < 2:
        raise BadInput(folder, "a series needs at least two slices to be a volume", "too_few_slices")
    row_dir, column_dir, _ = slice_geometry(slices[0][1], slices[0][0])
    normal = np.cross(row_dir, column_dir)
    placed = []
    for source, ds in slices:
        r, c, position = slice_geometry(ds, source)
        if not (np.allclose(r, row_dir, atol=1e-3) and np.allclose(c, column_dir, atol=1e-3)):
            raise BadInput(source, "slice orientation differs from the rest of its series", "inconsistent_series")
        placed.append((float(position @ normal), position, source, ds))
    placed.sort(key=lambda item: item[0])
    distances = np.diff([item[0] for item in placed])
    if np.any(distances < 1e-3):
        raise BadInput(folder, "two slices of the series share one position", "inconsistent_series")
    step = float(np.median(distances))
    if np.max(np.abs(distances - step)) > 0.1 * step:
        raise BadInput(folder, f"inconsistent slice spacing in the series (gaps from {distances.min():.3g} to "
                       f"{distances.max():.3g} mm)", "inconsistent_spacing")
    shape = (int(placed[0][3].Rows), int(placed[0][3].Columns))
    planes = []
    for _, _, source, ds in placed:
        check_image_header(ds, source)
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise BadInput(source, f"slice is {ds.Columns}x{ds.Rows}, its series {shape[1]}x{shape[0]}",
                           "inconsistent_series")
        try:
            planes.append(apply_modality_lut(stored_pixels(ds, source), ds).astype(np.float32))
        except (ValueError, TypeError, AttributeError) as error:
            raise BadInput(source, f"cannot apply its modality LUT ({error})", "corrupt_dicom") from None
    volume = np.stack([plane.T for plane in planes], axis=-1)  # [columns, rows, slices] = [X, Y, Z]
    first = placed[0][3]
    spacing = [float(v) for v in first.get("PixelSpacing") or (1.0, 1.0)]  # (between rows, between columns)
    affine = np.eye(4)
    affine[:3, 0] = row_dir * spacing[1]
    affine[:3, 1] = column_dir * spacing[0]
    affine[:3, 2] = (placed[-1][1] - placed[0][1]) / (len(placed) - 1)
    affine[:3, 3] = placed[0][1]
    affine[:2] *= -1  # DICOM's patient space is LPS, NIfTI's RAS
    return volume, affine, first
