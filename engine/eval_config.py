"""Settings of evaluation by generation (in training: ``eval.downstream``; ``biomedgpt evaluate``), torch-free
so that a run config loads without importing the model (``biomedgpt.engine.downstream`` does the work)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from biomedgpt.data.config import DataConfig
from biomedgpt.engine.config import PathStr, deep_merge, from_dict, to_dict
from biomedgpt.models.config import GenerationConfig

Inference = Literal["generate", "trie", "candidates"]


@dataclass
class TaskEvalConfig:
    """How one task is decoded: free generation, beam search inside the answer trie, or scoring of
    every closed answer; ``zero_shot`` masks the answer set after the log-softmax (pretrained models)."""

    inference: Inference = "generate"
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    zero_shot: bool = False
    answers: Optional[PathStr] = None  # answer-set file (JSON list / ans2label JSON or pickle / lines); None: see below


#: The spec's inference settings per task. Closed sets without a file: NLI / matching answers are fixed,
#: VQA and classification take every reference answer / class name seen in the evaluation data.
TASK_DEFAULTS: dict[str, TaskEvalConfig] = {
    "vqa": TaskEvalConfig("trie", GenerationConfig(beam_size=5, max_len=16)),
    "caption": TaskEvalConfig("generate", GenerationConfig(beam_size=5, max_len=32, no_repeat_ngram_size=3)),
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
    """Per-task settings over ``TASK_DEFAULTS`` (only what changes, e.g. ``{vqa: {inference: candidates}}``)."""

    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    # cap per evaluation (None: the whole evaluation set): the first max_batches x data.eval_batch_size
    # samples, over all ranks together
    max_batches: Optional[int] = None
    candidate_rows: int = 256  # decoder rows per chunk when scoring candidates (memory bound)

    def __post_init__(self) -> None:
        for name in self.tasks:
            self.task(name)  # unknown tasks / keys are errors now, not mid-evaluation

    def task(self, name: str) -> TaskEvalConfig:
        if name not in TASK_DEFAULTS:
            raise ValueError(f"task {name!r} has no downstream evaluation; evaluable: {sorted(TASK_DEFAULTS)}")
        merged = deep_merge(to_dict(TASK_DEFAULTS[name]), self.tasks.get(name, {}))
        return from_dict(TaskEvalConfig, merged, prefix=f"downstream.tasks.{name}.")


@dataclass
class EvaluateConfig:
    """Evaluate a model directory on the evaluation streams of a fine-tuning recipe (or given data)."""

    model_dir: PathStr
    recipe: Optional[str] = None  # a run config (file or packaged name): its data and eval.downstream are used
    data: Optional[DataConfig] = None  # replaces the recipe's data section
    downstream: Optional[DownstreamConfig] = None  # replaces the recipe's eval.downstream section
    output_dir: PathStr = "eval"
    device: str = "auto"  # auto: cuda when available
    bpe_dir: Optional[PathStr] = None  # tokenizer when the model directory has none (None: packaged GPT-2)
    # 3: partition the model across the launched ranks with DeepSpeed ZeRO-3 (ranks decode in lockstep).
    # Started by a launcher (launchers/local.sh -m biomedgpt.engine.downstream -n N), every rank evaluates
    # its share of the data; rank 0 writes the results.
    zero_stage: Literal[0, 3] = 0
