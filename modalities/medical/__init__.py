"""Medical images and volumes: DICOM through pydicom, NIfTI through nibabel; 2D radiographs and slices,
3D volumes."""
from .modality import MedicalModality  # noqa: F401  (registers "medical")
