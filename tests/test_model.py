"""The BiomedGPT/OFA model: reference parity (the compact cases of tests/fixtures, see parity_cases.py), sizes,
incremental decoding, masking, checkpoint import."""
from __future__ import annotations

import pytest
import torch

from biomedgpt.models.checkpoint import (CheckpointError, import_released, load_pretrained, read_model_weights,
                               save_pretrained)
from biomedgpt.models.config import PUBLISHED_PARAMS, model_config
from biomedgpt.models.ofa import BiomedGPT, MultiheadAttention, count_parameters
from parity_cases import CASES as CASE_FILES, NAMINGS, assert_holds, compare, hf_buffers

CASES = sorted(CASE_FILES)  # fairseq_mini (fairseq names), hf_small (HF-port names)
MINI = "fairseq_mini"  # the small case: the checkpoint-error tests edit its fairseq state


def small_config(**overrides):
    base = dict(d_model=32, ffn_dim=64, encoder_layers=2, decoder_layers=2, heads=4, resnet_layers=[1, 1, 1],
                vocab_size=600, dropout=0.0)
    base.update(overrides)
    return model_config("tiny", **base)


@pytest.fixture(scope="module")
def mini_state(parity):
    """The mini case's weights as a released fairseq checkpoint holds them (read-only: copy to edit)."""
    return parity.state(MINI, "fairseq")


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("naming", NAMINGS)
@pytest.mark.parametrize("case", CASES)
def test_compact_parity_through_import_tool(parity, case, naming, backend):
    """Each case, written in its own naming and in the other, imported by the tool, matches the reference
    logits at 1e-5 (chunked and flex: test_attention.py)."""
    out = parity.imported(case, naming)
    assert (out / "model.safetensors").exists() and (out / "tokenizer").is_dir()
    model = load_pretrained(out, attention_backend=backend).eval()
    assert {m.backend for m in model.modules() if isinstance(m, MultiheadAttention)} == {backend}
    measured = compare(parity.forward(case, model, key=(naming, backend)), parity.case(case))
    assert_holds(measured, what=f"{case} ({naming} names, {backend})")


@pytest.mark.parametrize("case", CASES)
def test_both_namings_import_to_the_same_model(parity, case):
    """The import tool maps the HF-port names onto the fairseq ones: both files give byte-identical model
    directories, so every backend's parity in one naming is its parity in the other."""
    hf, fairseq = set(parity.state(case, "hf")), set(parity.state(case, "fairseq"))
    assert any("self_attn_mid_layer_norm" in k for k in hf) and not any(".attn_ln." in k for k in hf)
    assert any(".attn_ln." in k for k in fairseq) and not any("mid_layer_norm" in k for k in fairseq)
    assert {k for k in hf if k.endswith(("rp_bucket", "image_position_idx"))} == set(hf_buffers())
    a, b = parity.imported(case, "fairseq"), parity.imported(case, "hf")
    for name in ("config.json", "model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{case}: {name} differs between namings"


def test_hf_file_buffers_are_the_models_own(parity):
    """The int64 buffers written into the HF-named files (README formulas) are the tables the model computes."""
    buffers = dict(parity.model(MINI).named_buffers())
    for key, value in hf_buffers().items():
        ours = buffers[key]
        if key == "decoder.image_position_idx":  # fairseq's length 1026, the HF port's 1025 (architecture.md)
            assert ours.shape == (1026,) and value.shape == (1025,) and ours[-1] == 1024
            ours = ours[:1025]
        assert torch.equal(ours, value), key


@pytest.mark.parametrize("case", CASES)
def test_hf_weights_import_from_their_directory(parity, case):
    """A directory holding pytorch_model.bin imports as the file does (the tool read the file itself)."""
    path = parity.checkpoint(case, "hf")
    assert path.name == "pytorch_model.bin"
    expected = parity.model(case, "hf").state_dict()
    state = import_released(path.parent).state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


@pytest.mark.parametrize("naming", NAMINGS)
def test_imported_embeddings_are_tied(parity, naming):
    model = import_released(parity.checkpoint(MINI, naming))
    weight = model.embed_tokens.weight
    assert model.encoder.embed_tokens.weight is weight and model.decoder.embed_tokens.weight is weight
    assert count_parameters(model) == sum(p.numel() for p in set(model.parameters()))


@pytest.mark.parametrize("size", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_match_the_spec(size):
    with torch.device("meta"):
        model = BiomedGPT(model_config(size))
    count = count_parameters(model)
    assert abs(count / PUBLISHED_PARAMS[size] - 1) < 1e-3, (size, count)


def random_batch(cfg, b=3, s=9, t=7, image=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, cfg.vocab_size, (b, s), generator=g)
    src[:, 0], src[:, -1] = 0, 2
    src[1, 5:] = 1  # padding
    src[1, 4] = 2
    prev = torch.randint(4, cfg.vocab_size, (b, t), generator=g)
    prev[:, 0] = 0
    images = torch.randn(b, 3, image, image, generator=g)
    patch_masks = torch.tensor([True, True, False][:b])  # the last sample is text-only
    return src, prev, images, patch_masks


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("codes", ["none", "mixed", "all"])
def test_incremental_decoding_matches_full(backend, codes):
    torch.manual_seed(0)
    cfg = small_config(attention_backend=backend)
    model = BiomedGPT(cfg).init_weights().eval()
    with torch.no_grad():  # non-zero relative tables so their indexing is exercised
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    src, prev, images, masks = random_batch(cfg)
    code_masks = {"none": None, "mixed": torch.tensor([True, False, True]), "all": torch.ones(3, dtype=torch.bool)}[codes]
    with torch.no_grad():
        enc = model.encode(src, images, masks)
        full = model.decode(prev, enc, code_masks)
        cache = model.new_cache()
        steps = [model.decode(prev[:, :2], enc, code_masks, cache)]  # a forced two-token prefix at once
        for t in range(3, prev.shape[1] + 1):
            steps.append(model.decode(prev[:, :t], enc, code_masks, cache))
    incremental = torch.cat(steps, dim=1)
    assert (incremental - full).abs().max().item() <= 1e-5


def test_cache_reorder_follows_beams():
    torch.manual_seed(0)
    model = BiomedGPT(small_config()).init_weights().eval()
    src, prev, images, masks = random_batch(model.cfg)
    index = torch.tensor([2, 0, 0])
    with torch.no_grad():
        enc = model.encode(src, images, masks)
        cache = model.new_cache()
        model.decode(prev[:, :3], enc, cache=cache)
        cache.reorder(index)
        step = model.decode(prev[index, :4], enc.reorder(index), cache=cache)
        full = model.decode(prev[index, :4], enc.reorder(index))
    assert (step[:, -1] - full[:, -1]).abs().max().item() <= 1e-5


def test_text_only_samples_ignore_the_image():
    torch.manual_seed(0)
    model = BiomedGPT(small_config()).init_weights().eval()
    src, prev, images, _ = random_batch(model.cfg)
    masks = torch.tensor([False, False, False])
    with torch.no_grad():
        a = model(src, prev, images, masks)
        b = model(src, prev, torch.randn_like(images), masks)
    assert torch.allclose(a, b, atol=1e-6)


def test_dropout_and_drop_path_only_in_training():
    torch.manual_seed(0)
    model = BiomedGPT(small_config(dropout=0.3, encoder_drop_path_rate=0.2, decoder_drop_path_rate=0.2,
                                   resnet_drop_path_rate=0.2, attention_dropout=0.1)).init_weights()
    src, prev, images, masks = random_batch(model.cfg)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(src, prev, images, masks), model(src, prev, images, masks))
        model.train()
        assert not torch.allclose(model(src, prev, images, masks), model(src, prev, images, masks))


def test_random_patch_sampling_keeps_k_patches():
    model = BiomedGPT(small_config()).init_weights().eval()
    src, _, images, masks = random_batch(model.cfg, image=96)  # 6x6 = 36 patches
    with torch.no_grad():
        enc = model.encode(src, images, masks, sample_patch_num=10)
    assert enc.states.shape[1] == 10 + src.shape[1]
    assert enc.padding_mask[2, :10].all() and not enc.padding_mask[0, :10].any()


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = BiomedGPT(small_config()).init_weights().train()
    src, prev, images, masks = random_batch(model.cfg)
    model(src, prev, images, masks, code_masks=torch.tensor([True, False, False])).logsumexp(-1).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, no_grad


def test_save_and_load_round_trip_with_shards(tmp_path):
    torch.manual_seed(0)
    model = BiomedGPT(small_config()).init_weights().eval()
    out = save_pretrained(model, tmp_path / "m", max_shard_bytes=200_000)
    assert (out / "model.safetensors.index.json").exists()
    loaded = load_pretrained(out).eval()
    src, prev, images, masks = random_batch(model.cfg)
    with torch.no_grad():
        assert torch.equal(model(src, prev, images, masks), loaded(src, prev, images, masks))
    assert loaded.encoder.embed_tokens.weight is loaded.decoder.embed_tokens.weight
    assert len(read_model_weights(out)) == len(model.state_dict()) - 2  # tied copies stored once
    with pytest.raises(CheckpointError, match="already exists"):
        save_pretrained(model, out)


def test_truncated_checkpoint_names_the_file(parity, tmp_path):
    data = parity.checkpoint(MINI, "fairseq").read_bytes()
    bad = tmp_path / "biomedgpt_truncated.pt"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="biomedgpt_truncated.pt.*truncated or corrupt"):
        import_released(bad)


def test_wrong_shape_tensor_is_named(mini_state, tmp_path):
    state = dict(mini_state)
    state["decoder.layers.1.fc1.weight"] = torch.zeros(255, 64)
    path = tmp_path / "bad_shape.pt"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"decoder\.layers\.1\.fc1\.weight: checkpoint \(255, 64\)"):
        import_released(path)


def test_missing_and_unexpected_keys_are_named(mini_state, tmp_path):
    state = dict(mini_state)
    del state["encoder.layers.0.attn_ln.weight"]
    state["encoder.mystery.weight"] = torch.zeros(3)
    path = tmp_path / "odd.pt"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"missing keys \['encoder\.layers\.0\.attn_ln\.weight'\].*"
                                              r"unexpected keys \['encoder\.mystery\.weight'\]"):
        import_released(path)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    # A plain text transformer checkpoint (no OFA image stem / position tables) is not silently loaded.
    state = {"encoder.embed_tokens.weight": torch.zeros(100, 16), "encoder.layers.0.self_attn.q_proj.weight":
             torch.zeros(16, 16), "decoder.layers.0.fc1.weight": torch.zeros(64, 16)}
    path = tmp_path / "bart_like.pt"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match="c_attn.*missing"):
        import_released(path)


def test_ema_weights_when_asked(mini_state, tmp_path):
    model_state = mini_state
    ema_state = {k: v * 0 if k.endswith("layer_norm.bias") else v for k, v in model_state.items()}
    path = tmp_path / "with_ema.pt"
    torch.save({"model": model_state, "extra_state": {"ema": ema_state}}, path)
    ema = import_released(path, ema=True)
    assert ema.encoder.layer_norm.bias.abs().sum() == 0
    with pytest.raises(CheckpointError, match="extra_state.ema is missing"):
        torch.save({"model": model_state}, tmp_path / "no_ema.pt")
        import_released(tmp_path / "no_ema.pt", ema=True)
