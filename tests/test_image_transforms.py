"""Per-recipe training transforms and image normalisation (``data.train_transform``, ``data.image_mean`` /
``data.image_std``): ``resize`` is the original's PIL bicubic resize pixel for pixel, ``medmnist`` is the
original's timm pipeline's parameters on torchvision v2 ops, the normalisation a run sets reaches the model's
input and its saved model directory, and the defaults keep the released checkpoints' ``x / 127.5 - 1``."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from biomedgpt.data import images as im
from biomedgpt.data.medmnist_ops import NormalisedNoiseErasing, medmnist_ops
from biomedgpt.data.config import IMAGENET_MEAN, IMAGENET_STD, DataConfig, StreamConfig
from biomedgpt.data.records import make_record
from biomedgpt.data.tasks import TaskContext, process
from biomedgpt.core.config import ConfigError, from_dict
from biomedgpt.engine.run_config import RunConfig
from biomedgpt.models.ofa import normalise_images
from biomedgpt.models.tokenizer import Tokenizer
from small_models import SMALL


def _encoded(size: tuple[int, int], fmt: str, mode: str = "RGB", seed: int = 0) -> bytes:
    """A smooth photo-like image with noise (every resampling difference shows), encoded as ``fmt``."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    rgb = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 3) % 256], -1)
    rgb = np.clip(rgb + rng.integers(-40, 40, rgb.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _context(train: bool, **cfg) -> TaskContext:
    return TaskContext(tokenizer=None, cfg=DataConfig(**cfg), rng=random.Random(0), train=train,
                       other_row=lambda rng: None)


@pytest.mark.parametrize("source,fmt,mode", [((700, 530), "JPEG", "RGB"),  # >= 2x the patch: no reduced decode
                                             ((301, 203), "PNG", "RGB"), ((90, 120), "JPEG", "L"),
                                             ((256, 256), "PNG", "RGB")])
def test_resize_is_pils_bicubic_resize_of_the_original_image(source, fmt, mode):
    """``resize`` training and evaluation give what the original's ``convert("RGB")`` + ``Resize((s, s),
    BICUBIC)`` gives before ``ToTensor``, pixel for pixel (computed here with PIL itself)."""
    data, size = _encoded(source, fmt, mode), 224
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BICUBIC))
    expected = torch.from_numpy(expected.copy()).permute(2, 0, 1)
    record = {"id": "r", "image": data}
    for train in (True, False):
        got = _context(train, patch_image_size=size, train_transform="resize").image(record)
        assert got.dtype == torch.uint8 and torch.equal(got, expected), (train, (got.int() - expected).abs().max())
    # the default (ofa_augment) evaluates with the same resize
    assert torch.equal(_context(False, patch_image_size=size).image(record), expected)


def test_boxed_tasks_train_with_the_resize_when_the_recipe_resizes():
    data = _encoded((100, 50), "PNG")
    record = make_record("g", "grounding", {"caption": "x", "box": [10, 5, 50, 25]}, data)
    expected = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(
        (64, 64), Image.BICUBIC)).copy()).permute(2, 0, 1)
    ctx = _context(True, patch_image_size=64, train_transform="resize")
    assert ctx.box_rng is None
    assert _context(True, patch_image_size=64).box_rng is not None  # ofa_augment crops around the object
    ctx.tokenizer = Tokenizer.from_gpt2_files()
    example = process("grounding", record, ctx)[0]
    assert torch.equal(example.image, expected)


def test_medmnist_is_the_original_timm_pipeline_on_torchvision_v2():
    """The composition and every parameter the original's ``create_transform(input_size=224, is_training=True,
    auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic', re_prob=0.25, re_mode='pixel', re_count=1)``
    gives, plus OFA's RandomAugment(2, 7) between its RandAugment and its erasing."""
    from torchvision.transforms import v2

    crop_flip_augment, erase = medmnist_ops(224, tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))
    crop, flip, *augments = crop_flip_augment.transforms
    assert type(crop) is v2.RandomResizedCrop and crop.size == (224, 224)
    assert crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert crop.interpolation == v2.InterpolationMode.BICUBIC and crop.antialias
    assert type(flip) is v2.RandomHorizontalFlip and flip.p == 0.5
    assert len(augments) == 2  # timm: 2 ops drawn with replacement, each applied with probability 0.5
    for apply in augments:
        assert type(apply) is v2.RandomApply and apply.p == 0.5
        (ra,) = apply.transforms
        assert type(ra) is v2.RandAugment and (ra.num_ops, ra.magnitude, ra.num_magnitude_bins) == (1, 9, 11)
        assert ra.interpolation == v2.InterpolationMode.BICUBIC
        assert ra.fill == [124, 116, 104]  # timm's img_mean fill: round(255 * ImageNet mean)
        # magnitude 9 of 10 of torchvision's maxima, which are timm's: shear 0.3, rotate 30, enhance 0.9
        def level(op: str) -> float:
            return float(ra._AUGMENTATION_SPACE[op][0](ra.num_magnitude_bins, 224, 224)[ra.magnitude])

        assert level("ShearX") == pytest.approx(0.9 * 0.3) and level("Rotate") == pytest.approx(0.9 * 30.0)
        assert level("Brightness") == pytest.approx(0.9 * 0.9) and level("Color") == pytest.approx(0.9 * 0.9)
        assert level("TranslateX") / 224 == pytest.approx(0.9 * 0.45, abs=0.003)
    assert isinstance(erase, v2.RandomErasing) and erase.p == 0.25 and erase.value is None  # per-pixel noise
    assert erase.scale == pytest.approx((0.02, 1 / 3)) and erase.ratio == pytest.approx((0.3, 1 / 0.3))
    assert erase.mean == tuple(IMAGENET_MEAN) and erase.std == tuple(IMAGENET_STD)


def test_medmnist_erasing_is_standard_normal_noise_after_normalisation():
    """timm's mode "pixel": the erased box holds per-pixel N(0, 1) values in the normalised space (here the
    uint8 values nearest them), covering 2% to 1/3 of the image; nothing outside the box changes."""
    erase = NormalisedNoiseErasing(p=1.0, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3),
                                    mean=IMAGENET_MEAN, std=IMAGENET_STD)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    image = torch.full((3, 128, 128), 7, dtype=torch.uint8)
    values = []
    torch.manual_seed(0)
    for _ in range(16):
        out = erase(image)
        changed = (out != image).any(0)
        rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
        box = (slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1))
        area = (box[0].stop - box[0].start) * (box[1].stop - box[1].start) / 128 ** 2
        assert 0.015 < area < 1 / 3 + 0.01, area
        outside = torch.ones_like(changed)
        outside[box] = False
        assert torch.equal(out[:, outside], image[:, outside])
        values.append(((out[:, box[0], box[1]].float() / 255 - mean) / std).flatten(1))
    noise = torch.cat(values, 1)
    assert noise.mean().abs() < 0.03 and 0.9 < noise.std() < 1.0  # tails beyond ~2.1 sd are clipped to 0 / 255


def test_medmnist_training_images_are_seeded_per_sample():
    """Same sample RNG, same image; different samples differ; the process's torch RNG is left alone; the
    loader's ``train_transform`` picks it, evaluation resizes."""
    data = _encoded((28, 28), "PNG")
    record = {"id": "m", "image": data}
    cfg = dict(patch_image_size=64, train_transform="medmnist", image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    state = torch.get_rng_state()
    first = _context(True, **cfg).image(record)
    assert torch.equal(torch.get_rng_state(), state)
    again = _context(True, **cfg).image(record)
    assert first.dtype == torch.uint8 and first.shape == (3, 64, 64) and torch.equal(first, again)
    direct = im.medmnist_transform(im.open_image(data), 64, random.Random(0), IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(first, direct)
    outputs = [im.medmnist_transform(im.open_image(data), 64, random.Random(s), IMAGENET_MEAN, IMAGENET_STD)
               for s in range(8)]
    assert len({o.numpy().tobytes() for o in outputs}) == 8
    resized = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).resize((64, 64), Image.BICUBIC)).copy())
    assert torch.equal(_context(False, **cfg).image(record), resized.permute(2, 0, 1))


def test_settings_are_checked():
    with pytest.raises(ValueError, match="medmnist crops and flips without moving boxes.*detection"):
        DataConfig(train_transform="medmnist", streams=[StreamConfig(name="d", task="detection", remote="/x")])
    with pytest.raises(ValueError, match="image_std must be positive"):
        DataConfig(image_std=[0.5, 0.0, 0.5])
    with pytest.raises(ValueError, match="one value per RGB channel"):
        DataConfig(image_mean=[0.5])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['data.augment'\].*train_transform"):
        from_dict(RunConfig, {"data": {"augment": False}})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['model.image_mean'\]"):  # one setting: data's
        from_dict(RunConfig, {"model": {"image_mean": [0.5, 0.5, 0.5]}})


def test_defaults_are_the_released_checkpoints_normalisation_bit_for_bit():
    """mean = std = 0.5: ``(x / 255 - 0.5) / 0.5`` is exactly the old ``x / 127.5 - 1`` for every uint8 value."""
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(2, 3, 16, 16)
    assert torch.equal(normalise_images(x, torch.float32), x.float().div(127.5).sub(1.0))
    cfg = RunConfig().model_config()
    assert cfg.image_mean == [0.5] * 3 and cfg.image_std == [0.5] * 3


def test_run_normalisation_reaches_the_model_input_and_its_saved_directory(tmp_path):
    """data.image_mean / image_std -> the run's model config -> the ResNet's input is (x / 255 - mean) / std;
    the model directory keeps them, so evaluation / inference load the same normalisation."""
    from biomedgpt.models.checkpoint import read_model_config, save_pretrained
    from biomedgpt.models.ofa import BiomedGPT

    run = from_dict(RunConfig, {"model": {"size": "tiny", **SMALL},
                                "data": {"image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD}})
    cfg = run.model_config()
    assert cfg.image_mean == IMAGENET_MEAN and cfg.image_std == IMAGENET_STD
    torch.manual_seed(0)
    model = BiomedGPT(cfg).init_weights().eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    expected = (images.float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD).view(1, 3, 1, 1)
    seen = []
    model.encoder.embed_images.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    src = torch.tensor([[0, 5, 6, 2], [0, 7, 2, 1]])
    with torch.no_grad():
        model.encode(src, images, torch.ones(2, dtype=torch.bool))
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=1e-6)

    save_pretrained(model, tmp_path / "model")  # evaluate / infer / export-hf build from this config
    assert read_model_config(tmp_path / "model") == cfg


def test_a_consolidated_checkpoint_keeps_the_runs_normalisation():
    """A ZeRO checkpoint's model config comes from the saved run config: its data normalisation too."""
    from biomedgpt.core.config import to_dict
    from biomedgpt.engine.checkpoint.zero_reader import _spec_from

    run = to_dict(from_dict(RunConfig, {"data": {"image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD}}))
    cfg = _spec_from(run, "test")
    assert cfg.image_mean == IMAGENET_MEAN and cfg.image_std == IMAGENET_STD
    assert _spec_from({"model": run["model"]}, "test").image_mean == [0.5] * 3  # runs saved before the setting
