"""The image modality on real pictures: patchify layout and inverse, the
tokenize/untokenize round trip, augmentations, decoding and its errors, and
the dataset adapters (scikit-learn digits and photos, scikit-image photos, folders)."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from polymae.modalities.image.adapters import decode_image, decode_jpeg_rgb, encode_png, read_source
from polymae.modalities.image.augment import random_hflip, random_resized_crop, random_resized_crop_box
from polymae.modalities.image.modality import ImageModality
from polymae.modalities.image.tokenizer import grid_coords, patchify, unpatchify
from polymae.shared.errors import BadInput, ConfigError
from polymae.shared.registry import MODALITIES

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage_data.astronaut()          # uint8 [512, 512, 3]


@pytest.fixture(scope="module")
def coffee() -> np.ndarray:
    return skimage_data.coffee()             # uint8 [400, 600, 3]


@pytest.fixture(scope="module")
def camera() -> np.ndarray:
    return skimage_data.camera()             # uint8 [512, 512] grey


def chw(array: np.ndarray) -> torch.Tensor:
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


def encode(array: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def hf_patchify_reference(images: torch.Tensor, p: int) -> torch.Tensor:
    """Hugging Face ViTMAE's patchify, written out: [B, C, H, W] -> [B, h*w, p*p*C]."""
    b, c, height, width = images.shape
    h, w = height // p, width // p
    x = images.reshape(b, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, h * w, p * p * c)


# -- patchify / unpatchify ---------------------------------------------------------

@pytest.mark.parametrize("patch,height,width", [(16, 224, 224), (8, 64, 96), (4, 8, 12), (1, 5, 7), (7, 21, 35)])
@pytest.mark.parametrize("channels", [1, 3])
def test_patchify_is_exact_and_matches_vitmae_layout(astronaut, patch, height, width, channels):
    image = chw(astronaut)[:channels, 100:100 + height, 150:150 + width].float()
    batch = torch.stack([image, chw(astronaut)[:channels, :height, :width].float()])

    tokens = patchify(image, patch)
    h, w = height // patch, width // patch
    assert tokens.grid == (h, w)
    assert tokens.values.shape == (h * w, patch * patch * channels)
    assert torch.equal(tokens.coords, grid_coords(h, w))
    assert torch.equal(unpatchify(tokens.values, tokens.grid, patch), image)

    batched = patchify(batch, patch)
    assert batched.values.shape == (2, h * w, patch * patch * channels)
    assert batched.coords.shape == (2, h * w, 2)
    assert torch.equal(unpatchify(batched.values, batched.grid, patch), batch)
    assert torch.equal(batched.values, hf_patchify_reference(batch, patch))
    assert torch.equal(tokens.values, hf_patchify_reference(image[None], patch)[0])


def test_patch_token_content_and_coords(astronaut):
    """Token (row r, col c) holds pixels [r*p:(r+1)*p, c*p:(c+1)*p] in (dy, dx, channel) order;
    its coords are (x=col, y=row)."""
    image = chw(astronaut)[:, :64, :96].float()
    p = 16
    tokens = patchify(image, p)
    h, w = tokens.grid
    for r, c in [(0, 0), (1, 4), (3, 5), (2, 0)]:
        i = r * w + c
        block = image[:, r * p:(r + 1) * p, c * p:(c + 1) * p]
        assert torch.equal(tokens.values[i], block.permute(1, 2, 0).reshape(-1))
        assert tokens.coords[i].tolist() == [c, r]


def test_patchify_matches_huggingface_vitmae(astronaut):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTMAEConfig(image_size=64, patch_size=16, num_channels=3, hidden_size=32,
                                       num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                       decoder_hidden_size=32, decoder_num_hidden_layers=1,
                                       decoder_num_attention_heads=2, decoder_intermediate_size=64)
    model = transformers.ViTMAEForPreTraining(config)
    batch = torch.stack([chw(astronaut)[:, :64, :64].float(), chw(astronaut)[:, 200:264, 300:364].float()])
    tokens = patchify(batch, 16)
    assert torch.equal(tokens.values, model.patchify(batch))
    assert torch.equal(unpatchify(tokens.values, tokens.grid, 16), model.unpatchify(model.patchify(batch)))


def test_patchify_rejects_a_size_not_a_multiple_of_the_patch(astronaut):
    with pytest.raises(ValueError, match="not a multiple of patch size 16"):
        patchify(chw(astronaut)[:, :50, :64].float(), 16)


# -- tokenize / untokenize ---------------------------------------------------------------

@pytest.mark.parametrize("which,patch,channels", [("astronaut", 16, 3), ("coffee", 8, 3), ("camera", 32, 1)])
def test_tokenize_untokenize_round_trip_is_exact(request, which, patch, channels):
    array = request.getfixturevalue(which)
    image = chw(array)
    modality = ImageModality({"image_size": list(image.shape[-2:]), "patch_size": patch, "channels": channels})
    tokens = modality.tokenize(image, torch.Generator().manual_seed(0), train=False)
    assert tokens.grid == modality.grid == (image.shape[1] // patch, image.shape[2] // patch)
    assert tokens.values.shape == (math.prod(modality.grid), modality.d_in)
    assert tokens.values.dtype == torch.uint8  # workers ship bytes; finish() normalises where consumed
    finished = modality.finish(tokens)
    assert finished.values.dtype == torch.float32
    mean = torch.tensor(modality.options.mean).repeat(patch * patch) * 255
    std = torch.tensor(modality.options.std).repeat(patch * patch) * 255
    torch.testing.assert_close(finished.values, (tokens.values.float() - mean) / std)
    assert modality.finish(finished) is finished  # finishing twice changes nothing
    for values in (tokens, finished):  # untokenize reads both back to the exact pixels
        back = modality.untokenize(values)
        assert back.dtype == torch.uint8
        assert torch.equal(back, image)
    # batched untokenize too
    stacked = type(tokens)(torch.stack([finished.values] * 2), torch.stack([tokens.coords] * 2), grid=tokens.grid)
    assert torch.equal(modality.untokenize(stacked), torch.stack([image, image]))


def test_sample_decode_tokenize_round_trip_on_digits():
    """A real shard-style sample (PNG bytes) through decode -> tokenize -> untokenize."""
    sample = next(iter(read_source("digits")))
    modality = MODALITIES.get("image")({"image_size": [8, 8], "patch_size": 4, "channels": 1})
    pixels = modality.decode(sample)
    assert pixels.shape == (1, 8, 8) and pixels.dtype == torch.uint8
    tokens = modality.tokenize(pixels, torch.Generator().manual_seed(0), train=False)
    assert tokens.values.shape == (4, 16)
    assert torch.equal(modality.untokenize(tokens), pixels)


def test_tokenize_rejects_an_image_smaller_than_a_patch():
    sample = next(iter(read_source("digits")))  # 8x8
    modality = ImageModality({"image_size": [32, 32], "patch_size": 16, "channels": 1})
    with pytest.raises(BadInput) as err:  # tokenize checks the pixels it is given
        modality.tokenize(decode_image(sample["image.png"], "d", 1), torch.Generator().manual_seed(0))
    assert err.value.kind == "too_small"
    with pytest.raises(BadInput) as err:  # and decode already rejects it, naming the record
        modality.decode(sample)
    assert err.value.kind == "too_small" and sample["__key__"] in str(err.value)


def test_image_options_are_validated():
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        ImageModality({"image_size": [100, 100], "patch_size": 16})
    with pytest.raises(ConfigError, match="channels"):
        ImageModality({"channels": 2})
    with pytest.raises(ConfigError, match="crop_scale"):
        ImageModality({"crop_scale": [0.5, 0.2]})
    with pytest.raises(ConfigError, match="modality_options.patch"):
        ImageModality({"patch": 16})
    assert ImageModality({"channels": 1}).options.mean == (0.5,)


# -- augmentations -------------------------------------------------------------------

def crop_area_slack(h: int, w: int) -> float:
    """w and h are rounded from sqrt(target * aspect) and sqrt(target / aspect): half a pixel each."""
    return 0.5 * (h + w) + 0.25


def test_random_resized_crop_respects_scale_and_ratio_when_it_succeeds():
    # on a square image, any area <= 9/16 with aspect in [3/4, 4/3] fits: every draw succeeds
    height = width = 512
    scale, ratio = (0.2, 0.5), (3 / 4, 4 / 3)
    fractions = []
    for seed in range(200):
        top, left, h, w = random_resized_crop_box(height, width, scale, ratio, torch.Generator().manual_seed(seed))
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        slack = crop_area_slack(h, w)
        area = height * width
        assert scale[0] * area - slack <= h * w <= scale[1] * area + slack
        assert ratio[0] - 0.01 <= w / h <= ratio[1] + 0.01
        fractions.append(h * w / area)
    # the draws span the range, not a point in it
    assert min(fractions) < 0.23 and max(fractions) > 0.47


def test_random_resized_crop_falls_back_to_a_centre_crop():
    # a 400x600 photo with MAE's defaults: each box is either in range or the torchvision fallback
    height, width = 400, 600
    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
    fallback = (0, (600 - 533) // 2, 400, 533)   # widest crop of aspect 4/3, centred
    in_range = 0
    for seed in range(200):
        box = random_resized_crop_box(height, width, scale, ratio, torch.Generator().manual_seed(seed))
        top, left, h, w = box
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        ok = (scale[0] * height * width - crop_area_slack(h, w) <= h * w <= scale[1] * height * width
              + crop_area_slack(h, w)) and ratio[0] - 0.01 <= w / h <= ratio[1] + 0.01
        assert ok or box == fallback, box
        in_range += ok
    assert in_range > 150
    # an impossible request always falls back
    for seed in range(5):
        box = random_resized_crop_box(height, width, (2.0, 3.0), ratio, torch.Generator().manual_seed(seed))
        assert box == fallback


def test_random_resized_crop_output_size_and_seeding(coffee):
    image = chw(coffee)
    out = random_resized_crop(image, (96, 128), (0.2, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(3))
    assert out.shape == (3, 96, 128) and out.dtype == torch.uint8
    # the uint8 fast path is the float resize, rounded: within one grey level of it
    as_float = random_resized_crop(image.float(), (96, 128), (0.2, 1.0), (3 / 4, 4 / 3),
                                   torch.Generator().manual_seed(3))
    assert as_float.dtype == torch.float32 and (out.float() - as_float).abs().max() <= 1.0
    assert (out.float() - as_float).abs().mean() < 0.3
    again = random_resized_crop(image, (96, 128), (0.2, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(3))
    other = random_resized_crop(image, (96, 128), (0.2, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(4))
    assert torch.equal(out, again) and not torch.equal(out, other)
    # the crop is of the photo: a full-image, same-size crop returns the photo itself
    full = random_resized_crop(image, (400, 600), (1.0, 1.0), (1.5, 1.5), torch.Generator().manual_seed(0))
    assert torch.equal(full, image)


def test_random_hflip_flips(astronaut):
    image = chw(astronaut)
    mirrored = image.flip(-1)
    assert torch.equal(mirrored[:, :, 0], image[:, :, -1]) and not torch.equal(mirrored, image)
    outcomes = []
    for seed in range(20):
        out = random_hflip(image, torch.Generator().manual_seed(seed))
        assert torch.equal(out, image) or torch.equal(out, mirrored)
        outcomes.append(torch.equal(out, mirrored))
    assert 3 <= sum(outcomes) <= 17


def test_train_tokenize_augments_with_crop_and_flip(astronaut):
    image = chw(astronaut)
    # full-image crops at native size: training differs from eval only by the flip
    full_crop = {"image_size": [512, 512], "patch_size": 32, "crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0]}
    modality = ImageModality(full_crop)
    flipped = 0
    for seed in range(12):
        back = modality.untokenize(modality.tokenize(image, torch.Generator().manual_seed(seed), train=True))
        assert torch.equal(back, image) or torch.equal(back, image.flip(-1))
        flipped += torch.equal(back, image.flip(-1))
    assert 0 < flipped < 12
    # MAE defaults at 224: the right token count, and different crops for different seeds
    modality = ImageModality({"image_size": [224, 224], "patch_size": 16})
    a = modality.tokenize(image, torch.Generator().manual_seed(0))
    b = modality.tokenize(image, torch.Generator().manual_seed(1))
    assert a.values.shape == b.values.shape == (196, 768) and a.grid == (14, 14)
    assert not torch.equal(a.values, b.values)
    no_flip = ImageModality({**full_crop, "hflip": False})
    for seed in range(6):
        assert torch.equal(no_flip.untokenize(no_flip.tokenize(image, torch.Generator().manual_seed(seed))), image)


# -- decode_image ------------------------------------------------------------------

def test_decode_png_and_jpeg(astronaut, camera):
    png = decode_image(encode(astronaut, "PNG"), "astronaut.png", 3)
    assert png.shape == (3, 512, 512) and png.dtype == torch.uint8
    assert torch.equal(png, chw(astronaut))
    jpeg = decode_image(encode(astronaut, "JPEG", quality=95), "astronaut.jpg", 3)
    assert jpeg.shape == (3, 512, 512)
    assert (jpeg.float() - chw(astronaut).float()).abs().mean() < 3  # lossy, but the same picture
    grey = decode_image(encode(astronaut, "PNG"), "astronaut.png", 1)
    assert grey.shape == (1, 512, 512)
    expected = np.array(Image.fromarray(astronaut).convert("L"))
    assert torch.equal(grey[0], torch.from_numpy(expected))
    assert torch.equal(decode_image(encode(camera, "PNG"), "camera.png", 1), chw(camera))
    assert decode_image(encode(camera, "JPEG"), "camera.jpg", 3).shape == (3, 512, 512)  # grey -> RGB
    rgba = np.concatenate([astronaut, np.full((512, 512, 1), 255, np.uint8)], axis=-1)
    assert torch.equal(decode_image(encode(rgba, "PNG"), "rgba.png", 3), chw(astronaut))


def jpeg_variants(astronaut, camera):
    """The JPEG kinds a photo collection holds: camera files (scikit-learn ships two), every chroma
    subsampling, progressive, low and high quality, greyscale, an odd size."""
    from sklearn.datasets import images

    folder = Path(images.__file__).parent
    variants = {name: (folder / name).read_bytes() for name in ("china.jpg", "flower.jpg")}
    for subsampling in (0, 1, 2):  # 4:4:4, 4:2:2, 4:2:0
        variants[f"subsampling{subsampling}"] = encode(astronaut, "JPEG", quality=90, subsampling=subsampling)
    variants["progressive"] = encode(astronaut, "JPEG", quality=75, progressive=True)
    variants["quality20"] = encode(astronaut, "JPEG", quality=20)
    variants["grey"] = encode(camera, "JPEG", quality=90)
    variants["odd_size"] = encode(astronaut[:317, :243], "JPEG", quality=90)
    return variants


def test_jpeg_fast_path_gives_pils_pixels_bit_for_bit(astronaut, camera):
    """decode_image reads JPEGs with libjpeg-turbo directly (simplejpeg): the same pixels PIL
    gives, for every kind of JPEG here."""
    for name, data in jpeg_variants(astronaut, camera).items():
        fast = decode_jpeg_rgb(data)
        assert fast is not None, name
        with Image.open(io.BytesIO(data)) as image:
            expected = np.array(image.convert("RGB"))
        assert fast.shape == expected.shape and np.array_equal(fast, expected), name
        assert torch.equal(decode_image(data, name, 3), torch.from_numpy(expected).permute(2, 0, 1))


def test_jpeg_fast_path_declines_what_pil_must_handle(astronaut):
    """CMYK JPEGs, other formats, damaged bytes and images above PIL's decompression-bomb limit go
    to PIL, so the pixels, or the reason for rejecting a file, are PIL's."""
    buffer = io.BytesIO()
    Image.fromarray(astronaut).convert("CMYK").save(buffer, format="JPEG", quality=90)
    cmyk = buffer.getvalue()
    png, jpeg = encode(astronaut, "PNG"), encode(astronaut, "JPEG", quality=90)
    for data in (cmyk, png, jpeg[: len(jpeg) // 2], b""):
        assert decode_jpeg_rgb(data) is None
    with Image.open(io.BytesIO(cmyk)) as image:
        expected = np.array(image.convert("RGB"))
    assert torch.equal(decode_image(cmyk, "cmyk.jpg", 3), torch.from_numpy(expected).permute(2, 0, 1))
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = 512 * 512 - 1  # the astronaut (512 x 512) is now over it
        assert decode_jpeg_rgb(jpeg) is None
        Image.MAX_IMAGE_PIXELS = 512 * 512 // 2 - 1  # over twice the limit, PIL refuses the file
        with pytest.raises(BadInput) as caught:
            decode_image(jpeg, "bomb.jpg", 3)
        assert caught.value.kind == "corrupt_image" and "DecompressionBombError" in str(caught.value)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def test_decode_16_bit_grey_png(camera):
    """A 16-bit grey PNG decodes to its 8-bit picture, not to PIL's clipped all-white image."""
    wide = camera.astype(np.uint16) * 257
    data = encode(wide, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    assert torch.equal(decode_image(data, "camera16.png", 1), chw(camera))
    assert torch.equal(decode_image(data, "camera16.png", 3), chw(camera).expand(3, -1, -1))


@pytest.mark.parametrize("case,kind", [
    ("truncated_jpeg", "corrupt_image"),
    ("truncated_png", "corrupt_image"),
    ("garbage", "corrupt_image"),
    ("empty", "empty_image"),
    ("too_small", "too_small"),
    ("two_channels", "wrong_channels"),
])
def test_decode_errors_are_bad_input_naming_the_source(astronaut, case, kind):
    jpeg, png = encode(astronaut, "JPEG", quality=90), encode(astronaut, "PNG")
    source = f"shard-000017.tar/sample_{case}.img"
    channels, min_side = 3, 1
    data = {"truncated_jpeg": jpeg[: len(jpeg) // 2], "truncated_png": png[: len(png) // 2],
            "garbage": b"this is not an image at all " * 8, "empty": b"",
            "too_small": encode(astronaut[:12, :40], "PNG"), "two_channels": png}[case]
    if case == "too_small":
        min_side = 16
    if case == "two_channels":
        channels = 2
    with pytest.raises(BadInput) as err:
        decode_image(data, source, channels, min_side=min_side)
    assert err.value.kind == kind
    assert err.value.source == source
    assert source in str(err.value)
    assert isinstance(err.value, ValueError)


# -- adapters ------------------------------------------------------------------------

def test_read_digits():
    from sklearn.datasets import load_digits

    samples = list(read_source("digits"))
    assert len(samples) == 1797
    digits = load_digits()
    labels = [int(s["cls"]) for s in samples]
    assert labels == digits.target.tolist()
    assert len({s["__key__"] for s in samples}) == 1797
    brightest = 0
    for i in (0, 1, 900, 1796):
        pixels = decode_image(samples[i]["image.png"], samples[i]["__key__"], 1)
        assert pixels.shape == (1, 8, 8)
        expected = np.round(digits.images[i] * (255 / 16)).astype(np.uint8)
        assert torch.equal(pixels[0], torch.from_numpy(expected))
        brightest = max(brightest, int(pixels.max()))
    assert brightest == 255  # scaled to the full uint8 range, not left at 0..16


def test_read_sklearn_photos():
    from sklearn.datasets import load_sample_images

    samples = list(read_source("sklearn-photos"))
    assert [s["__key__"] for s in samples] == ["china", "flower"]
    assert all("cls" not in s for s in samples)
    for sample, image in zip(samples, load_sample_images().images):
        assert torch.equal(decode_image(sample["image.png"], sample["__key__"], 3), chw(image))


def test_read_skimage_photos(astronaut, camera):
    samples = {s["__key__"]: s for s in read_source("skimage-photos")}
    assert len(samples) >= 5
    assert {"astronaut", "camera", "coffee", "chelsea"} <= set(samples)
    assert torch.equal(decode_image(samples["astronaut"]["image.png"], "astronaut", 3), chw(astronaut))
    assert torch.equal(decode_image(samples["camera"]["image.png"], "camera", 1), chw(camera))
    for key, sample in samples.items():  # every photo decodes as RGB
        assert decode_image(sample["image.png"], key, 3).shape[0] == 3


def test_read_folder_with_class_subfolders(tmp_path, astronaut, coffee):
    (tmp_path / "zebra").mkdir()
    (tmp_path / "ant").mkdir()
    (tmp_path / "moth").mkdir()
    (tmp_path / "zebra" / "z1.png").write_bytes(encode(astronaut[:64, :64], "PNG"))
    (tmp_path / "zebra" / "z2.JPG").write_bytes(encode(coffee[:48, :80], "JPEG"))
    (tmp_path / "ant" / "a1.jpeg").write_bytes(encode(coffee[100:164, 100:164], "JPEG"))
    (tmp_path / "moth" / "m1.png").write_bytes(encode(astronaut[200:232, 200:232], "PNG"))
    (tmp_path / "moth" / "notes.txt").write_text("not an image")
    from polymae.pipelines.shards import samples_recording_errors

    rejected = []
    samples = list(samples_recording_errors(read_source(str(tmp_path)), rejected.append))
    assert len(samples) == 4
    assert [(error.source, error.kind) for error in rejected] == [(str(tmp_path / "moth" / "notes.txt"), "not_an_image")]
    by_key = {s["__key__"]: s for s in samples}
    assert set(by_key) == {"ant_a1", "moth_m1", "zebra_z1", "zebra_z2"}
    assert {k: int(s["cls"]) for k, s in by_key.items()} == {"ant_a1": 0, "moth_m1": 1, "zebra_z1": 2, "zebra_z2": 2}
    assert "image.jpg" in by_key["zebra_z2"] and "image.jpg" in by_key["ant_a1"] and "image.png" in by_key["zebra_z1"]
    assert torch.equal(decode_image(by_key["zebra_z1"]["image.png"], "z1", 3), chw(astronaut[:64, :64]))
    assert decode_image(by_key["zebra_z2"]["image.jpg"], "z2", 3).shape == (3, 48, 80)
    assert all("." not in key for key in by_key)  # WebDataset splits keys at the first dot
    modality = ImageModality({"image_size": [32, 32], "patch_size": 16})
    assert modality.decode(by_key["moth_m1"]).shape == (3, 32, 32)


def test_read_flat_folder_has_no_labels(tmp_path, astronaut):
    (tmp_path / "one.png").write_bytes(encode(astronaut[:32, :32], "PNG"))
    (tmp_path / "two.jpg").write_bytes(encode(astronaut[32:64, :32], "JPEG"))
    samples = list(read_source(str(tmp_path)))
    assert sorted(s["__key__"] for s in samples) == ["one", "two"]
    assert all("cls" not in s for s in samples)


def test_missing_or_empty_folder_is_bad_input_naming_it(tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(BadInput) as err:
        list(read_source(str(missing)))
    assert str(missing) in str(err.value) and err.value.kind == "missing_source"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInput, match="holds no") as err:
        list(read_source(str(empty)))
    assert str(empty) in str(err.value)


def test_builtin_sources_are_listed():
    assert {"digits", "sklearn-photos", "skimage-photos"} <= set(ImageModality().sources())


def test_encode_png_round_trips(camera):
    assert torch.equal(decode_image(encode_png(camera), "camera", 1), chw(camera))


@pytest.mark.parametrize("size", [(8, 8), (6, 6), (12, 12)])
def test_tokenizing_never_writes_into_the_decoded_pixels(size):
    """`decoded_cacheable`: the data stream keeps decoded digits and tokenizes them again each
    epoch (pipelines/record_cache.py), so no augmentation may write into them: after 40
    training tokenizations with crop, flip, RandAugment and erasing (at the default's own size,
    and resized down and up), the pixels are unchanged and every draw gives what a fresh decode
    of the same record gives."""
    assert ImageModality.decoded_cacheable
    samples = [s for _, s in zip(range(4), read_source("digits"))]
    modality = ImageModality({"image_size": list(size), "patch_size": 2, "channels": 1, "crop_scale": [0.5, 1.0]})
    modality = modality.with_augmentations({"randaug_n": 2, "randaug_m": 9, "erase_prob": 1.0})
    for sample in samples:
        kept = modality.decode(sample)
        before = kept.clone()
        for seed in range(40):
            again = modality.tokenize(kept, torch.Generator().manual_seed(seed), train=True)
            fresh = modality.tokenize(modality.decode(sample), torch.Generator().manual_seed(seed), train=True)
            assert torch.equal(again.values, fresh.values)
        assert torch.equal(kept, before)
