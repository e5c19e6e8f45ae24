"""Image dataset adapters: raw sources -> Samples, and Sample bytes -> pixels.

A Sample is `{"__key__", "image.png" | "image.jpg": bytes, "cls": b"3"}`.
Sources: a folder of images (jpg, png, gif, webp, bmp, tiff: flat, or one sub-folder per class for labels;
its other files are listed as rejected),
or a built-in source shipped inside a package:
  digits          scikit-learn's 1,797 handwritten digits (8x8, labelled)
  sklearn-photos  scikit-learn's two sample photos
  skimage-photos  scikit-image's bundled photos
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import numpy as np
import simplejpeg
import torch
from PIL import Image, UnidentifiedImageError

from polymae.shared.errors import BadInput
from polymae.shared.sources import SourceSamples, sample_key

# every still-image format PIL reads that a photo folder holds; an animated GIF or a multi-page
# TIFF gives its first frame. Other files of a folder are listed as rejected, never passed over.
IMAGE_SUFFIXES = {".jpg": "image.jpg", ".jpeg": "image.jpg", ".png": "image.png", ".gif": "image.gif",
                  ".webp": "image.webp", ".bmp": "image.bmp", ".tif": "image.tiff", ".tiff": "image.tiff"}
DEFAULT_MAX_PIXELS = 40_000_000  # decoded size cap: 40 megapixels are 120 MB of RGB (ImageOptions.max_pixels)
BUILTIN_SOURCES = {
    "digits": "scikit-learn's 1,797 labelled handwritten digits (8x8 grey)",
    "sklearn-photos": "scikit-learn's two sample photos (china, flower)",
    "skimage-photos": "scikit-image's bundled photos (astronaut, coffee, chelsea, ...)",
}
SKIMAGE_PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field",
                  "moon", "page", "text", "coins", "horse", "brick", "grass", "gravel", "colorwheel", "retina",
                  "clock", "cell", "microaneurysms", "logo")
MODES = {1: "L", 3: "RGB"}
JPEG_CODINGS_AS_PIL = {"YCbCr", "Gray"}  # decoded to RGB by libjpeg-turbo exactly as PIL has it do
WIDE_GREY_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}  # 16-bit grey (PNG), scaled to 8 bits on decode


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_jpeg_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray | None:
    """A JPEG's RGB pixels [H, W, 3] straight from libjpeg-turbo (simplejpeg), or None where
    it declines: not a JPEG, not coded as YCbCr or grey (CMYK and YCCK files convert to RGB
    with different rounding), damaged (strict: even a warning), or above PIL's
    decompression-bomb limit. PIL then decodes it or names the problem, so what a file
    decodes to, or why it is rejected, does not depend on this path.

    The pixels are PIL's to the bit (both run libjpeg-turbo's exact DCT and smooth chroma
    upsampling; tests/test_image.py checks), in 0.16 instead of 0.22 ms for a 256px photo:
    PIL decodes into 4-byte pixels, then packs them to 3 and copies them out."""
    if not simplejpeg.is_jpeg(data):
        return None
    try:
        height, width, coding, _ = simplejpeg.decode_jpeg_header(data)
        if height * width > max_pixels:
            return None  # PIL reads the same header and names the size
        if coding not in JPEG_CODINGS_AS_PIL or (Image.MAX_IMAGE_PIXELS and height * width > Image.MAX_IMAGE_PIXELS):
            return None
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except ValueError:
        return None


def on_white(image: Image.Image) -> Image.Image:
    """An image with transparency composited over white (a cut-out stamp or icon), as it is
    seen; dropping alpha instead would show whatever colour hides under transparent pixels."""
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def check_pixels(width: int, height: int, channels: int, source: str, max_pixels: int) -> None:
    """An image's size from its header, before it is decoded: a 100-megapixel PNG is a 100 kB file."""
    if width * height > max_pixels:
        raise BadInput(source, f"image is {width}x{height} ({width * height / 1e6:.1f} megapixels, "
                       f"{width * height * channels / 2 ** 20:.0f} MiB decoded), more than "
                       f"modality_options.max_pixels={max_pixels} allows; downscale it or raise max_pixels",
                       "too_large")


def decode_with_pil(data: bytes, source: str, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Any format PIL reads -> uint8 [H, W] (grey) or [H, W, 3]; BadInput names `source` and the problem."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            check_pixels(image.width, image.height, channels, source, max_pixels)  # the header's, not decoded
            image.load()
            if image.width == 0 or image.height == 0:
                raise BadInput(source, f"image has zero size {image.width}x{image.height}", "empty_image")
            if image.mode in WIDE_GREY_MODES:  # 16-bit grey PNG: PIL's convert would clip it to 255 (white)
                image = Image.fromarray(np.clip(np.round(np.asarray(image, dtype=np.float64) / 257), 0, 255)
                                        .astype(np.uint8))
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                image = on_white(image)
            if image.mode != MODES[channels]:  # convert() to the same mode would only copy
                image = image.convert(MODES[channels])
            return np.array(image)  # a writable copy: np.asarray of a PIL image is read-only
    except BadInput:
        raise
    except UnidentifiedImageError:  # PIL's own message names a BytesIO object and its memory address
        raise BadInput(source, f"cannot decode image: not a format PIL reads ({len(data)} bytes starting "
                       f"{data[:8]!r})", "corrupt_image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadInput(source, f"cannot decode image ({type(err).__name__}: {err})", "corrupt_image") from None


def decode_image(data: bytes, source: str, channels: int, min_side: int = 1,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Image bytes -> uint8 tensor [channels, H, W], channels-last in memory (a view of the
    H x W x C pixels, which PyTorch's vectorised uint8 resize wants); BadInput names
    `source` and the problem."""
    if channels not in MODES:
        raise BadInput(source, f"cannot produce {channels} channels; images decode to 1 (grey) or 3 (RGB)",
                       "wrong_channels")
    if not data:
        raise BadInput(source, "image file is empty (0 bytes)", "empty_image")
    array = decode_jpeg_rgb(data, max_pixels) if channels == 3 else None
    if array is None:
        array = decode_with_pil(data, source, channels, max_pixels)
    height, width = array.shape[:2]
    if min(height, width) < min_side:
        raise BadInput(source, f"image {width}x{height} is smaller than one {min_side}px patch "
                       "(a smaller modality_options.patch_size, or `polymae shard --option patch_size=N`, fits it)",
                       "too_small")
    pixels = torch.from_numpy(array[..., None] if array.ndim == 2 else array)  # [H, W, C]
    return pixels.permute(2, 0, 1)


def folder_sample(root: Path, classes: list[str], path: Path) -> list[dict]:
    """One image file of a folder -> its sample (labelled by its class sub-folder, if any)."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise BadInput(str(path), f"is not an image file read here ({path.suffix or 'no suffix'}; images are "
                       f"{' '.join(sorted(IMAGE_SUFFIXES))})", "not_an_image")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BadInput(str(path), f"cannot read file ({error.strerror or error})", "unreadable_file") from None
    relative = path.relative_to(root)
    sample = {"__key__": sample_key(str(relative.with_suffix(""))), "__source__": str(path),
              IMAGE_SUFFIXES[path.suffix.lower()]: data}
    if classes and path.parent != root:
        sample["cls"] = str(classes.index(relative.parts[0])).encode()
    return [sample]


def read_folder(root: Path) -> SourceSamples:
    """A flat folder of images, or class sub-folders (labels by sorted folder name).
    A missing or image-less folder raises BadInput here, before any sample; an
    unreadable file ("unreadable_file") is rejected and the source goes on."""
    if not root.is_dir():
        raise BadInput(str(root), "is not a folder of images (nor a built-in source: "
                       f"{', '.join(BUILTIN_SOURCES)})", "missing_source")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    # not is_dir(): a folder named x.png is no image; a dangling link stays, to be rejected by name
    files = sorted(p for p in root.rglob("*") if not p.is_dir())
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in files):
        raise BadInput(str(root), f"holds no {'/'.join(sorted(IMAGE_SUFFIXES))} files", "missing_source")
    return SourceSamples(files, lambda path: folder_sample(root, classes, path), classes)


def read_digits() -> Iterator[dict]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    for i, (image, label) in enumerate(zip(pixels, digits.target)):
        yield {"__key__": f"digit{i:05d}", "image.png": encode_png(image), "cls": str(int(label)).encode()}


def read_sklearn_photos() -> Iterator[dict]:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    for name, image in zip(photos.filenames, photos.images):
        yield {"__key__": Path(name).stem, "image.png": encode_png(image)}


def read_skimage_photos() -> Iterator[dict]:
    import skimage.data

    for name in SKIMAGE_PHOTOS:
        try:  # some photos are fetched on demand by scikit-image; only the bundled ones are used
            image = getattr(skimage.data, name)()
        except Exception:  # noqa: BLE001  (not bundled in this scikit-image: skip it)
            continue
        if image.dtype != np.uint8:
            image = np.clip(image * (255.0 / max(float(image.max()), 1e-9)), 0, 255).astype(np.uint8)
        if image.ndim == 3 and image.shape[2] == 4:
            image = image[..., :3]
        yield {"__key__": name, "image.png": encode_png(image)}


BUILTIN_READERS = {"digits": read_digits, "sklearn-photos": read_sklearn_photos,
                   "skimage-photos": read_skimage_photos}


def read_source(source: str) -> Iterator[dict]:
    if source in BUILTIN_READERS:
        return BUILTIN_READERS[source]()
    return read_folder(Path(source))
