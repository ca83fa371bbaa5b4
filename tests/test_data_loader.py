"""Streaming loaders: mixing proportions, exact resumption on 2 ranks (gloo processes), 2 -> 1 rank elastic resume.

Run as a script, this file is one rank of the resumption test (see ``rank_main``).
"""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from biomedgpt.data.config import DataConfig, StreamConfig  # noqa: E402
from biomedgpt.data.tasks import TASK_NAMES  # noqa: E402

pytestmark = pytest.mark.timeout(180)


def write_text_streams(root: Path, sizes: dict[str, int]) -> dict[str, str]:
    """NLI / summarisation / report-text shards of the given row counts; returns name -> path."""
    from biomedgpt.data.convert import PrepareConfig, convert

    rows = {
        "nli": lambda i: f"the patient {i} has a fever\tthe patient is febrile\t{i % 3}\n",
        "summ": lambda i: f"question {i} about the dose of aspirin for a child\taspirin dose {i}\n",
        "text": lambda i: f"t{i}\tthe heart size is normal and the lungs are clear in study {i}\n",
    }
    formats = {"nli": "mednli_tsv", "summ": "meqsum_tsv", "text": "text_tsv"}
    out = {}
    for name, count in sizes.items():
        src = root / f"{name}.tsv"
        src.write_text("".join(rows[name](i) for i in range(count)))
        convert(PrepareConfig(input=str(src), format=formats[name], output=str(root / name), progress=False,
                              shard_size="4kb"))
        out[name] = str(root / name)
    return out


def write_caption_stream(root: Path, count: int, shard_size: str = "8kb") -> str:
    from PIL import Image

    from biomedgpt.data.convert import PrepareConfig, convert

    (root / "img").mkdir(exist_ok=True)
    lines = []
    for i in range(count):
        rng = np.random.default_rng(i)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
        (root / "img" / f"{i}.png").write_bytes(buf.getvalue())
        lines.append(json.dumps({"id": f"cap{i}", "image": f"img/{i}.png", "captions": [f"finding number {i}"]}))
    (root / "cap.jsonl").write_text("\n".join(lines) + "\n")
    convert(PrepareConfig(input=str(root / "cap.jsonl"), format="jsonl", kind="caption", output=str(root / "cap"),
                          progress=False, shard_size=shard_size))
    return str(root / "cap")


@pytest.fixture
def single_rank_env(monkeypatch):
    """The loader builders write the rank layout into os.environ; restore it after the test."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(key, "1" if "SIZE" in key else "0")


def test_mixing_proportions_over_10000_samples(tmp_path, vocab_dir, single_rank_env):
    from biomedgpt.data.loader import build_train_loader
    from biomedgpt.models.tokenizer import Tokenizer

    paths = write_text_streams(tmp_path, {"nli": 50, "summ": 30, "text": 70})
    wanted = {"nli": 0.5, "summarization": 0.3, "text_infilling": 0.2}
    tasks = {"nli": "nli", "summ": "summarization", "text": "text_infilling"}
    cfg = DataConfig(streams=[StreamConfig(name=n, task=tasks[n], remote=p, proportion=wanted[tasks[n]])
                              for n, p in paths.items()],
                     batch_size=100, epoch_size=10_000, num_workers=0, cache_dir=str(tmp_path / "cache"),
                     patch_image_size=16)
    loader = build_train_loader(cfg, Tokenizer.from_gpt2_files(vocab_dir))
    counts: Counter = Counter()
    for batch in loader:
        counts.update(TASK_NAMES[i] for i in batch["task_ids"].tolist())
        assert batch["patch_images"].shape[1:] == (3, 16, 16) and not batch["patch_masks"].any()
    assert sum(counts.values()) == 10_000
    for task, share in wanted.items():
        assert abs(counts[task] / 10_000 - share) < 0.02, counts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, args: dict, tmp_path: Path, tag: str) -> list[dict]:
    """Start ``world`` rank processes of this file (gloo), return each rank's JSON result."""
    port = free_port()
    procs = []
    for rank in range(world):
        out = tmp_path / f"{tag}-{rank}.json"
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(REPO)}
        env.pop("LOCAL_WORLD_SIZE", None)  # as under the DeepSpeed launcher
        procs.append((subprocess.Popen([sys.executable, __file__, json.dumps({**args, "out": str(out)})], env=env,
                                       stderr=subprocess.PIPE), out))
    results = []
    for proc, out in procs:
        _, err = proc.communicate(timeout=150)
        assert proc.returncode == 0, err.decode()[-3000:]
        results.append(json.loads(out.read_text()))
    return results


def run_epoch(args: dict, rank: int, world: int, state: dict | None = None, stop_after: int = 0):
    """Iterate one epoch (from ``state`` when given), recording each batch's ids and tensor checksums,
    and the loader state after ``stop_after`` batches."""
    from biomedgpt.data.loader import build_train_loader
    from biomedgpt.models.tokenizer import Tokenizer

    cfg = DataConfig(streams=[StreamConfig(name="nli", task="nli", remote=args["nli"]),
                              StreamConfig(name="cap", task="caption", remote=args["cap"])],
                     batch_size=4, num_workers=1, patch_image_size=32, cache_dir=args["cache"])
    loader = build_train_loader(cfg, Tokenizer.from_gpt2_files(args["bpe"]), rank, world)
    if state:
        loader.load_state_dict(state)
    batches, saved = [], None
    for step, batch in enumerate(loader):
        batches.append({"ids": batch["ids"], "src": int(batch["src_tokens"].sum()), "tgt": int(batch["target"].sum()),
                        "img": round(float(batch["patch_images"].double().sum()), 3)})
        if step + 1 == stop_after:
            saved = loader.state_dict()
    return batches, saved


def rank_main(args: dict) -> None:
    """One rank of two: an uninterrupted epoch (state saved after 3 batches), then a run resumed from it."""
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    full, state = run_epoch(args, rank, world, stop_after=3)
    local_world_size = os.environ["LOCAL_WORLD_SIZE"]
    resumed, _ = run_epoch(args, rank, world, state=state)
    Path(args["out"]).write_text(json.dumps({"full": full, "resumed": resumed, "state": state,
                                             "local_world_size": local_world_size}))
    dist.barrier()
    dist.destroy_process_group()


def test_resume_exact_on_two_ranks_and_elastic_to_one(tmp_path, vocab_dir, single_rank_env):
    args = {"nli": write_text_streams(tmp_path, {"nli": 60})["nli"], "cap": write_caption_stream(tmp_path, 36),
            "bpe": str(vocab_dir), "cache": str(tmp_path / "cache")}
    ranks = run_ranks(2, args, tmp_path, "ranks")
    assert [r["local_world_size"] for r in ranks] == ["2", "2"]  # derived from host names, not the launcher
    assert all(len(r["full"]) == 12 for r in ranks)  # 96 rows / (2 ranks x 4)
    state = ranks[0]["state"]
    assert state == ranks[1]["state"] and state["sample_in_epoch"] == 24
    for r in ranks:
        assert r["resumed"] == r["full"][3:]
    single, _ = run_epoch(args, 0, 1, state=state)  # this process as the only rank
    seen = Counter(i for r in ranks for b in r["full"][:3] for i in b["ids"])
    seen.update(i for b in single for i in b["ids"])
    assert sorted(seen) == sorted([f"row{n}" for n in range(1, 61)] + [f"cap{n}" for n in range(36)])
    assert set(seen.values()) == {1}


def test_config_from_dict_rejects_unknown_keys():
    from biomedgpt.core.config import ConfigError, from_dict

    cfg = from_dict(DataConfig, {"streams": [{"name": "a", "task": "nli", "remote": "s3://b/a", "proportion": 1.0}],
                                 "batch_size": 8})
    assert cfg.streams[0].remote == "s3://b/a" and cfg.batch_size == 8
    with pytest.raises(ConfigError, match="streams\\[0\\].bogus"):
        from_dict(DataConfig, {"streams": [{"name": "a", "task": "nli", "remote": "x", "bogus": 1}]})
    with pytest.raises(ConfigError, match="proportion for every stream or for none"):
        from_dict(DataConfig, {"streams": [{"name": "a", "task": "nli", "remote": "x", "proportion": 0.5},
                                           {"name": "b", "task": "nli", "remote": "y"}]})


if __name__ == "__main__":
    rank_main(json.loads(sys.argv[1]))


def test_streaming_threads_do_not_lock_the_cache_for_every_sample(tmp_path, vocab_dir, single_rank_env, monkeypatch):
    """streaming's prepare thread asks for every sample's shard (``predownload`` ahead of the reader); without cache_limit a shard found
    whole once is not locked, stat'ed and touched again (that was a third of the loader's CPU)."""
    from streaming import StreamingDataset

    from biomedgpt.data.loader import build_train_loader
    from biomedgpt.models.tokenizer import Tokenizer

    remote = write_caption_stream(tmp_path, 48, shard_size="64kb")  # about 11 rows per shard
    shards = len(json.loads((Path(remote) / "index.json").read_text())["shards"])
    calls = []
    original = StreamingDataset.prepare_shard
    monkeypatch.setattr(StreamingDataset, "prepare_shard",
                        lambda self, shard_id, blocking=True: (calls.append(shard_id), original(self, shard_id, blocking)))
    cfg = DataConfig(streams=[StreamConfig(name="cap", task="caption", remote=remote)], batch_size=8,
                     predownload=8, num_workers=0, cache_dir=str(tmp_path / "cache"), patch_image_size=32)
    seen = sum(len(batch["ids"]) for batch in build_train_loader(cfg, Tokenizer.from_gpt2_files(vocab_dir)))
    assert seen == 48 and 1 < shards < 10
    assert len(calls) <= 3 * shards, (len(calls), shards)  # per shard at most: each thread and the first read


def test_the_loader_imports_streaming_without_transformers():
    """streaming's package ``__init__`` files import transformers (seconds per rank); the loader and the MDS writer
    import streaming's own modules without them, and ``import streaming`` later still gives its real names. Nor
    do they import torchvision (it imports torch._dynamo, ~2.4 s per process) before an image is transformed."""
    probe = ("import sys; import biomedgpt.data.loader, biomedgpt.data.mds, biomedgpt.data.convert.pipeline; "
             "assert 'transformers' not in sys.modules, 'transformers imported'; "
             "assert 'torchvision' not in sys.modules and 'torch._dynamo' not in sys.modules, 'torchvision imported'; "
             "import streaming; from streaming import StreamingDataLoader, text; "
             "from streaming.base.dataloader import StreamingDataLoader as real; "
             "assert StreamingDataLoader is real and streaming.StreamingDataset is biomedgpt.data.loader.StreamingDataset; "
             "print(streaming.__version__)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()


def test_loader_workers_of_a_wandb_run_keep_every_image_row(tmp_path):
    """wandb's import hooks fail in a forked process: a module a loader worker (forked) imported first, as
    torchvision was once streaming no longer imported it, turned every image row of a wandb run into a bad row.
    With wandb running, a worker-fed epoch of image rows comes through whole and says nothing."""
    remote = write_caption_stream(tmp_path, 12)
    script = f"""
import wandb
from biomedgpt.data.config import DataConfig, StreamConfig
from biomedgpt.data.loader import build_train_loader
from biomedgpt.models.tokenizer import Tokenizer
run = wandb.init(project="loader", dir={str(tmp_path)!r}, mode="offline", settings=wandb.Settings(silent=True))
cfg = DataConfig(streams=[StreamConfig(name="cap", task="caption", remote={remote!r})], batch_size=4, num_workers=1,
                 cache_dir={str(tmp_path / "cache")!r}, patch_image_size=32)
batches = list(build_train_loader(cfg, Tokenizer.from_gpt2_files()))
print(sum(len(b["ids"]) for b in batches), sum(int(b["patch_masks"].sum()) for b in batches))
run.finish()
"""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=150, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["12", "12"], result.stdout  # every row, every one with its image
    assert "ForkedError" not in result.stderr and "skipped" not in result.stderr, result.stderr[-3000:]
