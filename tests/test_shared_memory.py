"""streaming's shared memory on a machine several jobs share (``biomedgpt.data.shared_memory``): jobs starting
together each get their own prefix; a crashed run's segments are removed and live ones are left alone."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_data_loader import free_port, write_text_streams  # noqa: E402

pytestmark = pytest.mark.timeout(300)
JOBS, ROUNDS = 3, 3


def rank_main(args: dict) -> None:
    """One rank of a 2-rank job: build the job's dataset ROUNDS times, recording streaming's prefix."""
    import gc

    import torch.distributed as dist

    from biomedgpt.data.config import DataConfig, StreamConfig
    from biomedgpt.data.loader import TaskStreamingDataset, set_distributed_env
    from biomedgpt.models.tokenizer import Tokenizer

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    set_distributed_env(rank, world, rank, world)
    cfg = DataConfig(streams=[StreamConfig(name="nli", task="nli", remote=args["nli"])], batch_size=2,
                     num_workers=0, cache_dir=args["cache"])
    tokenizer = Tokenizer.from_gpt2_files(args["bpe"])
    prefixes = []
    for _ in range(ROUNDS):
        dataset = TaskStreamingDataset(cfg.streams, cfg, tokenizer, train=True, cache_subdir="train")
        prefixes.append(dataset._shm_prefix_int)
        assert dataset[0]
        dist.barrier()
        del dataset
        gc.collect()
    Path(args["out"]).write_text(json.dumps(prefixes))
    dist.barrier()
    dist.destroy_process_group()


def test_jobs_starting_together_each_register_their_own_prefix(tmp_path, vocab_dir):
    """Three 2-rank jobs build their datasets at once, three times each: every rank opens its dataset (no
    "shared memory registered does not match local leader"), and the ranks of a job agree on the prefix."""
    procs = []
    for job in range(JOBS):
        root = tmp_path / f"job{job}"
        root.mkdir()
        args = {"nli": write_text_streams(root, {"nli": 24})["nli"], "bpe": str(vocab_dir),
                "cache": str(root / "cache")}
        port = free_port()
        for rank in range(2):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "OMP_NUM_THREADS": "1"}
            out = root / f"rank{rank}.json"
            procs.append((job, subprocess.Popen([sys.executable, __file__, json.dumps({**args, "out": str(out)})],
                                                env=env, stderr=subprocess.PIPE, text=True), out))
    errors = [(job, proc.communicate(timeout=240)[1]) for job, proc, _ in procs]
    failed = [f"job {job}: {err[-1500:]}" for (job, err), (_, proc, _) in zip(errors, procs) if proc.returncode]
    assert not failed, "\n".join(failed)
    prefixes: dict[int, list] = {}
    for job, _, out in procs:
        prefixes.setdefault(job, []).append(json.loads(out.read_text()))
    for job, (first, second) in prefixes.items():
        assert first == second, (job, first, second)


def _holder(name: str) -> subprocess.Popen:
    """A process that creates shared memory ``name`` (streaming's naming) and keeps it mapped."""
    code = ("import time\nfrom multiprocessing.shared_memory import SharedMemory\n"
            f"shm = SharedMemory({name!r}, True, 64)\nprint('ready', flush=True)\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_only_segments_no_process_maps_are_removed(monkeypatch):
    from biomedgpt.data import shared_memory

    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm on this machine")
    tag = os.getpid() % 1000
    live, crashed, fresh = (f"{990000 + tag:06}_locals", f"{991000 + tag:06}_locals", f"{992000 + tag:06}_barrier")
    keeper = _holder(live)
    victim = _holder(crashed)
    try:
        # a killed job (its resource tracker with it): the segment stays in /dev/shm, mapped by nobody
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        assert (shm / crashed).exists()
        (shm / fresh).write_bytes(b"\0" * 64)  # just created, not yet mapped by its creator
        monkeypatch.setattr(shared_memory, "ORPHAN_MIN_AGE_S", 2.0)
        old = time.time() - 60
        for name in (live, crashed):
            os.utime(shm / name, (old, old))
        removed = shared_memory.remove_orphaned_segments()
        assert crashed in removed and not (shm / crashed).exists()
        assert (shm / live).exists() and live not in removed  # mapped by a live process
        assert (shm / fresh).exists() and fresh not in removed  # younger than ORPHAN_MIN_AGE_S
    finally:
        os.killpg(keeper.pid, signal.SIGKILL)
        for name in (live, crashed, fresh):
            (shm / name).unlink(missing_ok=True)


if __name__ == "__main__":
    rank_main(json.loads(sys.argv[1]))
