"""The paper's downstream metrics, computed as the original scripts compute them, with the reference
implementations beside them.

As the original (taokz/BiomedGPT scripts and the OFA code they run), the paper's numbers:
- VQA: the mean of the predicted answer's confidence among the references (``ref_dict.get(hyp, 0)``);
- captions: ROUGE-L and CIDEr of pycocoevalcap on ``scripts/caption/metric_caption.py``'s cleaning
  (``bioclean`` of references and hypotheses, the hypotheses' punctuation stripped first as OFA's
  ``eval_caption`` does; no PTB tokenizer); in validation CIDEr-D (OFA's ``pyciderevalcap`` variant,
  implemented here as no package ships it) with cached document frequencies;
- summaries (MeQSum): ``rouge_score`` ROUGE-1/2/L with stemming against the lowercased reference, the
  hypothesis lowercased and re-tokenized as OFA's ``eval_gigaword`` does (``fix_tokenization``, "1" -> "#"),
  aggregated by bootstrap (the "mid" F-measure) as ``scripts/text_sum/eval_rouge.py``.
Beside them: BLEU-1..4, METEOR, ROUGE-L and CIDEr on PTB-tokenized text (the COCO caption evaluation;
METEOR and the tokenizer run Java), ROUGE F-measure averaged per sample (best over references), VQA
split into closed and open questions (the dataset's answer type when given, else yes/no answers are
closed). Grounding: a predicted box is right when its IoU with the reference exceeds 0.5.
All values are fractions (CIDEr is unbounded); multiply by 100 for the paper's tables.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
import string
from collections import Counter
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from biomedgpt.data.answers import CONVERSION_DOC, SideFileError, read_side_file

References = Union[Sequence[str], Mapping[str, float]]

CLOSED_ANSWERS = frozenset({"yes", "no"})

#: Per task, the metrics the paper reports, computed as the original computes them (results.json's
#: ``paper_metrics``; the other metrics stay beside them).
PAPER_METRICS: dict[str, tuple[str, ...]] = {
    "vqa": ("accuracy",), "caption": ("rouge_l", "cider"), "summarization": ("rouge1", "rouge2", "rougeL"),
    "nli": ("accuracy",), "classification": ("accuracy",),
}


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
    """BLEU-1..4, METEOR, ROUGE-L (``coco_rouge_l``), CIDEr (``coco_cider``) over the corpus (pycocoevalcap,
    PTB tokenization: the COCO caption evaluation, beside the paper's ``caption_metrics_paper``)."""
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
        out["coco_rouge_l"] = float(Rouge().compute_score(gts, res)[0])
        out["coco_cider"] = float(Cider().compute_score(gts, res)[0])
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


# ----- the original scripts' text handling ---------------------------------------------------------------

_PUNCTUATION = str.maketrans("", "", string.punctuation)
# metric_caption.py's character class '[.,?;*!%^&_+():-\[\]{}]': its ":-\[" is a range (: ; < = > ? @ A-Z [)
_BIOCLEAN_CHARS = re.compile(r"[.,?;*!%^&_+()\]{}:;<=>?@A-Z\[]")


def strip_punctuation(text: str) -> str:
    """OFA's caption hypotheses (and validation references): every ASCII punctuation mark removed, trimmed."""
    return text.translate(_PUNCTUATION).strip()


def bioclean(caption: str) -> str:
    """``metric_caption.py``'s ``_bioclean``: quotes, slashes and backslashes dropped, trimmed, lowercased,
    then its character class removed (``#$|~`` stay)."""
    for ch in ('"', "/", "\\", "'"):
        caption = caption.replace(ch, "")
    return _BIOCLEAN_CHARS.sub("", caption.strip().lower())


_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-",
                 "[UNK]": "UNK", "&": "&amp;", "<": "&lt;", ">": "&gt;"}


def _digits_and_commas(word: str) -> bool:
    return all(ch.isdigit() or ch == "," for ch in word)


def fix_tokenization(text: str) -> str:
    """OFA's ``fix_tokenization`` (tasks/nlg_tasks/gigaword.py) on a whitespace-split hypothesis: brackets and
    ``& < >`` to their PTB / HTML names, double and single quotes to alternating opening / closing marks,
    ``n ' t`` -> ``n't``, ``' s|d|ll`` joined, ``. . .`` -> ``...``, digit groups (``3 , 000``, ``3 . 03``) and
    capital initials (``U . N .``) joined, a dash between two words joins them."""
    words = text.split()
    out: list[str] = []
    double_open = single_open = False
    joining = False  # the previous word ended in a joining dash
    i = 0
    while i < len(words):
        word, nxt = words[i], words[i + 1] if i + 1 < len(words) else None
        after = words[i + 2] if i + 2 < len(words) else None
        dash = False
        step = 1
        if word in _PTB_BRACKETS:
            out.append(_PTB_BRACKETS[word])
        elif word == '"':
            out.append("''" if double_open else "``")
            double_open = not double_open
        elif word == "'" and out and out[-1].endswith("n") and nxt == "t":
            out[-1] = out[-1][:-1]
            out.append("n't")
            step = 2
        elif word == "'" and nxt in ("s", "d", "ll"):
            out.append("'" + nxt)
            step = 2
        elif word == "'":
            out.append("'" if single_open else "`")
            single_open = not single_open
        elif word == "." and nxt == "." and after == ".":
            out.append("...")
            step = 3
        elif word == "," and out and _digits_and_commas(out[-1]) and nxt is not None and _digits_and_commas(nxt):
            out[-1] += "," + nxt
            step = 2
        elif word == "." and out and out[-1].isdigit() and nxt is not None and nxt.isdigit():
            out[-1] += "." + nxt
            step = 2
        elif (word == "." and out and len(out[-1]) == 1 and out[-1].isupper() and nxt is not None
              and len(nxt) == 1 and nxt.isupper() and after == "."):
            end = i + 3
            while end + 2 < len(words) and len(words[end + 1]) == 1 and words[end + 1].isupper() \
                    and words[end + 2] == ".":
                end += 2
            out[-1] += "".join(words[i:end])
            step = 2
        elif word == "-":
            if nxt == "-":
                out.append("--")
                step = 2
            elif nxt is None or i == 0:
                out.append("-")
            elif out[-1] not in string.punctuation and nxt[0] not in string.punctuation:
                out[-1] += "-"
                dash = True
            else:
                out.append("-")
        elif joining and out and word[0] not in string.punctuation:
            out[-1] += word
        else:
            out.append(word)
        i += step
        joining = dash
    return " ".join(out)


def summary_hypothesis(text: str) -> str:
    """A generated summary as OFA's ``eval_gigaword`` scores it: lowercased, trimmed, re-tokenized, "1" -> "#"."""
    return fix_tokenization(text.lower().strip()).replace("1", "#")


# ----- the paper's numbers ------------------------------------------------------------------------------

BOOTSTRAP_SEED = 0  # eval_rouge.py leaves numpy unseeded (its mid F varies run to run); seeded for repeatability


def summary_rouge_paper(predictions: Sequence[str], references: Sequence[Sequence[str]],
                        seed: int = BOOTSTRAP_SEED) -> dict[str, float]:
    """``eval_rouge.py``: ``rouge_score`` ROUGE-1/2/L/Lsum with stemming of ``summary_hypothesis(prediction)``
    against the lowercased (first) reference, bootstrap-aggregated; the mid F-measure of each."""
    import numpy as np
    from rouge_score import rouge_scorer, scoring

    _check_lengths(predictions, references)
    kinds = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    aggregator = scoring.BootstrapAggregator()
    for prediction, refs in zip(predictions, references):
        if not refs:
            raise ValueError("every summary needs a reference")
        aggregator.add_scores(scorer.score(refs[0].lower(), summary_hypothesis(prediction)))
    state = np.random.get_state()  # the aggregator draws from numpy's global generator
    try:
        np.random.seed(seed)
        result = aggregator.aggregate()
    finally:
        np.random.set_state(state)
    return {kind: float(result[kind].mid.fmeasure) for kind in kinds}


def caption_metrics_paper(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """``metric_caption.py``: pycocoevalcap ROUGE-L and CIDEr on ``bioclean``-ed references and hypotheses
    (the hypotheses' punctuation stripped first, as OFA's ``eval_caption`` writes them), no tokenizer."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    _check_lengths(predictions, references)
    if any(not refs for refs in references):
        raise ValueError("every caption needs at least one reference")
    gts = {i: [bioclean(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [bioclean(strip_punctuation(p))] for i, p in enumerate(predictions)}
    return {"rouge_l": float(Rouge().compute_score(gts, res)[0]), "cider": float(Cider().compute_score(gts, res)[0])}


def _ngram_counts(text: str, n: int = 4) -> Counter:
    words = text.split()
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


#: the conversion of OFA's cached CIDEr-D tokens (``python3 -c '...' IN.p OUT.json``)
CIDER_DF_CONVERSION = (
    "python3 -c 'import json, pickle, sys; d = pickle.load(open(sys.argv[1], \"rb\"), encoding=\"latin1\"); "
    "json.dump({\"ref_len\": float(d[\"ref_len\"]), \"document_frequency\": [[list(k), float(v)] for k, v in "
    "d[\"document_frequency\"].items()]}, open(sys.argv[2], \"w\"))'")


def read_cider_df(path: str | Path) -> tuple[dict, float]:
    """OFA's cached CIDEr-D statistics, converted once to JSON (``CIDER_DF_CONVERSION``): ``ref_len``, the number
    of reference documents, and ``document_frequency``, ``[[n-gram words], count]`` pairs. Gives (n-gram tuple ->
    document frequency, log of that number)."""
    path = Path(path)
    raw = read_side_file(path, "CIDEr-D document frequency", CIDER_DF_CONVERSION)
    try:
        data = json.loads(raw)
        df = {tuple(gram): float(count) for gram, count in data["document_frequency"]}
        ref_len = float(data["ref_len"])
    except (ValueError, TypeError, KeyError) as exc:
        raise SideFileError(f"{path}: expected JSON with ref_len and document_frequency ([[n-gram words], count] "
                            f"pairs), as {CONVERSION_DOC} converts OFA's cached tokens "
                            f"({type(exc).__name__}: {exc})") from None
    return df, math.log(ref_len)


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]], df_file: Optional[str | Path] = None,
            sigma: float = 6.0) -> float:
    """CIDEr-D as OFA validates captions (``pyciderevalcap.ciderD``, no pip package): tf-idf vectors of
    1..4-grams of whitespace-split text, hypothesis weights clipped at the reference's, a Gaussian penalty on
    the length difference (counted in bigrams, as the original), the mean over n and references, times 10.
    Document frequencies from ``df_file`` (``read_cider_df``) or from the references themselves. Texts are
    taken as given: OFA strips the punctuation of both sides first (``strip_punctuation``)."""
    _check_lengths(predictions, references)
    refs = [[_ngram_counts(r) for r in rs] for rs in references]
    if df_file is not None:
        df, log_docs = read_cider_df(df_file)
    else:
        df = Counter(g for rs in refs for g in set().union(*rs))
        log_docs = math.log(float(len(refs)))

    def vector(counts: Counter):
        vec: list[dict] = [{} for _ in range(4)]
        norm = [0.0] * 4
        for gram, tf in counts.items():
            n = len(gram) - 1
            vec[n][gram] = tf * (log_docs - math.log(max(1.0, df.get(gram, 0.0))))
            norm[n] += vec[n][gram] ** 2
        return vec, [math.sqrt(x) for x in norm], sum(tf for gram, tf in counts.items() if len(gram) == 2)

    scores = []
    for prediction, rs in zip(predictions, refs):
        hyp, hyp_norm, hyp_len = vector(_ngram_counts(prediction))
        total = 0.0
        for ref_counts in rs:
            ref, ref_norm, ref_len = vector(ref_counts)
            penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * sigma ** 2))
            for n in range(4):
                value = sum(min(w, ref[n].get(g, 0.0)) * ref[n].get(g, 0.0) for g, w in hyp[n].items())
                if hyp_norm[n] != 0 and ref_norm[n] != 0:
                    value /= hyp_norm[n] * ref_norm[n]
                total += value * penalty / 4
        scores.append(total / len(rs) * 10.0)
    return sum(scores) / len(scores)
