"""Decoding for evaluation: every evaluation sample decoded the way its task is judged, as a library for the
evaluator (``engine/eval/evaluator.py``: in training and ``biomedgpt evaluate``, ``tools/evaluate.py``) and
``biomedgpt infer`` (``tools/infer.py``).

How each task is decoded (``TASK_DEFAULTS``: the original's test settings, overridable per task under
``downstream.tasks``, and for validation under ``downstream.valid_tasks``):
VQA beam search inside a trie of the answer set (or every answer scored), captions and summaries by
beam search with n-gram blocking, NLI / classification / matching by scoring each closed answer,
grounding by beam search over location bins only. Closed answer sets come from files
(``data/answers.py``), fixed lists, or the references of the evaluated data. A model directory is loaded
for decoding on one process or partitioned across ranks (``start_ranks``, ``prepare_model``).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from biomedgpt.data.answers import read_answers
from biomedgpt.data.tasks import TASK_NAMES
from biomedgpt.engine.eval.config import FIXED_ANSWERS, TASK_DEFAULTS, DownstreamConfig, TaskEvalConfig
from biomedgpt.engine.distributed.zero import ZeroPlan
from biomedgpt.models.generation import EOS, TokenRange, Trie, decoder_prefixes, generate, score_candidates

# ----------------------------------------------------------------------------------------------
# Answer sets
# ----------------------------------------------------------------------------------------------


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

    def __init__(self):
        from biomedgpt.engine.distributed.process_group import collective_device

        self.device = collective_device()
        self.padding_calls = 0
        self.agree_s = 0.0  # inside the agreement collectives (waiting for the slower rank included)
        self.decode_calls, self.decode_s = 0, 0.0  # with time_calls: to price the padding calls

    def time_calls(self, decoder: torch.nn.Module) -> None:
        """Count and time ``decoder``'s calls (one padding call is one decoder call)."""
        def before(*_):
            self.started = time.perf_counter()

        def after(*_):
            self.decode_calls += 1
            self.decode_s += time.perf_counter() - self.started

        decoder.register_forward_pre_hook(before)
        decoder.register_forward_hook(after)

    def _reduce(self, value: float, op) -> float:
        start = time.perf_counter()
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor, op)
        self.agree_s += time.perf_counter() - start
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
        # a task trained without </s> after its answer (nli after the src prompt) is scored without it too
        with_eos = bool(sub["target"].eq(EOS).any(1).all())
        scores = score_candidates(model, sub["src_tokens"], encoded, prefix=prefixes, constraint=trie,
                                  constraint_mode=mode, max_rows=candidate_rows, sync=sync, with_eos=with_eos,
                                  **image)
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
    from biomedgpt.data.loader import global_eval_batches

    iterator = iter(global_eval_batches(batches, max_batches))
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
# A model directory to decode with (biomedgpt evaluate, biomedgpt infer)
# ----------------------------------------------------------------------------------------------


def load_tokenizer(model_dir: str | Path, bpe_dir: str | Path | None, vocab_size: int):
    """The model directory's tokenizer (or the canonical one), checked against the model's vocabulary."""
    from biomedgpt.models.tokenizer import Tokenizer

    tok_dir = Path(model_dir) / "tokenizer"
    tokenizer = Tokenizer.load(tok_dir) if tok_dir.is_dir() else Tokenizer.from_gpt2_files(bpe_dir)
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but {model_dir} has vocab_size {vocab_size}")
    return tokenizer


def load_model_and_tokenizer(model_dir: str | Path, bpe_dir: str | Path | None, device: torch.device):
    """A model directory's fp32 model (eval mode) and its tokenizer (or the canonical one)."""
    from biomedgpt.models.checkpoint import load_pretrained

    model = load_pretrained(model_dir).to(device).eval()
    return model, load_tokenizer(model_dir, bpe_dir, model.cfg.vocab_size)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclasses.dataclass
class Ranks:
    """This process's place among the launched ranks; ``gather``: this rank's list -> every rank's lists
    concatenated in rank order (collective; the list itself on one process)."""

    rank: int
    world: int
    device: torch.device
    gather: Callable[[list], list]


def start_ranks(zero_stage: int, device: str) -> Ranks:
    """Join the launched ranks (a launcher set WORLD_SIZE, or ZeRO-3 asks for DeepSpeed), else one process."""
    if not ZeroPlan(zero_stage, int(os.environ.get("WORLD_SIZE", "1"))).joins_ranks:
        return Ranks(0, 1, pick_device(device), lambda part: part)
    from biomedgpt.engine.distributed.process_group import gather_lists, init_distributed

    info = init_distributed("auto")
    return Ranks(info.rank, info.world_size, info.device, gather_lists)


def prepare_model(model_dir: str | Path, bpe_dir: str | Path | None, zero_stage: int, ranks: Ranks):
    """(model, tokenizer, sync, engine) for evaluation or inference. Stage 3: built partitioned across the
    ranks (``ZeroPlan.evaluation_engine``: no rank materialises the whole model), wrapped in DeepSpeed's
    ZeRO-3 ``engine`` (for ``decoding_model``); where ``ZeroPlan.lockstep_decoding`` ``sync`` makes the
    ranks decode in lockstep when the whole model does not fit."""
    plan = ZeroPlan(zero_stage, ranks.world)
    if not plan.partitions_params:
        model, tokenizer = load_model_and_tokenizer(model_dir, bpe_dir, ranks.device)
        return model, tokenizer, None, None
    engine = plan.evaluation_engine(model_dir, ranks.rank)
    tokenizer = load_tokenizer(model_dir, bpe_dir, engine.module.cfg.vocab_size)
    sync = None
    if plan.lockstep_decoding:
        sync = RankSync()
        sync.time_calls(engine.module.decoder)
    return engine.module, tokenizer, sync, engine


def decoding_model(engine, ranks: Ranks, fraction: float):
    """Context yielding whether decoding runs on the whole model: ZeRO-3 ``engine`` (``prepare_model``)
    gathered once when it fits (``zero.gathered_for_decoding``; rank 0 says which way on stderr); stage 0
    (``engine`` None): the model is whole already and the ranks independent, nothing to do."""
    if engine is None:
        return nullcontext(False)
    from biomedgpt.engine.distributed.zero import gathered_for_decoding

    log = (lambda line: print(line, file=sys.stderr, flush=True)) if ranks.rank == 0 else (lambda line: None)
    return gathered_for_decoding(engine, ranks.device, ranks.world, fraction, log)
