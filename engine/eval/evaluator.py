"""The one evaluator, used by training (``Trainer.evaluate``) and by ``biomedgpt evaluate``
(``tools/evaluate.py``):

- the loss pass: loss, perplexity and token accuracy over the eval set, overall and per task
  (``Evaluator.loss_metrics``, ``eval_metrics``);
- the task metrics by generation: each sample decoded the way its task is judged (``engine/eval/decoding.py``)
  and scored with the paper's metrics (``engine/eval/metrics.py``) (``Evaluator.task_metrics``,
  ``evaluate_model``, ``compute_metrics``).

Across ranks each rank evaluates its share; results are gathered in rank order and each sample id counts
once (the eval loader pads the shares by repeating samples). Where the parameters are partitioned (ZeRO-3)
every module call is a collective, so every rank makes the same calls: the loss pass runs a forward each
round (a rank whose share is done repeats its last batch). Decoding gathers the whole model once per pass
when it fits (``ZeroPlan.decoding_model``) and the ranks then decode independently as at stage 0; else
it runs in lockstep (``ZeroPlan.lockstep_decoding``, ``RankSync``; each module gathers its own parameters per call).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence

import torch

from biomedgpt.engine.distributed import process_group as dist_utils
from biomedgpt.engine.distributed.zero import ZeroPlan
from biomedgpt.engine.eval import metrics as task_metrics
from biomedgpt.engine.eval.decoding import RankSync, answer_sets, predict, sets_from_references
from biomedgpt.engine.eval.config import DownstreamConfig


def eval_metrics(records: Sequence[tuple[str, int, float, float, int, int]], task_names: Sequence[str]) -> dict:
    """``records``: (sample id, task id, summed loss, summed nll, target tokens, correct tokens) per sample.

    The evaluation loader pads each rank's share by repeating samples, so each id counts once.
    """
    seen: dict[str, tuple[int, float, float, int, int]] = {}
    for uid, task, loss, nll, tokens, correct in records:
        seen.setdefault(uid, (task, loss, nll, tokens, correct))
    metrics: dict[str, float] = {"samples": float(len(seen))}
    groups: dict[str, list] = {"": list(seen.values())}
    for row in seen.values():
        groups.setdefault(f"/{task_names[row[0]]}", []).append(row)
    for suffix, rows in groups.items():
        tokens = sum(r[3] for r in rows)
        if tokens == 0:
            continue
        nll = sum(r[2] for r in rows) / tokens
        metrics[f"loss{suffix}"] = sum(r[1] for r in rows) / tokens
        metrics[f"nll{suffix}"] = nll
        metrics[f"ppl{suffix}"] = math.exp(min(nll, 50.0))
        metrics[f"accuracy{suffix}"] = sum(r[4] for r in rows) / tokens
    return metrics


def unique_records(records: Iterable[dict]) -> list[dict]:
    """Each (task, sample id) once, the first seen (the ranks' shares are padded by repeating samples)."""
    unique: dict[tuple[str, str], dict] = {}
    for record in records:
        unique.setdefault((record["task"], record["id"]), record)
    return list(unique.values())


def compute_metrics(records: list[dict], cfg: Optional[DownstreamConfig] = None) -> dict[str, float]:
    """``<task>/<metric>`` for every task present (each sample id counted once); ``cfg`` gives per-task
    metric inputs (the captions' CIDEr-D document frequencies)."""
    cfg = cfg or DownstreamConfig()
    by_task: dict[str, list[dict]] = {}
    for record in unique_records(records):
        by_task.setdefault(record["task"], []).append(record)
    metrics: dict[str, float] = {}
    for name, rows in sorted(by_task.items()):
        preds = [r["prediction"] for r in rows]
        refs = [r["references"] for r in rows]
        if name == "vqa":
            values = task_metrics.vqa_accuracy(preds, refs, [r.get("answer_type") for r in rows])
        elif name == "caption":
            values = task_metrics.caption_metrics(preds, refs)
            values.update(task_metrics.caption_metrics_paper(preds, refs))
            values["cider_d"] = task_metrics.cider_d(
                [task_metrics.strip_punctuation(p) for p in preds],
                [[task_metrics.strip_punctuation(" ".join(r.split())) for r in rs] for rs in refs],
                cfg.task(name).cider_df)
        elif name == "grounded_caption":
            values = task_metrics.caption_metrics(preds, refs)
        elif name == "summarization":
            values = {f"mean_{k}": v for k, v in task_metrics.rouge_metrics(preds, refs).items()}
            values.update(task_metrics.summary_rouge_paper(preds, refs))
        elif name == "instruction":
            values = task_metrics.rouge_metrics(preds, refs)
        elif name == "grounding":
            values = task_metrics.grounding_accuracy(preds, refs)
        else:
            values = {"accuracy": task_metrics.accuracy(preds, [r[0] if r else "" for r in refs])}
        metrics.update({f"{name}/{k}": v for k, v in values.items()})
        metrics[f"{name}/samples"] = float(len(rows))
    return metrics


def paper_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The paper's numbers among ``metrics`` (``task_metrics.PAPER_METRICS``), as the original computes them."""
    return {f"{task}/{m}": metrics[f"{task}/{m}"] for task, names in task_metrics.PAPER_METRICS.items()
            for m in names if f"{task}/{m}" in metrics}


def evaluate_model(model, tokenizer, batches: Iterable[dict], cfg: DownstreamConfig, device: torch.device,
                   gather: Callable[[list], list] = lambda part: part, sync: Optional[RankSync] = None
                   ) -> tuple[dict[str, float], list[dict]]:
    """One evaluation: predictions and metrics. A task whose closed answer set comes from the data
    (VQA, classification without an answers file) costs a second pass over ``batches`` (so they must
    be re-iterable). In a multi-rank run pass ``gather`` (this rank's list -> every rank's lists
    concatenated; called the same number of times on every rank). Ranks decode independently unless
    ``sync`` is given: then they make the same sequence of model calls (ZeRO-3 gathers parameters
    collectively inside each of them; see ``downstream.predict``)."""
    sets = answer_sets(cfg)
    records, seen = predict(model, tokenizer, batches, cfg, sets, device, sync=sync)
    seen = gather(seen)
    if seen:
        found = sets_from_references(seen)
        sets.update(found)
        records += predict(model, tokenizer, batches, cfg, sets, device, only=set(found), sync=sync)[0]
    records = gather(records)
    return compute_metrics(records, cfg), records


class Evaluator:
    """Evaluation of one model on this rank's share of the eval data, the ranks agreeing on the result.

    ``model`` is the module to evaluate (DeepSpeed's ``engine.module`` or a plain model, in eval mode);
    ``plan``: the run's ZeRO policy; where it partitions the parameters, ``engine`` (the DeepSpeed engine of
    ``model``) lets decoding gather the whole model once, and ``log`` (rank 0's) says which way it decodes."""

    def __init__(self, model, device: torch.device, rank: int, world: int, plan: ZeroPlan,
                 beat: Callable[[str], None] = lambda phase: None, engine=None,
                 log: Callable[[str], None] = lambda line: None):
        self.model, self.device, self.rank, self.world, self.beat = model, device, rank, world, beat
        self.plan = plan
        self.engine = engine if plan.partitions_params else None
        self.log = log
        self.sync = RankSync() if plan.lockstep_decoding else None
        self.gathered: Optional[bool] = None  # under ZeRO-3: whether the last decoding ran on the whole model

    def gather(self, part: list) -> list:
        """Every rank's list, concatenated in rank order (the same on every rank)."""
        return dist_utils.gather_lists(part) if self.world > 1 else part

    @torch.no_grad()
    def loss_metrics(self, batches: Iterable[dict], forward_loss: Callable[[dict], object],
                     task_names: Sequence[str], max_batches: Optional[int] = None) -> dict:
        """Loss, perplexity and token accuracy (``eval_metrics``). ``forward_loss(batch)`` returns the
        per-sample ``sample_loss``, ``sample_nll``, ``sample_tokens``, ``sample_correct`` of a raw batch.
        ``max_batches``: global batches, over all ranks together (``data.loader.global_eval_batches``)."""
        from biomedgpt.data.loader import global_eval_batches

        records: list[tuple[str, int, float, float, int, int]] = []
        iterator = iter(global_eval_batches(batches, max_batches))
        last = None
        while True:
            batch = next(iterator, None)
            alive = dist_utils.all_reduce(torch.tensor([0.0 if batch is None else 1.0]), "max")
            if alive[0] == 0:
                break
            self.beat("eval")
            if batch is None:
                if last is None and self.sync is None:
                    continue  # its share was empty; only partitioned parameters need its calls
                if last is None:
                    raise RuntimeError(f"rank {self.rank} got no evaluation batch at all (eval.max_batches x "
                                       f"data.eval_batch_size is smaller than the number of ranks)")
                forward_loss(last)
                continue
            last = batch
            out = forward_loss(batch)
            task_ids = batch.get("task_ids", torch.zeros(len(batch["ids"]), dtype=torch.long)).tolist()
            records.extend(zip(batch["ids"], task_ids, out.sample_loss.tolist(), out.sample_nll.tolist(),
                               out.sample_tokens.tolist(), out.sample_correct.tolist()))
        return eval_metrics(self.gather(records), task_names)

    def task_metrics(self, tokenizer, batches: Iterable[dict], cfg: DownstreamConfig
                     ) -> tuple[dict[str, float], list[dict]]:
        """The task metrics by generation on the validation streams (decoded with ``cfg.validation()``, the
        settings the original validates with), and every rank's predictions (each sample once)."""
        self.beat("downstream eval")
        cfg = cfg.validation()
        with self.decoding_model(cfg.gather_memory_fraction) as whole:
            metrics, records = evaluate_model(self.model, tokenizer, batches, cfg, self.device, self.gather,
                                              None if whole else self.sync)
        if self.engine is not None:
            self.gathered = whole
        return metrics, unique_records(records)

    def decoding_model(self, fraction: float):
        """ZeRO-3: the whole model for this pass when it fits (yields True), else the partitioned one."""
        return self.plan.decoding_model(self.engine, self.device, fraction, self.log)
