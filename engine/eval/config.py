"""Settings of evaluation by generation (in training: ``eval.downstream``; ``biomedgpt evaluate``), torch-free
so that a run config loads without importing the model (``biomedgpt.engine.eval.decoding`` does the work)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from biomedgpt.data.config import DataConfig
from biomedgpt.core.config import PathStr, deep_merge, from_dict, to_dict
from biomedgpt.models.config import GenerationConfig

Inference = Literal["generate", "trie", "candidates"]


@dataclass
class TaskEvalConfig:
    """How one task is decoded: free generation, beam search inside the answer trie, or scoring of
    every closed answer; ``zero_shot`` masks the answer set after the log-softmax (pretrained models)."""

    inference: Inference = "generate"
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    zero_shot: bool = False
    answers: Optional[PathStr] = None  # answer-set file (JSON list / ans2label JSON / lines); None: see below
    # Captions: OFA's cached CIDEr-D document frequencies (the original's --eval-cider-cached-tokens pickle
    # converted to JSON: docs/tasks-and-data.md) for caption/cider_d; None: from the evaluated references.
    cider_df: Optional[PathStr] = None


#: The inference settings per task: the original's test-time settings (scripts/*/evaluate_*.sh): VQA beam 1
#: with unnormalised scores inside the answer trie, captions beam 10 up to 32 tokens, summaries beam 5 with
#: length penalty 0.7 up to 128 tokens. Closed sets without a file: NLI / matching answers are fixed, VQA and
#: classification take every reference answer / class name seen in the evaluation data.
TASK_DEFAULTS: dict[str, TaskEvalConfig] = {
    "vqa": TaskEvalConfig("trie", GenerationConfig(beam_size=1, max_len=16, normalize_scores=False)),
    "caption": TaskEvalConfig("generate", GenerationConfig(beam_size=10, max_len=32, no_repeat_ngram_size=3)),
    "grounded_caption": TaskEvalConfig("generate", GenerationConfig(beam_size=5, max_len=32,
                                                                    no_repeat_ngram_size=3)),
    "summarization": TaskEvalConfig("generate", GenerationConfig(beam_size=5, max_len=128, len_penalty=0.7,
                                                                 no_repeat_ngram_size=3)),
    "instruction": TaskEvalConfig("generate", GenerationConfig(beam_size=5, max_len=256, no_repeat_ngram_size=3)),
    "nli": TaskEvalConfig("candidates"),
    "classification": TaskEvalConfig("candidates"),
    "itm": TaskEvalConfig("candidates"),
    "vqa_matching": TaskEvalConfig("candidates"),
    "grounding": TaskEvalConfig("generate", GenerationConfig(beam_size=5, min_len=4, max_len=4)),
}
FIXED_ANSWERS = {"nli": ["yes", "no", "maybe"], "itm": ["yes", "no"], "vqa_matching": ["yes", "no"]}


@dataclass
class DownstreamConfig:
    """Per-task settings over ``TASK_DEFAULTS`` (only what changes, e.g. ``{vqa: {inference: candidates}}``);
    ``valid_tasks`` over those in validation (in training and ``biomedgpt evaluate split=valid``), as the
    original decodes its validation set with other settings (``--eval-args``) than its test set."""

    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    valid_tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # e.g. {vqa: {generation: {beam_size: 5}}}
    # cap per evaluation (None: the whole evaluation set): the first max_batches x data.eval_batch_size
    # samples, over all ranks together
    max_batches: Optional[int] = None
    candidate_rows: int = 256  # decoder rows per chunk when scoring candidates (memory bound)
    # ZeRO-3: gather the whole model once per evaluation pass when it takes at most this share of the free
    # device memory (CPU: host memory, shared by the host's ranks); else per-module gathers in lockstep.
    # 0: always per module
    gather_memory_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.gather_memory_fraction <= 1.0:
            raise ValueError(f"gather_memory_fraction must be in [0, 1], got {self.gather_memory_fraction}")
        for name in {*self.tasks, *self.valid_tasks}:
            self.task(name)  # unknown tasks / keys are errors now, not mid-evaluation
        for name in self.valid_tasks:
            self.validation().task(name)

    def task(self, name: str) -> TaskEvalConfig:
        if name not in TASK_DEFAULTS:
            raise ValueError(f"task {name!r} has no downstream evaluation; evaluable: {sorted(TASK_DEFAULTS)}")
        merged = deep_merge(to_dict(TASK_DEFAULTS[name]), self.tasks.get(name, {}))
        return from_dict(TaskEvalConfig, merged, prefix=f"downstream.tasks.{name}.")

    def validation(self) -> "DownstreamConfig":
        """The settings validation decodes with: ``valid_tasks`` merged over ``tasks``."""
        tasks = {name: deep_merge(self.tasks.get(name, {}), self.valid_tasks.get(name, {}))
                 for name in {*self.tasks, *self.valid_tasks}}
        return dataclasses.replace(self, tasks=tasks, valid_tasks={})

    def for_split(self, split: Optional[str]) -> "DownstreamConfig":
        """The settings for evaluating streams of ``split`` (test, or untagged: ``tasks``; valid: ``validation()``)."""
        return self.validation() if split == "valid" else self


Split = Literal["train", "valid", "test"]


def selection_data(data: DataConfig, select_on_test: bool, selects: bool) -> DataConfig:
    """The data section in-training evaluation uses: the eval streams that are not a test split (those are
    for ``biomedgpt evaluate split=test``). Where every eval stream is a test split, training selects the
    best model on it only when told (``eval.select_on_test``): numbers picked on the test split are
    optimistic and not comparable with the paper's (the original selects on its val.tsv)."""
    kept = [s for s in data.eval_streams if s.split != "test"]
    if not kept and data.eval_streams:
        if selects and not select_on_test:
            names = ", ".join(s.name for s in data.eval_streams)
            raise ValueError(f"data.eval_streams ({names}) are all test splits: selecting the best model on the "
                             f"test split gives optimistic numbers; add the validation split as an eval stream "
                             f"(split: valid) or set eval.select_on_test=true")
        kept = list(data.eval_streams)
    return dataclasses.replace(data, eval_streams=kept)


def streams_of_split(data: DataConfig, split: Optional[Split]) -> DataConfig:
    """The data section with the eval streams of ``split`` only (None: every eval stream, which must then
    not mix splits: one metric per task would average over them)."""
    splits = sorted({str(s.split) for s in data.eval_streams})
    if split is None:
        if len(splits) > 1:
            raise ValueError(f"data.eval_streams hold several splits ({', '.join(splits)}): "
                             f"name one, e.g. split=test")
        return data
    kept = [s for s in data.eval_streams if s.split == split]
    if not kept:
        raise ValueError(f"no eval stream of split {split!r} (data.eval_streams hold: {', '.join(splits) or 'none'})")
    return dataclasses.replace(data, eval_streams=kept)
