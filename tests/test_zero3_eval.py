"""Evaluation by generation under ZeRO-3 on 2 CPU ranks (gloo) gives what stage 0 gives on the same weights,
on both of its paths: the whole model gathered once per pass, the ranks decoding independently (the default
where it fits: ``biomedgpt evaluate``), and per module in lockstep where it does not (a tiny
``gather_memory_fraction``: in training). The ranks need different numbers of decoder steps (VQA answers
of different lengths inside the trie, summaries that end at different lengths), so on the per-module path
without the lockstep their parameter gathers would not line up."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.test_engine_distributed import TINY_MODEL, WORDS, launch, metrics

pytestmark = pytest.mark.timeout(900)

#: the rank layout a launcher puts into the environment (the evaluation reads it from there)
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

ANSWERS = ["yes", "no", "left lower lobe", "right upper lobe opacity with effusion", "normal", "mild cardiomegaly",
           "stable", "no acute cardiopulmonary finding"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from biomedgpt.data.images import encode_png
    from biomedgpt.data.mds import ShardWriter
    from biomedgpt.data.records import make_record

    root = tmp_path_factory.mktemp("z3eval_shards")
    rng = np.random.default_rng(0)
    for split, rows in (("train", 24), ("eval", 10)):
        vqa, summ = ShardWriter(str(root / split / "vqa")), ShardWriter(str(root / split / "summ"))
        for i in range(rows):
            image = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
            answer = ANSWERS[i % len(ANSWERS)]
            question = "what is seen" + " in this part of the image" * (i % 7) + "?"
            vqa.write(make_record(f"{split}-vqa-{i}", "vqa", {"question": question,
                                                              "answers": {answer: 1.0}}, encode_png(image)))
            summ.write(make_record(f"{split}-sum-{i}", "summarization",
                                   {"source": " ".join(rng.choice(WORDS, 10)),
                                    "summary": " ".join(rng.choice(WORDS, int(rng.integers(1, 5))))}))
        vqa.commit()
        summ.commit()
    return root


def _config(shards: Path, out: Path, vocab_dir: Path, **sections) -> dict:
    streams = lambda split: [{"name": "vqa", "task": "vqa", "remote": str(shards / split / "vqa")},  # noqa: E731
                             {"name": "summ", "task": "summarization", "remote": str(shards / split / "summ")}]
    cfg = {"model": {**TINY_MODEL, "dropout": 0.0},
           "data": {"streams": streams("train"), "eval_streams": streams("eval"), "batch_size": 4,
                    "eval_batch_size": 3, "patch_image_size": 32, "num_workers": 0, "train_transform": "resize",
                    "group_weights": [1.0], "cache_dir": str(out.parent / "cache"),
                    "vqa_prompt_type": "prev_output"},
           "optim": {"lr": 3e-3, "max_steps": 16, "warmup_steps": 1},
           "log": {"interval": 1, "wandb_mode": "disabled", "progress_bar": False},
           "checkpoint": {"interval": 0, "at_end": False},
           "eval": {"interval": 0, "at_end": True, "export_best": True},
           "bpe_dir": str(vocab_dir), "output_dir": str(out)}
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


@pytest.fixture(scope="module")
def weights(shards, tmp_path_factory, vocab_dir) -> Path:
    """A randomly initialised tiny model directory, the same for every test here."""
    import torch

    from biomedgpt.core.config import from_dict
    from biomedgpt.engine.run_config import RunConfig
    from biomedgpt.models.checkpoint import save_pretrained
    from biomedgpt.models.ofa import BiomedGPT
    from biomedgpt.models.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("z3eval_weights") / "model"
    torch.manual_seed(0)
    cfg = from_dict(RunConfig, _config(shards, out, vocab_dir))
    save_pretrained(BiomedGPT(cfg.model.build()).init_weights(), out, Tokenizer.from_gpt2_files(vocab_dir))
    return out


def test_zero3_downstream_eval_matches_stage0(shards, weights, tmp_path, repo_root, vocab_dir):
    # Questions of different lengths: VQA's decoder prompt is the question, so batches take different
    # numbers of forced steps; beam 2 inside the trie ends once two answers have.
    # A budget no model fits in: the measured check sends ZeRO-3 down the per-module lockstep path.
    downstream = {"tasks": {"vqa": {"generation": {"beam_size": 2}},
                            "summarization": {"generation": {"max_len": 6, "beam_size": 2}}},
                  "gather_memory_fraction": 1e-12}
    results, predictions, logs = {}, {}, {}
    for stage in (0, 3):
        out = tmp_path / f"stage{stage}"
        cfg = _config(shards, out, vocab_dir, deepspeed={"zero_stage": stage},
                      optim={"max_steps": 0}, checkpoint={"init_from": str(weights)},
                      eval={"export_best": False, "metric": "vqa/accuracy", "mode": "max", "downstream": downstream})
        logs[stage] = launch(repo_root, cfg, 2, timeout=400)
        results[stage] = [m for m in metrics(out) if "eval/vqa/accuracy" in m][-1]
        predictions[stage] = (out / "eval_predictions" / "step_00000000.jsonl").read_text().splitlines()
    tasks = {json.loads(line)["task"] for line in predictions[0]}
    assert tasks == {"vqa", "summarization"} and len(predictions[0]) == 20
    assert predictions[3] == predictions[0]
    for key, value in results[0].items():
        if key.startswith(("eval/vqa/", "eval/summarization/")):
            assert results[3][key] == pytest.approx(value, abs=1e-9), key
    # The ranks needed different numbers of decoder steps: the lockstep made padding calls.
    assert results[3]["eval/decoding_gathered"] == 0.0
    assert "ZeRO-3 decoding per module in lockstep across ranks: the whole model does not fit" in logs[3]
    assert "ZeRO-3 decoding" not in logs[0]
    assert results[3]["eval/synced_padding_calls"] > 0
    print(json.dumps({f"stage{s}": {k: v for k, v in r.items() if k.startswith("eval/")} for s, r in results.items()}))


def test_evaluate_command_runs_a_zero3_model_across_ranks(shards, weights, tmp_path, repo_root, vocab_dir, one_thread,
                                                          monkeypatch):
    """``biomedgpt evaluate zero_stage=3`` on 2 ranks: the model fits, so it is gathered once and the ranks decode
    independently; the same predictions as one process without DeepSpeed (the reference, run in this process)."""
    from biomedgpt.tools import evaluate

    recipe = tmp_path / "recipe.yaml"
    import yaml

    cfg = _config(shards, tmp_path / "unused", vocab_dir)
    recipe.write_text(yaml.safe_dump({"data": cfg["data"], "eval": {"downstream": {
        "tasks": {"vqa": {"generation": {"beam_size": 2}}, "summarization": {"generation": {"max_len": 6}}}}}}))
    common = [f"model_dir={weights}", f"recipe={recipe}", f"bpe_dir={vocab_dir}"]
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    done = subprocess.run([str(repo_root / "launchers/local.sh"), "-n", "2", "-m", "biomedgpt.tools.evaluate",
                           "--", "zero_stage=3", *common, f"output_dir={tmp_path / 'zero3'}"], cwd=repo_root,
                          env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "ZeRO-3 decoding on the whole model, gathered once for this pass, ranks independent" in done.stderr
    for name in RANK_VARIABLES:  # the in-process evaluation sets them; restored after the test
        monkeypatch.delenv(name, raising=False)
    evaluate.main([*common, f"output_dir={tmp_path / 'alone'}"])
    rows = {name: sorted((json.loads(line) for line in (tmp_path / name / "predictions.jsonl").read_text().splitlines()),
                         key=lambda r: (r["task"], r["id"])) for name in ("alone", "zero3")}
    assert len(rows["alone"]) == 20
    for mine, reference in zip(rows["zero3"], rows["alone"]):
        # batches are made up differently on one and on two ranks: scores agree to float rounding
        assert mine.pop("score") == pytest.approx(reference.pop("score"), rel=1e-5)
        assert mine == reference
    results = {n: json.loads((tmp_path / n / "results.json").read_text()) for n in ("alone", "zero3")}
    assert results["zero3"]["metrics"] == results["alone"]["metrics"]
    assert results["zero3"]["decoding"] == "whole model" and "synced_decoding_per_rank" not in results["zero3"]


def test_gather_rule_counts_every_rank_on_the_host_against_the_budget():
    from biomedgpt.engine.distributed.zero import gather_fits

    gib = 2**30
    assert gather_fits(2 * gib, 10 * gib, 2, 0.5)  # 4 GiB of whole copies within half of 10 GiB
    assert not gather_fits(2 * gib, 10 * gib, 3, 0.5)  # a third rank on the host tips it over
    assert not gather_fits(1, 10 * gib, 1, 0.0)  # 0: always per module
