"""Text-only samples pay nothing for images: no ResNet forward on placeholders, no image tokens in their
attention (the train step's forward, ``engine/distributed/modality_passes.py``), the same logits as the path
that runs every placeholder (``Encoder.image_rows_only = False``), uint8 images normalised on the model's
device as the float path did, and on two ranks with different mixes of text and images the same training as
the one-pass path (the split is rank-safe)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from biomedgpt.engine.distributed.modality_passes import split_by_modality
from biomedgpt.models.ofa import BiomedGPT
from small_models import build as build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def build(*args) -> BiomedGPT:
    """A small model with the train step's forward on one rank (``split_by_modality``)."""
    return split_by_modality(build_model(*args), same_calls=False)


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
    lengths.clear()
    with torch.no_grad():
        model(**batch([True, True]))
    assert lengths == [(2, n_img + 12)]  # no text-only sample, one rank: one pass
    lengths.clear()
    split_by_modality(model, same_calls=True)  # several ranks: the same calls for every mix
    with torch.no_grad():
        model(**batch([True, True]))
    assert sorted(lengths) == [(1, 12), (2, n_img + 12)]  # one stand-in text row


@pytest.mark.parametrize("masks", [[False, False, False], [True, False, False], [True, True, True]])
def test_mfu_counts_only_the_flops_run(masks):
    """The trainer's FLOP count (engine/flops.py, MFU's numerator) never exceeds the matmul/conv FLOPs a
    forward+backward really runs (torch's FlopCounterMode): a text-only sample's zero image is never run,
    so it counts no ResNet or image tokens (MFU above 1 on text tasks came from counting them)."""
    from torch.utils.flop_counter import FlopCounterMode

    from biomedgpt.engine.flops import batch_train_flops, image_tokens, train_step_flops

    model = build()
    inputs = batch(masks)
    with FlopCounterMode(display=False) as counter:
        model(**inputs).float().sum().backward()
    run = counter.get_total_flops()  # includes the stand-in image row of a batch without images
    counted = batch_train_flops(model.cfg, inputs, sample_patch_num=None)
    b, s = inputs["src_tokens"].shape
    t = inputs["prev_output_tokens"].shape[1]
    text_only = train_step_flops(model.cfg, b - sum(masks), s, t)
    with_images = counted - text_only
    assert with_images == train_step_flops(model.cfg, sum(masks), s, t, image_tokens(48, 48), (48, 48))
    # Convention: backward = 2 x forward, where the stem convolution's input gradient is never computed (<= 4%
    # more than runs at this 48 px size); a text-only sample would add a whole ResNet and its image tokens.
    assert counted <= run * 1.05, (counted, run)
    if all(masks):  # the formula counts what runs, within its convention (no norms, softmax, embeddings)
        assert counted >= run * 0.95, (counted, run)


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


def test_a_batch_without_images_leaves_batchnorm_statistics_alone():
    model = build().train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    model(**batch([False, False, False]))
    after = model.state_dict()
    assert all(torch.equal(value, after[key]) for key, value in before.items())
    model(**batch([True, False, False]))
    assert not torch.equal(before["encoder.embed_images.bn1.running_mean"], after["encoder.embed_images.bn1.running_mean"])


# ----------------------------------------------------------------------------------------------
# Several ranks: the split is rank-safe (ZeRO-2/3, 2 gloo ranks; ``worker`` runs in the shared job, rank_jobs.py)
# ----------------------------------------------------------------------------------------------

#: each rank's text (False) / image (True) samples per step: mixed, all-image and all-text on either rank
RANK_MIXES = [([True, False], [True, True]), ([False, False], [False, True]), ([True, True], [False, False])]
STAGES = (2, 3)


def two_rank_engine(model, stage: int):
    """DeepSpeed with small buckets (several reductions and gathers per step, each of which must hold the
    same tensors on both ranks) and SGD (Adam would amplify the rounding noise of zero-sum gradients)."""
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
              "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": stage, "reduce_bucket_size": 20000, "allgather_bucket_size": 20000,
                                    "stage3_prefetch_bucket_size": 20000, "stage3_param_persistence_threshold": 0}}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    return deepspeed.initialize(model=model, optimizer=optimizer, config=config)[0]


def worker(out: Path) -> None:
    """One rank of the shared 2-rank job (rank_jobs.py): per ZeRO stage, the same 3 steps with the split on and
    off; losses and final weights to ``out``."""
    from biomedgpt.engine.distributed.process_group import all_reduce, init_distributed
    from biomedgpt.models.config import ModelSpec
    from biomedgpt.models.ofa import BiomedGPT
    from test_checkpoint_tools import MODEL, _full_state

    info = init_distributed("gloo")
    cfg = ModelSpec(**MODEL).build()
    result = {}
    for stage in STAGES:
        for split in (True, False):
            torch.manual_seed(0)
            model = BiomedGPT(cfg).init_weights()
            model.encoder.image_rows_only = split
            split_by_modality(model, same_calls=split)
            engine = two_rank_engine(model, stage)
            for module in engine.module.modules():  # the one-pass path's BatchNorm also sees placeholders
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.eval()
            losses = []
            for step, mixes in enumerate(RANK_MIXES):
                inputs = batch(mixes[info.rank])
                inputs["prev_output_tokens"] = inputs["prev_output_tokens"].roll(step, 1)
                target = inputs["prev_output_tokens"].roll(-1, 1)
                logits = engine(**inputs)
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), target.flatten())
                engine.backward(loss)
                engine.step()
                losses.append(all_reduce(loss.detach().clone(), "sum").item())
            result[(stage, split)] = {"losses": losses, "state": _full_state(engine.module, stage)}
    if info.rank == 0:
        torch.save(result, out / "split.pt")


@pytest.mark.distributed
def test_split_on_two_ranks_with_different_mixes_trains_as_the_one_pass_path(rank_jobs):
    result = torch.load(rank_jobs("text_only") / "split.pt")
    for stage in STAGES:
        split, one_pass = result[(stage, True)], result[(stage, False)]
        torch.testing.assert_close(split["losses"], one_pass["losses"], rtol=0, atol=1e-5, msg=f"ZeRO-{stage}")
        assert split["losses"][0] != split["losses"][-1]  # it trained
        for name, value in one_pass["state"].items():
            torch.testing.assert_close(split["state"][name], value, rtol=0, atol=1e-5, msg=f"ZeRO-{stage} {name}")

