"""Task processors: one shard row -> the exact source / target token sequences of the original dataset classes.

Each processor restates the rules of the BiomedGPT/OFA dataset class its task comes from (text cleaning,
prompt, word and token limits, decoder prompt), so the ids equal the original's token for token
(docs/tasks-and-data.md; tests/test_task_parity.py holds them). Every source is ``<s> + BPE(prompt) + </s>``;
targets and decoder inputs follow each class (``BPE(text) + </s>`` / ``<s> + BPE(text)`` unless a decoder
prompt is fed). Prompts are encoded in pieces that meet at GPT-2 pre-token boundaries (a space or a quote),
so the ids equal those of the whole prompt string.
"""
from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image

from biomedgpt.data.config import DataConfig
from biomedgpt.data.images import boxed_transform, eval_transform, open_image, transform_image
from biomedgpt.data.records import clean_caption, clean_question

BOS, PAD, EOS = 0, 1, 2
TEXT_INFILL_READ_TOKENS = 512  # text infilling encodes up to 512 tokens of a row ...
TEXT_INFILL_MAX_TOKENS = 256  # ... and keeps the last 256 (OFA's UnifyDataset)
VQA_MAX_OBJECTS = 30  # objects appended to a VQA question (OFA --max-object-length, 30 in every script)
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
    # answer -> confidence (VQA); the metric does the original's cleaning (engine/eval/metrics.py)
    references: list[str] | dict[str, float] = field(default_factory=list)
    answer_type: Optional[str] = None  # VQA: "open" / "closed" when the dataset annotates it
    sample_patches: bool = False  # patch sampling (sample_patch_num) applies: pretraining image-text rows


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
        cfg = self.cfg
        return transform_image(row_image(record), cfg.patch_image_size, cfg.train_transform if self.train else None,
                               self.rng, cfg.image_mean, cfg.image_std)

    @property
    def box_rng(self) -> random.Random | None:
        """The RNG of boxed tasks' random crop (training with ``ofa_augment``), else None: a plain resize."""
        return self.rng if (self.train and self.cfg.train_transform == "ofa_augment") else None

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
               extra: list[int] | None = None, limit: Optional[int] = None) -> list[int]:
    """``<s> prefix text suffix [extra] </s>``; with ``limit``, ``text`` is cut so the whole fits it (the
    original classes cut words, not tokens: only instruction rows use a limit)."""
    head, tail = ctx.prompt(prefix), ctx.prompt(suffix) + list(extra or [])
    body = ctx.encode(text)
    if limit is not None:
        body = body[: max(limit - 2 - len(head) - len(tail), 0)]
    return [BOS] + head + body + tail + [EOS]


def text_example(ctx: TaskContext, record: dict, task: str, source: list[int], target_text: str,
                 image: Optional[torch.Tensor], conf: float = 1.0,
                 references: list[str] | dict[str, float] | None = None,
                 target_ids: list[int] | None = None, max_tokens: Optional[int] = None) -> Example:
    """``<s> + ids`` -> ``ids + </s>`` for a text target (or given ids); ``max_tokens`` cuts the ids (the
    original classes keep whole targets, their limits being in words, except where a processor says)."""
    ids = target_ids if target_ids is not None else ctx.encode(target_text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return Example(uid=record["id"], task=task, source=source, prev_output=[BOS] + ids, target=ids + [EOS],
                   image=image, conf=conf, loss_group=ctx.loss_group, references=references or [])


def decoder_prompt(example: Example, prompt_type: str) -> Example:
    """OFA's ``--prompt-type`` on a ``<s> + answer -> answer + </s>`` example: ``src`` feeds the whole
    source to the decoder before the answer, ``prev_output`` the source without ``</s>``; the target is pad
    over the prompt (no loss there)."""
    if prompt_type == "none":
        return example
    prompt = example.source if prompt_type == "src" else example.source[:-1]
    answer = example.prev_output[1:]
    example.prev_output = prompt + answer
    example.target = [PAD] * (len(prompt) - 1) + example.target
    return example


def _max_words(ctx: TaskContext, target: bool) -> int:
    return ctx.cfg.max_tgt_tokens if target else ctx.cfg.max_src_tokens


# ----- image-text tasks -------------------------------------------------------------------------

PUNCTUATION = str.maketrans({c: None for c in string.punctuation})


def caption(record: dict, ctx: TaskContext, image=None) -> list[Example]:
    """Fine-tuning captioning (OFA's CaptionDataset): punctuation removed, case kept; in training one
    reference cut to max_tgt_tokens words; in evaluation every reference, joined by ``&&``."""
    refs = [" ".join(c.split()).translate(PUNCTUATION).strip() for c in record["meta"]["captions"]]
    if ctx.train:
        chosen = " ".join(ctx.rng.choice(refs).split()[: ctx.cfg.max_tgt_tokens])
    else:
        chosen = "&&".join(refs)
    image = ctx.image(record) if image is None else image
    src = source_ids(ctx, " what does the image describe?")
    return [text_example(ctx, record, "caption", src, f" {chosen}", image,
                         references=[str(c) for c in record["meta"]["captions"]])]


def pretrain_caption(record: dict, ctx: TaskContext, image) -> list[Example]:
    """Pretraining captioning (OFA's UnifyDataset): pre_caption, max_tgt_tokens words."""
    cap = clean_caption(record["meta"]["captions"][0], _max_words(ctx, True))
    src = source_ids(ctx, " what does the image describe?")
    return [text_example(ctx, record, "caption", src, f" {cap}", image, references=[cap])]


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


def vqa(record: dict, ctx: TaskContext, image=None) -> list[Example]:
    """Fine-tuning VQA (OFA's VqaGenDataset): `` {question}?`` [`` object: {objects}``], the most confident
    answer cut to max_tgt_tokens tokens and weighted by its confidence, the decoder prompt of
    ``vqa_prompt_type``."""
    meta = record["meta"]
    question = clean_question(meta["question"], _max_words(ctx, False))
    if not question.endswith("?"):
        question += "?"
    answers = {str(a): float(c) for a, c in meta["answers"].items()}
    answer = max(answers, key=answers.get)
    extra = []
    if ctx.cfg.vqa_add_objects:  # the original appends it for an empty objects column too
        extra = ctx.encode(" object: " + " ".join((meta.get("objects") or [])[:VQA_MAX_OBJECTS]))
    src = source_ids(ctx, "", " " + question, "", extra)
    image = ctx.image(record) if image is None else image
    example = text_example(ctx, record, "vqa", src, f" {answer}", image, conf=answers[answer],
                           references=answers, max_tokens=ctx.cfg.max_tgt_tokens)
    example.answer_type = meta.get("answer_type")
    return [decoder_prompt(example, ctx.cfg.vqa_prompt_type)]


def pretrain_vqa(record: dict, ctx: TaskContext, image) -> list[Example]:
    """Pretraining VQA (OFA's UnifyDataset): the question as cleaned (no ``?`` added), no decoder prompt."""
    meta = record["meta"]
    question = clean_question(meta["question"], _max_words(ctx, False))
    answers = {str(a): float(c) for a, c in meta["answers"].items()}
    answer = max(answers, key=answers.get)
    src = source_ids(ctx, "", " " + question)
    return [text_example(ctx, record, "vqa", src, f" {answer}", image, conf=answers[answer],
                         references=answers)]


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
    tensor, boxes = boxed_transform(image, [record["meta"]["box"]], ctx.cfg.patch_image_size, ctx.box_rng)
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
    """A vision_language row gives its task example plus a second one: matching (training only) or, for a
    grounding row, the region caption (always, as the original)."""
    kind = record["kind"]
    if kind == "grounding":
        view = _grounding_view(record, ctx)
        out = grounding(record, ctx, view) + grounded_caption(record, ctx, view)
    else:
        image = ctx.image(record)
        first, second = (pretrain_caption, itm) if kind == "caption" else (pretrain_vqa, vqa_matching)
        out = first(record, ctx, image) + (second(record, ctx, image) if ctx.train else [])
    for example in out:  # OFA samples patches of this sub-batch only
        example.sample_patches = True
    return out


# ----- text infilling, image infilling, detection -----------------------------------------------

def text_infilling(record: dict, ctx: TaskContext) -> list[Example]:
    """BART-style infilling of `` {text}`` lower-cased: of its first 512 tokens the last 256 are kept."""
    text = str(record["meta"]["text"]).strip().lower()
    ids = ctx.encode(" " + text)[:TEXT_INFILL_READ_TOKENS][-TEXT_INFILL_MAX_TOKENS:]
    masked = mask_spans(ids, ctx)
    src = ([BOS] + ctx.prompt(' what is the complete text of "') + masked + ctx.prompt(' "?') + [EOS])
    return [Example(uid=record["id"], task="text_infilling", source=src, prev_output=[BOS] + ids,
                    target=ids + [EOS], loss_group=ctx.loss_group)]


def mask_spans(ids: list[int], ctx: TaskContext) -> list[int]:
    """fairseq's whole-word span masking (``mask_length=span-poisson``, ``replace_length=1``).

    ⌈text_mask_ratio × words⌉ words are masked in spans of Poisson(λ) words drawn until they cover that
    budget (the last span trimmed), started at distinct random word starts; a span's first token becomes
    ``<mask>`` and the rest of its words are deleted (spans may meet: two ``<mask>``; overlap: one).
    Zero-length spans insert a ``<mask>`` at a random inner position instead. A leading piece of a word
    cut by the 256-token window is not a word start, so it is never masked.
    """
    item = [BOS] + ids + [EOS]
    starts = [False] + [ctx.is_word_start(t) for t in ids] + [False]
    budget = math.ceil(sum(starts) * ctx.cfg.text_mask_ratio)
    if budget == 0:
        return list(ids)
    np_rng = np.random.default_rng(ctx.rng.getrandbits(63))
    lengths: list[int] = []
    while sum(lengths) < budget:
        lengths.append(int(np_rng.poisson(ctx.cfg.poisson_lambda)))
    lengths[-1] -= sum(lengths) - budget
    spans = [n for n in lengths if n > 0]
    inserts = len(lengths) - len(spans)
    keep = [True] * len(item)
    word_starts = [i for i, s in enumerate(starts) if s]
    for start, length in zip(np_rng.permutation(word_starts)[: len(spans)].tolist(), spans):
        item[start] = ctx.tokenizer.mask_id
        left, j = length - 1, start + 1
        while j < len(item) - 1:  # a span never runs over </s>
            left -= starts[j]
            if left < 0:
                break
            keep[j] = False
            j += 1
    out = [t for t, k in zip(item, keep) if k]
    if inserts:
        count = math.ceil(len(out) * (inserts / len(out)))
        where = set((np_rng.permutation(len(out) + count - 2)[:count] + 1).tolist())
        rest = iter(out)
        out = [ctx.tokenizer.mask_id if i in where else next(rest) for i in range(len(out) + count)]
    return out[1:-1]


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
    """Every box the transform keeps, in order: 4 bins + BPE(" label") (no length cut, as the original)."""
    meta = record["meta"]
    image, boxes = boxed_transform(row_image(record), meta["boxes"], ctx.cfg.patch_image_size, ctx.box_rng)
    ids: list[int] = []
    for box in boxes:
        ids.extend(ctx.bins(box) + ctx.encode(" " + meta["labels"][int(box[4])]))
    src = source_ids(ctx, " what are the objects in the image?")
    return [text_example(ctx, record, "detection", src, "", image, target_ids=ids)]


# ----- fine-tuning text and classification tasks ------------------------------------------------

def nli(record: dict, ctx: TaskContext) -> list[Example]:
    """MedNLI (OFA's MNLIDataset): sentences lower-cased, whitespace squeezed, cut to max_src_tokens words;
    the answer is one token without ``</s>``, scored after the decoder prompt of ``text_prompt_type``."""
    meta = record["meta"]
    s1, s2 = (" ".join(str(meta[k]).lower().split()[: ctx.cfg.max_src_tokens]) for k in ("s1", "s2"))
    src = [BOS] + ctx.encode(f' can text1 " {s1} " imply text2 " {s2} "?') + [EOS]
    answer = NLI_ANSWERS[meta["label"]]
    token = ctx.prompt(answer)
    prompt = {"none": [BOS], "src": src, "prev_output": src[:-1]}[ctx.cfg.text_prompt_type]
    return [Example(uid=record["id"], task="nli", source=src, prev_output=list(prompt),
                    target=[PAD] * (len(prompt) - 1) + token, loss_group=ctx.loss_group,
                    references=[answer.strip()])]


def summarization(record: dict, ctx: TaskContext) -> list[Example]:
    """OFA's SummaryDataset: pre_caption on both sides, prompt + source cut together to max_src_tokens
    tokens, the summary without a leading space; in training ``noise_ratio`` of the decoder inputs (after
    ``<s>``) are replaced by random text ids."""
    meta = record["meta"]
    text = clean_caption(meta["source"], _max_words(ctx, False)).replace("<unk>", "unk")
    summary = clean_caption(meta["summary"], _max_words(ctx, True)).replace("<unk>", "unk")
    body = ctx.encode(f' what is the summary of article " {text} "?')[: ctx.cfg.max_src_tokens]
    example = text_example(ctx, record, "summarization", [BOS] + body + [EOS], summary, None,
                           references=[str(meta["summary"]).lower()])
    if ctx.train and ctx.cfg.noise_ratio > 0:
        example.prev_output = [BOS] + add_noise(example.prev_output[1:], ctx)
    return [example]


def add_noise(ids: list[int], ctx: TaskContext) -> list[int]:
    """Each token replaced, with probability noise_ratio, by a uniform id in [4, first code) (OFA's range:
    any text entry, ``<mask>`` included)."""
    high = ctx.tokenizer.first_code_id
    return [ctx.rng.randrange(4, high) if ctx.rng.random() < ctx.cfg.noise_ratio else t for t in ids]


def classification(record: dict, ctx: TaskContext) -> list[Example]:
    """MedMNIST (OFA's ImageClassifyDataset): `` {label name}`` as written, whole."""
    name = str(record["meta"]["label_name"])
    src = source_ids(ctx, " what does the image describe?")
    return [text_example(ctx, record, "classification", src, f" {name}", ctx.image(record), references=[name])]


def instruction(record: dict, ctx: TaskContext) -> list[Example]:
    """Free-form instruction tuning: `` {instruction}`` -> `` {response}``, judged against the whole response.

    A project addition (no original class): the instruction is cut so the source fits max_src_tokens and
    the target to max_tgt_tokens with ``</s>``. The text is kept as written (case, punctuation, line breaks: responses are free text); a row without
    an image is text-only.
    """
    meta = record["meta"]
    text, response = str(meta["instruction"]).strip(), str(meta["response"]).strip()
    src = source_ids(ctx, "", " " + text, limit=ctx.cfg.max_src_tokens)
    image = ctx.image(record) if record["image"] else None
    return [text_example(ctx, record, "instruction", src, f" {response}", image, references=[response],
                         max_tokens=ctx.cfg.max_tgt_tokens - 1)]


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
