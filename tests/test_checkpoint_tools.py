"""ZeRO checkpoint tools on real 2-rank DeepSpeed (gloo, CPU) checkpoints of a tiny-shaped BiomedGPT.

One 2-rank job trains ZeRO 1, 2 and 3 engines in turn, saves each through the engine's
``CheckpointManager`` (with an EMA), and records the live model's logits; the ZeRO-3 run then trains on
to give the uninterrupted loss trajectory. ZeRO-3 is saved by the background writer (the default of a
training run), and the same state once more synchronously (``zero3-sync``) to compare with. Run as a
script, this file is that rank worker.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from biomedgpt.engine.checkpoint.layout import META_FILE, optim_states_file

REPO = Path(__file__).resolve().parents[1]
MODEL = {"size": "tiny", "d_model": 64, "ffn_dim": 128, "encoder_layers": 1, "decoder_layers": 1,
         "heads": 2, "resnet_layers": [1, 1, 1], "vocab_size": 1000, "dropout": 0.0}
SAVE_STEP, LAST_STEP = 2, 5  # checkpoint after 2 steps; the ZeRO-3 run goes on to step 5
GLOBAL_BATCH = 4
# 2 ranks vs 1 rank is the same math summed in another order: the weights restored from the universal
# checkpoint give the first loss to float precision; after that Adam's normalised updates amplify the
# rounding differences of near-zero gradients (measured: 3e-4 relative after 3 steps).
FIRST_LOSS_RTOL = 1e-6
LOSS_RTOL = 2e-3
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


# ----------------------------------------------------------------------------------------------
# Rank worker (run as a script)
# ----------------------------------------------------------------------------------------------


def _batch(step: int, cfg, rank: int, world: int, images: bool) -> dict:
    """This rank's share of the global batch of ``step`` (the same samples whatever the world size)."""
    g = torch.Generator().manual_seed(1000 + step)
    batch = {"src_tokens": torch.randint(4, cfg.vocab_size, (GLOBAL_BATCH, 10), generator=g),
             "prev_output_tokens": torch.randint(4, cfg.vocab_size, (GLOBAL_BATCH, 6), generator=g),
             "target": torch.randint(4, cfg.vocab_size, (GLOBAL_BATCH, 6), generator=g)}
    if images:
        batch["patch_images"] = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)
        batch["patch_masks"] = torch.ones(GLOBAL_BATCH, dtype=torch.bool)
    share = GLOBAL_BATCH // world
    return {k: v[rank * share:(rank + 1) * share] for k, v in batch.items()}


def _engine(model, stage: int, world: int, extra: dict | None = None):
    import deepspeed

    if stage == 3:
        # OFA reads embedding tables in a parent's forward and the encoder returns a dataclass, whose
        # tensors ZeRO-3's backward hooks cannot see: keep every parameter gathered for the top module.
        for param in model.parameters():
            deepspeed.zero.register_external_parameter(model, param)
    config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "gradient_accumulation_steps": 1,
              "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9, **(extra or {})}
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _train_step(engine, step: int, cfg, rank: int, world: int, images: bool) -> float:
    from biomedgpt.engine.distributed.process_group import all_reduce

    batch = _batch(step, cfg, rank, world, images)
    target = batch.pop("target")
    logits = engine(**batch)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), target.flatten())
    engine.backward(loss)
    engine.step()
    return all_reduce(loss.detach().clone(), "sum").item() / world


def _full_state(module, stage: int) -> dict[str, torch.Tensor]:
    """The module's whole state dict on every rank (gathered from the ZeRO-3 partitions)."""
    import contextlib

    import deepspeed

    gather = (deepspeed.zero.GatheredParameters(list(module.parameters())) if stage == 3
              else contextlib.nullcontext())
    with gather:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


@torch.no_grad()
def _logits(module, cfg) -> torch.Tensor:
    from biomedgpt.engine.checkpoint.verify import sample_batch

    module.eval()
    out = module(**sample_batch(cfg))
    module.train()
    return out


def worker_train(root: Path, stages: list[int]) -> None:
    """Each stage: 2 steps (with images), an engine checkpoint with EMA, the live logits; ZeRO-3 goes on
    text-only (BatchNorm statistics differ per rank, text steps do not touch them) to ``LAST_STEP``."""
    from biomedgpt.engine.checkpoint.manager import CheckpointManager
    from biomedgpt.engine.distributed.process_group import init_distributed
    from biomedgpt.engine.train.ema import EMA
    from biomedgpt.models.checkpoint import TIED_ALIASES, load_into
    from biomedgpt.models.config import ModelSpec
    from biomedgpt.models.ofa import BiomedGPT

    info = init_distributed("gloo")
    cfg = ModelSpec(**MODEL).build()
    for spec in stages:
        stage, bf16 = int(spec[0]), spec.endswith("bf16")
        if bf16:
            worker_train_bf16(root, stage, info, cfg)
            continue
        torch.manual_seed(0)
        engine = _engine(BiomedGPT(cfg).init_weights(), stage, info.world_size)
        ema = EMA(engine.module, decay=0.5)
        names = [n for n, _ in engine.module.named_parameters()]
        reference_ema = {n: v.float() for n, v in _full_state(engine.module, stage).items() if n in names}
        run_dir = root / f"zero{stage}"
        losses = []
        for step in range(SAVE_STEP):
            losses.append(_train_step(engine, step, cfg, info.rank, info.world_size, images=True))
            ema.update(engine.module, step + 1)
            full = _full_state(engine.module, stage)
            for name, value in reference_ema.items():
                value.lerp_(full[name], 0.5)
        client = {"step": SAVE_STEP, "config": {"model": MODEL}}
        manager = CheckpointManager(run_dir, info.rank, info.world_size, keep_last_n=2, background=stage == 3)
        manager.save(engine, SAVE_STEP, client, {"ema": ema.state_dict()}, stage)
        if stage == 3:  # the same state written synchronously, to compare the background files with
            CheckpointManager(root / "zero3-sync", info.rank, info.world_size, keep_last_n=2).save(
                engine, SAVE_STEP, client, {"ema": ema.state_dict()}, stage)
        live = _logits(engine.module, cfg)
        # The EMA's reference: a plain model holding the full-weight average kept alongside.
        ema_model = BiomedGPT(cfg).init_weights()
        load_into(ema_model, {k: reference_ema.get(k, v) for k, v in full.items() if k not in TIED_ALIASES})
        live_ema = _logits(ema_model, cfg)
        if stage == 3:
            for step in range(SAVE_STEP, LAST_STEP):
                losses.append(_train_step(engine, step, cfg, info.rank, info.world_size, images=False))
        manager.close()  # the background write went on while the run trained: its snapshot is of step 2
        if info.rank == 0:
            torch.save({"logits": live, "ema_logits": live_ema, "losses": losses}, run_dir / "live.pt")


def worker_train_bf16(root: Path, stage: int, info, cfg) -> None:
    """bf16 (DeepSpeed's bf16 optimizer at stage 0): text-only steps, an engine checkpoint with EMA, and the
    live bf16 weights (which DeepSpeed copies from the fp32 master after every step)."""
    from biomedgpt.engine.checkpoint.manager import CheckpointManager
    from biomedgpt.engine.train.ema import EMA
    from biomedgpt.models.ofa import BiomedGPT

    torch.manual_seed(0)
    engine = _engine(BiomedGPT(cfg).init_weights(), stage, info.world_size, {"bf16": {"enabled": True}})
    ema = EMA(engine.module, decay=0.5)
    for step in range(SAVE_STEP):
        _train_step(engine, step, cfg, info.rank, info.world_size, images=False)
        ema.update(engine.module, step + 1)
    run_dir = root / f"zero{stage}-bf16"
    CheckpointManager(run_dir, info.rank, info.world_size, keep_last_n=2).save(
        engine, SAVE_STEP, {"step": SAVE_STEP, "config": {"model": MODEL}}, {"ema": ema.state_dict()}, stage)
    full = _full_state(engine.module, stage)
    if info.rank == 0:
        torch.save({"state": full}, run_dir / "live.pt")


def worker_resume(load_dir: Path, out: Path) -> None:
    """One rank resumes ZeRO-3 from a universal checkpoint and trains to ``LAST_STEP``."""
    from biomedgpt.engine.distributed.process_group import init_distributed
    from biomedgpt.models.config import ModelSpec
    from biomedgpt.models.ofa import BiomedGPT

    info = init_distributed("gloo")
    cfg = ModelSpec(**MODEL).build()
    engine = _engine(BiomedGPT(cfg).init_weights(), 3, info.world_size, {"checkpoint": {"load_universal": True}})
    path, client = engine.load_checkpoint(str(load_dir), tag="universal", load_lr_scheduler_states=False)
    assert path is not None and client["step"] == SAVE_STEP, (path, client)
    losses = [_train_step(engine, step, cfg, info.rank, info.world_size, images=False)
              for step in range(SAVE_STEP, LAST_STEP)]
    out.write_text(json.dumps(losses))


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, *args: str, script: str | Path = __file__) -> None:
    """``script *args`` as ``world`` local ranks (gloo, CPU); fails with a rank's stderr tail."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)])),
               "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env, cwd=REPO,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for proc in procs:
        _, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err.decode()[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zero")
    run_ranks(2, "train", str(root), "0,1,2,3,0bf16,3bf16")
    return root


def tag_dir(runs: Path, stage: int) -> Path:
    return runs / f"zero{stage}" / "checkpoints" / f"step_{SAVE_STEP:08d}"


@pytest.fixture
def model_cfg():
    from biomedgpt.models.config import ModelSpec

    return ModelSpec(**MODEL).build()


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_round_trip_matches_live_model(runs, stage, tmp_path, model_cfg):
    from biomedgpt.models.checkpoint import TIED_ALIASES, load_pretrained, read_model_weights
    from biomedgpt.engine.checkpoint.consolidate import consolidate
    from biomedgpt.engine.checkpoint.verify import sample_batch
    from biomedgpt.engine.checkpoint.zero_reader import open_checkpoint

    ckpt = open_checkpoint(runs / f"zero{stage}")  # the run directory: checkpoints/latest picks the tag
    assert (ckpt.stage, ckpt.world_size, ckpt.step, ckpt.tag) == (stage, 2, SAVE_STEP, f"step_{SAVE_STEP:08d}")
    result = consolidate(ckpt, tmp_path / "model", model_cfg, progress=False, max_shard_bytes=4 << 20)
    assert len(list(result.output.glob("model-*.safetensors"))) > 1  # sharded, with an index
    assert not set(TIED_ALIASES) & set(read_model_weights(result.output))
    model = load_pretrained(result.output).eval()
    assert model.decoder.embed_tokens.weight is model.encoder.embed_tokens.weight is model.embed_tokens.weight
    live = torch.load(runs / f"zero{stage}" / "live.pt")
    with torch.no_grad():
        logits = model(**sample_batch(model_cfg))
    torch.testing.assert_close(logits, live["logits"], rtol=0, atol=1e-5)


def test_ema_and_bf16(runs, tmp_path, model_cfg):
    """ZeRO-3's EMA is partitioned per rank; ZeRO-0's and ZeRO-1's are whole on every rank."""
    from biomedgpt.models.checkpoint import load_pretrained
    from safetensors import safe_open
    from biomedgpt.engine.checkpoint.consolidate import consolidate
    from biomedgpt.engine.checkpoint.verify import sample_batch
    from biomedgpt.engine.checkpoint.zero_reader import open_checkpoint

    batch = sample_batch(model_cfg)
    for stage in (0, 1, 3):
        ckpt = open_checkpoint(tag_dir(runs, stage))
        out = consolidate(ckpt, tmp_path / f"ema{stage}", model_cfg, ema=True, progress=False).output
        with torch.no_grad():
            logits = load_pretrained(out).eval()(**batch)
        live = torch.load(runs / f"zero{stage}" / "live.pt")
        torch.testing.assert_close(logits, live["ema_logits"], rtol=0, atol=1e-5)
        assert (logits - live["logits"]).abs().max() > 1e-3  # the EMA really differs from the weights
    out = consolidate(open_checkpoint(tag_dir(runs, 2)), tmp_path / "bf16", model_cfg, dtype="bf16",
                      progress=False).output
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("encoder.embed_images.bn1.num_batches_tracked").dtype == torch.int64
    with torch.no_grad():
        logits = load_pretrained(out).eval()(**batch)
    torch.testing.assert_close(logits, torch.load(runs / "zero2" / "live.pt")["logits"], rtol=0.05, atol=0.05)


@pytest.mark.parametrize("stage", [0, 3])
def test_bf16_training_checkpoints(runs, tmp_path, model_cfg, stage):
    """bf16 engines (stage 0: bf16 weights only; ZeRO-3: DeepSpeed's bf16 optimizer with fp32 masters):
    the bf16 output equals the live bf16 weights, with and without EMA, and inspect calls it usable."""
    from biomedgpt.models.checkpoint import TIED_ALIASES, read_model_weights
    from biomedgpt.tools import inspect_checkpoint
    from biomedgpt.engine.checkpoint.consolidate import consolidate
    from biomedgpt.engine.checkpoint.zero_reader import open_checkpoint

    run = runs / f"zero{stage}-bf16"
    ckpt = open_checkpoint(run)
    assert (ckpt.stage, ckpt.world_size, ckpt.step) == (stage, 2, SAVE_STEP)
    out = consolidate(ckpt, tmp_path / "bf16", model_cfg, dtype="bf16", progress=False).output
    written = read_model_weights(out)
    live = {k: v for k, v in torch.load(run / "live.pt")["state"].items() if k not in TIED_ALIASES}
    assert set(written) == set(live)
    for key, value in live.items():
        assert torch.equal(written[key], value.to(written[key].dtype)), key
    ema = read_model_weights(consolidate(ckpt, tmp_path / "ema", model_cfg, dtype="fp32", ema=True,
                                         progress=False).output)
    assert set(ema) == set(live)
    assert (ema["decoder.layers.0.fc1.weight"] - live["decoder.layers.0.fc1.weight"].float()).abs().max() > 0
    assert inspect_checkpoint.main([f"path={run}"]) == 0


def test_verify_against_deepspeed_live_model_and_checksums(runs, tmp_path, model_cfg):
    from biomedgpt.models.checkpoint import CheckpointError, load_into
    from biomedgpt.models.ofa import BiomedGPT
    from biomedgpt.engine.checkpoint.consolidate import consolidate
    from biomedgpt.engine.checkpoint.verify import reference_state, verify
    from biomedgpt.engine.checkpoint.zero_reader import open_checkpoint

    ckpt = open_checkpoint(tag_dir(runs, 3))
    # verified against DeepSpeed's zero_to_fp32 before the directory is published
    out = consolidate(ckpt, tmp_path / "bf16", model_cfg, dtype="bf16", progress=False, verify_output=True).output
    live = BiomedGPT(model_cfg)
    load_into(live, reference_state(ckpt))
    report = verify(out, live_model=live)
    assert report.max_tensor_diff == 0.0 and report.max_logit_diff == 0.0
    live.decoder.layers[0].fc1.bias.data += 1e-2
    with pytest.raises(CheckpointError, match="differs from the reference"):
        verify(out, live_model=live)
    shard = out / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: tensor .* does not match its checksum"):
        verify(out)


def _copy_tag(runs: Path, stage: int, dest: Path) -> Path:
    shutil.copytree(tag_dir(runs, stage), dest, ignore=shutil.ignore_patterns("universal"))
    return dest


def _assert_no_output(parent: Path) -> None:
    assert sorted(p.name for p in parent.iterdir()) == [], "output or temporary directory left behind"


@pytest.mark.parametrize("stage", [2, 3])
def test_broken_checkpoints_name_the_file(runs, tmp_path, model_cfg, stage):
    from biomedgpt.models.checkpoint import CheckpointError
    from biomedgpt.engine.checkpoint.consolidate import consolidate
    from biomedgpt.engine.checkpoint.zero_reader import open_checkpoint

    out_parent = tmp_path / "out"
    out_parent.mkdir()
    rank1 = optim_states_file(1)

    missing = _copy_tag(runs, stage, tmp_path / "missing" / "step")
    (missing / rank1).unlink()
    with pytest.raises(CheckpointError, match=f"{missing / rank1}: missing"):
        consolidate(open_checkpoint(missing), out_parent / "m", model_cfg, progress=False)

    truncated = _copy_tag(runs, stage, tmp_path / "truncated" / "step")
    with open(truncated / rank1, "r+b") as f:
        f.truncate(os.path.getsize(truncated / rank1) // 2)
    with pytest.raises(CheckpointError, match=f"{truncated / rank1}: truncated or corrupt"):
        open_checkpoint(truncated)

    extra = _copy_tag(runs, stage, tmp_path / "extra" / "step")
    shutil.copy(extra / rank1, extra / optim_states_file(2))
    with pytest.raises(CheckpointError, match=f"{optim_states_file(2)}: rank 2 shard in a "
                                              r"checkpoint .* written by 2 ranks"):
        open_checkpoint(extra)

    meta = _copy_tag(runs, stage, tmp_path / "meta" / "step")
    (meta / META_FILE).write_text(json.dumps({"step": SAVE_STEP, "world_size": 4, "zero_stage": stage}))
    with pytest.raises(CheckpointError, match=f"{meta / META_FILE}: says world size 4"):
        open_checkpoint(meta)

    # A shard that disappears mid-consolidation (pruned by a concurrent run): the opened files stay
    # open, so the output is still complete and the same, and nothing half-written is left.
    vanishing = _copy_tag(runs, stage, tmp_path / "vanishing" / "step")
    ckpt = open_checkpoint(vanishing)
    previous = consolidate(ckpt, out_parent / "model", model_cfg, progress=False).output
    before = {p.name: p.read_bytes() for p in previous.iterdir()}
    (vanishing / rank1).unlink()
    consolidate(ckpt, previous, model_cfg, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before
    shutil.rmtree(previous)
    _assert_no_output(out_parent)


def _assert_same_objects(a, b, where: str) -> None:
    """Equal values and equal types all the way down (what ``torch.save`` writes)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.stride(), a.requires_grad) == (b.dtype, b.shape, b.stride(), b.requires_grad), where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            _assert_same_objects(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_objects(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__"):
        _assert_same_objects(vars(a), vars(b), f"{where}.__dict__")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def test_background_zero3_files_are_what_deepspeed_writes_synchronously(runs):
    """Every file of the background-written ZeRO-3 tag holds what the synchronous save of the same state
    holds, types included (``param_shapes``' torch.Size, DeepSpeed's enums and loss scaler)."""
    from biomedgpt.engine.checkpoint.load import load_checkpoint_file

    background, sync = tag_dir(runs, 3), runs / "zero3-sync" / "checkpoints" / f"step_{SAVE_STEP:08d}"
    names = sorted(p.name for p in sync.glob("*.pt"))
    assert names == sorted(p.name for p in background.glob("*.pt")) and len(names) == 6, names
    for name in names:
        _assert_same_objects(load_checkpoint_file(background / name), load_checkpoint_file(sync / name), name)


def test_deepspeed_zero_to_fp32_reads_a_background_zero3_checkpoint(runs, tmp_path):
    """DeepSpeed's own tool consolidates the background-written 2-rank ZeRO-3 tag to exactly what
    ``biomedgpt consolidate`` writes (which verifies it against DeepSpeed's reconstruction too)."""
    from biomedgpt.models.checkpoint import TIED_ALIASES, TIED_KEY, read_model_weights
    from biomedgpt.tools import consolidate as consolidate_cli

    root = runs / "zero3" / "checkpoints"
    done = subprocess.run([sys.executable, "-m", "deepspeed.utils.zero_to_fp32", str(root), str(tmp_path / "ds"),
                           "--tag", f"step_{SAVE_STEP:08d}"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = torch.load(tmp_path / "ds" / "pytorch_model.bin", weights_only=True)
    theirs = {TIED_KEY if k in TIED_ALIASES else k: v for k, v in theirs.items()}
    assert consolidate_cli.main([f"checkpoint={runs / 'zero3'}", f"output={tmp_path / 'ours'}", "verify=true",
                                 "progress=false"]) == 0
    ours = read_model_weights(tmp_path / "ours")
    assert set(ours) == set(theirs)
    worst = max((ours[k].double() - theirs[k].double()).abs().max().item() for k in ours)
    assert worst == 0.0


def test_universal_reshard_resumes_on_one_rank(runs, tmp_path, model_cfg):
    from biomedgpt.models.checkpoint import load_pretrained
    from biomedgpt.engine.checkpoint.consolidate import consolidate
    from biomedgpt.engine.checkpoint.manager import to_universal
    from biomedgpt.engine.checkpoint.verify import sample_batch
    from biomedgpt.engine.checkpoint.zero_reader import open_checkpoint

    source = _copy_tag(runs, 3, tmp_path / "checkpoints" / f"step_{SAVE_STEP:08d}")
    universal = to_universal(open_checkpoint(source).directory)
    assert universal == source / "universal" and (universal / "zero").is_dir()
    out = tmp_path / "losses.json"
    run_ranks(1, "resume", str(source), str(out))
    resumed = json.loads(out.read_text())
    uninterrupted = torch.load(runs / "zero3" / "live.pt")["losses"][SAVE_STEP:]
    assert len(resumed) == LAST_STEP - SAVE_STEP
    # the first resumed loss is computed from the restored weights alone: equal up to summation order
    assert resumed[0] == pytest.approx(uninterrupted[0], rel=FIRST_LOSS_RTOL)
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(uninterrupted), rtol=LOSS_RTOL, atol=0)
    # the universal checkpoint consolidates too
    model = load_pretrained(consolidate(open_checkpoint(universal), tmp_path / "u", model_cfg,
                                        progress=False).output).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**sample_batch(model_cfg)), torch.load(runs / "zero3" / "live.pt")["logits"],
                                   rtol=0, atol=1e-5)


def test_cli_consolidate_inspect_and_export(runs, tmp_path, model_cfg, capsys, vocab_dir):
    from biomedgpt.models.checkpoint import import_released
    from biomedgpt.tools import consolidate as consolidate_cli
    from biomedgpt.tools import export_hf, inspect_checkpoint
    from biomedgpt.engine.checkpoint.verify import sample_batch

    assert inspect_checkpoint.main([f"path={runs / 'zero3'}", "json=true"]) == 0
    info = json.loads(capsys.readouterr().out)
    (tag,) = info["tags"]
    assert info["latest"] == tag["tag"] == f"step_{SAVE_STEP:08d}"
    assert (tag["zero_stage"], tag["world_size"], tag["step"], tag["has_ema"]) == (3, 2, SAVE_STEP, True)
    assert tag["model_config"]["d_model"] == 64 and tag["parameters"] > 2e6

    out = tmp_path / "model"
    assert consolidate_cli.main([f"checkpoint={runs / 'zero1'}", f"output={out}", "verify=true",
                                 f"tokenizer={vocab_dir}", "progress=false",
                                 "model.vocab_size=1000"]) == 1  # the tokenizer does not fit
    assert "tokenizer" in capsys.readouterr().err and not out.exists()
    assert consolidate_cli.main([f"checkpoint={runs / 'zero1'}", f"output={out}", "verify=true",
                                 "progress=false"]) == 0
    assert consolidate_cli.main([f"checkpoint={runs / 'zero1'}", f"output={out}", "progress=false"]) == 1
    assert "already exists" in capsys.readouterr().err

    hf = tmp_path / "hf"
    assert export_hf.main([f"model={out}", f"output={hf}"]) == 0
    from safetensors import safe_open

    with safe_open(str(hf / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "encoder.layers.0.self_attn_mid_layer_norm.weight" in keys
    assert "decoder.layers.0.cross_attn.q_proj.weight" in keys
    assert {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "decoder.output_projection.weight"} <= keys
    imported = import_released(hf).eval()
    live = torch.load(runs / "zero1" / "live.pt")["logits"]
    with torch.no_grad():
        torch.testing.assert_close(imported(**sample_batch(model_cfg)), live, rtol=0, atol=1e-5)


def test_biomedgpt_command_on_zero0_checkpoint(runs, tmp_path, model_cfg):
    """The README's `biomedgpt inspect-checkpoint` / `consolidate checkpoint=runs/demo` on a ZeRO-0 run (the
    demo's default stage), through the installed console command."""
    from biomedgpt.models.checkpoint import load_pretrained
    from biomedgpt.engine.checkpoint.verify import sample_batch

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))}
    cli = [sys.executable, "-m", "biomedgpt.tools.cli"]
    shown = subprocess.run([*cli, "inspect-checkpoint", f"path={runs / 'zero0'}"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "ZeRO-0 x 2 ranks" in shown.stdout and "UNUSABLE" not in shown.stdout
    out = tmp_path / "demo-model"
    done = subprocess.run([*cli, "consolidate", f"checkpoint={runs / 'zero0'}", f"output={out}", "progress=false"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with torch.no_grad():
        logits = load_pretrained(out).eval()(**sample_batch(model_cfg))
    torch.testing.assert_close(logits, torch.load(runs / "zero0" / "live.pt")["logits"], rtol=0, atol=1e-5)



# ----------------------------------------------------------------------------------------------
# The consolidation index: the torch path's output from the stored bytes, without torch
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    from biomedgpt.models.tokenizer import Tokenizer

    return Tokenizer.from_gpt2_files()


@pytest.fixture(scope="module")
def zero3_torch_path(runs, tmp_path_factory) -> Path:
    """The ZeRO-3 tag consolidated by the torch path (the reference of the indexed one)."""
    from biomedgpt.engine.checkpoint.consolidate import consolidate
    from biomedgpt.engine.checkpoint.zero_reader import open_checkpoint
    from biomedgpt.models.config import ModelSpec

    out = tmp_path_factory.mktemp("zero3-torch-path") / "model"
    return consolidate(open_checkpoint(tag_dir(runs, 3)), out, ModelSpec(**MODEL).build(), progress=False).output


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _same_output(ours: Path, reference: Path) -> None:
    """Every file byte for byte, but the report's ``source`` (the checkpoint's path)."""
    from biomedgpt.engine.checkpoint.layout import REPORT_FILE

    mine, theirs = _files(ours), _files(reference)
    assert sorted(mine) == sorted(theirs)
    for name in mine:
        if name == REPORT_FILE:
            a, b = json.loads(mine[name]), json.loads(theirs[name])
            assert {**a, "source": None} == {**b, "source": None}
        else:
            assert mine[name] == theirs[name], name


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_indexed_consolidation_writes_what_the_torch_path_writes(runs, stage, tmp_path, model_cfg, gpt2_tokenizer):
    """Every save writes the tag's index; consolidating by it gives the torch path's directory byte for byte
    (sharded, with a tokenizer). bf16 weights (cast to fp32 by default) get no index."""
    from biomedgpt.engine.checkpoint.consolidate import consolidate
    from biomedgpt.engine.checkpoint.consolidation_index import consolidate_indexed, read_index
    from biomedgpt.engine.checkpoint.layout import CONSOLIDATION_INDEX_FILE
    from biomedgpt.engine.checkpoint.zero_reader import open_checkpoint

    tag = tag_dir(runs, stage)
    assert (tag / CONSOLIDATION_INDEX_FILE).is_file()
    torch_path = consolidate(open_checkpoint(tag), tmp_path / "torch", model_cfg, tokenizer=gpt2_tokenizer,
                             max_shard_bytes=4 << 20, progress=False).output
    indexed = consolidate_indexed(read_index(tag), tmp_path / "indexed", gpt2_tokenizer, max_shard_bytes=4 << 20,
                                  progress=False).output
    assert len(list(indexed.glob("model-*.safetensors"))) > 1 and (indexed / "tokenizer").is_dir()
    assert _files(indexed) == _files(torch_path)
    assert not (runs / "zero0-bf16" / "checkpoints" / tag.name / CONSOLIDATION_INDEX_FILE).exists()


def test_consolidate_command_copies_by_the_index_without_torch(runs, tmp_path, zero3_torch_path):
    """``biomedgpt consolidate`` of an indexed tag imports no torch at all, and writes the torch path's
    directory."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))}
    argv = [f"checkpoint={runs / 'zero3'}", f"output={tmp_path / 'cli'}", "progress=false"]
    script = (f"import sys\nfrom biomedgpt.tools import consolidate\ncode = consolidate.main({argv!r})\n"
              "print('torch imported:', 'torch' in sys.modules)\nsys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch imported: False" in done.stdout and "note:" not in done.stderr
    assert _files(tmp_path / "cli") == _files(zero3_torch_path)


BAD_INDEXES = {  # how the index (or its tag) was altered -> the problem the note names
    "bad JSON": "not readable JSON",
    "a file outside the tag": "files is not",
    "an offset past the file": "outside its stored tensors",
    "a wrong file size": "the index recorded",
    "a truncated shard": "the index recorded",
}


@pytest.mark.parametrize("damage", list(BAD_INDEXES))
def test_an_altered_index_falls_back_to_the_torch_path(runs, tmp_path, zero3_torch_path, capsys, damage):
    """An index that does not describe its tag is never trusted: one note naming it and the problem, then
    the torch path, which writes the right directory (or, for real damage, says so in one line)."""
    from biomedgpt.engine.checkpoint.layout import CONSOLIDATION_INDEX_FILE
    from biomedgpt.tools import consolidate as consolidate_cli

    tag = _copy_tag(runs, 3, tmp_path / "checkpoints" / f"step_{SAVE_STEP:08d}")
    index_path = tag / CONSOLIDATION_INDEX_FILE
    index = json.loads(index_path.read_text())
    shard = optim_states_file(1)
    if damage == "bad JSON":
        index_path.write_text(index_path.read_text()[:-10])
    else:
        if damage == "a file outside the tag":  # the same bytes, reached through the parent folder
            outside = f"../{tag.name}/{shard}"
            index["files"][outside] = index["files"].pop(shard)
            for tensor in index["tensors"]:
                tensor["segments"] = [[outside if s[0] == shard else s[0], s[1], s[2]] for s in tensor["segments"]]
        elif damage == "an offset past the file":
            segment = index["tensors"][0]["segments"][-1]
            segment[1] = index["files"][segment[0]] - segment[2] // 2
        elif damage == "a wrong file size":
            index["files"][shard] += 1
        index_path.write_text(json.dumps(index))
    if damage == "a truncated shard":
        with open(tag / shard, "r+b") as f:
            f.truncate(os.path.getsize(tag / shard) // 2)
    code = consolidate_cli.main([f"checkpoint={tag}", f"output={tmp_path / 'model'}", "progress=false"])
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and str(index_path) in notes[0] and BAD_INDEXES[damage] in notes[0], err
    if damage == "a truncated shard":  # the torch path's own one line
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 1 and not (tmp_path / "model").exists() and "Traceback" not in err
        assert len(errors) == 1 and errors[0].startswith(f"error: {tag / shard}: truncated or corrupt"), err
        return
    assert code == 0
    _same_output(tmp_path / "model", zero3_torch_path)


def test_a_tag_whose_index_cannot_be_made_completes(tmp_path, capsys):
    """The index is a convenience: a tag it cannot be made for (here: not a tensor layout it knows) is
    completed all the same, after one line, and consolidating it takes the torch path."""
    from biomedgpt.engine.checkpoint.layout import CONSOLIDATION_INDEX_FILE, LATEST_FILE, model_states_file
    from biomedgpt.engine.checkpoint.manager import CheckpointManager

    manager = CheckpointManager(tmp_path, rank=0, world_size=1, keep_last_n=1)
    tag = manager.root / f"step_{SAVE_STEP:08d}"
    tag.mkdir()
    torch.save({"module": {"w": torch.zeros(3)}, "buffer_names": [], "dp_world_size": 1}, tag / model_states_file())
    manager._complete(tag.name, SAVE_STEP, 0)
    assert (tag / META_FILE).is_file() and (manager.root / LATEST_FILE).read_text() == tag.name
    assert not (tag / CONSOLIDATION_INDEX_FILE).exists()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"note: {tag}: no consolidation index ("), lines

if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    mode = sys.argv[1]
    if mode == "train":
        worker_train(Path(sys.argv[2]), sys.argv[3].split(","))
    elif mode == "resume":
        worker_resume(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
