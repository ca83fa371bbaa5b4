"""The paper's downstream metrics, computed with the reference implementations.

Captioning: BLEU-1..4, METEOR, ROUGE-L and CIDEr from pycocoevalcap on PTB-tokenized text (the COCO
caption evaluation; METEOR and the tokenizer run Java). Summaries: ROUGE-1/2/L F-measure with Porter
stemming from ``rouge_score`` (best over references, averaged). VQA: exact match against the reference
answers (the answer's confidence when references carry one), split into closed and open questions
(the dataset's answer type when given, else yes/no answers are closed). Grounding: a predicted box is
right when its IoU with the reference exceeds 0.5.
All values are fractions (CIDEr is unbounded); multiply by 100 for the paper's tables.
"""
from __future__ import annotations

import contextlib
import io
import shutil
from typing import Mapping, Optional, Sequence, Union

References = Union[Sequence[str], Mapping[str, float]]

CLOSED_ANSWERS = frozenset({"yes", "no"})


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of exact (whitespace-trimmed) matches."""
    _check_lengths(predictions, references)
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(predictions)


def vqa_score(prediction: str, references: References) -> float:
    """Confidence of the predicted answer among the references (1 / 0 for a plain answer list)."""
    prediction = prediction.strip()
    if isinstance(references, Mapping):
        return float(references.get(prediction, 0.0))
    return 1.0 if prediction in {r.strip() for r in references} else 0.0


def is_closed(references: References) -> bool:
    """Closed-ended question: its (most confident) reference answer is yes or no."""
    if isinstance(references, Mapping):
        best = max(references, key=references.get)
    else:
        best = references[0]
    return best.strip().lower() in CLOSED_ANSWERS


def vqa_accuracy(predictions: Sequence[str], references: Sequence[References],
                 answer_types: Optional[Sequence[Optional[str]]] = None) -> dict[str, float]:
    """``accuracy`` overall, ``closed_accuracy`` / ``open_accuracy`` and the counts of each split.

    A question is closed when the dataset says so (``answer_types``: "open" / "closed", as SLAKE and
    VQA-RAD annotate them: "left or right?" is closed), else when its answer is yes / no.
    """
    _check_lengths(predictions, references)
    answer_types = answer_types if answer_types is not None else [None] * len(references)
    if len(answer_types) != len(references):
        raise ValueError(f"{len(answer_types)} answer types but {len(references)} references")
    scores = [vqa_score(p, r) for p, r in zip(predictions, references)]
    closed = [t == "closed" if t is not None else is_closed(r) for t, r in zip(answer_types, references)]
    out = {"accuracy": sum(scores) / len(scores), "closed_count": float(sum(closed)),
           "open_count": float(len(closed) - sum(closed))}
    for name, want in (("closed", True), ("open", False)):
        part = [s for s, c in zip(scores, closed) if c == want]
        if part:
            out[f"{name}_accuracy"] = sum(part) / len(part)
    return out


def caption_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr over the corpus (pycocoevalcap, PTB tokenization)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    _check_lengths(predictions, references)
    if any(not refs for refs in references):
        raise ValueError("every caption needs at least one reference")
    if shutil.which("java") is None:
        raise RuntimeError("caption metrics need Java on PATH (pycocoevalcap's PTB tokenizer and METEOR run it); "
                           "install a JRE, e.g. apt-get install default-jre-headless")
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(references)})
    res = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(predictions)})
    # METEOR's Java process chokes on empty hypotheses; an empty caption scores as a lone dot
    res = {i: [c if c.strip() else "."] for i, (c,) in res.items()}
    out: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its internals
        bleu, _ = Bleu(4).compute_score(gts, res)
        out.update({f"bleu_{n}": float(b) for n, b in enumerate(bleu, 1)})
        meteor = Meteor()
        try:
            out["meteor"] = float(meteor.compute_score(gts, res)[0])
        finally:
            _close_meteor(meteor)
        out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
        out["cider"] = float(Cider().compute_score(gts, res)[0])
    return out


def _close_meteor(meteor) -> None:
    """pycocoevalcap leaves its Java subprocess running until garbage collection; stop it now."""
    with meteor.lock:
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()


def rouge_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """ROUGE-1/2/L F-measure with stemming, best over each sample's references, averaged."""
    from rouge_score import rouge_scorer

    _check_lengths(predictions, references)
    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    totals = dict.fromkeys(kinds, 0.0)
    for prediction, refs in zip(predictions, references):
        if not refs:
            raise ValueError("every summary needs at least one reference")
        scores = scorer.score_multi(list(refs), prediction)
        for kind in kinds:
            totals[kind] += scores[kind].fmeasure
    return {kind: value / len(predictions) for kind, value in totals.items()}


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two x0,y0,x1,y1 boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding_accuracy(predictions: Sequence[Sequence[float] | None], references: Sequence[Sequence[float]],
                       threshold: float = 0.5) -> dict[str, float]:
    """Share of boxes with IoU > threshold (a missing prediction counts as wrong), and the mean IoU."""
    _check_lengths(predictions, references)
    ious = [box_iou(p, r) if p is not None else 0.0 for p, r in zip(predictions, references)]
    return {"accuracy": sum(i > threshold for i in ious) / len(ious), "mean_iou": sum(ious) / len(ious)}
