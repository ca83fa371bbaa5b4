"""Evaluation as the original BiomedGPT scripts (issue 23, acceptance 4): model selection on the validation
split, VQA test decoding (beam 1, unnormalised scores, inside the trie of the answer set), and each paper metric
equal to the original script's computation on hypotheses and references written down here.

The expected strings and numbers were computed once by running the original code itself on these inputs
(``taokz/BiomedGPT``: ``tasks/nlg_tasks/gigaword.py`` ``fix_tokenization``, ``scripts/caption/metric_caption.py``
``_bioclean`` + pycocoevalcap, ``utils/cider/pyciderevalcap/ciderD``, ``scripts/text_sum/eval_rouge.py``'s
rouge_score + BootstrapAggregator with numpy seeded 0), not with this project's code.
"""
from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from biomedgpt.data.collate import collate
from biomedgpt.data.config import DataConfig, StreamConfig
from biomedgpt.data.records import make_record
from biomedgpt.data.tasks import TaskContext, process
from biomedgpt.engine.eval import metrics as tm
from biomedgpt.core.config import ConfigError, load
from biomedgpt.engine.eval.decoding import predict_task, select_rows
from biomedgpt.engine.eval.config import DownstreamConfig, selection_data
from biomedgpt.engine.eval.evaluator import compute_metrics, paper_metrics
from biomedgpt.engine.run_config import RunConfig

# ----- the original's text handling --------------------------------------------------------------------

# fix_tokenization(text) as gigaword.py returns it
FIX_TOKENIZATION = {
    "what are the treatments for ( type 1 ) diabetes ?": "what are the treatments for -lrb- type 1 -rrb- diabetes ?",
    "i don ' t know if it ' s [ ok ] or { not }": "i do n't know if it 's -lsb- ok -rsb- or -lcb- not -rcb-",
    "\" flu \" shots & < > ' quoted ' words": "`` flu '' shots &amp; &lt; &gt; ` quoted ' words",
    "wait . . . 3 , 000 and 3 . 03 mg": "wait ... 3,000 and 3.03 mg",
    "u . n . and U . N . S . x": "u . n . and U.N. . S . x",
    "well - known - - dash - ,x a - b -": "well-known -- dash - ,x a-b -",
    "- start and end -": "- start and end -",
    "pre- dash ' d ' ll end": "pre- dash 'd 'll end",
}
# eval_gigaword's hypothesis: fix_tokenization(text.lower().strip()).replace('1', '#')
SUMMARY_HYPOTHESIS = {
    "u . n . and U . N . S . x": "u . n . and u . n . s . x",
    "what are the treatments for ( type 1 ) diabetes ?": "what are the treatments for -lrb- type # -rrb- diabetes ?",
}
# metric_caption.py's _bioclean
BIOCLEAN = {
    "Liver: Cirrhosis, Micronodular.": "liver cirrhosis micronodular",
    "Pneumothorax/effusion: left lung.": "pneumothoraxeffusion left lung",
    "a \"quoted\" it's back\\slash #1 $2 | ~ ` @x <y> =z [w] {v} 50%^&_+*!":
        "a quoted its backslash #1 $2 | ~ ` x y z w v 50",
    "Hep-B (chronic) ; 3.5 cm?": "hep-b chronic  35 cm",
}


def test_text_handling_equals_the_originals():
    assert {t: tm.fix_tokenization(t) for t in FIX_TOKENIZATION} == FIX_TOKENIZATION
    assert {t: tm.summary_hypothesis(t) for t in SUMMARY_HYPOTHESIS} == SUMMARY_HYPOTHESIS
    assert {t: tm.bioclean(t) for t in BIOCLEAN} == BIOCLEAN
    assert tm.strip_punctuation(" a/b, (c)! ") == "ab c"


# ----- captions -----------------------------------------------------------------------------------------

CAPTION_PREDICTIONS = ["Liver: cirrhosis, micronodular.", "pneumothorax/effusion in the Left lung",
                       "normal heart size (no acute disease)", ""]
CAPTION_REFERENCES = [["Liver: Cirrhosis, Micronodular."], ["Pneumothorax/effusion: left lung."],
                      ["Heart: normal size; no acute disease!"], ["Brain: glioblastoma multiforme #2"]]
METRIC_CAPTION_ROUGE_L = 0.6546852646638055  # metric_caption.py on eval_caption's hypotheses
METRIC_CAPTION_CIDER = 4.062823477988598
# OFA's caption valid_step: CIDEr-D of the punctuation-stripped hypotheses against these references (a second
# reference for the third image), document frequencies from the references / from the cached file (as JSON)
CIDER_D_REFERENCES = [["Liver Cirrhosis Micronodular"], ["Pneumothoraxeffusion left lung"],
                      ["Heart normal size no acute disease", "normal heart no acute disease"],
                      ["Brain glioblastoma multiforme 2"]]
CIDER_D_CORPUS = 1.6463643211356744
CIDER_D_CACHED = 1.2520791000079587
CACHED_DF = {("Liver",): 3.0, ("lung",): 5.0, ("left", "lung"): 2.0, ("normal",): 7.0, ("heart",): 4.0,
             ("no", "acute"): 6.0, ("acute", "disease"): 6.0}
CACHED_REF_LEN = 12


def test_caption_metrics_equal_metric_caption_py():
    out = tm.caption_metrics_paper(CAPTION_PREDICTIONS, CAPTION_REFERENCES)
    assert out["rouge_l"] == pytest.approx(METRIC_CAPTION_ROUGE_L, abs=1e-12)
    assert out["cider"] == pytest.approx(METRIC_CAPTION_CIDER, abs=1e-12)


def test_cider_d_equals_ofas_validation_metric(tmp_path):
    hyps = [tm.strip_punctuation(p) for p in CAPTION_PREDICTIONS]
    refs = [[tm.strip_punctuation(" ".join(r.split())) for r in rs] for rs in CAPTION_REFERENCES]
    refs[2].append("normal heart no acute disease")
    assert refs == CIDER_D_REFERENCES
    assert tm.cider_d(hyps, refs) == pytest.approx(CIDER_D_CORPUS, abs=1e-12)
    df_file = tmp_path / "words.json"  # OFA's cached tokens, converted: document frequencies and a count
    df_file.write_text(json.dumps({"document_frequency": [[list(k), v] for k, v in CACHED_DF.items()],
                                   "ref_len": CACHED_REF_LEN}))
    assert tm.cider_d(hyps, refs, df_file) == pytest.approx(CIDER_D_CACHED, abs=1e-12)
    (tmp_path / "bad.json").write_text(json.dumps({"ref_len": 3}))
    with pytest.raises(ValueError, match="bad.json: expected JSON with ref_len and document_frequency"):
        tm.cider_d(hyps, refs, tmp_path / "bad.json")


# ----- summaries ----------------------------------------------------------------------------------------

SUMMARY_PREDICTIONS = ["What are the treatments for ( type 1 ) diabetes ?", "How can I don ' t get \" flu \" shots ?",
                       "what is the dose of tylenol 500mg & advil ?", "Is 11 mg of zinc ( daily ) safe ?"]
SUMMARY_REFERENCES = ["What are the treatments for type 1 diabetes?", "Where can I get flu shots?",
                      "What is the dosage of Tylenol?", "Is 11 mg of zinc safe daily?"]
# eval_gigaword's hypotheses and eval_rouge.py's mid F-measures (numpy seeded 0 before aggregating)
EVAL_GIGAWORD_HYPOTHESES = ["what are the treatments for -lrb- type # -rrb- diabetes ?",
                            "how can i do n't get `` flu '' shots ?",
                            "what is the dose of tylenol 500mg &amp; advil ?",
                            "is ## mg of zinc -lrb- daily -rrb- safe ?"]
EVAL_ROUGE = {"rouge1": 0.7392156862745098, "rouge2": 0.441025641025641, "rougeL": 0.7058823529411765,
              "rougeLsum": 0.7058823529411765}


def test_summary_rouge_equals_eval_rouge_py():
    assert [tm.summary_hypothesis(p) for p in SUMMARY_PREDICTIONS] == EVAL_GIGAWORD_HYPOTHESES
    out = tm.summary_rouge_paper(SUMMARY_PREDICTIONS, [[r] for r in SUMMARY_REFERENCES])
    assert out == pytest.approx(EVAL_ROUGE, abs=1e-12)
    import numpy as np

    before = np.random.get_state()[1].copy()
    tm.summary_rouge_paper(SUMMARY_PREDICTIONS, [[r] for r in SUMMARY_REFERENCES])
    assert (np.random.get_state()[1] == before).all()  # the caller's numpy generator is left as it was


def test_results_headline_the_paper_metrics():
    records = [{"id": str(i), "task": "summarization", "prediction": p, "references": [r]}
               for i, (p, r) in enumerate(zip(SUMMARY_PREDICTIONS, SUMMARY_REFERENCES))]
    records += [{"id": "q1", "task": "vqa", "prediction": "left lung", "references": {"left lung": 0.6, "left": 0.4}},
                {"id": "q2", "task": "vqa", "prediction": "left", "references": {"right": 1.0}},
                {"id": "q3", "task": "vqa", "prediction": "yes", "references": {"yes": 1.0}}]
    metrics = compute_metrics(records)
    assert metrics["vqa/accuracy"] == pytest.approx((0.6 + 0.0 + 1.0) / 3)  # ref_dict.get(hyp, 0)
    assert {k: metrics[f"summarization/{k}"] for k in ("rouge1", "rouge2", "rougeL")} == pytest.approx(
        {k: EVAL_ROUGE[k] for k in ("rouge1", "rouge2", "rougeL")}, abs=1e-12)
    assert "summarization/mean_rougeL" in metrics  # the per-sample mean stays beside the paper's number
    assert paper_metrics(metrics) == {k: metrics[k] for k in ("vqa/accuracy", "summarization/rouge1",
                                                              "summarization/rouge2", "summarization/rougeL")}


# ----- VQA ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(vocab_dir):
    from biomedgpt.models.tokenizer import Tokenizer

    return Tokenizer.from_gpt2_files(vocab_dir)


def _vqa_batch(tokenizer, answers: dict[str, float]) -> dict:
    cfg = DataConfig(patch_image_size=32, train_transform="resize", vqa_prompt_type="prev_output")
    import io

    import numpy as np
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(png, format="PNG")
    record = make_record("q0", "vqa", {"question": "which lung is affected", "answers": answers}, png.getvalue())
    ctx = TaskContext(tokenizer=tokenizer, cfg=cfg, rng=random.Random(0), train=False, other_row=lambda r: record)
    return collate(process("vqa", record, ctx), 32, [1.0], with_references=True)


def test_vqa_references_carry_their_confidences(tokenizer):
    batch = _vqa_batch(tokenizer, {"left lung": 0.6, "left": 0.4})
    assert batch["references"] == [{"left lung": 0.6, "left": 0.4}]


def test_vqa_test_decoding_is_greedy_unnormalised_inside_the_answer_set(tokenizer, tmp_path):
    from biomedgpt.models.config import model_config
    from biomedgpt.models.ofa import BiomedGPT

    torch.manual_seed(0)
    model = BiomedGPT(model_config("tiny", d_model=64, ffn_dim=128, encoder_layers=1, decoder_layers=1, heads=2,
                                   resnet_layers=[1, 1, 1], vocab_size=tokenizer.vocab_size)).init_weights().eval()
    answer_file = tmp_path / "trainval_ans2label.json"  # the train+val answers, not the test references
    answers = ["left lung", "left", "right lung", "bilateral", "no"]
    answer_file.write_text(json.dumps({a: i for i, a in enumerate(answers)}))
    batch = _vqa_batch(tokenizer, {"right": 1.0})
    task = load(DownstreamConfig, overrides=[f"tasks.vqa.answers={answer_file}"]).task("vqa")
    assert (task.inference, task.generation.beam_size, task.generation.normalize_scores) == ("trie", 1, False)
    from biomedgpt.data.answers import read_answers

    sub = select_rows(batch, [0], torch.device("cpu"), torch.float32)
    [record] = predict_task(model, tokenizer, "vqa", sub, task, read_answers(answer_file))
    assert record["prediction"] in answers

    # The original's search by hand: from the question prefix, take the most likely token the trie of the
    # answer set allows (renormalised over them) until </s>; the score is the plain sum of log-probabilities.
    encoded = [tokenizer.encode(" " + a) for a in answers]
    target = batch["target"][0].tolist()
    prompt_length = next(i for i, y in enumerate(target) if y != 1)  # the question: no loss taken on it
    prefix = batch["prev_output_tokens"][0].tolist()[1:1 + prompt_length]
    generated, total = [], 0.0
    while True:
        allowed = sorted({e[len(generated)] if len(e) > len(generated) else 2 for e in encoded
                          if e[:len(generated)] == generated})
        prev = torch.tensor([[0] + prefix + generated])
        logits = model(batch["src_tokens"], prev, patch_images=batch["patch_images"],
                       patch_masks=batch["patch_masks"])[0, -1].float()
        mask = torch.full_like(logits, float("-inf"))
        mask[allowed] = 0.0
        lprobs = F.log_softmax(logits + mask, dim=-1)
        token = max(allowed, key=lambda t: lprobs[t].item())
        total += lprobs[token].item()
        if token == 2:
            break
        generated.append(token)
    assert tokenizer.decode(generated).strip() == record["prediction"]
    assert record["score"] == pytest.approx(total, abs=1e-5)  # unnormalised: not divided by the length
    assert abs(total / (len(generated) + 1) - total) > 1e-3  # (a normalised score would differ here)


# ----- selection on the validation split ----------------------------------------------------------------

def _streams(*splits) -> list[dict]:
    return [{"name": f"s{i}", "task": "nli", "remote": f"/data/{s}", "split": s} for i, s in enumerate(splits)]


def test_training_selects_on_validation_and_refuses_test_unless_told():
    data = DataConfig(eval_streams=[StreamConfig(**s) for s in _streams("valid", "test")])
    assert [s.split for s in selection_data(data, False, True).eval_streams] == ["valid"]
    only_test = [f"data.eval_streams={_streams('test')}".replace("'", "")]
    with pytest.raises(ConfigError, match=r"data.eval_streams \(s0\) are all test splits: selecting the best model "
                                          r"on the test split gives optimistic numbers; .*eval.select_on_test=true"):
        load(RunConfig, "finetune/vqa_rad", only_test)
    assert load(RunConfig, "finetune/vqa_rad", only_test + ["eval.select_on_test=true"]).data.eval_streams[0].split \
        == "test"
    assert load(RunConfig, "finetune/vqa_rad", only_test + ["eval.export_best=false"])  # monitoring only: allowed
    untagged = DataConfig(eval_streams=[StreamConfig(name="x", task="nli", remote="/d")])
    assert selection_data(untagged, False, True).eval_streams == untagged.eval_streams


def test_the_trainers_eval_loader_reads_only_the_validation_stream(tmp_path, tokenizer):
    """The in-training evaluation (which selects the best model) iterates the valid stream's samples only."""
    from test_data_loader import write_text_streams

    from biomedgpt.engine.train.builders import build_eval_loader

    (tmp_path / "valid").mkdir()
    (tmp_path / "test").mkdir()
    valid = write_text_streams(tmp_path / "valid", {"nli": 3})["nli"]
    test = write_text_streams(tmp_path / "test", {"nli": 5})["nli"]
    cfg = load(RunConfig, "finetune/mednli", [
        f"data.eval_streams=[{{name: v, task: nli, remote: {valid}, split: valid}}, "
        f"{{name: t, task: nli, remote: {test}, split: test}}]", f"data.cache_dir={tmp_path / 'cache'}",
        "data.num_workers=0", "data.eval_batch_size=2"])
    samples = [uid for batch in build_eval_loader(cfg, tokenizer, 0, 1) for uid in batch["ids"]]
    assert len(samples) == 3  # the test stream's 5 rows are not read


def test_evaluate_split_picks_its_streams_and_decoding():
    from biomedgpt.tools.evaluate import EvaluateConfig, resolve

    test_data, test_downstream = resolve(EvaluateConfig(model_dir="m", recipe="finetune/vqa_rad", split="test"))
    assert [s.name for s in test_data.eval_streams] == ["vqa_rad_test"]
    assert test_downstream.task("vqa").generation.beam_size == 1
    valid_data, valid_downstream = resolve(EvaluateConfig(model_dir="m", recipe="finetune/vqa_rad", split="valid"))
    assert [s.name for s in valid_data.eval_streams] == ["vqa_rad_val"]
    vqa = valid_downstream.task("vqa")
    assert (vqa.generation.beam_size, vqa.generation.normalize_scores) == (5, False)
    with pytest.raises(ConfigError, match=r"data.eval_streams hold several splits \(test, valid\): name one"):
        resolve(EvaluateConfig(model_dir="m", recipe="finetune/vqa_rad"))
    with pytest.raises(ConfigError, match="no eval stream of split 'train'"):
        resolve(EvaluateConfig(model_dir="m", recipe="finetune/vqa_rad", split="train"))


def test_evaluation_every_epoch():
    from biomedgpt.engine.train.trainer import Trainer

    trainer = Trainer.__new__(Trainer)
    trainer.cfg = load(RunConfig, "finetune/peir_gross", ["optim.grad_accum=2", "eval.interval=500"])
    trainer.train_loader = [None] * 14  # 7 optimizer steps per epoch
    due = []
    for step in range(1, 1001):
        trainer.step = step
        if trainer._eval_due():
            due.append(step)
    assert due[:3] == [7, 14, 21] and 500 in due and 1000 in due and 499 not in due
    assert len(due) == 1000 // 7 + 2  # every epoch, and every 500 steps (500 and 1000 are no epoch ends)

