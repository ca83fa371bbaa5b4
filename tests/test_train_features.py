"""The training features of the original recipes (issue 23): answer-set constrained training, frozen
embeddings, drop-worst, fairseq's loss normalisation over the accumulation window, EMA of BatchNorm buffers.

The in-process tests check the data and the loss against formulas written out here; 2 DeepSpeed ranks
(gloo, CPU; ``worker`` runs in the shared 2-rank job, rank_jobs.py) check what needs real ranks: an
accumulation window's update equals one big batch's at ZeRO 0 and 2, the frozen table gets no optimizer
state, and the trainer starts dropping after the given update.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from biomedgpt.engine.train.ema import EMA
from biomedgpt.engine.train.loss import label_smoothed_cross_entropy
from biomedgpt.engine.run_config import OptimConfig

REPO = Path(__file__).resolve().parents[1]
EOS, PAD = 2, 1


# -- answer-set constrained training -----------------------------------------------------------------


def _vqa_shards(tmp_path: Path, answers: list[str]) -> str:
    from biomedgpt.data.convert import PrepareConfig, convert

    rows = []
    for i, answer in enumerate(answers):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((16, 16, 3), 40 * i % 255, dtype=np.uint8)).save(path)
        rows.append({"id": f"q{i}", "image": str(path), "question": "which side is abnormal?", "answer": answer})
    source = tmp_path / "vqa.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "shards"
    convert(PrepareConfig(input=str(source), format="jsonl", kind="vqa", output=str(out), progress=False))
    return str(out)


def _data_config(tmp_path: Path, remote: str, **extra):
    from biomedgpt.data.config import DataConfig, StreamConfig

    return DataConfig(streams=[StreamConfig(name="vqa", task="vqa", remote=remote)], batch_size=4,
                      patch_image_size=16, num_workers=0, shuffle=False, train_transform="resize",
                      cache_dir=str(tmp_path / "cache"), constrain_training=True, **extra)


def _expected_rows(tokenizer, answers: list[str]) -> dict[tuple[int, ...], set[int]]:
    """The answer set's trie written out: answer prefix (token ids) -> the tokens that may follow it."""
    follow: dict[tuple[int, ...], set[int]] = {}
    for answer in answers:
        ids = tokenizer.encode(" " + answer) + [EOS]
        for i in range(len(ids)):
            follow.setdefault(tuple(ids[:i]), set()).add(ids[i])
    return follow


def _check_masks(batch: dict, follow: dict) -> int:
    """Every answer position allows exactly the trie's next tokens; every other position allows all."""
    masks, targets = batch["constraint_masks"], batch["target"]
    assert masks.dtype == torch.bool and masks.shape[:2] == targets.shape
    checked = 0
    for row in range(targets.shape[0]):
        target = targets[row].tolist()
        start = next(i for i, t in enumerate(target) if t != PAD)
        end = len(target) - target[::-1].index(EOS)  # past the answer's </s>
        for i in range(targets.shape[1]):
            allowed = set(masks[row, i].nonzero().flatten().tolist())
            if start <= i < end:
                assert allowed == follow[tuple(target[start:i])], (row, i)
                checked += 1
            else:
                assert masks[row, i].all(), (row, i)
    return checked


def test_training_batches_carry_the_answer_set_constraint_masks(tmp_path, canonical_tokenizer):
    """data.constrain_training: masks from the training rows' answers, or from data.answer_set (OFA's
    trainval_ans2label as JSON: answer -> index); an answer outside the given set fails naming the row."""
    from biomedgpt.data.loader import build_train_loader

    answers = ["left lung", "right lung", "yes", "no"]
    remote = _vqa_shards(tmp_path, answers)
    batch = next(iter(build_train_loader(_data_config(tmp_path, remote), canonical_tokenizer)))
    assert batch["constraint_masks"].shape[2] == canonical_tokenizer.vocab_size
    assert _check_masks(batch, _expected_rows(canonical_tokenizer, answers)) >= 4 * 2

    answer_set = answers + ["left lower lobe", "cardiomegaly"]
    answer_file = tmp_path / "trainval_ans2label.json"
    answer_file.write_text(json.dumps({a: i for i, a in enumerate(answer_set)}))
    loader = build_train_loader(_data_config(tmp_path, remote, answer_set=str(answer_file)), canonical_tokenizer)
    batch = next(iter(loader))
    _check_masks(batch, _expected_rows(canonical_tokenizer, answer_set))

    answer_file.write_text(json.dumps({"yes": 0, "no": 1}))
    loader = build_train_loader(_data_config(tmp_path, remote, answer_set=str(answer_file)), canonical_tokenizer)
    with pytest.raises(ValueError, match="'q0'.*not in the answer set"):
        next(iter(loader))


def test_nli_answer_set_is_fixed(canonical_tokenizer):
    """MedNLI's set is yes / no / maybe (OFA's mnli task), whatever the data says."""
    from biomedgpt.data.collate import collate
    from biomedgpt.data.config import DataConfig, StreamConfig
    from biomedgpt.data.constraints import training_constraints
    from biomedgpt.data.tasks import Example

    cfg = DataConfig(streams=[StreamConfig(name="nli", task="nli", remote="unused")], constrain_training=True)
    constraints = training_constraints(cfg, canonical_tokenizer, dataset=None)
    yes = canonical_tokenizer.encode(" yes")
    examples = [Example(uid="n0", task="nli", source=[0, 5, 2], prev_output=[0] + yes, target=yes + [EOS]),
                Example(uid="c0", task="caption", source=[0, 5, 2], prev_output=[0, 7, 8], target=[7, 8, EOS])]
    batch = collate(examples, 8, [1.0], constraints=constraints)
    _check_masks({k: batch[k][:1] for k in ("constraint_masks", "target")},
                 _expected_rows(canonical_tokenizer, ["yes", "no", "maybe"]))
    assert batch["constraint_masks"][1].all()  # another task's example is not constrained


def test_constrained_loss_equals_the_formula_and_has_finite_gradients():
    """OFA's criterion with constraint masks, written out per token: logits outside the mask at -inf,
    (1 - eps - eps_i) * nll + eps_i * sum(-log p over the allowed), eps_i = eps / (allowed - 1),
    confidence-weighted, summed over the target tokens and divided by their count."""
    torch.manual_seed(0)
    vocab, eps = 11, 0.1
    target = torch.tensor([[PAD, PAD, 5, 7, EOS], [4, EOS, PAD, PAD, PAD]])
    masks = torch.ones(2, 5, vocab, dtype=torch.bool)
    for row, col, allowed in ((0, 2, [4, 5, 6]), (0, 3, [7, 8]), (0, 4, [EOS]), (1, 0, [4, 5, 9]), (1, 1, [EOS, 3])):
        masks[row, col] = False
        masks[row, col, allowed] = True
    conf = torch.tensor([0.5, 1.0])
    logits = torch.randn(2, 5, vocab, requires_grad=True)
    out = label_smoothed_cross_entropy(logits, target, eps, conf=conf, constraint_masks=masks)

    total, count = 0.0, 0
    for b in range(2):
        for t in range(5):
            if target[b, t] == PAD:
                continue
            allowed = masks[b, t].nonzero().flatten().tolist()
            row = logits[b, t].detach().double()
            log_z = math.log(sum(math.exp(row[v]) for v in allowed))
            lp = {v: float(row[v]) - log_z for v in allowed}
            eps_i = eps / (len(allowed) - 1) if len(allowed) > 1 else eps
            nll = -lp[int(target[b, t])]
            token = (1 - eps - eps_i) * nll + eps_i * -sum(lp.values())
            total += float(conf[b]) * token
            count += 1
    assert out.loss.item() == pytest.approx(total / count, abs=1e-6)
    out.loss.backward()
    assert torch.isfinite(logits.grad).all()


# -- drop-worst ----------------------------------------------------------------------------------------


def test_drop_worst_keeps_exactly_the_best_fraction_of_token_losses():
    """OFA: each micro-batch keeps the int(n * (1 - ratio)) target tokens of smallest loss (per token, not
    per sample) and divides by that count; the statistics follow the kept tokens."""
    torch.manual_seed(1)
    logits = torch.randn(3, 6, 13)
    target = torch.randint(3, 13, (3, 6))
    target[0, 4:] = PAD
    target[2, 1:] = PAD  # 4 + 6 + 1 = 11 tokens: keep int(11 * 0.8) = 8, drop 3
    nll = -F.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    losses = sorted(float(nll[b, t]) for b in range(3) for t in range(6) if target[b, t] != PAD)
    assert len(losses) == 11
    out = label_smoothed_cross_entropy(logits, target, 0.0, drop_worst_ratio=0.2)
    assert int(out.sample_tokens.sum()) == 8
    assert out.loss.item() == pytest.approx(sum(losses[:8]) / 8, rel=1e-6)
    assert out.sample_nll.sum().item() == pytest.approx(sum(losses[:8]), rel=1e-6)
    worst_kept = max(float(nll[b, t]) for b in range(3) for t in range(6)
                     if target[b, t] != PAD and nll[b, t] <= losses[7])
    assert worst_kept == losses[7]
    plain = label_smoothed_cross_entropy(logits, target, 0.0)
    assert plain.loss.item() == pytest.approx(sum(losses) / 11, rel=1e-6)


def test_drop_worst_starts_after_the_given_update():
    """OFA drops once its update count exceeds drop_worst_after (update_num > drop_worst_after)."""
    optim = OptimConfig(drop_worst_ratio=0.2, drop_worst_after=600)
    assert [optim.drop_worst_at(s) for s in (0, 599, 600, 601, 5000)] == [0.0, 0.0, 0.0, 0.2, 0.2]
    with pytest.raises(ValueError, match="drop_worst_ratio"):
        OptimConfig(drop_worst_ratio=1.0)


def test_window_token_count_normalises_the_micro_batch_loss():
    """group_tokens replaces the batch's own count: the micro-batch's share of the window's loss."""
    torch.manual_seed(2)
    logits = torch.randn(2, 4, 9)
    target = torch.tensor([[5, 6, 2, 1], [7, 2, 1, 1]])
    own = label_smoothed_cross_entropy(logits, target, 0.1)
    shared = label_smoothed_cross_entropy(logits, target, 0.1, group_tokens=torch.tensor([20.0]))
    assert shared.loss.item() == pytest.approx(own.loss.item() * 5 / 20, rel=1e-6)


# -- EMA of BatchNorm buffers ----------------------------------------------------------------------------


def test_ema_averages_batchnorm_buffers_and_evaluation_swaps_them_in():
    """fairseq's EMA: running mean / var averaged like the weights, num_batches_tracked copied."""
    sys.path.insert(0, str(REPO / "tests"))
    from small_models import build

    model = build()
    norms = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    name, norm = next(iter(norms.items()))
    ema = EMA(model, decay=0.75, buffers=True)
    before = norm.running_mean.clone()
    assert f"{name}.running_mean" in ema.buffers and f"{name}.num_batches_tracked" in ema.buffers
    model.train()
    with torch.no_grad():
        model.encoder.embed_images(torch.randn(2, 3, 32, 32) * 3 + 1)
    after = norm.running_mean.clone()
    assert not torch.allclose(after, before)
    ema.update(model, step=1)
    expected = 0.75 * before + 0.25 * after
    torch.testing.assert_close(ema.buffers[f"{name}.running_mean"], expected, rtol=0, atol=1e-6)
    assert int(ema.buffers[f"{name}.num_batches_tracked"]) == int(norm.num_batches_tracked) == 1
    with ema.swapped_in(model):
        torch.testing.assert_close(norm.running_mean, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(norm.running_mean, after, rtol=0, atol=0)

    restored = EMA(model, decay=0.75, buffers=True)
    restored.load_state_dict(ema.state_dict())
    torch.testing.assert_close(restored.buffers[f"{name}.running_mean"], expected, rtol=0, atol=0)
    assert EMA(model, decay=0.75).buffers == {}  # ema.buffers=false: the weights only


# -- on 2 DeepSpeed ranks ----------------------------------------------------------------------------------

MODEL = {"size": "tiny", "d_model": 32, "ffn_dim": 64, "encoder_layers": 1, "decoder_layers": 1, "heads": 2,
         "resnet_layers": [1, 1, 1], "dropout": 0.0}
MICRO_BATCHES, ROWS, SRC_LEN, TGT_LEN = 4, 2, 8, 10


def _micro_batch(rank: int, index: int) -> dict:
    """Text-only rows whose target lengths differ a lot between micro-batches and ranks."""
    g = torch.Generator().manual_seed(100 * rank + index)
    target = torch.randint(4, 2000, (ROWS, TGT_LEN), generator=g)
    lengths = [1 + (3 * rank + 5 * index + 7 * r) % TGT_LEN for r in range(ROWS)]
    for r, n in enumerate(lengths):
        target[r, n:] = PAD
    return {"src_tokens": torch.randint(4, 2000, (ROWS, SRC_LEN), generator=g),
            "prev_output_tokens": torch.randint(4, 2000, (ROWS, TGT_LEN), generator=g), "target": target,
            "patch_images": torch.zeros(ROWS, 3, 16, 16), "patch_masks": torch.zeros(ROWS, dtype=torch.bool),
            "task_ids": torch.zeros(ROWS, dtype=torch.long), "loss_groups": torch.zeros(ROWS, dtype=torch.long),
            "group_weights": [1.0]}


class _Batches:
    """A fixed list of batches as a training loader (state_dict / load_state_dict for the trainer)."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _trainer(out: Path, rank: int, stage: int, **optim):
    from biomedgpt.core.config import from_dict
    from biomedgpt.engine.run_config import RunConfig
    from biomedgpt.engine.train.trainer import Trainer

    cfg = from_dict(RunConfig, {
        "model": MODEL, "optim": {"lr": 1e-3, "max_steps": 10, "warmup_steps": 1, "clip_norm": 0.0,
                                  "label_smoothing": 0.1, **optim},
        "deepspeed": {"zero_stage": stage}, "log": {"wandb_mode": "disabled", "progress_bar": False},
        "checkpoint": {"interval": 0, "at_end": False, "background": False}, "output_dir": str(out)})
    batches = [_micro_batch(rank, i) for i in range(MICRO_BATCHES)]
    return Trainer(cfg, train_loader=_Batches(batches)), batches


def _window(trainer, batches: list[dict]) -> dict:
    """One accumulation window through the trainer: the gradients DeepSpeed holds before its optimizer step
    (full, fp32) and the losses back-propagated, on every rank."""
    from deepspeed.utils import safe_get_full_grad

    from biomedgpt.engine.distributed.process_group import all_reduce

    engine, captured, backpropagated = trainer.engine, {}, []
    step, backward = engine.step, engine.backward

    def capturing_step(*args, **kwargs):
        if engine.is_gradient_accumulation_boundary():
            for name, param in engine.module.named_parameters():
                if param.requires_grad:
                    captured[name] = safe_get_full_grad(param).detach().float().clone()
        return step(*args, **kwargs)

    def recording_backward(loss, *args, **kwargs):
        scale = 1.0 if kwargs.get("scale_wrt_gas", True) is False else 1.0 / engine.gradient_accumulation_steps()
        backpropagated.append(float(loss) * scale)
        return backward(loss, *args, **kwargs)

    engine.step, engine.backward = capturing_step, recording_backward
    trainer.window = trainer._new_window()  # the logged metrics of this window alone
    window, tokens = trainer._next_window(iter(batches), None)
    results = [trainer.train_step(batch, tokens) for batch in window]
    engine.step, engine.backward = step, backward
    assert [r.boundary for r in results] == [False] * (MICRO_BATCHES - 1) + [True]
    # DeepSpeed averages the ranks' gradients: the update's loss is the ranks' mean of what they back-propagated
    loss = float(all_reduce(torch.tensor([sum(backpropagated)], dtype=torch.float64))[0]) / trainer.world
    return {"grads": captured, "loss": loss, "logged": trainer._window_metrics(trainer.window)["loss"]}


def _one_big_batch(state: dict, world: int) -> dict:
    """The reference: every rank's micro-batches through a plain model with the window's starting weights,
    as one batch (OFA's loss, one backward) and, for the old normalisation, each micro-batch's mean averaged."""
    from biomedgpt.engine.distributed.modality_passes import split_by_modality
    from biomedgpt.models.config import ModelSpec
    from biomedgpt.models.ofa import BiomedGPT

    model = BiomedGPT(ModelSpec(**MODEL).build())
    model.load_state_dict(state)
    split_by_modality(model, same_calls=False)  # the train step's forward (text-only rows without image tokens)
    model.train()
    parts = [_micro_batch(r, i) for r in range(world) for i in range(MICRO_BATCHES)]
    keys = ("src_tokens", "prev_output_tokens", "patch_images", "patch_masks")
    with torch.no_grad():
        means = [label_smoothed_cross_entropy(model(**{k: p[k] for k in keys}), p["target"], 0.1).loss.item()
                 for p in parts]
    big = {k: torch.cat([p[k] for p in parts]) for k in keys}
    out = label_smoothed_cross_entropy(model(**big), torch.cat([p["target"] for p in parts]), 0.1)
    out.loss.backward()
    return {"loss": out.loss.item(), "micro_batch_mean": sum(means) / len(means),
            "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None}}


def _state(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}


def _frozen_table(trainer, before: dict, stage: int) -> dict:
    """After optimizer steps with the token table frozen: the table, the other weights, the optimizer's params
    and state (ZeRO-2: this rank's flat partition of the trainable params)."""
    module, optimizer = trainer.engine.module, trainer.engine.optimizer
    table = module.embed_tokens.weight
    groups = optimizer.bit16_groups if stage == 2 else [g["params"] for g in optimizer.param_groups]
    in_optimizer = [p for group in groups for p in group]
    state = optimizer.optimizer.state if stage == 2 else optimizer.state
    return {
        "table_unchanged": torch.equal(table.detach(), before["embed_tokens.weight"]),
        "others_changed": sum(not torch.equal(p.detach(), before[n]) for n, p in module.named_parameters()
                              if n != "embed_tokens.weight"),
        "table_in_optimizer": any(p is table for p in in_optimizer),
        "table_has_state": any(p is table for p in state),
        "optimizer_elements": sum(p.numel() for p in in_optimizer),
        "trainable_elements": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "table_elements": table.numel(),
        "state_elements": sum(t.numel() for s in state.values() for t in s.values()
                              if isinstance(t, torch.Tensor) and t.dim() > 0),
    }


def worker(out_dir: Path) -> None:
    """One rank of the shared 2-rank job (rank_jobs.py). Two trainers (the suite's time): ZeRO-0 with the decoder flag, ZeRO-2 with the encoder flag. ZeRO-0 runs
    a window with the old normalisation first, then one with fairseq's; each window is compared with one big
    batch from its starting weights."""
    from biomedgpt.engine.distributed.process_group import all_reduce

    rank = int(os.environ["RANK"])
    results: dict = {}
    for stage, flag in ((0, "freeze_decoder_embedding"), (2, "freeze_encoder_embedding")):
        trainer, batches = _trainer(out_dir / f"stage{stage}", rank, stage, grad_accum=MICRO_BATCHES, **{flag: True})
        initial = _state(trainer)
        # the reference on rank 0 only (the other rank would wait for it anyway)
        reference = (lambda: _one_big_batch(_state(trainer), trainer.world) if rank == 0 else None)
        if stage == 0:
            trainer.cfg.optim.loss_normalization = "micro_batch"
            results["micro_batch"] = {"reference": reference(), **_window(trainer, batches)}
            trainer.cfg.optim.loss_normalization = "accumulation"
        results[f"accumulation{stage}"] = {"reference": reference(), **_window(trainer, batches)}
        results[f"frozen{stage}"] = _frozen_table(trainer, initial, stage)
        if stage == 0:
            # drop-worst in the trainer: not while the optimizer has done <= drop_worst_after steps
            trainer.cfg.optim.drop_worst_ratio, trainer.cfg.optim.drop_worst_after = 0.5, 1
            kept = {}
            for done in (0, 1, 2):
                trainer.step = done
                with torch.no_grad():
                    local = int(trainer._forward_loss(batches[0], train=True).sample_tokens.sum())
                # the pre-pass count (no forward) agrees with what the loss kept, over the ranks
                kept[done] = (local, float(all_reduce(torch.tensor([float(local)]))[0]),
                              float(trainer.window_tokens(batches[:1])[0]))
            results["drop_worst"] = {"kept": kept, "tokens": int(batches[0]["target"].ne(PAD).sum())}
        del trainer
    if rank == 0:
        torch.save(results, out_dir / "results.pt")


@pytest.fixture(scope="module")
def ranks(rank_jobs) -> dict:
    return torch.load(rank_jobs("train_features") / "results.pt")


@pytest.mark.distributed
@pytest.mark.slow
def test_accumulation_window_update_equals_one_big_batch(ranks):
    """2 ranks x 4 micro-batches of different token counts, ZeRO 0 and 2: the loss DeepSpeed's update
    back-propagates, the logged loss and every gradient equal one big batch's (fairseq's normalisation);
    loss_normalization micro_batch gives the mean of the micro-batch means instead."""
    for stage in (0, 2):
        run = ranks[f"accumulation{stage}"]
        reference = run["reference"]
        assert abs(run["loss"] - reference["loss"]) <= 1e-6, (stage, run["loss"], reference["loss"])
        assert abs(run["logged"] - reference["loss"]) <= 1e-6, stage
        assert set(reference["grads"]) - {"embed_tokens.weight"} <= set(run["grads"]), stage
        for name, grad in run["grads"].items():  # parameters the batch does not reach: zero, None in plain torch
            expected = reference["grads"].get(name, torch.zeros_like(grad))
            assert (grad - expected).abs().max().item() <= 1e-6, (stage, name)
    micro = ranks["micro_batch"]
    reference = micro["reference"]
    assert abs(micro["loss"] - reference["micro_batch_mean"]) <= 1e-6
    assert abs(micro["loss"] - reference["loss"]) > 1e-3  # the case tells the two apart
    assert abs(micro["logged"] - reference["loss"]) <= 1e-6  # the log is per token in both modes
    print(f"one big batch {reference['loss']:.6f}, micro_batch {micro['loss']:.6f}; next window: one big batch "
          f"{ranks['accumulation0']['reference']['loss']:.6f}, accumulation {ranks['accumulation0']['loss']:.6f}")


@pytest.mark.distributed
@pytest.mark.slow
def test_frozen_embedding_is_unchanged_and_has_no_optimizer_state(ranks):
    """freeze_decoder_embedding (ZeRO-0) and freeze_encoder_embedding (ZeRO-2), two optimizer steps: the shared
    table is as it was, and neither the optimizer's parameters nor its AdamW moments include it."""
    for stage in (0, 2):
        run = ranks[f"frozen{stage}"]
        assert run["table_unchanged"] and run["others_changed"] > 0, stage
        assert not run["table_in_optimizer"] and not run["table_has_state"], stage
        assert run["optimizer_elements"] == run["trainable_elements"], stage
        share = 1 if stage == 0 else 2  # ZeRO-2: this rank's half of the flat partition (plus alignment)
        assert run["state_elements"] <= 2 * run["optimizer_elements"] // share + 64, stage


@pytest.mark.distributed
@pytest.mark.slow
def test_trainer_drops_the_worst_tokens_only_after_the_given_update(ranks):
    run = ranks["drop_worst"]
    n = run["tokens"]
    assert [run["kept"][done][0] for done in (0, 1, 2)] == [n, n, int(n * 0.5)]
    for local, counted_by_loss, counted_before in run["kept"].values():
        assert counted_by_loss == counted_before

