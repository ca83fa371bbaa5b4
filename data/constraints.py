"""Answer-set constraint masks for training: OFA's trie-constrained training of VQA, MedNLI and MedMNIST.

OFA's VQA, MNLI and image-classification datasets give every training example a ``constraint_mask``: per
target position, the tokens that the closed answer set allows after the answer so far (a trie over the
answers' token sequences, each ending in ``</s>``). Its criterion sets the other logits to -inf before the
log-softmax, so the loss and its label smoothing cover the answer set only (``engine/train/loss.py``).

What this adds to ``models.generation.Trie`` (the same trie decoding uses): the answer sets of a run's
training streams (an answer file, every answer of the training rows, or NLI's fixed set) and the [B, T, V]
masks of a collated batch. Positions outside an answer (decoder prompts, padding) and examples of other tasks
allow every token: the formula there is the unconstrained one, and no row is all -inf.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

from biomedgpt.data.answers import read_answers
from biomedgpt.data.config import DataConfig
from biomedgpt.data.tasks import NLI_ANSWERS, PAD, Example
from biomedgpt.models.generation import Trie

#: Stream tasks whose targets come from a closed answer set.
CONSTRAINED_TASKS = ("vqa", "nli", "classification")


class AnswerConstraints:
    """Per task, the trie of its answer set; ``masks`` builds a batch's ``constraint_masks``."""

    def __init__(self, tries: dict[str, Trie], vocab_size: int):
        self.tries, self.vocab_size = tries, vocab_size

    def masks(self, examples: Sequence[Example], length: int) -> torch.Tensor:
        """[B, length, vocab_size] bool: the answer set's next tokens at each answer position.

        An answer outside its task's set fails naming the example (a trie row without the target would
        make its loss infinite)."""
        out = torch.ones(len(examples), length, self.vocab_size, dtype=torch.bool)
        for row, ex in enumerate(examples):
            trie = self.tries.get(ex.task)
            if trie is None:
                continue
            start = next((i for i, t in enumerate(ex.target) if t != PAD), len(ex.target))
            for i in range(start, len(ex.target)):
                allowed = trie.next_tokens(ex.target[start:i])
                if ex.target[i] not in allowed:
                    raise ValueError(f"example {ex.uid!r} ({ex.task}): its target answer is not in the answer "
                                     "set; add it to data.answer_set, or set data.constrain_training=false")
                out[row, i] = False
                out[row, i, allowed] = True
        return out


def answer_ids(tokenizer, answers: Iterable[str], max_tokens: int | None) -> list[list[int]]:
    """Each answer's target tokens as the task processors build them: BPE of `` answer``, cut to ``max_tokens``
    (VQA: max_tgt_tokens; class names are kept whole: None)."""
    return [list(tokenizer.encode(" " + a))[:max_tokens] for a in answers]


def stream_answers(dataset, stream_index: int, task: str) -> set[str]:
    """Every answer of a training stream's rows (VQA: each answer of each row, classification: the labels)."""
    start = int(dataset.sample_offset_per_stream[stream_index])
    answers: set[str] = set()
    for sample_id in range(start, start + int(dataset.samples_per_stream[stream_index])):
        meta = dataset.get_item(sample_id)["meta"]
        if task == "vqa":
            answers.update(str(a) for a in meta["answers"])
        else:
            answers.add(str(meta["label_name"]))  # as written, like the classification processor
    return answers


def training_constraints(cfg: DataConfig, tokenizer, dataset) -> Optional[AnswerConstraints]:
    """The answer sets of ``cfg.streams`` (``data.constrain_training``): ``data.answer_set`` for VQA and
    classification (OFA's --ans2label-file), else every answer their training rows give; NLI's fixed
    yes / no / maybe. None when no stream has a closed answer set."""
    tasks = {s.task for s in cfg.streams if s.task in CONSTRAINED_TASKS}
    if not tasks:
        return None
    tries = {}
    if "nli" in tasks:
        tries["nli"] = Trie([list(tokenizer.encode(a)) for a in NLI_ANSWERS.values()])
    open_tasks = sorted(tasks - {"nli"})
    if open_tasks:
        if cfg.answer_set is not None:
            given = set(read_answers(cfg.answer_set))
            sets = {task: given for task in open_tasks}
        else:
            sets = {task: set() for task in open_tasks}
            for index, stream in enumerate(cfg.streams):
                if stream.task in sets:
                    sets[stream.task] |= stream_answers(dataset, index, stream.task)
        for task, answers in sets.items():
            limit = cfg.max_tgt_tokens if task == "vqa" else None
            tries[task] = Trie(answer_ids(tokenizer, sorted(answers), limit))
    return AnswerConstraints(tries, tokenizer.vocab_size)
