"""Image bytes in, uint8 tensors out: decoding (incl. DICOM), the training and evaluation transforms.

Evaluation, and training with ``data.train_transform: resize`` (the original's VQA and captioning fine-tuning):
PIL's bicubic resize of the whole image to size x size, pixel for pixel the original's ``Resize`` before its
``ToTensor``. ``ofa_augment`` (OFA's pretraining): random resize of the short side to [size, 480] (long side
<= 672), centre crop to ``size``, two RandAugment ops at magnitude 7; boxed tasks (grounding, detection) skip
the photometric/geometric ops and crop around the object so the box stays valid. ``medmnist`` (the original's
MedMNIST fine-tuning: timm's ``create_transform`` training pipeline with OFA's RandAugment spliced in) is built
from torchvision.transforms.v2; see ``data.medmnist_ops`` for how it follows timm's ``rand-m9-mstd0.5-inc1`` and
pixel-mode random erasing. All randomness comes from the caller's ``random.Random`` (torchvision's ops draw
from a torch generator seeded by it) so a sample's augmentation is a pure function of (seed, epoch, sample id):
exact resumption.

Transforms give ``uint8`` [3, H, W] tensors; the model normalises, ``(x / 255 - mean) / std`` with its
config's ``image_mean`` / ``image_std`` (``data.image_mean`` / ``data.image_std`` of the run that trained it),
on its device (``biomedgpt.models.ofa.normalise_images``). For ``ofa_augment`` JPEGs are decoded at the
smallest DCT scale that still covers the size they are resampled to (PIL ``draft``), and resize + centre
crop is one resampling of the crop's source box (``resize(box=...)``), so no pixel outside the crop is
resampled.
"""
from __future__ import annotations

import io
import math
import os
import random
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance

from biomedgpt.data.records import BadRecord

MAX_RESIZE, MAX_LONG_SIDE = 480, 672
#: default limit on an image's width x height, checked from its header before anything is decoded (conversion
#: and training): far above what training resamples from (672 px sides), well below the 89.5 Mpx at which
#: PIL only starts to warn (a 13,000 x 13,000 PNG of 190 KB decodes to 0.5 GB of pixels in seconds)
MAX_IMAGE_PIXELS = 36_000_000
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RANDAUG_OPS = ("identity", "autocontrast", "equalize", "brightness", "sharpness",
               "shear_x", "shear_y", "translate_x", "translate_y", "rotate")


def import_torchvision() -> None:
    """Import the torchvision modules the transforms use, now: a loader does before it forks its workers, since a
    module first imported in a forked worker runs wandb's import hooks there, which fail in a fork (every image
    row of a wandb run was dropped as bad). Elsewhere they are imported where an image is first transformed:
    torchvision imports torch._dynamo, ~2.4 s of a core that text-only data and most commands need not pay."""
    import torchvision.io  # noqa: F401

    import biomedgpt.data.medmnist_ops  # noqa: F401  (torchvision.transforms.v2 and its functional ops)


def decode_image(data: bytes, name: str = "") -> Image.Image:
    """Encoded bytes (PNG/JPEG/..., or a DICOM file) -> RGB PIL image; BadRecord (naming ``name``) if unreadable."""
    if is_dicom(data):
        return Image.fromarray(dicom_to_uint8(data, name)).convert("RGB")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # PIL raises many types for corrupt data
        raise BadRecord(f"{_label(data, name)}: corrupt image: {exc}", "corrupt image") from None
    return _eight_bit(image).convert("RGB")


def image_size(data: bytes, name: str = "") -> tuple[int, int]:
    """(width, height) from the header alone (JPEG frame, PNG IHDR, DICOM Rows/Columns, else PIL's lazy open);
    BadRecord naming ``name`` if there is no readable header."""
    frame = _jpeg_frame(data)
    if frame is not None:
        return frame[0], frame[1]
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    try:
        if is_dicom(data):
            import pydicom

            header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            return int(header.Columns), int(header.Rows)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data)).size
    except Image.DecompressionBombError as exc:
        raise BadRecord(f"{_label(data, name)}: image too large: {exc}", "image too large") from None
    except Exception as exc:
        raise BadRecord(f"{_label(data, name)}: corrupt image: {type(exc).__name__}: {exc}", "corrupt image") from None


def check_image_pixels(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, name: str = "") -> None:
    """BadRecord ("image too large") when the header says the image has more than ``max_pixels`` pixels."""
    width, height = image_size(data, name)
    if width * height > max_pixels:
        raise BadRecord(f"{_label(data, name)}: {width} x {height} = {width * height / 1e6:.3g} Mpx is above the "
                        f"limit of {max_pixels / 1e6:.3g} Mpx (max_image_pixels={max_pixels})", "image too large")


def is_dicom(data: bytes) -> bool:
    return len(data) > 132 and data[128:132] == b"DICM"


def _label(data: bytes | str | os.PathLike, name: str) -> str:
    if name:
        return name
    return f"image of {len(data)} bytes" if isinstance(data, bytes) else str(data)


def dicom_to_uint8(data: bytes | str | os.PathLike, name: str = "") -> np.ndarray:
    """DICOM pixels -> uint8 (H, W) or (H, W, 3); BadRecord naming the file (or ``name``) if it cannot be.

    Greyscale: rescale slope/intercept, VOI window (the first WindowCenter/WindowWidth when the header
    has several, else the pixel range), MONOCHROME1 inverted. Colour: YBR (incl. JPEG 2000's ICT/RCT)
    converted to RGB, palette colour through its lookup table. Multi-frame files give their middle frame.
    """
    try:
        return _dicom_pixels(data)
    except Exception as exc:  # pydicom and its decoder plugins raise many types for what they cannot read
        raise BadRecord(f"{_label(data, name)}: unreadable DICOM: {type(exc).__name__}: {exc}",
                        "corrupt image") from None


def _dicom_pixels(data: bytes | str | os.PathLike) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut, convert_color_space, get_decoder

    ds = pydicom.dcmread(io.BytesIO(data) if isinstance(data, bytes) else data)
    frames = int(ds.get("NumberOfFrames") or 1)
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    pixels, decoded = decoder.as_array(ds, index=frames // 2, as_rgb=True)
    photometric = str(decoded.get("photometric_interpretation") or ds.get("PhotometricInterpretation", ""))
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(pixels, ds)
        return _to_uint8(rgb.astype(np.float64), 0.0, float(np.iinfo(rgb.dtype).max))
    if photometric.startswith("YBR"):
        pixels = convert_color_space(pixels, photometric, "RGB")
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        if pixels.dtype == np.uint8:
            return pixels
        return _to_uint8(pixels.astype(np.float64), float(pixels.min()), float(pixels.max()))
    if pixels.ndim != 2:
        raise ValueError(f"expected one greyscale or RGB frame, got pixel array shape {pixels.shape} "
                         f"({photometric})")
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 1:
        low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    else:
        low, high = float(values.min()), float(values.max())
    out = _to_uint8(values, low, high)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out


def _first(element) -> float | None:
    """A header element's (first) number: WindowCenter / WindowWidth may hold one value per VOI window."""
    value = getattr(element, "value", element)
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = value[0] if len(value) else None
    return None if value in (None, "") else float(value)


def _to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    scale = 255.0 / max(high - low, 1e-6)
    return np.clip((values - low) * scale, 0, 255).round().astype(np.uint8)


def encode_png(array_or_image) -> bytes:
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def storable_image(data: bytes, name: str = "", max_pixels: int = MAX_IMAGE_PIXELS) -> bytes:
    """Bytes to keep in a shard: JPEG/PNG as they are (checked by decoding), DICOM and others as PNG; an image
    above ``max_pixels`` is refused from its header, before it is decoded."""
    check_image_pixels(data, max_pixels, name)
    if is_dicom(data):
        return encode_png(dicom_to_uint8(data, name))
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:
        raise BadRecord(f"{_label(data, name)}: corrupt image: {exc}", "corrupt image") from None
    if image.format in ("JPEG", "PNG"):
        return bytes(data)
    return encode_png(_eight_bit(image))


#: the smallest crop ``medmnist``'s random resized crop takes: 8% of the area at aspect 3/4 or 4/3
MEDMNIST_MIN_CROP_SIDE = math.sqrt(0.08 * 3 / 4)


def training_image_sides(patch_size: int, train_transform: str) -> tuple[int, int]:
    """(longest, shortest) side bounds for ``pre_resized``: images so stored hold at least the pixels the
    training transform (``data.train_transform``) of a ``patch_size`` run ever resamples from. ``resize``
    resizes to size x size (the shortest side must stay >= size); the random resize of ``ofa_augment`` goes
    up to a short side of 480 and a long side of 672 (more only where 672 would break the short side's lower
    bound, which 480 covers); ``medmnist``'s random crop can be as small as ``MEDMNIST_MIN_CROP_SIDE`` of
    the short side, enlarged to size."""
    if train_transform == "ofa_augment":
        return max(MAX_LONG_SIDE, patch_size), max(MAX_RESIZE, patch_size)
    if train_transform == "medmnist":
        side = math.ceil(patch_size / MEDMNIST_MIN_CROP_SIDE)
        return side, side
    if train_transform == "resize":
        return patch_size, patch_size
    raise ValueError(f"unknown train_transform {train_transform!r}")


def pre_resized(data: bytes, max_side: int, min_side: int = 0, name: str = "") -> tuple[bytes, float, float]:
    """Stored image bytes (JPEG or PNG, as ``storable_image`` gives) shrunk, aspect kept, so the longest side
    is <= ``max_side`` unless that would take the shortest below ``min_side``; returns (bytes, x scale,
    y scale) for coordinates. JPEG is re-encoded at quality 95 with the source's chroma subsampling, PNG as
    PNG; an image already small enough comes back as it is (scales 1.0). Smaller stored images decode
    faster; training resamples them as it did the originals (``training_image_sides`` gives the bounds)."""
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    out = pre_resized_size(image.size, max_side, min_side)
    if out == (width, height):
        return data, 1.0, 1.0
    try:
        fmt, sampling = image.format, _jpeg_sampling(image)
        resized = image.resize(out, Image.LANCZOS)
    except Exception as exc:
        raise BadRecord(f"{_label(data, name)}: corrupt image: {exc}", "corrupt image") from None
    buf = io.BytesIO()
    if fmt == "JPEG":
        resized.save(buf, format="JPEG", quality=95, subsampling=sampling)
    else:
        resized.save(buf, format="PNG", optimize=False)
    return buf.getvalue(), out[0] / width, out[1] / height


def pre_resized_size(size: tuple[int, int], max_side: int, min_side: int = 0) -> tuple[int, int]:
    """The (width, height) ``pre_resized`` stores an image of ``size`` at (never larger than it was)."""
    width, height = size
    scale = min(1.0, max(max_side / max(width, height), min_side / min(width, height)))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _jpeg_sampling(image: Image.Image) -> int:
    """PIL's subsampling code of a JPEG (0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0); 4:2:0 for anything else."""
    from PIL import JpegImagePlugin

    sampling = JpegImagePlugin.get_sampling(image) if image.format == "JPEG" else -1
    return 2 if sampling < 0 else sampling


def _eight_bit(image: Image.Image) -> Image.Image:
    """RGB (or L) view of any PIL image; 16/32-bit greyscale is stretched over its range, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(_to_uint8(values, float(values.min()), float(values.max())))
    return image if image.mode in ("L", "RGB") else image.convert("RGB")


def open_image(data: bytes, name: str = "") -> Image.Image | JpegSource:
    """Encoded bytes -> an image whose pixels are not decoded yet (DICOM: decoded); see ``decoded_pixels``.

    A JPEG comes back as a ``JpegSource`` (size and layout from its frame header), anything else as PIL's."""
    if is_dicom(data):
        return Image.fromarray(dicom_to_uint8(data, name)).convert("RGB")
    frame = _jpeg_frame(data)
    if frame is not None and frame[2] in (1, 3):
        return JpegSource(data, frame[:2], "L" if frame[2] == 1 else "RGB", _label(data, name))
    return _pil_open(data, _label(data, name))


def _pil_open(data: bytes, label: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.source_name = label  # for the error if its pixels turn out corrupt
        image.source_bytes = data
        return image
    except Exception as exc:
        raise BadRecord(f"{label}: corrupt image: {exc}", "corrupt image") from None


class JpegSource:
    """A JPEG not decoded yet: its size and colour layout from the frame header (a few bytes read, where
    PIL's header parse cost half a millisecond per sample). ``pil()`` opens it when PIL must decode it."""

    format = "JPEG"

    def __init__(self, data: bytes, size: tuple[int, int], mode: str, name: str) -> None:
        self.source_bytes, self.size, self.mode, self.source_name = data, size, mode, name

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    def pil(self) -> Image.Image:
        return _pil_open(self.source_bytes, self.source_name)


#: start-of-frame markers (baseline, extended, progressive, lossless; Huffman and arithmetic coded)
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG's start-of-frame segment; None if not a JPEG or unclear."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # segments without a length
            i += 2
            continue
        if marker in _SOF_MARKERS:
            if i + 10 > n:
                return None
            height, width = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            return (width, height, data[i + 9]) if width and height else None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def load_rgb(image: Image.Image | JpegSource, covering: tuple[int, int] | None = None, name: str = ""
             ) -> Image.Image:
    """Decode an ``open_image`` result to RGB; a JPEG at the smallest DCT scale (1/2, 1/4, 1/8) whose size still
    covers ``covering`` (width, height) in both directions. Returns the image and keeps ``image.size`` semantics:
    callers scale coordinates by ``loaded.width / image.width``."""
    if isinstance(image, JpegSource):
        image = image.pil()
    if image.format == "JPEG" and covering is not None and image.mode in ("RGB", "L", "YCbCr", "CMYK"):
        image.draft("RGB" if image.mode != "L" else "L", (max(int(covering[0]), 1), max(int(covering[1]), 1)))
    try:
        image.load()
    except Exception as exc:
        raise BadRecord(f"{name or getattr(image, 'source_name', 'image')}: corrupt image: {exc}",
                        "corrupt image") from None
    return _eight_bit(image).convert("RGB")


def to_uint8(image: Image.Image) -> torch.Tensor:
    """RGB PIL -> uint8 [3, H, W] (0..255, channels-last memory: a view of the H x W x 3 pixels), what batches carry."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def _draft_scale(size: tuple[int, int], covering: tuple[int, int]) -> int:
    """The DCT scale denominator PIL's ``draft`` picks: the largest of 8, 4, 2, 1 still covering ``covering``."""
    ratio = min(size[0] // max(covering[0], 1), size[1] // max(covering[1], 1))
    return next((s for s in (8, 4, 2) if ratio >= s), 1)


def decoded_pixels(image: Image.Image | JpegSource, covering: tuple[int, int]) -> torch.Tensor:
    """An ``open_image`` result -> uint8 [3, h, w] (channels-last memory), a JPEG at the coarsest covering scale.

    Full-scale JPEGs are decoded by torchvision (libjpeg-turbo straight into a tensor: the same pixels as PIL,
    no PIL -> numpy copy); reduced scales by PIL's ``draft``; anything else through PIL."""
    data = getattr(image, "source_bytes", None)
    if (image.format == "JPEG" and data is not None and image.mode in ("RGB", "L")
            and _draft_scale(image.size, covering) == 1):
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            if tuple(pixels.shape[1:]) == (image.height, image.width):
                return pixels
        except RuntimeError:
            pass  # PIL decodes it or names the damage
    loaded = load_rgb(image, covering)
    return torch.from_numpy(np.array(loaded, dtype=np.uint8)).permute(2, 0, 1)


def _resized(image: Image.Image | JpegSource, out: tuple[int, int], box: tuple[float, float, float, float] | None = None
             ) -> torch.Tensor:
    """``image`` (opened, maybe not decoded) -> uint8 [3, h, w] bicubic (antialiased) resampling of ``box``
    (in ``image.size`` pixels, default all of it) to ``out`` = (w, h). The JPEG is decoded at the coarsest DCT
    scale that keeps at least ``out`` pixels over the box; the box is cut at whole pixels of the decoded image
    (at most half a pixel from the exact box) and resampled on the channels-last uint8 tensor (torchvision's
    SIMD kernels: ~4x PIL's bicubic resize here)."""
    box = box or (0.0, 0.0, float(image.width), float(image.height))
    bw, bh = box[2] - box[0], box[3] - box[1]
    covering = (math.ceil(out[0] * image.width / bw), math.ceil(out[1] * image.height / bh))
    width, height = image.size
    pixels = decoded_pixels(image, covering)
    fx, fy = pixels.shape[2] / width, pixels.shape[1] / height
    left, top = max(round(box[0] * fx), 0), max(round(box[1] * fy), 0)
    right, bottom = min(round(box[2] * fx), pixels.shape[2]), min(round(box[3] * fy), pixels.shape[1])
    # H x W x 3 contiguous crop: the kernel's channels-last uint8 path (a strided view takes a 2-3x slower one)
    pixels = pixels[:, top:bottom, left:right].permute(1, 2, 0).contiguous().permute(2, 0, 1)
    if tuple(pixels.shape[1:]) != (out[1], out[0]):
        from torchvision.transforms.v2 import functional as TF

        pixels = TF.resize(pixels, [out[1], out[0]], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return pixels.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # H x W x 3 memory (a no-op for the kernel's output)


def transform_image(image: Image.Image | JpegSource, size: int, train_transform: str | None,
                    rng: random.Random, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """An ``open_image`` result -> uint8 [3, size, size]: ``train_transform`` (None: evaluation, which
    resizes as ``resize`` does). ``mean`` / ``std`` are the model's normalisation (``medmnist``'s fills)."""
    if train_transform is None or train_transform == "resize":
        return eval_transform(image, size)
    if train_transform == "ofa_augment":
        return ofa_augment_transform(image, size, rng)
    if train_transform == "medmnist":
        return medmnist_transform(image, size, rng, mean, std)
    raise ValueError(f"unknown train_transform {train_transform!r}")


def eval_transform(image: Image.Image | JpegSource, size: int) -> torch.Tensor:
    """PIL's bicubic resize of the whole decoded image to size x size: the original's evaluation and
    VQA / captioning training transform (``Resize((size, size), BICUBIC)``), pixel for pixel."""
    return to_uint8(load_rgb(image).resize((size, size), Image.BICUBIC))


def ofa_augment_transform(image: Image.Image | JpegSource, size: int, rng: random.Random) -> torch.Tensor:
    """Random resize, centre crop and RandAugment (2 ops, magnitude 7) of the spec."""
    width, height = _random_size(image.size, size, rng)
    left, top = (width - size) // 2, (height - size) // 2
    sx, sy = image.width / width, image.height / height
    crop = _resized(image, (size, size), (left * sx, top * sy, (left + size) * sx, (top + size) * sy))
    plan = rand_augment_plan(rng)
    if not plan:
        return crop
    return to_uint8(apply_plan(Image.fromarray(crop.permute(1, 2, 0).numpy()), plan))  # HWC: no copy


def medmnist_transform(image: Image.Image | JpegSource, size: int, rng: random.Random, mean: Sequence[float],
                       std: Sequence[float]) -> torch.Tensor:
    """The original MedMNIST training image: random resized crop, flip, timm-style RandAugment (torchvision
    ops), OFA's RandAugment (2 ops, magnitude 7), random erasing in normalised noise (``data.medmnist_ops``)."""
    from biomedgpt.data.medmnist_ops import medmnist_ops

    crop_flip_augment, erase = medmnist_ops(size, tuple(mean), tuple(std))
    with torch.random.fork_rng(devices=[]):  # the sample's own draws; the process's torch RNG is left as it was
        torch.default_generator.manual_seed(rng.getrandbits(63))  # the CPU one (torch.manual_seed: +3 ms)
        augmented = crop_flip_augment(load_rgb(image))  # on the PIL image, as timm: PIL's bicubic resampling
        return erase(to_uint8(apply_plan(augmented, rand_augment_plan(rng))))


def _random_size(source: tuple[int, int], size: int, rng: random.Random) -> tuple[int, int]:
    """The random resize's output size: short side in [size, 480], long side <= 672 (unless that breaks size)."""
    short = rng.randint(size, max(size, MAX_RESIZE))
    scale = short / min(source)
    if max(source) * scale > MAX_LONG_SIDE:
        scale = max(MAX_LONG_SIDE / max(source), size / min(source))
    return max(size, round(source[0] * scale)), max(size, round(source[1] * scale))


def boxed_transform(image: Image.Image, boxes: list[list[float]], size: int, rng: random.Random | None
                    ) -> tuple[torch.Tensor, list[list[float]]]:
    """Resize (+ a random scale and an object-centred crop when ``rng``) keeping boxes in patch pixels.

    Boxes that leave the crop are clipped; boxes clipped to nothing are dropped (their index too: the
    caller gets back only the boxes that remain, in order, as ``[x0, y0, x1, y1, original_index]``).
    """
    if rng is None:
        sx, sy = size / image.width, size / image.height
        out = [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy, i] for i, b in enumerate(boxes)]
        return eval_transform(image, size), out
    width, height = _random_size(image.size, size, rng)
    sx, sy = width / image.width, height / image.height
    scaled = [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in boxes]
    cx = (scaled[0][0] + scaled[0][2]) / 2 if scaled else width / 2
    cy = (scaled[0][1] + scaled[0][3]) / 2 if scaled else height / 2
    left = int(min(max(cx - size / 2, 0), width - size))
    top = int(min(max(cy - size / 2, 0), height - size))
    crop = _resized(image, (size, size), (left / sx, top / sy, (left + size) / sx, (top + size) / sy))
    out = []
    for i, (x0, y0, x1, y1) in enumerate(scaled):
        x0, x1 = min(max(x0 - left, 0), size), min(max(x1 - left, 0), size)
        y0, y1 = min(max(y0 - top, 0), size), min(max(y1 - top, 0), size)
        if x1 > x0 and y1 > y0:
            out.append([x0, y0, x1, y1, i])
    return crop, out


def rand_augment(image: Image.Image, rng: random.Random, num_ops: int = 2, magnitude: int = 7) -> Image.Image:
    """Two random ops from the spec's list, each applied with probability 0.5 at the given magnitude."""
    return apply_plan(image, rand_augment_plan(rng, num_ops), magnitude)


def rand_augment_plan(rng: random.Random, num_ops: int = 2) -> list[tuple[str, float]]:
    """The (op, sign) pairs RandAugment applies, drawn as ``rand_augment`` draws them; identity left out."""
    plan = []
    for op in rng.sample(RANDAUG_OPS, num_ops):
        if rng.random() < 0.5:
            continue
        sign = -1.0 if rng.random() < 0.5 else 1.0
        if op != "identity":
            plan.append((op, sign))
    return plan


def apply_plan(image: Image.Image, plan: list[tuple[str, float]], magnitude: int = 7) -> Image.Image:
    for op, sign in plan:
        image = _apply_op(image, op, magnitude / 10.0, sign)
    return image


def _apply_lut(image: Image.Image, lut: np.ndarray) -> Image.Image:
    """Each band through its row of ``lut`` ([bands, 256]) with PIL's ``point``, given Python ints (it rounds
    every entry in Python: cheap for ints, 2 ms for numpy scalars). A numpy gather per band of the interleaved
    pixels takes 4x as long as ``point``."""
    return image.point(np.clip(lut, 0, 255).astype(np.uint8).ravel().tolist())


def _sharpened(image: Image.Image, factor: float) -> Image.Image:
    """``ImageEnhance.Sharpness`` (blend of PIL's SMOOTH 3x3 filter with the image; edge pixels kept), the
    same pixels in a third of its time: the 13-weight kernel as two 3-tap integer box sums plus 4x the centre,
    rounded as PIL's float filter rounds (``(sum + 6.5) / 13`` is never within 0.03 of an integer, so float32
    gives the exact floor), then PIL's float32 blend, truncated."""
    pixels = np.asarray(image)
    x = pixels.astype(np.int16)
    rows = x[:-2] + x[1:-1] + x[2:]
    total = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]
    centre = x[1:-1, 1:-1]
    total += 4 * centre
    smooth = np.floor((total + np.float32(6.5)) * np.float32(1 / 13))
    out = pixels.copy()
    out[1:-1, 1:-1] = np.clip(smooth + np.float32(factor) * (centre - smooth), 0, 255)
    return Image.fromarray(out, image.mode)


def _autocontrast_lut(histogram: list[int]) -> np.ndarray:
    """``ImageOps.autocontrast``'s table (each band's [lo, hi] stretched to [0, 255]), built with numpy:
    PIL builds it in a Python loop, 4 ms per image."""
    hist = np.asarray(histogram, dtype=np.int64).reshape(-1, 256)
    ramp = np.arange(256, dtype=np.float64)
    lut = np.tile(np.arange(256, dtype=np.int64), (hist.shape[0], 1))
    for band, h in enumerate(hist):
        used = np.flatnonzero(h)
        lo, hi = (int(used[0]), int(used[-1])) if used.size else (0, 0)
        if hi > lo:
            scale = 255.0 / (hi - lo)
            lut[band] = np.clip(np.trunc(ramp * scale + -lo * scale), 0, 255)
    return lut


def _equalize_lut(histogram: list[int]) -> np.ndarray:
    """``ImageOps.equalize``'s table (each band's cumulative histogram), built with numpy, as PIL's loop does."""
    hist = np.asarray(histogram, dtype=np.int64).reshape(-1, 256)
    lut = np.tile(np.arange(256, dtype=np.int64), (hist.shape[0], 1))
    for band, h in enumerate(hist):
        used = h[h > 0]
        step = (int(used.sum()) - int(used[-1])) // 255 if used.size > 1 else 0
        if step:
            lut[band] = (step // 2 + np.concatenate([[0], np.cumsum(h)[:-1]])) // step
    return lut


def _apply_op(image: Image.Image, op: str, level: float, sign: float) -> Image.Image:
    fill = (128, 128, 128)
    if op == "identity":
        return image
    if op == "autocontrast":
        return _apply_lut(image, _autocontrast_lut(image.histogram()))
    if op == "equalize":
        return _apply_lut(image, _equalize_lut(image.histogram()))
    if op == "brightness":
        return ImageEnhance.Brightness(image).enhance(1.0 + sign * level * 0.9)
    if op == "sharpness":
        return _sharpened(image, 1.0 + sign * level * 0.9)
    if op == "shear_x":
        return image.transform(image.size, Image.AFFINE, (1, sign * level * 0.3, 0, 0, 1, 0), fillcolor=fill)
    if op == "shear_y":
        return image.transform(image.size, Image.AFFINE, (1, 0, 0, sign * level * 0.3, 1, 0), fillcolor=fill)
    if op == "translate_x":
        shift = sign * level * 0.25 * image.width
        return image.transform(image.size, Image.AFFINE, (1, 0, shift, 0, 1, 0), fillcolor=fill)
    if op == "translate_y":
        shift = sign * level * 0.25 * image.height
        return image.transform(image.size, Image.AFFINE, (1, 0, 0, 0, 1, shift), fillcolor=fill)
    if op == "rotate":
        return image.rotate(sign * level * 30, fillcolor=fill)
    raise ValueError(f"unknown RandAugment op {op!r}")
