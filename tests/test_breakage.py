"""Tests written so that a deliberately broken implementation fails them (issue 16's breakage list):
activation checkpointing must really recompute, drop path must drop whole samples and rescale, random
patch sampling must be random and uniform, backend resolution on CUDA, EMA decay direction,
checkpoint pruning, resume bookkeeping. Each test names the breakage it guards against."""
from __future__ import annotations

import json

import pytest
import torch

from biomedgpt.engine.checkpoint.layout import META_FILE
from biomedgpt.engine.train.ema import EMA
from biomedgpt.engine.distributed.parallelize import apply_activation_checkpointing
from biomedgpt.models import attention
from biomedgpt.models.config import model_config
from biomedgpt.models.ofa import BiomedGPT, drop_path

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(d_model=32, ffn_dim=64, encoder_layers=2, decoder_layers=2, heads=2, resnet_layers=[1, 1, 1],
            vocab_size=500)


def _model(**overrides) -> BiomedGPT:
    torch.manual_seed(0)
    return BiomedGPT(model_config("tiny", **{**TINY, **overrides})).init_weights()


def _batch(images: int = 32, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    return (torch.randint(4, 500, (batch, 9), generator=g), torch.randint(4, 500, (batch, 5), generator=g),
            torch.randn(batch, 3, images, images, generator=g), torch.ones(batch, dtype=torch.bool))


# -- activation checkpointing: a plain call would pass an equal-gradients test -----------------------


def _count_layer_forwards(model: BiomedGPT) -> dict[str, int]:
    """Calls of each layer's fc1 (inside the layer's forward, so a recomputation calls it again)."""
    counts: dict[str, int] = {}
    for stack_name, stack in (("encoder", model.encoder.layers), ("decoder", model.decoder.layers)):
        for i, layer in enumerate(stack):
            key = f"{stack_name}.{i}"
            counts[key] = 0
            layer.fc1.register_forward_hook(lambda *_, k=key: counts.__setitem__(k, counts[k] + 1))
    return counts


def test_activation_checkpointing_recomputes_every_layer_in_the_backward():
    """Breakage guarded: ``_checkpointed`` turned into a plain call (no recomputation)."""
    plain, recomputed = _model(), _model()
    assert apply_activation_checkpointing(recomputed) == 4
    for model, expected in ((plain, 1), (recomputed, 2)):
        counts = _count_layer_forwards(model.train())
        model(*_batch()).square().mean().backward()
        assert set(counts.values()) == {expected}, counts  # one forward, plus one recomputation in the backward
    counts = _count_layer_forwards(recomputed.eval())
    with torch.no_grad():
        recomputed(*_batch())
    assert set(counts.values()) == {1}, counts  # inference: nothing to recompute


# -- drop path alone ---------------------------------------------------------------------------------


def test_drop_path_drops_whole_samples_and_rescales():
    """Breakages guarded: drop_path as identity; the 1/keep rescale dropped; the mask drawn per element."""
    torch.manual_seed(0)
    x = torch.ones(4000, 3, 5)
    out = drop_path(x, 0.25, training=True)
    per_sample = out.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()  # whole samples, rescaled
    dropped = (per_sample == 0).all(1).float().mean().item()
    assert abs(dropped - 0.25) < 0.03, dropped  # binomial(4000, 0.25): sd 0.007
    assert abs(out.mean().item() - 1.0) < 0.05  # expectation preserved
    assert torch.equal(drop_path(x, 0.25, training=False), x) and torch.equal(drop_path(x, 0.0, True), x)


def test_drop_path_alone_changes_training_outputs():
    """Only drop path on (no dropout of any kind): training outputs vary, evaluation outputs do not."""
    model = _model(dropout=0.0, attention_dropout=0.0, encoder_drop_path_rate=0.5, decoder_drop_path_rate=0.5,
                   resnet_drop_path_rate=0.5)
    batch = _batch(batch=4)
    with torch.no_grad():
        model.train()
        assert not torch.allclose(model(*batch), model(*batch))
        model.eval()
        assert torch.equal(model(*batch), model(*batch))
    off = _model(dropout=0.0, attention_dropout=0.0).train()
    with torch.no_grad():
        assert torch.equal(off(*batch), off(*batch))  # so the variation above is drop path's


# -- random patch sampling -----------------------------------------------------------------------------


def test_patch_sampling_is_random_uniform_and_keeps_tokens_with_their_positions():
    """Breakages guarded: ``arange`` instead of a random permutation; tokens and position ids gathered
    with different orders; a sample's patches repeated."""
    model = _model().eval()
    src, _, images, masks = _batch(images=96, batch=64)  # 6x6 = 36 patches
    n, k = 36, 10
    with torch.no_grad():
        full_x, _, full_ids = model.encoder.embed_image(images, masks, None)
        draws = []
        for seed in range(5):
            torch.manual_seed(seed)
            x, padding, ids = model.encoder.embed_image(images, masks, k)
            assert x.shape[:2] == (64, k) and ids.shape == (64, k) and not padding.any()
            position = {int(v): i for i, v in enumerate(full_ids[0])}
            index = torch.tensor([[position[int(v)] for v in row] for row in ids])
            torch.testing.assert_close(x, full_x.gather(1, index[:, :, None].expand(-1, -1, x.shape[2])))
            assert all(len(set(row.tolist())) == k for row in ids)  # without replacement
            draws.append(ids)
    assert not torch.equal(draws[0], draws[1])  # other seeds, other patches
    assert not all(torch.equal(row, draws[0][0]) for row in draws[0])  # and other patches per sample
    torch.manual_seed(0)
    with torch.no_grad():
        assert torch.equal(model.encoder.embed_image(images, masks, k)[2], draws[0])  # same seed, same patches
    counts = torch.bincount(torch.cat(draws).flatten(), minlength=int(full_ids.max()) + 1)[full_ids[0]]
    expected = 5 * 64 * k / n  # each patch is kept with probability k / n: 88.9 of 320 samples, sd 8
    assert counts.min() > expected - 40 and counts.max() < expected + 40, counts.tolist()


# -- backend resolution on a (pretended) CUDA machine ----------------------------------------------------


@pytest.mark.parametrize("flash", [True, False])
def test_backend_resolution_on_cuda(monkeypatch, flash):
    """The GPU branch: flex for OFA biases; flash for RoPE where flash-attn exists, else sdpa."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention, "flash_attn_available", lambda: flash)
    assert attention.resolve_backend("auto", "ofa") == "flex"
    assert attention.resolve_backend("auto", "ofa", attention_dropout=0.1) == "flex"
    assert attention.resolve_backend("auto", "rope") == ("flash" if flash else "sdpa")
    assert attention.resolve_backend("sdpa", "ofa") == "sdpa"
    if "flash" in attention.BACKENDS:
        assert attention.resolve_backend("flash", "rope") == ("flash" if flash else "sdpa")


def test_backend_resolution_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert attention.resolve_backend("auto", "ofa") == "chunked"
    assert attention.resolve_backend("auto", "ofa", attention_dropout=0.1) == "sdpa"
    assert attention.resolve_backend("auto", "rope") == "sdpa"


# -- engine: EMA direction, pruning, resume bookkeeping ----------------------------------------------


def test_ema_moves_by_one_minus_decay_and_honours_start_step():
    """Breakage guarded: the lerp weight as ``decay`` instead of ``1 - decay`` (invisible at decay 0.5)."""
    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
    ema = EMA(layer, decay=0.9, start_step=2)
    with torch.no_grad():
        layer.weight.fill_(10.0)
    ema.update(layer, step=1)  # before start_step: copies the weights
    torch.testing.assert_close(ema.shadow["weight"], torch.full((1, 2), 10.0))
    with torch.no_grad():
        layer.weight.fill_(20.0)
    ema.update(layer, step=2)
    torch.testing.assert_close(ema.shadow["weight"], torch.full((1, 2), 11.0))  # 0.9 * 10 + 0.1 * 20


def test_pruning_keeps_exactly_the_last_n_complete_checkpoints(tmp_path):
    """Breakage guarded: an off-by-one in ``keep_last_n``."""
    from biomedgpt.engine.checkpoint.manager import CheckpointManager, tag_for

    manager = CheckpointManager(tmp_path, rank=0, world_size=1, keep_last_n=3)
    for step in range(1, 7):
        (manager.root / tag_for(step)).mkdir()
        (manager.root / tag_for(step) / META_FILE).write_text(json.dumps({"step": step}))
    manager._prune(keep=tag_for(6))
    assert sorted(p.name for p in manager.root.iterdir()) == [tag_for(s) for s in (4, 5, 6)]


def test_resume_check_reports_only_real_model_differences():
    from biomedgpt.engine.checkpoint.resume_checks import model_differences

    saved = {"size": "tiny", "overrides": {"d_model": 64, "heads": 2}}  # a run saved before the typed fields
    assert model_differences(saved, {"size": "tiny", "d_model": 64, "heads": 2, "dropout": 0.3,
                                     "attention_backend": "sdpa"}) == []  # runtime choices may change
    assert model_differences(saved, {"size": "base", "d_model": 64, "heads": 4}) == [
        "model.ffn_dim: checkpoint 1024, this run 3072", "model.encoder_layers: checkpoint 4, this run 6",
        "model.decoder_layers: checkpoint 4, this run 6", "model.heads: checkpoint 2, this run 4",
        "model.resnet_layers: checkpoint [3, 4, 6], this run [3, 4, 23]"]


# -- data: the shuffle seed ----------------------------------------------------------------------------


def test_shuffle_seed_decides_the_sample_order(tmp_path, vocab_dir, monkeypatch):
    """Breakage guarded: ``data.shuffle_seed`` ignored (every seed giving the same order)."""
    from test_data_loader import write_text_streams

    from biomedgpt.data.config import DataConfig, StreamConfig
    from biomedgpt.data.loader import build_train_loader
    from biomedgpt.models.tokenizer import Tokenizer

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(key, "1" if "SIZE" in key else "0")
    paths = write_text_streams(tmp_path, {"summ": 40})
    tokenizer = Tokenizer.from_gpt2_files(vocab_dir)

    def order(seed: int, run: str) -> list[str]:
        cfg = DataConfig(streams=[StreamConfig(name="summ", task="summarization", remote=paths["summ"])],
                         batch_size=40, num_workers=0, cache_dir=str(tmp_path / f"cache-{run}"), patch_image_size=16,
                         shuffle_seed=seed)
        batch = next(iter(build_train_loader(cfg, tokenizer)))
        return list(batch["ids"])

    first = order(1, "a")
    assert sorted(first) == sorted(set(first)) and len(first) == 40
    assert order(1, "b") == first  # the same seed: the same order
    assert order(2, "c") != first  # another seed: another order
