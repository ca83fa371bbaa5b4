"""Downstream evaluation: decode every evaluation sample the way its task is judged, score with the
paper's metrics, write a results JSON and per-sample predictions.

Used two ways: inside training (``evaluate_model``, one call per evaluation, its metrics such as
``vqa/accuracy`` select the best checkpoint) and as a command on a model directory::

    biomedgpt evaluate recipe=finetune/vqa_rad model_dir=runs/vqa_rad/best output_dir=runs/vqa_rad/eval

(the recipe, a RunConfig file or packaged name, gives the ``data`` and ``eval.downstream`` sections).
How each task is decoded (``TASK_DEFAULTS``, overridable per task under ``downstream.tasks``):
VQA beam search inside a trie of the answer set (or every answer scored), captions and summaries by
beam search with n-gram blocking, NLI / classification / matching by scoring each closed answer,
grounding by beam search over location bins only.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from biomedgpt.data.config import DataConfig
from biomedgpt.data.tasks import TASK_NAMES
from biomedgpt.engine import task_metrics
from biomedgpt.engine.checkpointing import atomic_write_text
from biomedgpt.engine.config import ConfigError, load, parse_cli, to_dict
from biomedgpt.engine.eval_config import FIXED_ANSWERS, TASK_DEFAULTS, DownstreamConfig, EvaluateConfig, TaskEvalConfig
from biomedgpt.models.generation import TokenRange, Trie, decoder_prefixes, generate, score_candidates

# ----------------------------------------------------------------------------------------------
# Answer sets
# ----------------------------------------------------------------------------------------------


def read_answers(path: str | Path) -> list[str]:
    """A closed answer set: JSON list, JSON / pickle ``answer -> index`` (OFA's trainval_ans2label.pkl,
    ordered by index), or one answer per line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"answer set file {path} not found") from None
    if path.suffix == ".pkl":
        data = pickle.loads(raw)  # the released answer lists are pickles; only read files you trust
    elif path.suffix == ".json":
        data = json.loads(raw)
    else:
        data = [line.strip() for line in raw.decode("utf-8").splitlines() if line.strip()]
    if isinstance(data, dict):
        data = sorted(data, key=data.get)
    if not isinstance(data, list) or not data or not all(isinstance(a, str) for a in data):
        raise ValueError(f"{path}: expected a non-empty list of answers or an answer -> index mapping")
    return list(dict.fromkeys(a.strip() for a in data))


def answer_sets(cfg: DownstreamConfig) -> dict[str, list[str]]:
    """The closed answer sets known before reading the data: fixed lists and answer files."""
    sets = {name: list(values) for name, values in FIXED_ANSWERS.items()}
    for name in TASK_DEFAULTS:
        task = cfg.task(name)
        if task.answers is not None:
            sets[name] = read_answers(task.answers)
    return sets


def sets_from_references(seen: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Answer sets of (task, reference) pairs seen in the data (sorted, so every rank agrees)."""
    sets: dict[str, set[str]] = {}
    for name, answer in seen:
        sets.setdefault(name, set()).add(answer)
    return {name: sorted(values) for name, values in sets.items()}


def _limited(batches: Iterable[dict], max_batches: Optional[int]) -> Iterable[dict]:
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


# ----------------------------------------------------------------------------------------------
# Prediction
# ----------------------------------------------------------------------------------------------


def select_rows(batch: dict, rows: list[int], device: torch.device, dtype: torch.dtype) -> dict:
    """The model inputs, ids and references of some rows of a collated batch, on ``device``."""
    index = torch.tensor(rows)
    out = {}
    for key in ("src_tokens", "patch_images", "patch_masks", "prev_output_tokens", "target", "code_masks"):
        value = batch[key].index_select(0, index).to(device)
        out[key] = value.to(dtype) if key == "patch_images" and value.is_floating_point() else value  # uint8: the model normalises
    out["ids"] = [batch["ids"][i] for i in rows]
    out["references"] = [batch["references"][i] for i in rows] if "references" in batch else [[] for _ in rows]
    out["answer_types"] = [batch["answer_types"][i] for i in rows] if "answer_types" in batch else [None] * len(rows)
    return out


class RankSync:
    """Lockstep decoding across the ranks of the default process group (``generation.StepSync``), for
    models whose parameters are gathered collectively (ZeRO-3). Counts the decoder calls made only to
    keep step (``padding_calls``) and the rounds of batches (``rounds``)."""

    def __init__(self, device: torch.device):
        self.device = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        self.padding_calls = 0

    def _reduce(self, value: float, op) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor, op)
        return float(tensor.item())

    def all_done(self, done: bool) -> bool:
        return self._reduce(0.0 if done else 1.0, torch.distributed.ReduceOp.MAX) == 0.0

    def max_count(self, n: int) -> int:
        return int(self._reduce(float(n), torch.distributed.ReduceOp.MAX))

    def padded(self, calls: int) -> None:
        self.padding_calls += calls

    def gather(self, obj) -> list:
        parts: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, obj)
        return parts


class RootCalls:
    """A model whose ``encode`` / ``decode`` run as calls of the root module (its ``forward`` swapped for
    the call's duration), for ZeRO-3: the root's hooks gather the parameters registered as its external
    parameters (the embedding tables, read outside their modules' calls) and release them afterwards.
    Everything else is the model's."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def _call(self, method, *args, **kwargs):
        self.model.forward = method
        try:
            return self.model(*args, **kwargs)
        finally:
            del self.model.forward

    def encode(self, *args, **kwargs):
        return self._call(type(self.model).encode.__get__(self.model), *args, **kwargs)

    def decode(self, *args, **kwargs):
        return self._call(type(self.model).decode.__get__(self.model), *args, **kwargs)


def predict_task(model, tokenizer, name: str, sub: dict, task: TaskEvalConfig, answers: Optional[list[str]],
                 candidate_rows: int = 256, sync: Optional[RankSync] = None) -> list[dict]:
    """Prediction records of one task's rows (a ``select_rows`` batch): text, answer, or box."""
    prefixes = decoder_prefixes(sub["prev_output_tokens"], sub["target"])
    image = dict(patch_images=sub["patch_images"], patch_masks=sub["patch_masks"])
    mode = "after" if task.zero_shot else "before"
    records = [{"id": uid, "task": name, "references": refs} for uid, refs in zip(sub["ids"], sub["references"])]
    for record, answer_type in zip(records, sub["answer_types"]):
        if answer_type is not None:
            record["answer_type"] = answer_type
    if task.inference in ("trie", "candidates"):
        if not answers:
            raise ValueError(f"task {name}: {task.inference} inference needs an answer set (set "
                             f"downstream.tasks.{name}.answers or evaluate data with references)")
        encoded = [tokenizer.encode(" " + a) for a in answers]
        trie = Trie(encoded)
    if task.inference == "candidates":
        scores = score_candidates(model, sub["src_tokens"], encoded, prefix=prefixes, constraint=trie,
                                  constraint_mode=mode, max_rows=candidate_rows, sync=sync, **image)
        best = scores.argmax(1).tolist()
        for record, b, row in zip(records, best, scores.tolist()):
            record.update(prediction=answers[b], score=row[b])
        return records
    gen = dataclasses.replace(task.generation, constraint_mode=mode)
    constraint = None
    if task.inference == "trie":
        constraint = trie
        gen = dataclasses.replace(gen, max_len=max(len(e) for e in encoded), min_len=min(gen.min_len, 1))
    elif name == "grounding":
        constraint = TokenRange(tokenizer.first_bin_id, tokenizer.vocab_size)
    hyps = generate(model, sub["src_tokens"], cfg=gen, prefix=prefixes, constraint=constraint,
                    code_masks=sub["code_masks"], sync=sync, **image)
    for record, options, target in zip(records, hyps, sub["target"].tolist()):
        tokens = options[0].tokens if options else []
        record["score"] = options[0].score if options else float("-inf")
        if name == "grounding":
            record["prediction"] = _box(tokenizer, tokens)
            record["references"] = _box(tokenizer, [t for t in target if tokenizer.is_bin(t)])
        else:
            record["prediction"] = tokenizer.decode(tokens).strip()
    return records


def _box(tokenizer, tokens: list[int]) -> Optional[list[float]]:
    bins = [t for t in tokens if tokenizer.is_bin(t)]
    return [tokenizer.bin_to_coord(t) for t in bins[:4]] if len(bins) >= 4 else None


def _rounds(batches: Iterable[dict], max_batches: Optional[int], sync: Optional[RankSync]):
    """(batch or None, the tasks every rank has in this round): alone, each batch with its own tasks;
    synced, as many rounds as the rank with the most batches, ``None`` once this rank has run out."""
    iterator = iter(_limited(batches, max_batches))
    while True:
        batch = next(iterator, None)
        names = sorted({TASK_NAMES[t] for t in batch["task_ids"].tolist()}) if batch is not None else []
        if sync is None:
            if batch is None:
                return
            yield batch, names
            continue
        everyone = sync.gather(names if batch is not None else None)
        if all(part is None for part in everyone):
            return
        yield batch, sorted({n for part in everyone if part for n in part})


@torch.no_grad()
def predict(model, tokenizer, batches: Iterable[dict], cfg: DownstreamConfig, sets: dict[str, list[str]],
            device: torch.device, only: Optional[set[str]] = None, sync: Optional[RankSync] = None
            ) -> tuple[list[dict], list[tuple[str, str]]]:
    """Per-sample prediction records (id, task, prediction, references, score) over ``batches``.

    Rows of a task that needs a closed answer set not yet in ``sets`` are not decoded: their
    (task, reference) pairs are returned instead, to build the set for a second pass (``only``).
    With ``sync`` every rank decodes every task that any rank has in a round (a rank without rows of
    it, or without a batch, decodes one row of its last batch and drops the result), in lockstep.
    """
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    records: list[dict] = []
    seen: list[tuple[str, str]] = []
    last = None
    try:
        for batch, names in _rounds(batches, cfg.max_batches, sync):
            by_task: dict[str, list[int]] = {}
            if batch is not None:
                last = batch
                for row, task_id in enumerate(batch["task_ids"].tolist()):
                    by_task.setdefault(TASK_NAMES[task_id], []).append(row)
            for name in names:
                task = cfg.task(name)
                if only is not None and name not in only:
                    continue
                rows = by_task.get(name)
                if task.inference in ("trie", "candidates") and name not in sets:
                    if rows:
                        seen.extend((name, r.strip()) for i in rows for r in batch["references"][i])
                    continue
                if rows:
                    sub = select_rows(batch, rows, device, dtype)
                    records.extend(predict_task(model, tokenizer, name, sub, task, sets.get(name),
                                                cfg.candidate_rows, sync))
                elif sync is not None:  # keep step with the ranks that have rows of this task
                    if last is None:
                        raise RuntimeError("this rank got no evaluation batch at all")
                    predict_task(model, tokenizer, name, select_rows(last, [0], device, dtype), task,
                                 sets.get(name), cfg.candidate_rows, sync)
    finally:
        model.train(was_training)
    return records, seen


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def compute_metrics(records: list[dict]) -> dict[str, float]:
    """``<task>/<metric>`` for every task present (each sample id counted once)."""
    unique: dict[tuple[str, str], dict] = {}
    for record in records:
        unique.setdefault((record["task"], record["id"]), record)
    by_task: dict[str, list[dict]] = {}
    for record in unique.values():
        by_task.setdefault(record["task"], []).append(record)
    metrics: dict[str, float] = {}
    for name, rows in sorted(by_task.items()):
        preds = [r["prediction"] for r in rows]
        refs = [r["references"] for r in rows]
        if name == "vqa":
            values = task_metrics.vqa_accuracy(preds, refs, [r.get("answer_type") for r in rows])
        elif name in ("caption", "grounded_caption"):
            values = task_metrics.caption_metrics(preds, refs)
        elif name in ("summarization", "instruction"):
            values = task_metrics.rouge_metrics(preds, refs)
        elif name == "grounding":
            values = task_metrics.grounding_accuracy(preds, refs)
        else:
            values = {"accuracy": task_metrics.accuracy(preds, [r[0] if r else "" for r in refs])}
        metrics.update({f"{name}/{k}": v for k, v in values.items()})
        metrics[f"{name}/samples"] = float(len(rows))
    return metrics


def evaluate_model(model, tokenizer, batches: Iterable[dict], cfg: DownstreamConfig, device: torch.device,
                   gather: Callable[[list], list] = lambda part: part, sync: Optional[RankSync] = None
                   ) -> tuple[dict[str, float], list[dict]]:
    """One evaluation: predictions and metrics. A task whose closed answer set comes from the data
    (VQA, classification without an answers file) costs a second pass over ``batches`` (so they must
    be re-iterable). In a multi-rank run pass ``gather`` (this rank's list -> every rank's lists
    concatenated; called the same number of times on every rank). Ranks decode independently unless
    ``sync`` is given: then they make the same sequence of model calls (ZeRO-3 gathers parameters
    collectively inside each of them; see ``predict``)."""
    sets = answer_sets(cfg)
    records, seen = predict(model, tokenizer, batches, cfg, sets, device, sync=sync)
    seen = gather(seen)
    if seen:
        found = sets_from_references(seen)
        sets.update(found)
        records += predict(model, tokenizer, batches, cfg, sets, device, only=set(found), sync=sync)[0]
    records = gather(records)
    return compute_metrics(records), records


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def resolve(cfg: EvaluateConfig) -> tuple[DataConfig, DownstreamConfig]:
    """The data and downstream settings: explicit ones, else the recipe's (loaded as the RunConfig it is)."""
    recipe = None
    if cfg.recipe is not None:
        from biomedgpt.engine.run_config import RunConfig

        try:
            recipe = load(RunConfig, cfg.recipe)
        except ConfigError as exc:
            raise ConfigError(f"recipe {cfg.recipe}: {exc}") from None
    data = cfg.data or (recipe.data if recipe is not None else None)
    if data is None:
        raise ConfigError("give data (eval_streams) or a recipe")
    downstream = cfg.downstream or (recipe.eval.downstream if recipe is not None else None) or DownstreamConfig()
    if not data.eval_streams:
        raise ConfigError("no data.eval_streams to evaluate")
    return data, downstream


def load_model_and_tokenizer(model_dir: str | Path, bpe_dir: str | Path | None, device: torch.device):
    """A model directory's fp32 model (eval mode) and its tokenizer (or the canonical one)."""
    from biomedgpt.models.checkpoint import load_pretrained
    from biomedgpt.models.tokenizer import Tokenizer

    model = load_pretrained(model_dir).to(device).eval()
    tok_dir = Path(model_dir) / "tokenizer"
    tokenizer = Tokenizer.load(tok_dir) if tok_dir.is_dir() else Tokenizer.from_gpt2_files(bpe_dir)
    if tokenizer.vocab_size != model.cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but {model_dir} has vocab_size "
                         f"{model.cfg.vocab_size}")
    return model, tokenizer


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(cfg: EvaluateConfig) -> dict:
    """Evaluate and write ``results.json`` and ``predictions.jsonl`` into ``output_dir``."""
    from biomedgpt.data.loader import build_eval_loader

    data, downstream = resolve(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, gather, sync = 0, (lambda part: part), None
    if world > 1 or cfg.zero_stage == 3:
        from biomedgpt.engine.distributed import init_distributed

        info = init_distributed("auto")
        rank, world, device = info.rank, info.world_size, info.device

        def gather(part: list) -> list:
            parts: list = [None] * world
            torch.distributed.all_gather_object(parts, part)
            return [item for p in parts for item in p]
    else:
        device = pick_device(cfg.device)
    model, tokenizer = load_model_and_tokenizer(cfg.model_dir, cfg.bpe_dir, device)
    if cfg.zero_stage == 3:  # every rank reads the whole model, then keeps its partition
        import deepspeed

        from biomedgpt.engine.model_setup import register_external_parameters

        register_external_parameters(model)
        engine, _, _, _ = deepspeed.initialize(model=model, config={
            "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
        model = RootCalls(engine.module)
        sync = RankSync(device) if world > 1 else None
    loader = build_eval_loader(data, tokenizer, rank, world)
    start = time.perf_counter()
    metrics, records = evaluate_model(model, tokenizer, loader, downstream, device, gather, sync)
    elapsed = time.perf_counter() - start
    if rank != 0:
        return {"metrics": metrics}
    unique: dict[tuple[str, str], dict] = {}
    for record in records:  # ranks' shares are padded by repeating samples
        unique.setdefault((record["task"], record["id"]), record)
    records = list(unique.values())
    results = {"model_dir": str(cfg.model_dir), "metrics": metrics, "samples": len({r["id"] for r in records}),
               "seconds": elapsed, "eval_streams": [to_dict(s) for s in data.eval_streams],
               "downstream": {name: to_dict(downstream.task(name))
                              for name in sorted({r["task"] for r in records})}}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(EvaluateConfig, argv, description=__doc__.split("\n\n")[0])
    results = run(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        json.dump(results["metrics"], sys.stdout, indent=2)
        print()


if __name__ == "__main__":
    main()
