"""Downstream metrics on hand-checkable examples, and agreement with the reference libraries."""
from __future__ import annotations

import math

import pytest

from biomedgpt.engine.eval import metrics as tm


def test_accuracy_and_vqa_split():
    assert tm.accuracy(["yes", " no", "left"], ["yes", "no", "right"]) == pytest.approx(2 / 3)
    preds = ["yes", "no", "chest", "ct", "brain"]
    refs = [["yes"], ["yes"], ["chest"], {"mri": 1.0, "ct": 0.3}, ["liver"]]
    out = tm.vqa_accuracy(preds, refs)
    assert out["accuracy"] == pytest.approx((1 + 0 + 1 + 0.3 + 0) / 5)
    assert out["closed_accuracy"] == pytest.approx(0.5) and out["closed_count"] == 2
    assert out["open_accuracy"] == pytest.approx(1.3 / 3) and out["open_count"] == 3
    # the dataset's answer types decide the split where given: "left or right?" is closed, the others fall back
    typed = tm.vqa_accuracy(["yes", "left", "chest"], [["yes"], ["right"], ["chest"]], [None, "closed", "open"])
    assert typed["closed_count"] == 2 and typed["closed_accuracy"] == pytest.approx(0.5)
    assert typed["open_count"] == 1 and typed["open_accuracy"] == 1.0
    assert tm.vqa_accuracy(["yes"], [["yes"]], ["open"])["open_count"] == 1  # a yes/no answer to an open question
    with pytest.raises(ValueError, match="2 answer types but 1 references"):
        tm.vqa_accuracy(["yes"], [["yes"]], ["open", "closed"])


def test_rouge_with_stemming_by_hand():
    # "cats" stems to "cat": unigrams all match; bigrams: (the cat)(cat sat) vs (the cat)(cat sat)(sat down)
    out = tm.rouge_metrics(["the cats sat"], [["the cat sat down"]])
    p, r = 3 / 3, 3 / 4
    assert out["rouge1"] == pytest.approx(2 * p * r / (p + r))
    p2, r2 = 2 / 2, 2 / 3
    assert out["rouge2"] == pytest.approx(2 * p2 * r2 / (p2 + r2))
    assert out["rougeL"] == pytest.approx(out["rouge1"])
    # the best of several references counts
    assert tm.rouge_metrics(["no acute findings"], [["heart enlarged", "no acute findings"]])["rouge1"] == 1.0


def test_caption_metrics_hand_values_and_library_agreement():
    preds = ["a b c d e", "the heart is normal in size", "no acute disease"]
    refs = [["a b c d f"], ["the heart is normal in size", "normal heart"], ["no acute cardiopulmonary disease"]]
    out = tm.caption_metrics(preds, refs)
    # corpus BLEU-4 by hand: clipped n-gram matches over all three captions, brevity penalty 1 vs closest refs
    matches = [4 + 6 + 3, 3 + 5 + 1, 2 + 4 + 0, 1 + 3 + 0]
    totals = [5 + 6 + 3, 4 + 5 + 2, 3 + 4 + 1, 2 + 3 + 0]
    ref_len, hyp_len = 5 + 6 + 4, 14
    bleu4 = math.exp(sum(math.log(m / t) for m, t in zip(matches, totals)) / 4) * math.exp(min(0, 1 - ref_len / hyp_len))
    assert out["bleu_4"] == pytest.approx(bleu4, rel=1e-6)
    assert out["bleu_1"] == pytest.approx(13 / 14 * math.exp(1 - 15 / 14), rel=1e-6)

    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [p] for i, p in enumerate(preds)}
    assert out["coco_cider"] == pytest.approx(Cider().compute_score(gts, res)[0])
    assert out["coco_rouge_l"] == pytest.approx(Rouge().compute_score(gts, res)[0])
    assert 0.0 < out["meteor"] < 1.0


def test_caption_metrics_survive_an_empty_prediction():
    out = tm.caption_metrics(["", "normal chest"], [["normal chest"], ["normal chest x ray"]])
    assert set(out) >= {"bleu_4", "meteor", "coco_rouge_l", "coco_cider"}


def test_box_iou_and_grounding_accuracy():
    assert tm.box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert tm.box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    out = tm.grounding_accuracy([[0, 0, 10, 10], [0, 0, 10, 10], None], [[0, 0, 10, 9], [5, 0, 15, 10], [0, 0, 1, 1]])
    assert out["accuracy"] == pytest.approx(1 / 3)
    assert out["mean_iou"] == pytest.approx((0.9 + 1 / 3 + 0) / 3)


def test_mismatched_inputs_are_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        tm.accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        tm.rouge_metrics([], [])
