"""``eval.max_batches`` is a global count: the ranks together evaluate the first max_batches x eval_batch_size
samples of the evaluation order, the same samples on 1 and 2 ranks (loader, loss pass).

The two-rank check's ``worker`` runs in the shared 2-rank job (rank_jobs.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from biomedgpt.data.config import DataConfig, StreamConfig  # noqa: E402
from biomedgpt.data.loader import build_eval_loader, eval_rows_of_rank, global_eval_batches  # noqa: E402
from biomedgpt.data.tasks import TASK_NAMES  # noqa: E402

MAX_BATCHES, BATCH = 5, 3  # 15 rows: 8 on rank 0 and 7 on rank 1, each rank's last batch cut


def rank_order(partition: np.ndarray, node: int, rank: int) -> list[int]:
    """A rank's samples in its loader's order (workers take turns batch by batch), streaming's padding dropped."""
    ids = partition[node, rank].transpose(1, 0, 2).reshape(-1)
    return [int(i) for i in ids if i >= 0]


@pytest.mark.parametrize("samples,canonical,nodes,ranks,workers", [
    (40, 1, 1, 2, 1), (41, 2, 2, 2, 2), (97, 4, 2, 3, 1), (10, 1, 1, 4, 2), (64, 8, 4, 2, 3)])
def test_each_rank_share_is_a_slice_of_the_one_rank_order(samples, canonical, nodes, ranks, workers):
    """streaming's own partitioning: the union of every rank's first ``eval_rows_of_rank`` rows is the first
    max_batches x batch_size samples a single rank sees (for counts that do and do not divide evenly)."""
    from streaming.base.partition.orig import get_partitions_orig
    from streaming.base.world import World

    for batch_size in (1, 3, 4):
        alone = rank_order(get_partitions_orig(samples, canonical, 1, 1, 1, batch_size), 0, 0)
        partition = get_partitions_orig(samples, canonical, nodes, ranks, workers, batch_size)
        for max_batches in (1, 2, 5, 7, 100):
            union = []
            for node in range(nodes):
                for rank in range(ranks):
                    world = World(nodes, ranks, 1, node * ranks + rank)
                    union += rank_order(partition, node, rank)[:eval_rows_of_rank(max_batches, batch_size, world)]
            assert set(union) == set(alone[:max_batches * batch_size]), (batch_size, max_batches)


def eval_ids_and_loss(args: dict, rank: int, world: int) -> dict:
    """The ids this rank evaluates under ``eval.max_batches`` and the loss pass's gathered sample count."""
    from biomedgpt.engine.eval.evaluator import Evaluator
    from biomedgpt.engine.distributed.zero import ZeroPlan
    from biomedgpt.models.tokenizer import Tokenizer

    cfg = DataConfig(eval_streams=[StreamConfig(name="nli", task="nli", remote=args["nli"])], eval_batch_size=BATCH,
                     num_workers=0, cache_dir=args["cache"])
    loader = build_eval_loader(cfg, Tokenizer.from_gpt2_files(args["bpe"]), rank, world, rank, world)
    batches = [batch["ids"] for batch in global_eval_batches(loader, MAX_BATCHES)]

    def forward_loss(batch):  # per-sample statistics of the batch's own tokens (the pass's bookkeeping is tested)
        tokens = (batch["target"] != 1).sum(1)
        return SimpleNamespace(sample_loss=tokens.float(), sample_nll=tokens.float(), sample_tokens=tokens,
                               sample_correct=torch.zeros_like(tokens))

    metrics = Evaluator(None, torch.device("cpu"), rank, world, ZeroPlan(0, world)).loss_metrics(
        loader, forward_loss, TASK_NAMES, MAX_BATCHES)
    return {"batches": batches, "samples": metrics["samples"]}


def worker(out: Path) -> None:
    """One rank of the shared 2-rank job (rank_jobs.py): rank 0 writes the NLI stream into ``out``, then each
    rank writes what it evaluates there."""
    from biomedgpt.engine.distributed.process_group import barrier, init_distributed
    from biomedgpt.models.tokenizer import GPT2_VOCAB_DIR
    from test_data_loader import write_text_streams

    info = init_distributed("gloo")
    if info.rank == 0:
        write_text_streams(out, {"nli": 40})
    barrier()
    args = {"nli": str(out / "nli"), "bpe": str(GPT2_VOCAB_DIR), "cache": str(out / "cache")}
    result = eval_ids_and_loss(args, info.rank, info.world_size)
    (out / f"rank{info.rank}.json").write_text(json.dumps(result))


def test_the_same_samples_on_one_and_two_ranks(rank_jobs, tmp_path, vocab_dir, monkeypatch):
    job = rank_jobs("eval_max_batches")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(key, "1" if "SIZE" in key else "0")
    alone = eval_ids_and_loss({"nli": str(job / "nli"), "bpe": str(vocab_dir), "cache": str(tmp_path / "cache")}, 0, 1)
    ranks = [json.loads((job / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [len(b) for b in alone["batches"]] == [BATCH] * MAX_BATCHES
    assert [[len(b) for b in r["batches"]] for r in ranks] == [[3, 3, 2], [3, 3, 1]]
    one = sorted(i for b in alone["batches"] for i in b)
    two = sorted(i for r in ranks for b in r["batches"] for i in b)
    assert one == two and len(set(one)) == MAX_BATCHES * BATCH
    assert alone["samples"] == ranks[0]["samples"] == ranks[1]["samples"] == MAX_BATCHES * BATCH
