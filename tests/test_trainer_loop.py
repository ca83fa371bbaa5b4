"""The training loop in-process, in seconds: a ``Trainer`` built from ``engine/train/builders.py`` with the real
process setup (a one-rank gloo group), checkpoint manager, resume checks, logger and sample log, and two
stand-ins given through ``TrainSpec``: a list of batches as the loader and ``LoopEngine``, the DeepSpeed
engine's surface (forward, backward, step, accumulation boundary, lr, save/load through the checkpoint
manager's engine) over a small torch module, AdamW and the run's ``lr_lambda`` - what DeepSpeed does at
ZeRO stage 0 on one rank.

Checked here: resume (step counter, loader position, RNG, metrics and sample ids go on as an uninterrupted
run's), non-finite losses skipped then the run stopped, a signal's checkpoint and exit 75, the EMA's update
cadence, the LR schedule's values, metrics.jsonl, and when evaluations and checkpoints are due. Which model
settings may change on resume: test_resume_fields.py (the real engine). What needs real ranks or DeepSpeed's
optimizers stays in the launched tests (test_engine_distributed.py, ...).
"""
from __future__ import annotations

import json
import math
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from biomedgpt.core.config import from_dict
from biomedgpt.engine.checkpoint.layout import LATEST_FILE, META_FILE
from biomedgpt.engine.run_config import RunConfig
from biomedgpt.engine.train.builders import TrainSpec, build_parts
from biomedgpt.engine.train.schedule import lr_lambda
from biomedgpt.engine.train.trainer import EXIT_RESUME, NonFiniteLossError, Trainer, TrainingStopped

VOCAB, ROWS, SRC_LEN, TGT_LEN, PAD = 64, 3, 5, 6, 1
pytestmark = pytest.mark.usefixtures("one_thread")  # microscopic ops: one thread is far faster on a busy machine
POISON = 3  # a source token that makes the stand-in model's logits NaN
MODEL = {"size": "tiny", "d_model": 32, "ffn_dim": 64, "encoder_layers": 1, "decoder_layers": 1, "heads": 2,
         "resnet_layers": [1, 1, 1], "dropout": 0.3}


class Net(nn.Module):
    """Logits from token embeddings, with dropout (so the RNG matters) and a BatchNorm (per-rank buffers)."""

    def __init__(self, dropout: float):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 8)
        self.norm = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(8, VOCAB)

    def forward(self, src_tokens, prev_output_tokens, **_):
        h = self.embed(prev_output_tokens) + self.embed(src_tokens).mean(1, keepdim=True)
        logits = self.out(self.drop(self.norm(h.transpose(1, 2)).transpose(1, 2)))
        poisoned = (src_tokens == POISON).any(dim=1)
        return torch.where(poisoned[:, None, None], torch.full_like(logits, float("nan")), logits)


class LoopEngine:
    """What the loop and the checkpoint manager call on a DeepSpeed engine, as DeepSpeed does it at ZeRO 0 on
    one rank: backward scales by the accumulation steps (unless ``scale_wrt_gas=False``), ``step`` steps the
    optimizer and the LR schedule at a boundary, checkpoints go through ``checkpoint_engine`` (the manager's)."""

    def __init__(self, module: nn.Module, cfg: RunConfig, total_steps: int):
        self.module = module
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                           eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.optim, total_steps))
        self.accum = cfg.optim.grad_accum
        self.micro_steps = 0
        self.checkpoint_engine = None
        self.weights_after_step: list[dict[str, torch.Tensor]] = []

    def __call__(self, **batch):
        return self.module(**batch)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        (loss / self.accum if scale_wrt_gas else loss).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.accum == 0

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
            self.weights_after_step.append({n: p.detach().clone() for n, p in self.module.named_parameters()})
        self.micro_steps += 1

    def gradient_accumulation_steps(self) -> int:
        return self.accum

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_global_grad_norm(self):
        return None  # as DeepSpeed's plain fp32 path: the trainer computes the norm

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        state = {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "lr_scheduler": self.lr_scheduler.state_dict(), **client_state}
        self.checkpoint_engine.save(state, os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"))

    def load_checkpoint(self, load_dir: str, tag: str, load_optimizer_states: bool, load_lr_scheduler_states: bool):
        path = os.path.join(load_dir, tag, "mp_rank_00_model_states.pt")
        state = dict(self.checkpoint_engine.load(path))
        self.module.load_state_dict(state.pop("module"))
        self.optimizer.load_state_dict(state.pop("optimizer"))
        self.lr_scheduler.load_state_dict(state.pop("lr_scheduler"))
        return path, state


class ListLoader:
    """Batches of a list, resumable mid-epoch (``state_dict``: how many this epoch has handed out)."""

    def __init__(self, batches: list[dict]):
        self.batches, self.start, self.handed_out = batches, 0, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        start, self.start = self.start, 0
        for index in range(start, len(self.batches)):
            self.handed_out = index + 1
            yield self.batches[index]

    def state_dict(self) -> dict:
        return {"handed_out": self.handed_out % len(self.batches)}

    def load_state_dict(self, state: dict) -> None:
        self.start = self.handed_out = state["handed_out"]


def batch(index: int, poison: bool = False) -> dict:
    g = torch.Generator().manual_seed(index)
    src = torch.randint(4, VOCAB, (ROWS, SRC_LEN), generator=g)
    if poison:
        src[0, 0] = POISON
    target = torch.randint(4, VOCAB, (ROWS, TGT_LEN), generator=g)
    target[:, -1 - index % 3:] = PAD
    return {"src_tokens": src, "prev_output_tokens": torch.randint(4, VOCAB, (ROWS, TGT_LEN), generator=g),
            "target": target, "task_ids": torch.zeros(ROWS, dtype=torch.long),
            "ids": [f"s{index}-{r}" for r in range(ROWS)]}


def config(out: Path, **sections) -> RunConfig:
    data = {"model": MODEL, "optim": {"lr": 1e-2, "max_steps": 6, "warmup_steps": 2, "clip_norm": 0.0},
            "log": {"interval": 1, "wandb_mode": "disabled", "progress_bar": False, "peak_tflops": 1.0,
                    "sample_ids": True},
            "checkpoint": {"interval": 0, "at_end": False, "background": False},
            "eval": {"interval": 0, "at_end": False, "export_best": False},
            "watchdog": {"timeout_s": 0}, "output_dir": str(out)}
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    return from_dict(RunConfig, data)


def spec(batches: list[dict], engines: list | None = None) -> TrainSpec:
    """The default builders, with the list loader and ``LoopEngine`` (recorded in ``engines``)."""

    def engine(cfg: RunConfig, inputs):
        built = LoopEngine(Net(inputs.model_cfg.dropout), cfg, inputs.total_steps)
        if engines is not None:
            engines.append(built)
        return built, None

    return replace(TrainSpec(), tokenizer=lambda cfg: None, train_loader=lambda *_: ListLoader(batches),
                   eval_loader=lambda *_: None, engine=engine)


def trainer(cfg: RunConfig, batches: list[dict], engines: list | None = None) -> Trainer:
    return Trainer(cfg, build_parts(cfg, spec(batches, engines)))


def logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in logged(out) if "loss" in m}


# -- resume ------------------------------------------------------------------------------------------------


def test_a_stopped_and_resumed_run_goes_on_as_the_straight_run(tmp_path):
    """6 steps straight vs 3 (``stop_after``: checkpoint, exit 75) + 3 resumed, over a 4-batch epoch with
    dropout: the same losses, weights, sample ids, epoch count and LR; the resumed run's metrics continue."""
    batches = [batch(i) for i in range(4)]
    straight = trainer(config(tmp_path / "straight"), batches)
    straight.train()

    split = tmp_path / "split"
    first = trainer(config(split, checkpoint={"stop_after": 3}), batches)
    with pytest.raises(TrainingStopped) as stopped:
        first.train()
    assert stopped.value.code == EXIT_RESUME == 75
    assert (split / "checkpoints" / LATEST_FILE).read_text() == "step_00000003"

    resumed = trainer(config(split), batches)
    assert (resumed.step, resumed.epoch, resumed.train_loader.start) == (3, 0, 3)  # 3 of the epoch's 4 batches
    resumed.train()
    assert (resumed.step, resumed.epoch) == (straight.step, straight.epoch) == (6, 1)
    a, b = train_losses(tmp_path / "straight"), train_losses(split)
    assert [m["step"] for m in logged(split) if "loss" in m] == [1, 2, 3, 4, 5, 6]  # one metrics.jsonl, continued
    assert all(b[step] == a[step] for step in a), (a, b)
    assert [m["lr"] for m in logged(split) if "lr" in m] == [m["lr"] for m in logged(tmp_path / "straight")
                                                             if "lr" in m]
    for name, value in straight.engine.module.state_dict().items():
        assert torch.equal(value, resumed.engine.module.state_dict()[name]), name
    ids = lambda out: (out / "sample_ids" / "rank_00000.jsonl").read_text()  # noqa: E731
    assert ids(split) == ids(tmp_path / "straight") and len(ids(split).splitlines()) == 6


def test_a_resumed_run_restores_the_rng_once_its_first_batch_is_fetched(tmp_path):
    """A new epoch's iterator draws from torch's RNG (the streaming loader's seed): the saved states are put
    back after the first batch, once (without them the resumed dropout masks differ: the test above)."""
    batches = [batch(i) for i in range(4)]
    out = tmp_path / "run"
    with pytest.raises(TrainingStopped):
        trainer(config(out, checkpoint={"stop_after": 2}), batches).train()
    resumed = trainer(config(out, optim={"max_steps": 3}), batches)
    saved = resumed.resumed_rng["torch"].clone()
    torch.manual_seed(1234)
    batches_of_the_run = resumed._batches()
    assert next(batches_of_the_run) is batches[2]
    assert torch.equal(torch.get_rng_state(), saved) and resumed.resumed_rng is None


# -- skipped and stopped steps ------------------------------------------------------------------------------


def test_nonfinite_losses_are_skipped_then_the_run_stops(tmp_path, capsys):
    """A micro-batch with a NaN loss gets no backward and no step and is counted; past
    ``max_nonfinite_steps`` the run fails instead of training on."""
    batches = [batch(0), batch(1, poison=True), batch(2), batch(3, poison=True)]
    engines: list = []
    run = trainer(config(tmp_path / "run", optim={"max_steps": 3}, max_nonfinite_steps=5), batches, engines)
    run.train()
    assert run.step == 3 and run.nonfinite == 2 and engines[0].micro_steps == 3
    assert capsys.readouterr().out.count("non-finite loss, micro-batch skipped") == 2
    assert [m["nonfinite_skipped"] for m in logged(tmp_path / "run") if "loss" in m] == [0, 1, 2]
    assert all(math.isfinite(m["loss"]) for m in logged(tmp_path / "run") if "loss" in m)
    ids = [json.loads(line)["ids"] for line in (tmp_path / "run" / "sample_ids" / "rank_00000.jsonl").read_text()
           .splitlines()]
    assert ids == [batches[i]["ids"] for i in (0, 2, 0)]  # the skipped batches' samples were not trained on

    strict = trainer(config(tmp_path / "strict", optim={"max_steps": 3}, max_nonfinite_steps=1), batches)
    with pytest.raises(NonFiniteLossError, match=r"2 non-finite losses \(limit max_nonfinite_steps=1\)"):
        strict.train()


def test_a_signal_checkpoints_and_exits_75(tmp_path, capsys):
    """SIGTERM (a pre-emption) during step 2: the step ends, a checkpoint of step 2 is written, exit 75."""
    batches = [batch(i) for i in range(4)]

    class SignallingLoader(ListLoader):
        def __iter__(self):
            for index, item in enumerate(super().__iter__()):
                if index == 1:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield item

    cfg = config(tmp_path / "run", optim={"max_steps": 100})
    parts = build_parts(cfg, replace(spec(batches), train_loader=lambda *_: SignallingLoader(batches)))
    run = Trainer(cfg, parts)
    with pytest.raises(TrainingStopped) as stopped:
        run.train()
    assert stopped.value.code == 75 and run.step == 2
    root = tmp_path / "run" / "checkpoints"
    assert (root / LATEST_FILE).read_text() == "step_00000002"
    assert json.loads((root / "step_00000002" / META_FILE).read_text())["step"] == 2
    assert "stopping on signal at step 2: checkpoint saved, exit 75" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) != run.stop._handle  # the handlers are put back


# -- EMA, schedule, metrics -----------------------------------------------------------------------------------


def test_the_ema_updates_once_per_optimizer_step_from_its_start_step(tmp_path):
    """grad_accum 2: 4 optimizer steps of 2 micro-batches; until ``ema.start_step`` the EMA copies the
    weights, then decays: shadow_s = d * shadow_(s-1) + (1 - d) * weights_s."""
    engines: list = []
    run = trainer(config(tmp_path / "run", optim={"max_steps": 4, "grad_accum": 2, "warmup_steps": 1},
                         ema={"enabled": True, "decay": 0.5, "start_step": 3}), [batch(i) for i in range(8)], engines)
    initial = {n: p.detach().clone() for n, p in engines[0].module.named_parameters()}
    run.train()
    steps = engines[0].weights_after_step
    assert len(steps) == 4
    for name, shadow in run.ema.shadow.items():
        expected = initial[name].float()
        for number, weights in enumerate(steps, start=1):
            decay = 0.0 if number < 3 else 0.5
            expected = decay * expected + (1 - decay) * weights[name]
        torch.testing.assert_close(shadow, expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(run.ema.shadow["out.weight"], steps[-1]["out.weight"])


def test_the_logged_lr_follows_the_schedule_and_metrics_jsonl_holds_every_step(tmp_path):
    out = tmp_path / "run"
    run = trainer(config(out, optim={"lr": 1e-2, "max_steps": 6, "warmup_steps": 2, "end_lr": 1e-3,
                                     "schedule": "polynomial", "power": 2.0}, log={"interval": 2}),
                  [batch(i) for i in range(6)])
    run.train()
    records = [m for m in logged(out) if "loss" in m]
    assert [m["step"] for m in records] == [2, 4, 6]
    factor = lr_lambda(run.cfg.optim, 6)
    for record in records:  # after step s the schedule has stepped s times
        assert record["lr"] == pytest.approx(1e-2 * factor(record["step"]), rel=1e-12), record
    assert records[-1]["lr"] == pytest.approx(1e-3)
    for key in ("loss", "nll", "accuracy", "grad_norm", "step_time_s", "samples_per_s", "tokens_per_s", "mfu",
                "memory_gb", "epoch", "nonfinite_skipped", "loss/caption"):
        assert all(key in m for m in records), key
    assert all(math.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in records)
    assert [m["epoch"] for m in records] == [0, 0, 0]


def test_checkpoints_and_evaluations_are_due_at_their_intervals(tmp_path):
    """checkpoint.interval 2 over 5 steps: steps 2 and 4, and at the end step 5 (kept: the last 2); the
    evaluation every 2 steps and every epoch of 3 steps, and once at the end."""
    out = tmp_path / "run"
    cfg = config(out, optim={"max_steps": 5}, checkpoint={"interval": 2, "at_end": True, "keep_last_n": 2},
                 eval={"interval": 2, "interval_epochs": 1, "at_end": True, "export_best": False})
    batches = [batch(i) for i in range(3)]
    parts = build_parts(cfg, replace(spec(batches), eval_loader=lambda *_: [batch(10), batch(11)]))
    run = Trainer(cfg, parts)
    run.train()
    evaluated = [m["step"] for m in logged(out) if "eval/loss" in m]
    assert evaluated == [2, 3, 4, 5]  # 2, 4: interval; 3: the epoch; 5: at the end
    assert all(m["eval/best"] <= m["eval/loss"] for m in logged(out) if "eval/loss" in m)
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == ["step_00000004", "step_00000005"]
    assert (root / LATEST_FILE).read_text() == "step_00000005"
