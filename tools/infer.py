"""Run a fine-tuned model on every task it trains: answer a question, caption, ground, classify an image;
summarise, judge entailment or follow an instruction in text (with an image or without).

    biomedgpt infer model_dir=runs/vqa_rad/best image=scan.dcm task=vqa 'question=what modality is this?' \
        answers=trainval_ans2label.json
    biomedgpt infer model_dir=runs/iu_xray/best images_dir=xrays/ task=caption output=captions.jsonl
    biomedgpt infer model_dir=M image=cxr.png task=grounding 'text=the left lung'
    biomedgpt infer model_dir=runs/meqsum/best task=summarization 'text=SUBJECT: ... MESSAGE: ...'
    biomedgpt infer model_dir=runs/mednli/best task=nli 'text=the premise' 'hypothesis=the hypothesis'
    biomedgpt infer model_dir=runs/instruct/best task=instruction 'text=list the findings' [image=cxr.png]

Images may be PNG, JPEG or DICOM (windowed as in the data converter); summarization and nli are text-only,
instruction takes an image or none. ``text=`` / ``question=`` are taken as written (no YAML parsing).
Prompts are built by the same task processors as training (``biomedgpt.data.tasks``), so they match what
the model was fine-tuned on, and each task is decoded as ``biomedgpt evaluate`` decodes it
(``engine.eval.config.TASK_DEFAULTS``): nli scores yes / no / maybe, classification scores the class names
of ``answers``, VQA searches inside the answer trie of ``answers`` (a file, as
``biomedgpt.data.answers.read_answers``: the fine-tuning set, e.g. OFA's ``trainval_ans2label.json``);
VQA without ``answers`` decodes unconstrained, and its rows say so. Prints one JSON line per image (or per
text) or writes them to ``output``; an unreadable image gets a line with its ``error`` and the command
exits non-zero after the others.

Across ranks (``biomedgpt infer -n 2 ...``, or torchrun / the deepspeed launcher): the images are dealt
out to the ranks, rank 0 writes every row in input order. ``zero_stage=3`` partitions the model across
the ranks (built partitioned, as ``biomedgpt evaluate zero_stage=3``); decoding gathers the whole model
once when it fits (``engine.distributed.zero.decoding_model``), else the ranks decode in lockstep
(``engine.eval.decoding.RankSync``), a rank without images left decoding a blank placeholder image.
"""
from __future__ import annotations

import dataclasses
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from biomedgpt.data.collate import collate
from biomedgpt.data.config import DataConfig
from biomedgpt.data.images import decode_image
from biomedgpt.data.records import make_record
from biomedgpt.data.tasks import TaskContext, process
from biomedgpt.core.durable import atomic_write_text
from biomedgpt.core.config import PathStr, parse_cli
from biomedgpt.core.user_errors import UserError, command
from biomedgpt.engine.distributed.process_group import configure_environment
from biomedgpt.data.answers import read_answers
from biomedgpt.engine.eval.config import FIXED_ANSWERS, TASK_DEFAULTS, DownstreamConfig
from biomedgpt.engine.eval.decoding import decoding_model, predict_task, prepare_model, select_rows, start_ranks
from biomedgpt.models.generation import GenerationConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
InferTask = Literal["vqa", "caption", "grounding", "classification", "summarization", "nli", "instruction"]
IMAGE_TASKS = ("vqa", "caption", "grounding", "classification")  # need an image
TEXT_ONLY_TASKS = ("summarization", "nli")  # take none
TEXT_TASKS = ("grounding", "summarization", "nli", "instruction")  # need text=
UNCONSTRAINED_VQA = ("unconstrained (free generation); give answers=trainval_ans2label.json (the fine-tuning "
                     "answer set) to decode inside it as biomedgpt evaluate does")


@dataclass
class InferConfig:
    """Run a model directory on one image or every image of a folder, or on a text."""

    model_dir: PathStr
    # one PNG / JPEG / DICOM file (vqa, caption, grounding, classification; optional for instruction)
    image: Optional[str] = None
    images_dir: Optional[str] = None  # batch mode: every image file in this folder (sorted by name)
    task: InferTask = "vqa"  # what to do with the image / text
    question: str = ""  # vqa, as written
    # as written: grounding the region's description, summarization the source, nli the premise, instruction the
    # instruction
    text: str = ""
    hypothesis: str = ""  # nli: the hypothesis (text= the premise)
    # closed answer set file: vqa decodes inside it as evaluate does (answers=trainval_ans2label.json; without it
    # unconstrained), classification scores its class names (required), nli its answers (default yes/no/maybe)
    answers: Optional[str] = None
    generation: Optional[GenerationConfig] = None  # None: the task's evaluation defaults
    image_size: int = 256  # the fine-tuning patch_image_size
    max_src_tokens: int = 80  # the fine-tuning data.max_src_tokens (longer prompts are cut)
    # the decoder prompt the model was fine-tuned with (data.vqa_prompt_type / data.text_prompt_type of its recipe:
    # VQA-RAD prev_output, MedNLI src)
    prompt_type: Literal["none", "src", "prev_output"] = "none"
    max_image_size: int = 512  # the bins' coordinate range (grounding)
    batch_size: int = 8  # images per forward pass (images_dir)
    output: Optional[str] = None  # JSONL file; None: standard output
    device: str = "auto"  # auto (cuda when there is one, else cpu), cpu, cuda or cuda:N
    bpe_dir: Optional[str] = None  # GPT-2 BPE files; None: the packaged copy
    zero_stage: Literal[0, 3] = 0  # 3: the model partitioned across the launched ranks (DeepSpeed ZeRO-3)
    # zero_stage=3: gather the whole model once when it takes at most this share of the free memory (as
    # evaluate's downstream.gather_memory_fraction); 0: decode per module in lockstep
    gather_memory_fraction: float = DownstreamConfig.gather_memory_fraction

    def __post_init__(self) -> None:
        if not 0.0 <= self.gather_memory_fraction <= 1.0:
            raise ValueError(f"gather_memory_fraction must be in [0, 1], got {self.gather_memory_fraction}")
        images = (self.image is not None) + (self.images_dir is not None)
        if images > 1 or (images == 0 and self.task in IMAGE_TASKS):
            raise ValueError("give exactly one of image= or images_dir=")
        if images and self.task in TEXT_ONLY_TASKS:
            raise ValueError(f"task {self.task} is text-only: leave out image= / images_dir=")
        if self.task == "vqa" and not self.question.strip():
            raise ValueError("task vqa needs question=")
        if self.task in TEXT_TASKS and not self.text.strip():
            raise ValueError(f"task {self.task} needs text=")
        if self.task == "nli" and not self.hypothesis.strip():
            raise ValueError("task nli needs hypothesis= (text= is the premise)")
        if self.task == "classification" and self.answers is None:
            raise ValueError("task classification needs answers= (the class names)")


def image_files(cfg: InferConfig) -> list[Optional[Path]]:
    """The input images in order; ``[None]``: one text-only input."""
    if cfg.image is None and cfg.images_dir is None:
        return [None]
    if cfg.image is not None:
        path = Path(cfg.image)
        if not path.is_file():
            raise UserError(f"image {path}: file not found")
        return [path]
    folder = Path(cfg.images_dir)
    if not folder.is_dir():
        raise UserError(f"images_dir {folder}: not a directory")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"images_dir {folder}: no {'/'.join(IMAGE_SUFFIXES)} files in it")
    return files


def _record(cfg: InferConfig, path: Optional[Path], data: bytes) -> dict:
    """A shard-style row for the task processor; its target fields are placeholders (never scored)."""
    meta = {"vqa": {"question": cfg.question, "answers": {"?": 1.0}},
            "caption": {"captions": ["?"]},
            "grounding": {"caption": cfg.text, "box": [0.0, 0.0, 1.0, 1.0]},
            "classification": {"label": 0, "label_name": "?"},
            "summarization": {"source": cfg.text, "summary": "?"},
            "nli": {"s1": cfg.text, "s2": cfg.hypothesis, "label": "entailment"},
            "instruction": {"instruction": cfg.text, "response": "?"}}[cfg.task]
    return make_record(str(path) if path is not None else "text", cfg.task, meta, data)


def _row(path: Optional[Path], prediction, score: float, original_size: Optional[tuple[int, int]],
         cfg: InferConfig, decoding: Optional[str]) -> dict:
    out = {**({"image": str(path)} if path is not None else {}), "task": cfg.task, "prediction": prediction,
           "score": score}
    if cfg.task == "vqa":
        out["question"] = cfg.question
        out["decoding"] = decoding
    if cfg.task in TEXT_TASKS:
        out["text"] = cfg.text
    if cfg.task == "nli":
        out["hypothesis"] = cfg.hypothesis
    if cfg.task == "grounding":
        if prediction is not None:  # patch pixels -> pixels of the original image
            w, h = original_size
            sx, sy = w / cfg.image_size, h / cfg.image_size
            out["prediction"] = [prediction[0] * sx, prediction[1] * sy, prediction[2] * sx, prediction[3] * sy]
    return out


def _examples(cfg: InferConfig, files: list[tuple[int, Optional[Path]]], tokenizer, data_cfg: DataConfig
              ) -> tuple[list, list[tuple[int, Optional[Path], Optional[tuple[int, int]]]], list[dict]]:
    """The task examples of some (input index, image or None) pairs, which of them were readable, error rows."""
    examples, readable, errors = [], [], []
    for index, path in files:
        try:
            data = path.read_bytes() if path is not None else b""
            size = decode_image(data).size if path is not None else None
            record = _record(cfg, path, data)
        except Exception as exc:  # noqa: BLE001  one unreadable file must not stop a folder
            errors.append({"index": index, "image": str(path), "task": cfg.task,
                           "error": f"{type(exc).__name__}: {exc}"})
            continue
        examples.extend(_task_examples(cfg, record, tokenizer, data_cfg))
        readable.append((index, path, size))
    return examples, readable, errors


def _task_examples(cfg: InferConfig, record: dict, tokenizer, data_cfg: DataConfig) -> list:
    ctx = TaskContext(tokenizer=tokenizer, cfg=data_cfg, rng=random.Random(0), train=False,
                      other_row=lambda rng: record)
    return process(cfg.task, record, ctx)


def run(cfg: InferConfig) -> list[dict]:
    """Every image's row, in input order (on every rank); rank 0 prints or writes them."""
    files = image_files(cfg)  # a missing image fails before the model loads
    ranks = start_ranks(cfg.zero_stage, cfg.device)
    model, tokenizer, sync, engine = prepare_model(cfg.model_dir, cfg.bpe_dir, cfg.zero_stage, ranks)
    with decoding_model(engine, ranks, cfg.gather_memory_fraction) as whole:
        return _predict_all(cfg, files, ranks, model, tokenizer, None if whole else sync)


def _predict_all(cfg: InferConfig, files: list, ranks, model, tokenizer, sync) -> list[dict]:
    data_cfg = DataConfig(patch_image_size=cfg.image_size, max_src_tokens=cfg.max_src_tokens,
                          vqa_prompt_type=cfg.prompt_type, text_prompt_type=cfg.prompt_type,
                          max_image_size=cfg.max_image_size)
    answers = read_answers(cfg.answers) if cfg.answers is not None else FIXED_ANSWERS.get(cfg.task)
    task = dataclasses.replace(TASK_DEFAULTS[cfg.task], generation=cfg.generation or TASK_DEFAULTS[cfg.task].generation)
    if cfg.task == "vqa":  # inside the answer trie when an answer set is given, else free (zero-shot style)
        task = dataclasses.replace(task, inference="trie" if answers is not None else "generate")
    decoding = (f"inside the answer set ({len(answers)} answers)" if answers is not None else UNCONSTRAINED_VQA) \
        if cfg.task == "vqa" else None
    dtype = next(model.parameters()).dtype
    mine = list(enumerate(files))[ranks.rank::ranks.world]
    batches = [mine[i:i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
    rounds = sync.max_count(len(batches)) if sync is not None else len(batches)
    blank = None
    results: list[dict] = []
    for i in range(rounds):
        examples, readable, errors = _examples(cfg, batches[i] if i < len(batches) else [], tokenizer, data_cfg)
        results.extend(errors)
        if not examples:
            if sync is None:
                continue
            if blank is None:  # keeps step with the ranks that have images in this round; its rows are dropped
                blank = _blank_examples(cfg, tokenizer, data_cfg)
            examples = blank
        batch = collate(examples, cfg.image_size, [1.0], with_references=True)
        sub = select_rows(batch, list(range(len(examples))), ranks.device, dtype)
        predictions = predict_task(model, tokenizer, cfg.task, sub, task, answers, sync=sync)
        results.extend({"index": index, **_row(path, p["prediction"], p["score"], size, cfg, decoding)}
                       for (index, path, size), p in zip(readable, predictions))
    results = sorted(ranks.gather(results), key=lambda r: r["index"])
    for r in results:
        del r["index"]
    padding = sum(ranks.gather([sync.padding_calls])) if sync is not None else None
    if ranks.rank == 0:
        if padding is not None:
            print(f"synced decoding on {ranks.world} ranks: {rounds} rounds, {padding} padding decoder calls",
                  file=sys.stderr)
        text = "".join(json.dumps(r) + "\n" for r in results)
        if cfg.output is not None:
            Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(Path(cfg.output), text)
        else:
            sys.stdout.write(text)
    return results


def _blank_examples(cfg: InferConfig, tokenizer, data_cfg: DataConfig) -> list:
    from biomedgpt.data.images import encode_png

    blank = encode_png(np.zeros((8, 8, 3), dtype=np.uint8))
    return _task_examples(cfg, _record(cfg, Path("blank.png"), blank), tokenizer, data_cfg)


@command
def main(argv: list[str] | None = None) -> None:
    configure_environment()  # before deepspeed is imported
    results = run(parse_cli(InferConfig, argv, description=__doc__.split("\n\n")[0]))
    failed = [r["image"] for r in results if "error" in r]
    if failed:
        sys.exit(f"biomedgpt.tools.infer: {len(failed)} of {len(results)} images could not be read (see their error rows)")


if __name__ == "__main__":
    main()
