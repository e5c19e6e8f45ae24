"""NIfTI volumes through nibabel: reading from bytes, checks, resampling, intensities.

A volume is an array [X, Y, Z] of voxel values with its affine (voxel indices -> RAS
millimetres), as nibabel gives it. Records store volumes (and 2D slices, as volumes one
voxel deep) as gzipped NIfTI-1, which every neuro-imaging tool reads and which keeps
the affine, so a record says where its voxels are.
"""
from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
from nibabel.processing import resample_to_output

from polymae.shared.errors import BadInput

MAX_VOXELS = 512 * 1024 * 1024   # more is a damaged or hostile header (or a volume no MAE recipe wants)
GZIP_MAGIC = b"\x1f\x8b"


def percentile_scaled(values: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """`values` clipped to their `low` / `high` percentiles and scaled to [0, 1] (all 0 when
    constant): one bright outlier voxel or a dark border no longer decides the contrast."""
    lo, hi = np.percentile(values, [low, high])
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return np.zeros_like(values, dtype=np.float64)
    return (np.clip(values, lo, hi) - lo) / (hi - lo)


def read_nifti(data: bytes, source: str) -> nib.spatialimages.SpatialImage:
    """NIfTI-1 or NIfTI-2 bytes (gzipped or not) -> a nibabel image; BadInput names `source`."""
    try:
        raw = gzip.decompress(data) if data[:2] == GZIP_MAGIC else bytes(data)
    except (OSError, EOFError) as error:
        raise BadInput(source, f"damaged gzip stream ({error})", "corrupt_nifti") from None
    if len(raw) < 348:
        raise BadInput(source, f"{len(raw)} bytes is shorter than a NIfTI header (348)", "corrupt_nifti")
    header_size = int.from_bytes(raw[:4], "little")
    if header_size not in (348, 540):
        header_size = int.from_bytes(raw[:4], "big")
    image_class = nib.Nifti2Image if header_size == 540 else nib.Nifti1Image
    try:
        image = image_class.from_bytes(raw)
        shape = image.shape
    except Exception as error:  # noqa: BLE001  (nibabel raises many kinds for a damaged header)
        raise BadInput(source, f"not a NIfTI file nibabel reads ({type(error).__name__}: {error})",
                       "corrupt_nifti") from None
    voxels = int(np.prod(shape, dtype=np.int64))
    if len(shape) < 2 or voxels == 0 or voxels > MAX_VOXELS:
        raise BadInput(source, f"NIfTI shape {list(shape)} is absurd (2 to 4 axes, at most {MAX_VOXELS} voxels)",
                       "absurd_size")
    return image


def volumes_of(image, source: str, max_frames: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """An image's 3D volumes as float32 [X, Y, Z] with its affine: a 4D series (fMRI) gives one per
    time point (the first `max_frames`). NaNs, infinities or a singular affine -> BadInput."""
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise BadInput(source, "the NIfTI affine is singular (or not finite): voxel positions are unknown",
                       "singular_affine")
    try:
        data = np.asarray(image.dataobj, dtype=np.float32)
    except (ValueError, OSError, EOFError) as error:
        raise BadInput(source, f"cannot read the voxel data ({error})", "corrupt_nifti") from None
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim == 5 and data.shape[3] == 1:  # NIfTI keeps axis 4 for time: [X, Y, Z, 1, C]
        data = data[:, :, :, 0]
    if data.ndim > 4:
        raise BadInput(source, f"NIfTI with {data.ndim} axes {list(data.shape)}: polymae reads 2D, 3D or 3D+time",
                       "absurd_size")
    frames = [data] if data.ndim == 3 else [data[..., t] for t in range(data.shape[3])][:max_frames]
    for frame in frames:
        if not np.all(np.isfinite(frame)):
            raise BadInput(source, f"the volume holds {int(np.sum(~np.isfinite(frame)))} NaN or infinite voxels",
                           "not_finite")
    return [(np.ascontiguousarray(frame), affine) for frame in frames]


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(s) for s in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


def resampled(volume: np.ndarray, affine: np.ndarray, spacing: tuple[float, float, float] | None,
              tolerance: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """The volume on a grid of `spacing` mm voxels aligned with the RAS axes (nibabel's
    resample_to_output, trilinear), or as it is when it is there already (or `spacing` is None)."""
    if spacing is None:
        return volume, affine
    aligned = np.allclose(np.abs(affine[:3, :3]), np.diag(np.abs(np.diag(affine[:3, :3]))), atol=1e-6) \
        and np.all(np.diag(affine[:3, :3]) > 0)
    if aligned and np.allclose(spacing_of(affine), spacing, rtol=tolerance):
        return volume, affine
    out = resample_to_output(nib.Nifti1Image(volume, affine), voxel_sizes=tuple(spacing), order=1)
    return np.asarray(out.dataobj, dtype=np.float32), out.affine


def nifti_bytes(volume: np.ndarray, affine: np.ndarray) -> bytes:
    """A volume as gzipped NIfTI-1 (float32), byte-identical for the same input (gzip mtime 0)."""
    image = nib.Nifti1Image(np.asarray(volume, dtype=np.float32), affine)
    image.header.set_xyzt_units("mm")
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)
