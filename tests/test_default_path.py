"""The default training path (attention ``auto``, channels-last stem, optionally compiled) against the eager
reference path: forward parity and training gradients, on a small config (compilation kept short); the
channels-last stem's gradients against an fp64 run."""
from __future__ import annotations

import pytest
import torch

from biomedgpt.engine.distributed.parallelize import apply_compile, compile_enabled
from biomedgpt.models.config import ModelConfig
from biomedgpt.models.ofa import BiomedGPT
from biomedgpt.tools.bench import step as bench_step

EAGER = bench_step.PATHS["eager"]
SMALL = dict(d_model=64, ffn_dim=128, encoder_layers=2, decoder_layers=2, heads=4, resnet_layers=[1, 1, 1],
             vocab_size=300, dropout=0.0, image_bucket_size=8, max_source_positions=64, max_target_positions=64,
             token_bucket_size=16, code_grid=4)


def run(**overrides) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(0)
    model = BiomedGPT(ModelConfig(**{**SMALL, **overrides})).init_weights().train()
    with torch.no_grad():  # OFA initialises the relative tables to zero: make them matter
        for name, param in model.named_parameters():
            if "rel_pos_table" in name:
                param.normal_(0.0, 0.5)
    if compile_enabled(model.cfg, torch.device("cpu")):
        apply_compile(model)
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, 300, (3, 9), generator=g)
    src[1, 6:] = 1
    prev = torch.randint(4, 300, (3, 7), generator=g)
    prev[2, 5:] = 1
    out = model(src, prev, torch.randn(3, 3, 64, 64, generator=g), torch.tensor([True, False, True]))
    out.square().mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_parity(out, grads, ref_out, ref_grads) -> None:
    torch.testing.assert_close(out, ref_out, rtol=0.0, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        # relative 1e-4; gradients that are zero in exact arithmetic (key biases: softmax is shift-invariant)
        # are float noise of ~1e-10, hence the absolute floor
        err = (grads[name] - ref).norm().item()
        assert err <= 1e-4 * ref.norm().item() + 1e-7, (name, err, ref.norm().item())


@pytest.fixture(scope="module")
def reference():
    return run(**EAGER)


def test_default_path_settings():
    cfg = ModelConfig(**SMALL)
    assert cfg.attention_backend == "auto" and not cfg.channels_last and cfg.compile == "auto"
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not compile_enabled(cfg, cpu) and compile_enabled(cfg, cuda, partitions_params=False)
    assert not compile_enabled(cfg, cuda, partitions_params=True)
    assert compile_enabled(ModelConfig(**SMALL, compile=True), cpu, partitions_params=True)
    assert not compile_enabled(ModelConfig(**SMALL, compile=False), cuda)
    assert bench_step.path_overrides("default") == {}
    assert bench_step.path_overrides("compile=true,attention_backend=sdpa") == {"compile": True,
                                                                                "attention_backend": "sdpa"}


def test_default_path_matches_eager(reference):
    assert_parity(*run(), *reference)


def test_compiled_path_matches_eager(reference):
    """compile=True: the transformer layers compiled (inductor), the stem eager channels-first."""
    torch._dynamo.reset()
    assert_parity(*run(compile=True), *reference)


def test_decoder_self_attention_layer_norm_runs_once_per_layer():
    torch.manual_seed(0)
    model = BiomedGPT(ModelConfig(**SMALL)).init_weights().eval()
    calls = []
    for layer in model.decoder.layers:
        layer.self_attn_layer_norm.register_forward_hook(lambda *_: calls.append(1))
    src, prev = torch.randint(4, 300, (2, 5)), torch.randint(4, 300, (2, 4))
    with torch.no_grad():
        model(src, prev)
    assert len(calls) == len(model.decoder.layers)
