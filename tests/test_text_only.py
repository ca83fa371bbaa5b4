"""Text-only samples pay nothing for images: no ResNet forward on placeholders, no image tokens in their
attention, the same logits as the path that runs every placeholder (``Encoder.image_rows_only = False``),
and uint8 images normalised on the model's device as the float path did."""
from __future__ import annotations

import pytest
import torch

from biomedgpt.models.ofa import BiomedGPT
from small_models import build

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(masks: list[bool], codes: bool = False) -> dict:
    g = torch.Generator().manual_seed(1)
    b = len(masks)
    src = torch.randint(4, 300, (b, 12), generator=g)
    src[1, 8:] = 1
    prev = torch.randint(4, 300, (b, 9), generator=g)
    prev[-1, 6:] = 1
    images = torch.randint(0, 256, (b, 3, 48, 48), generator=g, dtype=torch.uint8)
    patch_masks = torch.tensor(masks)
    images[~patch_masks] = 0  # what the collator gives text-only samples
    code_masks = torch.zeros(b, dtype=torch.bool)
    if codes:
        code_masks[0] = True
    return dict(src_tokens=src, prev_output_tokens=prev, patch_images=images, patch_masks=patch_masks,
                code_masks=code_masks)


def reference(model: BiomedGPT, inputs: dict) -> torch.Tensor:
    """Today's path: the ResNet on every placeholder and the encoder over all image tokens, masked."""
    model.encoder.image_rows_only = False
    try:
        return model(**inputs)
    finally:
        model.encoder.image_rows_only = True


@pytest.mark.parametrize("scheme", ["ofa", "rope"])
@pytest.mark.parametrize("masks,codes", [([True, False, True, False], False), ([False, True, False], True),
                                         ([False, False], False), ([True, True], False)])
def test_logits_equal_todays_path(scheme, masks, codes):
    model = build("eager", scheme).eval()
    inputs = batch(masks, codes)
    with torch.no_grad():
        expected, got = reference(model, inputs), model(**inputs)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0.0, atol=1e-5)


def test_resnet_runs_only_on_image_samples_and_text_samples_see_no_image_tokens():
    model = build().eval()
    seen, lengths = [], []
    model.encoder.embed_images.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    model.encoder.layers[0].register_forward_hook(lambda m, args, out: lengths.append(tuple(args[0].shape[:2])))
    with torch.no_grad():
        model(**batch([True, False, False, True]))
    assert seen == [2]  # two images, not four
    n_img = (48 // 16) ** 2
    assert sorted(lengths) == [(2, 12), (2, n_img + 12)]  # text-only samples: their tokens only
    seen.clear()
    with torch.no_grad():
        model(**batch([False, False]))
    assert seen == [1]  # a batch without images: one placeholder (every rank runs the same modules)


def test_gradients_equal_todays_path_and_reach_the_same_parameters():
    inputs = batch([True, False, True, False])

    def grads(rows_only: bool, data: dict) -> dict:
        model = build().train()
        for module in model.modules():  # BatchNorm statistics: today's include the zero placeholders (below)
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()
        model.encoder.image_rows_only = rows_only
        model(**data).float().pow(2).mean().backward()
        return {n: p.grad for n, p in model.named_parameters()}

    expected, got = grads(False, inputs), grads(True, inputs)
    assert [n for n, g in got.items() if g is None] == [n for n, g in expected.items() if g is None]
    for name, grad in got.items():
        if grad is not None:
            torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    text_only = grads(True, batch([False, False]))  # no image at all: the stem still gets a (zero) gradient
    assert all(text_only[n] is not None for n in text_only if n.startswith("encoder.embed_images"))


def test_batchnorm_statistics_come_from_real_images_only():
    model = build().train()
    model(**batch([True, False, False, True]))
    alone = build().train()
    alone(**{k: (v[[0, 3]] if torch.is_tensor(v) else v) for k, v in batch([True, False, False, True]).items()})
    bn, bn_alone = model.encoder.embed_images.bn1, alone.encoder.embed_images.bn1
    torch.testing.assert_close(bn.running_mean, bn_alone.running_mean)
    torch.testing.assert_close(bn.running_var, bn_alone.running_var)


def test_uint8_images_are_normalised_on_the_device_like_the_float_path():
    model = build().eval()
    inputs = batch([True, True, False])
    as_float = dict(inputs, patch_images=torch.stack([to_tensor_float(im) for im in inputs["patch_images"]]))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), model(**as_float), rtol=0.0, atol=0.0)


def to_tensor_float(image: torch.Tensor) -> torch.Tensor:
    """The old loader output: float, normalised mean = std = 0.5 on the CPU."""
    return image.float().div(127.5).sub(1.0)
