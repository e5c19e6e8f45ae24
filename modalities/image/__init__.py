"""Natural images: folders of JPEG/PNG, scikit-learn's and scikit-image's bundled photos."""
from .modality import ImageModality  # noqa: F401  (registers "image")
