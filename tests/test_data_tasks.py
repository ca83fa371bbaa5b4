"""Exact token sequences of every task against the spec's prompts (the packaged GPT-2 BPE), and the batch layout."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from biomedgpt.data.collate import collate
from biomedgpt.data.config import DataConfig
from biomedgpt.data.records import BadRecord, make_record
from biomedgpt.data.tasks import TASK_NAMES, TaskContext, process
from biomedgpt.models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(vocab_dir) -> Tokenizer:
    return Tokenizer.from_gpt2_files(vocab_dir)


def png(width: int = 100, height: int = 50) -> bytes:
    rng = np.random.default_rng(width * height)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def context(tok, other=None, seed=0, train=False, **cfg) -> TaskContext:
    cfg = DataConfig(**{"patch_image_size": 64, "max_src_tokens": 80, "max_tgt_tokens": 30, **cfg})
    return TaskContext(tokenizer=tok, cfg=cfg, rng=random.Random(seed), train=train,
                       other_row=lambda rng: other)


def src(tok, prompt: str, extra=()) -> list[int]:
    return [0] + tok.encode(prompt) + list(extra) + [2]


def check(ex, tok, source: list[int], target_text: str | None = None, target_ids=None):
    ids = tok.encode(target_text) if target_ids is None else list(target_ids)
    assert ex.source == source
    assert ex.target == ids + [2]
    assert ex.prev_output == [0] + ids


CAPTION = make_record("c1", "caption", {"captions": ["Chest X-ray: normal/clear lungs.", "second ref"]}, png())
OTHER_CAPTION = make_record("c2", "caption", {"captions": ["A CT of the head"]}, png())
VQA = make_record("q1", "vqa", {"question": "Is there an effusion", "answers": {"no": 0.4, "yes": 0.9},
                                "objects": ["lung", "heart"]}, png())
GROUNDING = make_record("g1", "grounding", {"caption": "the left lung", "box": [10, 5, 50, 25]}, png(100, 50))


def test_known_ids_and_leading_spaces(tok):
    """Fine-tuning captions as OFA's CaptionDataset: punctuation removed, case kept; evaluation joins the
    references with && (the original's validation target)."""
    ex = process("caption", CAPTION, context(tok))[0]
    assert ex.source[:2] == [0, 99] and ex.source[-2:] == [116, 2]  # " what" = 99, "?" = 116
    check(ex, tok, src(tok, " what does the image describe?"), " Chest Xray normalclear lungs&&second ref")
    assert ex.references == ["Chest X-ray: normal/clear lungs.", "second ref"]  # raw: the metric cleans as the original
    train = process("caption", CAPTION, context(tok, train=True, train_transform="resize", max_tgt_tokens=2, seed=1))[0]
    assert train.target[:-1] in (tok.encode(" Chest Xray"), tok.encode(" second ref"))  # 2 words, whole
    assert ex.image.shape == (3, 64, 64) and ex.image.dtype == torch.uint8  # normalised by the model, on its device


def test_itm_positive_and_negative(tok):
    seen = set()
    for seed in range(12):
        ex = process("itm", CAPTION, context(tok, other=OTHER_CAPTION, seed=seed))[0]
        caption = "chest x ray: normal clear lungs." if ex.target[:-1] == tok.encode(" yes") else "a ct of the head"
        answer = " yes" if caption.startswith("chest") else " no"
        check(ex, tok, src(tok, f' does the image describe " {caption} "?'), answer)
        seen.add(answer)
    assert seen == {" yes", " no"}


def test_pretraining_vqa_and_matching(tok):
    other = make_record("q2", "vqa", {"question": "what organ", "answers": {"liver": 1.0}}, png())
    for seed in range(8):
        vqa, match = process("pretrain_vl", VQA, context(tok, other=other, seed=seed, train=True))
        check(vqa, tok, src(tok, " is there an effusion"), " yes")
        assert vqa.conf == pytest.approx(0.9) and vqa.task == "vqa" and match.task == "vqa_matching"
        shown = "yes" if match.target[:-1] == tok.encode(" yes") else "no"  # negative of a yes/no answer: no
        check(match, tok, src(tok, f' what is the answer to question " is there an effusion ". is " {shown} "?'),
              f" {shown}")


def test_finetune_vqa_prompt_prev_output_and_objects(tok):
    ex = process("vqa", VQA, context(tok, vqa_prompt_type="prev_output", vqa_add_objects=True))[0]
    question = tok.encode(" is there an effusion?") + tok.encode(" object: lung heart")
    assert ex.source == [0] + question + [2]
    answer = tok.encode(" yes")
    assert ex.prev_output == [0] + question + answer
    assert ex.target == [1] * len(question) + answer + [2]
    assert ex.answer_type is None  # not annotated: evaluation falls back to yes/no
    typed = make_record("q3", "vqa", {"question": "left or right?", "answers": {"left": 1.0}, "answer_type": "closed"},
                        png())
    assert process("vqa", typed, context(tok))[0].answer_type == "closed"
    with pytest.raises(BadRecord, match="answer_type 'yes' is not one of"):
        make_record("q4", "vqa", {"question": "q", "answers": {"a": 1.0}, "answer_type": "yes"}, png())


def test_grounding_bins_and_grounded_caption(tok):
    ground, region = process("pretrain_vl", GROUNDING, context(tok, train=True, train_transform="resize"))
    # 100x50 -> 64x64: box (10,5,50,25) -> (6.4, 6.4, 32, 32); bin = round(c / 512 * 999)
    bins = [tok.bin_id(j) for j in (12, 12, 62, 62)]
    check(ground, tok, src(tok, ' which region does the text " the left lung " describe?'), target_ids=bins)
    check(region, tok, src(tok, "  what does the region describe? region:", bins), " the left lung")
    assert tok.encode("  what")[0] != tok.encode(" what")[0]  # the two-space quirk changes the ids


def test_text_infilling_span_masking(tok):
    text = " ".join(f"Word{i}" for i in range(40))
    for seed in range(6):
        ex = process("text_infilling", make_record("t1", "text", {"text": text}), context(tok, seed=seed))[0]
        check(ex, tok, ex.source, " " + text.lower())
        head, tail = tok.encode(' what is the complete text of "'), tok.encode(' "?')
        assert ex.source[: 1 + len(head)] == [0] + head and ex.source[-len(tail) - 1:] == tail + [2]
        masked = tok.decode(ex.source[1 + len(head): -len(tail) - 1])
        kept = [w for w in masked.replace("<mask>", " ").split()]
        assert 40 - 12 <= len(kept) < 40  # at most ceil(30% of 40) words masked (spans may overlap)
        assert kept == [w for w in text.lower().split() if w in kept]  # order kept, words whole


def test_image_infilling_codes(tok):
    codes = list(range(100, 356))
    record = make_record("i1", "image_codes", {"codes": codes}, png(256, 256))
    ex = process("image_infilling", record, context(tok, patch_image_size=256))[0]
    check(ex, tok, src(tok, " what is the image in the middle part?"), target_ids=[tok.code_id(c) for c in codes])
    centre = ex.image[:, 64:192, 64:192]
    assert ex.code_mask and bool((centre == 128).all()) and bool((ex.image[:, :64] != 128).any())  # mid grey


def test_detection_boxes_then_labels(tok):
    record = make_record("d1", "detection", {"boxes": [[0, 0, 100, 50], [50, 25, 100, 50]],
                                             "labels": ["nodule", "pleural effusion"]}, png(100, 50))
    ex = process("detection", record, context(tok, train_transform="resize"))[0]
    scale = [0.64, 1.28, 0.64, 1.28]
    ids = []
    for box, label in zip(record["meta"]["boxes"], record["meta"]["labels"]):
        ids += [tok.coord_to_bin(c * s) for c, s in zip(box, scale)] + tok.encode(f" {label}")
    check(ex, tok, src(tok, " what are the objects in the image?"), target_ids=ids)


def test_nli_summarization_classification(tok):
    for label, answer in (("entailment", " yes"), ("contradiction", " no"), ("neutral", " maybe")):
        ex = process("nli", make_record("n", "nli", {"s1": "He has a fever.", "s2": "He is febrile", "label": label}),
                     context(tok))[0]
        assert ex.source == src(tok, ' can text1 " he has a fever. " imply text2 " he is febrile "?')
        assert ex.prev_output == [0] and ex.target == tok.encode(answer)  # prompt type none: one token, no </s>
        assert ex.image is None
    ex = process("summarization", make_record("s", "summarization", {"source": "No acute disease. Heart normal.",
                                                                     "summary": "No acute disease"}), context(tok))[0]
    check(ex, tok, src(tok, ' what is the summary of article " no acute disease. heart normal. "?'), "no acute disease")
    assert ex.references == ["no acute disease"]  # the summary lower-cased, as the original's target_str
    ex = process("classification", make_record("m", "classification", {"label": 3, "label_name": "basophil"}, png()),
                 context(tok))[0]
    check(ex, tok, src(tok, " what does the image describe?"), " basophil")


def test_instruction_with_and_without_image(tok):
    """Free text kept as written (no lower-casing), a leading space on both sides, the whole response as reference."""
    meta = {"instruction": "What does the CT show?\n", "response": "A normal CT of the head.\nNo bleed."}
    ex = process("instruction", make_record("i", "instruction", meta, png()), context(tok))[0]
    check(ex, tok, src(tok, " What does the CT show?"), " A normal CT of the head.\nNo bleed.")
    assert ex.references == ["A normal CT of the head.\nNo bleed."] and ex.image.shape == (3, 64, 64)
    text_only = process("instruction", make_record("t", "instruction", meta), context(tok, max_tgt_tokens=4))[0]
    assert text_only.image is None and text_only.target == tok.encode(" A normal CT")[:3] + [2]
    assert text_only.references == ex.references  # judged against the whole response, not the cut target
    batch = collate([ex, text_only], 64, [1.0])
    assert batch["patch_masks"].tolist() == [True, False] and batch["patch_images"][1].abs().sum() == 0
    assert [TASK_NAMES[i] for i in batch["task_ids"]] == ["instruction", "instruction"]


def test_length_limits(tok):
    """The original's limits: summarization cuts prompt + source together to max_src_tokens tokens (the
    closing quote may go) and the summary to max_tgt_tokens words; instruction rows keep their prompt."""
    long = " ".join(["finding"] * 300)
    ex = process("summarization", make_record("s", "summarization", {"source": long, "summary": long}),
                 context(tok, max_src_tokens=40, max_tgt_tokens=10))[0]
    assert ex.source == [0] + tok.encode(' what is the summary of article " ' + long + ' "?')[:40] + [2]
    assert ex.target == tok.encode(" ".join(["finding"] * 10)) + [2]
    meta = {"instruction": long + " explain", "response": long}
    ex = process("instruction", make_record("i", "instruction", meta), context(tok, max_src_tokens=40))[0]
    assert len(ex.source) == 40 and ex.source[-1] == 2 and len(ex.target) == 30


def test_wrong_row_kind_is_named(tok):
    with pytest.raises(ValueError, match="row 'c1' is a 'caption' row; task 'nli'"):
        process("nli", CAPTION, context(tok))


def test_collate_batch_layout(tok):
    ctx = context(tok, train=True, train_transform="ofa_augment")
    examples = (process("pretrain_vl", CAPTION, context(tok, other=OTHER_CAPTION, train=True))
                + process("nli", make_record("n", "nli", {"s1": "a", "s2": "b", "label": "neutral"}), ctx))
    examples[-1].loss_group = 1
    batch = collate(examples, 64, [1.0, 2.0], with_references=True)
    assert set(batch) == {"src_tokens", "src_lengths", "patch_images", "patch_masks", "prev_output_tokens", "target",
                          "code_masks", "sample_patches", "conf", "loss_groups", "group_weights", "task_ids", "ids", "references",
                          "answer_types"}
    assert batch["patch_images"].shape == (3, 3, 64, 64) and batch["patch_images"][2].abs().sum() == 0
    assert batch["patch_masks"].tolist() == [True, True, False]
    assert batch["loss_groups"].tolist() == [0, 0, 1] and batch["group_weights"] == [1.0, 2.0]
    assert [TASK_NAMES[i] for i in batch["task_ids"]] == ["caption", "itm", "nli"]
    assert batch["src_tokens"].dtype == torch.long and batch["src_lengths"].tolist() == [len(e.source) for e in examples]
    assert (batch["target"][2, len(examples[2].target):] == 1).all()
    assert batch["ids"] == ["c1", "c1", "n"]
