"""DICOM decoding on every real file pydicom-data ships: each one becomes an 8-bit greyscale / RGB image or a
BadRecord naming the file (never a bare decoder exception), and the colour / multi-frame / windowing cases
give the right pixels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from biomedgpt.data.images import decode_image, dicom_to_uint8
from biomedgpt.data.records import BadRecord

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the malformed files on purpose

MAX_BYTES = 5_000_000  # the few larger radiographs only cost time; the smaller ones cover every code path
#: Files whose decoding needs the colour / window / frame handling (each failed before it existed).
MUST_DECODE = ("US1_J2KI.dcm", "US1_J2KR.dcm", "examples_jpeg2k.dcm", "SC_ybr_full_uncompressed.dcm",
               "OBXXXX1A.dcm", "OBXXXX1A_2frame.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm", "examples_overlay.dcm",
               "emri_small.dcm", "examples_ybr_color.dcm", "gdcm-US-ALOKA-16.dcm")


@pytest.fixture(scope="module")
def packaged_dicoms() -> dict[str, Path]:
    """Every ``*.dcm`` of pydicom's data stores. pydicom would also try to download its online-only files;
    simulating an outage keeps the test offline and fast (~15 s of failing requests otherwise)."""
    import pydicom.data.download as download
    from pydicom.data import get_testdata_files

    before = download._SIMULATE_NETWORK_OUTAGE
    download._SIMULATE_NETWORK_OUTAGE = True
    try:
        paths = [Path(p) for p in get_testdata_files("*.dcm")]
    finally:
        download._SIMULATE_NETWORK_OUTAGE = before
    return {p.name: p for p in sorted(paths) if p.stat().st_size <= MAX_BYTES}


def test_every_packaged_dicom_decodes_or_is_named(packaged_dicoms):
    decoded, refused = {}, {}
    for name, path in packaged_dicoms.items():
        try:
            pixels = dicom_to_uint8(path)
        except BadRecord as exc:
            assert str(path) in str(exc) and exc.reason == "corrupt image", exc
            refused[name] = str(exc)
            continue
        assert pixels.dtype == np.uint8 and pixels.size > 0, name
        assert pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] == 3), (name, pixels.shape)
        decoded[name] = pixels
    assert not [n for n in MUST_DECODE if n not in decoded], {n: refused.get(n) for n in MUST_DECODE}
    assert len(decoded) >= 90 and len(refused) <= 40, (len(decoded), sorted(refused))
    assert "no pixel data" in refused["rtplan.dcm"]  # files without an image are refused, by name
    path = packaged_dicoms["MR_truncated.dcm"]  # in-memory bytes: the caller's name is used
    with pytest.raises(BadRecord, match=f"^{path}: unreadable DICOM"):
        decode_image(path.read_bytes(), name=str(path))


def test_colour_multiframe_and_window_pixels(packaged_dicoms):
    import pydicom
    from pydicom.pixels import apply_modality_lut

    def pixels(name: str) -> np.ndarray:
        return dicom_to_uint8(packaged_dicoms[name]).astype(int)

    rgb = pixels("SC_rgb.dcm")
    assert np.abs(pixels("SC_ybr_full_uncompressed.dcm") - rgb).max() <= 8  # YBR_FULL -> the same RGB image
    assert np.array_equal(pixels("US1_J2KR.dcm"), pixels("US1_UNCR.dcm"))  # JPEG 2000 RCT, lossless
    assert np.abs(pixels("US1_J2KI.dcm") - pixels("US1_UNCI.dcm")).max() <= 8  # JPEG 2000 ICT
    palette = pixels("OBXXXX1A.dcm")  # palette colour through its LUT: a colour image, not the indices
    assert palette.shape == (600, 800, 3) and (np.abs(palette[..., 0] - palette[..., 2]) > 10).mean() > 0.02
    assert np.array_equal(pixels("SC_rgb_2frame.dcm"), 255 - rgb)  # the middle (second) frame: the inverse

    ds = pydicom.dcmread(packaged_dicoms["emri_small.dcm"])  # 10 frames, no window: the middle frame's range
    middle = apply_modality_lut(ds.pixel_array[5], ds).astype(float)
    expected = np.round((middle - middle.min()) * 255 / (middle.max() - middle.min()))
    assert np.array_equal(pixels("emri_small.dcm"), expected.astype(int))

    ds = pydicom.dcmread(packaged_dicoms["MR-SIEMENS-DICOM-WithOverlays.dcm"])  # two VOI windows: the first
    center, width = float(ds.WindowCenter[0]), float(ds.WindowWidth[0])
    values = apply_modality_lut(ds.pixel_array, ds).astype(float)
    low = center - 0.5 - (width - 1) / 2
    expected = np.clip(np.round((values - low) * 255 / (width - 1)), 0, 255)
    assert np.abs(pixels("MR-SIEMENS-DICOM-WithOverlays.dcm") - expected).max() <= 1


# ----- the uint8 fast path against the reference transforms (full decode, float, resize then crop) -------------

def _jpeg(side: int = 512) -> bytes:
    import io

    from PIL import Image
    from skimage import data as skdata

    image = Image.fromarray(skdata.retina()).resize((side, side * 3 // 4), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _unit_scale(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [-1, 1] (mean = std = 0.5), where resampling noise is compared."""
    return images.to(torch.float32).div(127.5).sub(1.0)


@pytest.mark.parametrize("size", [128, 256, 480])
def test_fast_path_sees_what_the_reference_sees(size):
    """Draft decoding + one box resampling differ from full decode + resize (+ crop) by resampling noise only."""
    import random

    from PIL import Image

    from biomedgpt.data import images as im

    data = _jpeg()
    full = im.decode_image(data)
    ref = _unit_scale(im.to_uint8(full.resize((size, size), Image.BICUBIC)))
    fast = im.eval_transform(im.open_image(data), size)
    assert fast.dtype == torch.uint8 and fast.shape == (3, size, size)
    diff = (_unit_scale(fast) - ref).abs()
    assert diff.mean() < 0.02 and diff.max() < 0.5, (float(diff.mean()), float(diff.max()))

    for seed in range(3):  # train: random resize + centre crop (RandAugment off: num_ops 0 via the same RNG draws)
        rng_a, rng_b = random.Random(seed), random.Random(seed)
        width, height = im._random_size(full.size, size, rng_a)
        resized = full.resize((width, height), Image.BICUBIC)
        left, top = (width - size) // 2, (height - size) // 2
        ref = _unit_scale(im.to_uint8(resized.crop((left, top, left + size, top + size))))
        w2, h2 = im._random_size(full.size, size, rng_b)
        sx, sy = full.width / w2, full.height / h2
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        fast = im._resized(im.open_image(data), (size, size), box)
        diff = (_unit_scale(fast) - ref).abs()
        assert diff.mean() < 0.02 and diff.max() < 0.5, (seed, float(diff.mean()), float(diff.max()))


def test_jpeg_is_decoded_at_a_reduced_scale_that_still_covers_the_target():
    from biomedgpt.data import images as im

    image = im.open_image(_jpeg(512))  # 512 x 384
    loaded = im.load_rgb(image, (128, 128))
    assert loaded.size == (256, 192)  # 1/2 scale: 1/4 would give 128 x 96, below 128 in height


# ----- pre-resized storage, JPEG headers, RandAugment tables ---------------------------------------------------

def test_pre_resized_images_hold_every_pixel_the_transform_resamples_from():
    """Stored within ``training_image_sides``, an image is never smaller than the random resize (ofa_augment),
    the size x size resize (resize) or the smallest random crop enlarged to size (medmnist) of its source:
    training resamples from at least as many pixels."""
    import io
    import random

    from PIL import Image

    from biomedgpt.data import images as im

    rng = random.Random(0)
    for case in range(300):
        source = (rng.randint(60, 2000), rng.randint(60, 2000))
        for size in (128, 256, 480):
            smallest_crop = min(source) * im.MEDMNIST_MIN_CROP_SIDE  # either side of an 8% area, 3:4 crop
            for transform in ("resize", "ofa_augment", "medmnist"):
                stored = im.pre_resized_size(source, *im.training_image_sides(size, transform))
                needed = {"resize": [(size, size)],
                          "ofa_augment": [im._random_size(source, size, random.Random(s)) for s in range(5)],
                          "medmnist": [(round(source[0] * size / smallest_crop),
                                        round(source[1] * size / smallest_crop))]}[transform]
                for w, h in needed:
                    assert stored[0] >= min(source[0], w) and stored[1] >= min(source[1], h), (source, size, transform)
    buf = io.BytesIO()
    Image.new("RGB", (900, 700), (90, 40, 200)).save(buf, format="JPEG")
    data, sx, sy = im.pre_resized(buf.getvalue(), *im.training_image_sides(256, "resize"))
    assert Image.open(io.BytesIO(data)).size == im.pre_resized_size((900, 700), 256, 256) == (329, 256)
    assert (sx, sy) == (329 / 900, 256 / 700)


def test_jpeg_frame_header_gives_pils_size_and_layout():
    import io

    from PIL import Image

    from biomedgpt.data import images as im

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    for mode, options in (("RGB", {}), ("RGB", {"progressive": True}), ("L", {}), ("CMYK", {})):
        buf = io.BytesIO()
        rgb.convert(mode).save(buf, format="JPEG", **options)
        opened = im.open_image(buf.getvalue())
        assert opened.size == rgb.size
        assert isinstance(opened, im.JpegSource) == (mode != "CMYK") and opened.mode == mode
        if mode != "CMYK":  # the pixels torchvision gives are the ones PIL decodes
            assert torch.equal(im.decoded_pixels(opened, opened.size),
                               im.to_uint8(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    assert im._jpeg_frame(b"\xff\xd8\xff\xe0\x00") is None and not isinstance(im.open_image(_png()), im.JpegSource)


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 6)).save(buf, format="PNG")
    return buf.getvalue()


def test_randaugment_tables_equal_pils():
    from PIL import Image, ImageOps

    from biomedgpt.data import images as im

    rng = np.random.default_rng(0)
    for case in range(12):
        low = int(rng.integers(0, 120))
        pixels = rng.integers(low, int(rng.integers(low + 1, 256)), (21, 34, 3)).astype(np.uint8)
        if case % 4 == 0:
            pixels[..., 1] = 9  # a flat band: PIL leaves it as it is
        for image in (Image.fromarray(pixels), Image.fromarray(pixels[..., 0])):
            for op, reference in (("autocontrast", ImageOps.autocontrast), ("equalize", ImageOps.equalize)):
                assert np.array_equal(np.asarray(im._apply_op(image, op, 0.7, 1.0)), np.asarray(reference(image))), op


def test_sharpness_equals_pils():
    """The numpy sharpness (integer box sums, PIL's rounding and float32 blend) gives PIL's pixels exactly."""
    from PIL import Image, ImageEnhance

    from biomedgpt.data import images as im

    rng = np.random.default_rng(0)
    for case in range(8):
        shape = (int(rng.integers(3, 90)), int(rng.integers(3, 90)), 3)
        pixels = rng.integers(0, 256, shape).astype(np.uint8)
        if case % 2:  # smooth ramps as well as noise: values near the rounding and clipping edges differ
            pixels = np.clip(pixels // 4 + np.arange(shape[1])[None, :, None] * 3, 0, 255).astype(np.uint8)
        for image in (Image.fromarray(pixels), Image.fromarray(pixels[..., 0])):
            for sign in (-1.0, 1.0):
                ours = im._apply_op(image, "sharpness", 0.7, sign)
                reference = ImageEnhance.Sharpness(image).enhance(1.0 + sign * 0.7 * 0.9)
                assert ours.mode == image.mode and np.array_equal(np.asarray(ours), np.asarray(reference)), (case, sign)
