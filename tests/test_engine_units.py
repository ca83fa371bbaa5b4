"""Engine pieces in one process: loss, schedule, DeepSpeed JSON, FLOPs, checkpoints, EMA, configs."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from biomedgpt.engine.checkpoint.layout import LATEST_FILE, META_FILE, model_states_file
from biomedgpt.engine.checkpoint.manager import CheckpointManager, ResumeError, atomic_write_text
from biomedgpt.core.config import ConfigError, load
from biomedgpt.engine.distributed.ds_config import DeepSpeedConfigError, build_ds_config
from biomedgpt.engine.train.ema import EMA
from biomedgpt.engine.eval.evaluator import eval_metrics
from biomedgpt.engine.flops import forward_flops, resnet_flops, train_step_flops
from biomedgpt.engine.train.loss import label_smoothed_cross_entropy
from biomedgpt.engine.distributed.parallelize import apply_activation_checkpointing
from biomedgpt.engine.run_config import RunConfig
from biomedgpt.tools.train import parse
from biomedgpt.engine.train.schedule import lr_lambda
from biomedgpt.models.config import model_config
from biomedgpt.models.ofa import BiomedGPT

TINY = dict(d_model=64, ffn_dim=128, encoder_layers=1, decoder_layers=1, resnet_layers=[1, 1, 1], vocab_size=500)


# -- loss -------------------------------------------------------------------------------------------


def _reference_token_loss(lprobs_row: torch.Tensor, target: int, eps: float, allowed: torch.Tensor | None):
    """OFA's formula written out for one position."""
    if allowed is None:
        allowed = torch.ones_like(lprobs_row, dtype=torch.bool)
    eps_i = eps / (int(allowed.sum()) - 1)
    nll = -lprobs_row[target]
    smooth = -lprobs_row[allowed].sum()
    return (1 - eps - eps_i) * nll + eps_i * smooth


def test_label_smoothing_matches_the_formula_and_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7)
    target = torch.tensor([[4, 5, 2], [6, 2, 1]])  # 1 = pad
    out = label_smoothed_cross_entropy(logits, target, 0.1)
    lprobs = F.log_softmax(logits, -1)
    expected = [_reference_token_loss(lprobs[b, t], int(target[b, t]), 0.1, None)
                for b in range(2) for t in range(3) if target[b, t] != 1]
    assert out.loss.item() == pytest.approx(sum(expected).item() / 5, rel=1e-6)
    assert out.sample_tokens.tolist() == [3, 2]
    no_smoothing = label_smoothed_cross_entropy(logits, target, 0.0)
    assert no_smoothing.loss.item() == pytest.approx(F.cross_entropy(
        logits.reshape(-1, 7), target.reshape(-1), ignore_index=1).item(), rel=1e-6)


def test_constrained_smoothing_spreads_only_over_allowed_tokens():
    torch.manual_seed(1)
    logits = torch.randn(1, 2, 6)
    target = torch.tensor([[3, 2]])
    allowed = torch.zeros(1, 2, 6, dtype=torch.bool)
    allowed[0, 0, [3, 4, 5]] = True
    allowed[0, 1, [2, 4]] = True
    out = label_smoothed_cross_entropy(logits, target, 0.2, constraint_masks=allowed)
    masked = logits.masked_fill(~allowed, float("-inf"))
    lprobs = F.log_softmax(masked, -1)
    expected = sum(_reference_token_loss(lprobs[0, t], int(target[0, t]), 0.2, allowed[0, t]) for t in range(2))
    assert torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(expected.item() / 2, rel=1e-6)


def test_confidence_weights_and_group_normalisation():
    torch.manual_seed(2)
    logits = torch.randn(3, 4, 9)
    target = torch.tensor([[5, 6, 2, 1], [7, 2, 1, 1], [4, 4, 4, 2]])
    conf = torch.tensor([0.5, 1.0, 1.0])
    groups = torch.tensor([0, 0, 1])
    out = label_smoothed_cross_entropy(logits, target, 0.0, conf=conf, loss_groups=groups, group_weights=[1.0, 2.0])
    nll = F.cross_entropy(logits.reshape(-1, 9), target.reshape(-1), ignore_index=1, reduction="none").view(3, 4)
    group0 = (0.5 * nll[0].sum() + nll[1].sum()) / 5  # own token count: 3 + 2
    group1 = nll[2].sum() / 4
    assert out.loss.item() == pytest.approx((group0 + 2.0 * group1).item(), rel=1e-6)


# -- schedule, DeepSpeed JSON, config ---------------------------------------------------------------


def test_warmup_then_polynomial_decay():
    cfg = load(RunConfig, overrides=["optim.lr=1.0", "optim.max_steps=110", "optim.warmup_steps=10",
                                     "optim.schedule=polynomial", "optim.power=2.0", "optim.end_lr=0.1"])
    f = lr_lambda(cfg.optim, 110)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.9 * 0.25 + 0.1)
    assert f(110) == pytest.approx(0.1)
    linear = lr_lambda(load(RunConfig, overrides=["optim.max_steps=100", "optim.warmup_ratio=0.1",
                                                  "optim.schedule=linear"]).optim, 100)
    assert linear(55) == pytest.approx(0.5)


def test_ds_config_is_filled_from_the_run_config(tmp_path):
    cfg = load(RunConfig, overrides=["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=cpu",
                                     "deepspeed.offload_param=cpu", "deepspeed.precision=bf16",
                                     "optim.grad_accum=4", "optim.clip_norm=2.5", "data.batch_size=6"])
    ds = build_ds_config(cfg)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert (ds["gradient_accumulation_steps"], ds["gradient_clipping"], ds["train_micro_batch_size_per_gpu"]) \
        == (4, 2.5, 6)
    stage0 = build_ds_config(load(RunConfig))
    assert stage0["zero_optimization"] == {"stage": 0}

    template = tmp_path / "bad.json"
    template.write_text(json.dumps({"gradient_clipping": 1.0, "zero_optimization": {"stage": "auto"}}))
    bad = load(RunConfig, overrides=[f"deepspeed.template={template}", "optim.clip_norm=5.0"])
    with pytest.raises(DeepSpeedConfigError, match="gradient_clipping"):
        build_ds_config(bad)


def test_run_config_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="optim.lrr"):
        load(RunConfig, overrides=["optim.lrr=1"])
    with pytest.raises(ConfigError, match="zero_stage"):
        load(RunConfig, overrides=["deepspeed.zero_stage=4"])
    path = tmp_path / "run.yaml"
    path.write_text("model: {size: tiny}\nloging: {interval: 3}\n")
    with pytest.raises(ConfigError, match="loging"):
        load(RunConfig, path)
    demo = parse(["optim.max_steps=3"])  # no --config: the demo recipe, with overrides
    assert demo.model.build().d_model == 128 and demo.optim.max_steps == 3 and demo.demo_data_dir


# -- FLOPs ------------------------------------------------------------------------------------------


def test_flop_formula_matches_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model_config("tiny", **TINY, dropout=0.0, attention_backend="eager")
    model = BiomedGPT(cfg).init_weights()
    b, s, t, h = 2, 12, 7, 64
    src, prev = torch.randint(4, 500, (b, s)), torch.randint(4, 500, (b, t))
    images = torch.randn(b, 3, h, h)
    with FlopCounterMode(display=False) as counter:
        model(src, prev, images, torch.ones(b, dtype=torch.bool)).sum().backward()
    formula = train_step_flops(cfg, b, s, t, (h // 16) ** 2, (h, h))
    # The counter skips the input gradient of the first convolution (the images need none): one
    # forward's worth of the stem conv; everything else must agree to 1%.
    stem = 2.0 * 3 * 64 * 49 * (h // 2) ** 2 * b
    assert counter.get_total_flops() == pytest.approx(formula - stem, rel=0.01)
    assert resnet_flops([1, 1, 1], 64, 64) < forward_flops(cfg, 1, s, t, 16, (64, 64))



@pytest.mark.parametrize("flops_per_s, sides", [(1e9, [128, 256, 256]), (1e13, [128, 1024, 1024])])
def test_the_peak_measurement_fits_its_budget_on_a_slow_device(monkeypatch, flops_per_s, sides):
    """A CPU rank's peak behind MFU is measured in ~0.5 s at start-up: on a CPU that emulates the dtype slowly
    (here a matmul at 1 GFLOP/s, as bf16 without bf16 instructions) the matrices shrink, where the full 1024
    side took ~20 s per rank; a fast one is measured at the full side. Either way the rate is the device's."""
    import time

    from biomedgpt.engine import flops

    measured = []

    def matmul(a, b):  # a device of ``flops_per_s``: the product's time, not its value, is what is measured
        measured.append(a.shape[0])
        time.sleep(2.0 * a.shape[0] ** 3 / flops_per_s)
        return a

    monkeypatch.setattr(torch, "matmul", matmul)
    started = time.perf_counter()
    peak = flops.device_peak("bf16")
    assert time.perf_counter() - started < 1.5 and peak.source == "measured"
    assert sorted(set(measured)) == sorted(set(sides)) and measured[-1] == sides[-1], measured
    assert peak.tflops * 1e12 == pytest.approx(flops_per_s, rel=0.5)

# -- checkpoint bookkeeping ------------------------------------------------------------------------


class _FakeDeepSpeedEngine:
    """Writes what DeepSpeed's save_checkpoint writes for one rank (the shards); the manager does the rest."""

    checkpoint_engine = None  # the manager installs its writer here, as on a real engine

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False
        (tmp := __import__("pathlib").Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        torch.save(client_state, tmp / model_states_file())


def test_latest_only_moves_to_complete_checkpoints_and_old_ones_are_pruned(tmp_path):
    manager = CheckpointManager(tmp_path, rank=0, world_size=1, keep_last_n=2)
    assert manager.latest() is None
    for step in (1, 2, 3):
        manager.save(_FakeDeepSpeedEngine(), step, {"step": step}, {"loader": {}}, zero_stage=0)
    assert manager.latest() == "step_00000003"
    assert sorted(p.name for p in manager.root.iterdir() if p.is_dir()) == ["step_00000002", "step_00000003"]
    # A save that dies after DeepSpeed wrote its shards but before the meta file: the pointer stays put.
    _FakeDeepSpeedEngine().save_checkpoint(str(manager.root), "step_00000004", {}, False)
    assert manager.latest() == "step_00000003"
    assert manager.load_rank_state("step_00000003") == {"loader": {}}
    atomic_write_text(manager.root / LATEST_FILE, "step_00000004")
    with pytest.raises(ResumeError, match=META_FILE):
        manager.latest()


def test_eval_metrics_count_each_sample_once():
    records = [("a", 0, 2.0, 1.0, 2, 1), ("b", 1, 6.0, 3.0, 3, 3), ("a", 0, 2.0, 1.0, 2, 1)]
    m = eval_metrics(records, ["caption", "vqa"])
    assert m["samples"] == 2
    assert m["loss"] == pytest.approx(8.0 / 5)
    assert m["accuracy/vqa"] == pytest.approx(1.0)
    assert m["ppl/caption"] == pytest.approx(math.exp(0.5))


# -- EMA and activation checkpointing ---------------------------------------------------------------


def test_ema_tracks_and_swaps_back():
    layer = torch.nn.Linear(3, 2)
    ema = EMA(layer, decay=0.5)
    original = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(2.0)
    ema.update(layer, step=1)
    assert torch.allclose(ema.shadow["weight"], original + 1.0)
    with ema.swapped_in(layer):
        assert torch.allclose(layer.weight, original + 1.0)
    assert torch.allclose(layer.weight, original + 2.0)
    restored = EMA(layer, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert torch.allclose(restored.shadow["weight"], original + 1.0)


def test_activation_checkpointing_keeps_outputs_gradients_and_names():
    torch.manual_seed(0)
    cfg = model_config("tiny", **{**TINY, "encoder_layers": 2, "decoder_layers": 2})
    plain, recomputed = BiomedGPT(cfg).init_weights(), BiomedGPT(cfg).init_weights()
    recomputed.load_state_dict(plain.state_dict())
    assert apply_activation_checkpointing(recomputed) == 4
    assert list(recomputed.state_dict()) == list(plain.state_dict())
    src, prev = torch.randint(4, 500, (2, 9)), torch.randint(4, 500, (2, 5))
    images = torch.randn(2, 3, 32, 32)
    grads = []
    for model in (plain, recomputed):
        torch.manual_seed(5)  # dropout active: the recomputation must replay the same masks
        model(src, prev, images, torch.tensor([True, False])).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_unreachable_wandb_server_never_fails_the_run(tmp_path):
    """Online mode against a closed port: wandb falls back to offline files and the metrics still land."""
    import os
    import subprocess
    import sys

    script = ("from biomedgpt.engine.train.metrics import MetricsLogger\nfrom biomedgpt.engine.run_config import LogConfig\n"
              f"log = MetricsLogger(LogConfig(wandb_mode='online', progress_bar=False), {str(tmp_path)!r}, {{}}, 3, 0, True)\n"
              "log.log(1, {'loss': 2.5})\nlog.close()\n")
    env = {**os.environ, "WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_INIT_TIMEOUT": "5"}
    env.pop("WANDB_MODE", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          cwd=__import__("pathlib").Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 2.5}
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_progress_bar_only_on_a_terminal(tmp_path, capsys):
    """Output redirected to a file (here: captured, not a TTY) gets plain lines and no \\r-redrawn bar."""
    from biomedgpt.engine.train.metrics import MetricsLogger
    from biomedgpt.engine.run_config import LogConfig

    log = MetricsLogger(LogConfig(wandb_mode="disabled", progress_bar=True), tmp_path, {}, 3, 0, True)
    log.log(1, {"loss": 2.5})
    log.advance(1)
    log.close()
    out = capsys.readouterr()
    assert "\r" not in out.out + out.err
    assert "step 1: loss=2.5" in out.out


def test_metric_window_sums_by_name_and_per_task():
    from biomedgpt.engine.train.metrics import MetricWindow

    window = MetricWindow(3)
    for tokens in (2.0, 3.0):
        window.add(torch.tensor([0, 2]), torch.tensor([1.0, 4.0]), torch.tensor([1.0, 2.0]),
                   loss=5.0, tokens=tokens, flops=10.0)
    total = window.reduced(memory_gb=1.5, rank=0, world=1)  # one process: the reduction is the identity
    assert (total.loss, total.tokens, total.flops, total.nll, total.memory_gb) == (10.0, 5.0, 20.0, 0.0, 1.5)
    assert total.per_task.tolist() == [[2.0, 2.0], [0.0, 0.0], [8.0, 4.0]]


def test_zero_plan_decides_by_stage():
    from biomedgpt.engine.distributed.zero import ZeroPlan

    plans = {stage: ZeroPlan(stage, world=4, precision="fp32") for stage in range(4)}
    assert [p.partitions_params for p in plans.values()] == [False, False, False, True]
    assert [p.own_grad_norm for p in plans.values()] == [True, False, False, False]
    assert not ZeroPlan(0, 4, "bf16").own_grad_norm
    assert [p.optimizer_state_elements(100) for p in plans.values()] == [100, 25, 25, 100]
    assert not plans[2].needs_universal(saved_stage=0, saved_world=1)  # unpartitioned state loads anywhere
    assert plans[2].needs_universal(saved_stage=2, saved_world=2) and plans[2].needs_universal(3, 4)
    assert not plans[2].needs_universal(2, 4)
    assert plans[3].lockstep_decoding and not ZeroPlan(3, 1, "fp32").lockstep_decoding
