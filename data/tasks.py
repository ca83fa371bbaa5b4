"""Task processors: one shard row -> the exact source / target token sequences of the spec's tasks.

Every source is ``<s> + BPE(prompt) + </s>``, every target ``BPE(text) + </s>`` and the decoder input
``<s> + BPE(text)`` (docs/tasks-and-data.md). Prompts are encoded in pieces that meet at
GPT-2 pre-token boundaries (a space or a quote), so the ids equal those of the whole prompt string while
the free text in the middle can be cut to the length limit without cutting the prompt.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image

from biomedgpt.data.config import DataConfig
from biomedgpt.data.images import boxed_transform, eval_transform, open_image, train_transform
from biomedgpt.data.records import clean_caption, clean_question

BOS, PAD, EOS = 0, 1, 2
TEXT_INFILL_MAX_TOKENS = 256
#: Example-level tasks; a batch's ``task_ids`` index this tuple.
TASK_NAMES = ("caption", "itm", "vqa", "vqa_matching", "grounding", "grounded_caption", "text_infilling",
              "image_infilling", "detection", "nli", "summarization", "classification", "instruction")
NLI_ANSWERS = {"entailment": " yes", "contradiction": " no", "neutral": " maybe"}


@dataclass
class Example:
    """One model example before collation (token lists include ``<s>`` / ``</s>`` as they go in)."""

    uid: str
    task: str
    source: list[int]
    prev_output: list[int]
    target: list[int]
    image: Optional[torch.Tensor] = None  # uint8 [3, H, W] (0..255), None for text-only
    code_mask: bool = False
    conf: float = 1.0
    loss_group: int = 0
    # what evaluation scores against, as the original's evaluation reads it: the raw text (captions, summaries),
    # answer -> confidence (VQA); the metric does the original's cleaning (engine/task_metrics.py)
    references: list[str] | dict[str, float] = field(default_factory=list)
    answer_type: Optional[str] = None  # VQA: "open" / "closed" when the dataset annotates it


@dataclass
class TaskContext:
    """What a processor needs besides the row: tokenizer, settings, this sample's RNG, other rows."""

    tokenizer: Any
    cfg: DataConfig
    rng: random.Random
    train: bool
    other_row: Callable[[random.Random], dict]  # a random row of the same stream (ITM / matching negatives)
    loss_group: int = 0
    _word_start: dict = field(default_factory=dict)
    prompts: dict = field(default_factory=dict)  # prompt text -> ids; the dataset shares one across samples

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text)) if text else []

    def prompt(self, text: str) -> list[int]:
        """``encode`` of a constant prompt piece, cached (a bounded number of distinct pieces)."""
        ids = self.prompts.get(text)
        if ids is None:
            ids = self.encode(text)
            if len(self.prompts) < 4096:
                self.prompts[text] = ids
        return list(ids)

    def image(self, record: dict) -> torch.Tensor:
        image = row_image(record)
        size = self.cfg.patch_image_size
        if self.train and self.cfg.augment:
            return train_transform(image, size, self.rng)
        return eval_transform(image, size)

    def bins(self, box: list[float]) -> list[int]:
        """Patch-pixel coordinates -> ``<bin_round(c / max_image_size * (num_bins - 1))>`` ids."""
        limit = self.cfg.max_image_size
        return [self.tokenizer.coord_to_bin(min(max(c, 0.0), limit), limit) for c in box[:4]]

    def is_word_start(self, token: int) -> bool:
        if token not in self._word_start:
            self._word_start[token] = self.tokenizer.id_to_token(token).startswith("\u0120")  # GPT-2's space
        return self._word_start[token]


def row_image(record: dict) -> Image.Image:
    """The row's image, opened (pixels decoded by the transform, at the scale it needs); a corrupt one
    raises BadRecord naming the row."""
    return open_image(record["image"], f"row {record['id']!r}")


def source_ids(ctx: TaskContext, prefix: str, text: str = "", suffix: str = "",
               extra: list[int] | None = None) -> list[int]:
    """``<s> prefix text suffix [extra] </s>`` with ``text`` cut so the whole fits max_src_tokens."""
    head, tail = ctx.prompt(prefix), ctx.prompt(suffix) + list(extra or [])
    budget = max(ctx.cfg.max_src_tokens - 2 - len(head) - len(tail), 0)
    return [BOS] + head + ctx.encode(text)[:budget] + tail + [EOS]


def text_example(ctx: TaskContext, record: dict, task: str, source: list[int], target_text: str,
                 image: Optional[torch.Tensor], conf: float = 1.0,
                 references: list[str] | dict[str, float] | None = None,
                 target_ids: list[int] | None = None) -> Example:
    """An example whose target is text (or given ids), cut to max_tgt_tokens including ``</s>``."""
    ids = target_ids if target_ids is not None else ctx.encode(target_text)
    ids = ids[: ctx.cfg.max_tgt_tokens - 1]
    return Example(uid=record["id"], task=task, source=source, prev_output=[BOS] + ids, target=ids + [EOS],
                   image=image, conf=conf, loss_group=ctx.loss_group, references=references or [])


def _max_words(ctx: TaskContext, target: bool) -> int:
    return ctx.cfg.max_tgt_tokens if target else ctx.cfg.max_src_tokens


# ----- image-text tasks -------------------------------------------------------------------------

def caption(record: dict, ctx: TaskContext, image=None) -> list[Example]:
    refs = [clean_caption(c, _max_words(ctx, True)) for c in record["meta"]["captions"]]
    chosen = ctx.rng.choice(refs) if ctx.train else refs[0]
    image = ctx.image(record) if image is None else image
    src = source_ids(ctx, " what does the image describe?")
    return [text_example(ctx, record, "caption", src, f" {chosen}", image,
                         references=[str(c) for c in record["meta"]["captions"]])]


def itm(record: dict, ctx: TaskContext, image=None) -> list[Example]:
    """Image-text matching: the row's caption (yes) or, half the time, another row's caption (no)."""
    own = record["meta"]["captions"][0]
    text, answer = own, " yes"
    if ctx.rng.random() < 0.5:
        other = _other_caption(ctx, own)
        if other is not None:
            text, answer = other, " no"
    image = ctx.image(record) if image is None else image
    src = source_ids(ctx, ' does the image describe "', " " + clean_caption(text, _max_words(ctx, False)), ' "?')
    return [text_example(ctx, record, "itm", src, answer, image, references=[answer.strip()])]


def _other_caption(ctx: TaskContext, own: str, tries: int = 8) -> Optional[str]:
    for _ in range(tries):
        row = ctx.other_row(ctx.rng)
        captions = row["meta"].get("captions") or ([row["meta"]["caption"]] if "caption" in row["meta"] else [])
        if captions and clean_caption(captions[0]) != clean_caption(own):
            return captions[0]
    return None


def vqa(record: dict, ctx: TaskContext, image=None, finetune: bool = True) -> list[Example]:
    """VQA: the most confident answer is the target and its confidence weights the loss."""
    meta = record["meta"]
    question = clean_question(meta["question"], _max_words(ctx, False))
    if finetune and not question.endswith("?"):
        question += "?"
    answers = {str(a): float(c) for a, c in meta["answers"].items()}
    answer = max(answers, key=answers.get)
    objects = meta.get("objects") or []
    extra = ctx.encode(" object: " + " ".join(objects)) if ctx.cfg.vqa_add_objects and objects else []
    src = source_ids(ctx, "", " " + question, "", extra)
    image = ctx.image(record) if image is None else image
    example = text_example(ctx, record, "vqa", src, f" {answer}", image, conf=answers[answer],
                           references=answers)
    example.answer_type = meta.get("answer_type")
    if finetune and ctx.cfg.vqa_prompt_type == "prev_output":
        prefix = src[1:-1]  # the question (and objects) without <s> / </s>
        answer_ids = example.target[:-1]
        example.prev_output = [BOS] + prefix + answer_ids
        example.target = [PAD] * len(prefix) + answer_ids + [EOS]
    return [example]


def vqa_matching(record: dict, ctx: TaskContext, image=None) -> list[Example]:
    """Is answer a the answer to question q? Negative: another answer of the same question type."""
    meta = record["meta"]
    question = clean_question(meta["question"], _max_words(ctx, False))
    answer = max(meta["answers"], key=meta["answers"].get)
    shown, reply = answer, " yes"
    if ctx.rng.random() < 0.5:
        negative = _negative_answer(ctx, answer)
        if negative is not None:
            shown, reply = negative, " no"
    src = source_ids(ctx, ' what is the answer to question "', " " + question, f' ". is " {shown} "?')
    image = ctx.image(record) if image is None else image
    return [text_example(ctx, record, "vqa_matching", src, reply, image, references=[reply.strip()])]


def answer_type(answer: str) -> str:
    """Question type judged from its answer: yes/no, number, or other."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "number" if answer.replace(".", "", 1).isdigit() else "other"


def _negative_answer(ctx: TaskContext, answer: str, tries: int = 8) -> Optional[str]:
    if answer in ("yes", "no"):
        return "no" if answer == "yes" else "yes"
    kind = answer_type(answer)
    for _ in range(tries):
        answers = ctx.other_row(ctx.rng)["meta"].get("answers") or {}
        for candidate in answers:
            if candidate != answer and answer_type(candidate) == kind:
                return candidate
    return None


def _grounding_view(record: dict, ctx: TaskContext) -> tuple[torch.Tensor, list[int]]:
    image = row_image(record)
    rng = ctx.rng if (ctx.train and ctx.cfg.augment) else None
    tensor, boxes = boxed_transform(image, [record["meta"]["box"]], ctx.cfg.patch_image_size, rng)
    return tensor, ctx.bins(boxes[0])


def grounding(record: dict, ctx: TaskContext, view=None) -> list[Example]:
    image, bins = view or _grounding_view(record, ctx)
    text = " " + clean_caption(record["meta"]["caption"], _max_words(ctx, False))
    src = source_ids(ctx, ' which region does the text "', text, ' " describe?')
    return [text_example(ctx, record, "grounding", src, "", image, target_ids=bins)]


def grounded_caption(record: dict, ctx: TaskContext, view=None) -> list[Example]:
    image, bins = view or _grounding_view(record, ctx)
    src = source_ids(ctx, "  what does the region describe? region:", extra=bins)
    cap = clean_caption(record["meta"]["caption"], _max_words(ctx, True))
    return [text_example(ctx, record, "grounded_caption", src, f" {cap}", image, references=[cap])]


def pretrain_vl(record: dict, ctx: TaskContext) -> list[Example]:
    """A vision_language row gives its task example plus (training) a matching / region example."""
    kind = record["kind"]
    if kind == "grounding":
        view = _grounding_view(record, ctx)
        out = grounding(record, ctx, view)
        return out + grounded_caption(record, ctx, view) if ctx.train else out
    image = ctx.image(record)
    if kind == "caption":
        out = caption(record, ctx, image)
        return out + itm(record, ctx, image) if ctx.train else out
    out = vqa(record, ctx, image, finetune=False)
    return out + vqa_matching(record, ctx, image) if ctx.train else out


# ----- text infilling, image infilling, detection -----------------------------------------------

def text_infilling(record: dict, ctx: TaskContext) -> list[Example]:
    """BART-style: 30% of whole words masked in Poisson(3)-length spans, one ``<mask>`` per span."""
    ids = ctx.encode(" " + " ".join(record["meta"]["text"].split()))[:TEXT_INFILL_MAX_TOKENS]
    masked = mask_spans(ids, ctx)
    src = ([BOS] + ctx.prompt(' what is the complete text of "') + masked + ctx.prompt(' "?') + [EOS])
    return [Example(uid=record["id"], task="text_infilling", source=src, prev_output=[BOS] + ids,
                    target=ids + [EOS], loss_group=ctx.loss_group)]


def mask_spans(ids: list[int], ctx: TaskContext) -> list[int]:
    """Replace ~text_mask_ratio of the words, in spans of Poisson(λ) words (at least 1), by ``<mask>``."""
    starts = [i for i, t in enumerate(ids) if i == 0 or ctx.is_word_start(t)]
    words = [ids[s:e] for s, e in zip(starts, starts[1:] + [len(ids)])]
    to_mask = math.ceil(len(words) * ctx.cfg.text_mask_ratio)
    masked = [False] * len(words)
    count = 0
    np_rng = np.random.default_rng(ctx.rng.getrandbits(63))
    while count < to_mask:
        length = min(max(int(np_rng.poisson(ctx.cfg.poisson_lambda)), 1), to_mask - count)
        start = int(np_rng.integers(0, len(words)))
        for w in range(start, min(start + length, len(words))):
            if not masked[w]:
                masked[w] = True
                count += 1
    out: list[int] = []
    for w, word in enumerate(words):
        if not masked[w]:
            out.extend(word)
        elif w == 0 or not masked[w - 1]:
            out.append(ctx.tokenizer.mask_id)
    return out


def image_infilling(record: dict, ctx: TaskContext) -> list[Example]:
    """Centre half of the image zeroed; target: the 256 VQGAN codes of the centre."""
    size = ctx.cfg.patch_image_size
    image = eval_transform(row_image(record), size)
    lo, hi = size // 4, size - size // 4
    image[:, lo:hi, lo:hi] = 128  # mid grey: normalised 0.004 (uint8 has no 127.5, the original's 0.0)
    codes = [ctx.tokenizer.code_id(int(c)) for c in record["meta"]["codes"]]
    src = source_ids(ctx, " what is the image in the middle part?")
    return [Example(uid=record["id"], task="image_infilling", source=src, prev_output=[BOS] + codes,
                    target=codes + [EOS], image=image, code_mask=True, loss_group=ctx.loss_group)]


def detection(record: dict, ctx: TaskContext) -> list[Example]:
    """Per box (as many whole boxes as fit max_tgt_tokens): 4 bins + BPE(" label")."""
    meta = record["meta"]
    rng = ctx.rng if (ctx.train and ctx.cfg.augment) else None
    image, boxes = boxed_transform(row_image(record), meta["boxes"], ctx.cfg.patch_image_size, rng)
    ids: list[int] = []
    for box in boxes:
        piece = ctx.bins(box) + ctx.encode(" " + meta["labels"][int(box[4])])
        if len(ids) + len(piece) > ctx.cfg.max_tgt_tokens - 1:
            break
        ids.extend(piece)
    src = source_ids(ctx, " what are the objects in the image?")
    return [text_example(ctx, record, "detection", src, "", image, target_ids=ids)]


# ----- fine-tuning text and classification tasks ------------------------------------------------

def nli(record: dict, ctx: TaskContext) -> list[Example]:
    meta = record["meta"]
    limit = _max_words(ctx, False)
    s1, s2 = clean_caption(meta["s1"], limit), clean_caption(meta["s2"], limit)
    head = ctx.prompt(' can text1 "')
    mid = ctx.prompt(' " imply text2 "')
    tail = ctx.prompt(' "?')
    budget = max(ctx.cfg.max_src_tokens - 2 - len(head) - len(mid) - len(tail), 0)
    t1, t2 = ctx.encode(" " + s1), ctx.encode(" " + s2)
    t1 = t1[: max(budget - len(t2), budget // 2)]
    t2 = t2[: budget - len(t1)]
    src = [BOS] + head + t1 + mid + t2 + tail + [EOS]
    answer = NLI_ANSWERS[meta["label"]]
    return [text_example(ctx, record, "nli", src, answer, None, references=[answer.strip()])]


def summarization(record: dict, ctx: TaskContext) -> list[Example]:
    meta = record["meta"]
    text = " " + clean_caption(meta["source"], _max_words(ctx, False))
    summary = clean_caption(meta["summary"], _max_words(ctx, True))
    src = source_ids(ctx, ' what is the summary of article "', text, ' "?')
    return [text_example(ctx, record, "summarization", src, summary, None, references=[str(meta["summary"])])]


def classification(record: dict, ctx: TaskContext) -> list[Example]:
    name = str(record["meta"]["label_name"]).strip()
    src = source_ids(ctx, " what does the image describe?")
    return [text_example(ctx, record, "classification", src, f" {name}", ctx.image(record), references=[name])]


def instruction(record: dict, ctx: TaskContext) -> list[Example]:
    """Free-form instruction tuning: `` {instruction}`` -> `` {response}``, judged against the whole response.

    The text is kept as written (case, punctuation, line breaks: responses are free text); a row without
    an image is text-only.
    """
    meta = record["meta"]
    text, response = str(meta["instruction"]).strip(), str(meta["response"]).strip()
    src = source_ids(ctx, "", " " + text)
    image = ctx.image(record) if record["image"] else None
    return [text_example(ctx, record, "instruction", src, f" {response}", image, references=[response])]


def _single(fn):
    return lambda record, ctx: fn(record, ctx)


#: stream task -> (processor, record kinds it accepts)
PROCESSORS: dict[str, tuple[Callable[[dict, TaskContext], list[Example]], tuple[str, ...]]] = {
    "pretrain_vl": (pretrain_vl, ("caption", "vqa", "grounding")),
    "caption": (_single(caption), ("caption",)),
    "itm": (_single(itm), ("caption",)),
    "vqa": (_single(vqa), ("vqa",)),
    "vqa_matching": (_single(vqa_matching), ("vqa",)),
    "grounding": (_single(grounding), ("grounding",)),
    "grounded_caption": (_single(grounded_caption), ("grounding",)),
    "text_infilling": (text_infilling, ("text", "summarization")),
    "image_infilling": (image_infilling, ("image_codes",)),
    "detection": (detection, ("detection",)),
    "nli": (nli, ("nli",)),
    "summarization": (summarization, ("summarization",)),
    "classification": (classification, ("classification",)),
    "instruction": (instruction, ("instruction",)),
}


def process(task: str, record: dict, ctx: TaskContext) -> list[Example]:
    """Run stream task ``task`` on one row, naming the row and task when the row does not fit."""
    fn, kinds = PROCESSORS[task]
    if record["kind"] not in kinds:
        raise ValueError(f"row {record['id']!r} is a {record['kind']!r} row; task {task!r} takes {kinds}")
    if task == "text_infilling" and record["kind"] == "summarization":
        record = {**record, "meta": {"text": record["meta"]["source"]}}
    return fn(record, ctx)
