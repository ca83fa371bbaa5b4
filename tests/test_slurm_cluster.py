"""The sbatch scripts on a real SLURM (tests/slurm/cluster.sh): training, pre-emption + requeue, two nodes.

The cluster is started here if it is not up (and stopped again afterwards); the tests skip only when
its daemons cannot start. Every job trains a tiny-shaped model on CPU with gloo for a few steps.
Two jobs serve all four tests: the pre-emption job runs the deepspeed launcher on the two namespaced nodes
(so it holds the two-node test too), and the sweep's array tasks train two srun ranks each (so one of them
holds the two-rank srun test).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from biomedgpt.engine.checkpoint.layout import LATEST_FILE

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
SLURM_DIR = Path(os.environ.get("BIOMEDGPT_SLURM_DIR", "/tmp/biomedgpt-slurm"))
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}

pytestmark = [pytest.mark.timeout(900), pytest.mark.slurm, pytest.mark.slow]


class Slurm:
    """sbatch / scontrol against the test cluster."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.submitted: list[str] = []

    def cancel_all(self) -> None:
        """Cancel what a test submitted, so a failed test never leaves jobs that block the next ones."""
        if self.submitted:
            self.run("scancel", *self.submitted, check=False)
            self.submitted.clear()

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr}")
        return done

    @property
    def partitions(self) -> set[str]:
        return set(self.run("sinfo", "-h", "-o", "%R").stdout.split())

    def submit(self, *args: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"sbatch failed: {done.stderr}"
        job_id = done.stdout.strip().split(";")[0]
        self.submitted.append(job_id)
        return job_id

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, until, timeout: float, what: str) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if until(info):
                return info
            if info["JobState"] in FINAL_STATES:
                break
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} never {what}: {info}\n{_batch_log(info)}")


def _batch_log(info: dict[str, str]) -> str:
    path = Path(info.get("StdOut", ""))
    return f"--- {path}\n{path.read_text()[-4000:]}" if path.is_file() else f"(no batch log at {path})"


def _done(info: dict[str, str]) -> bool:
    return info["JobState"] in FINAL_STATES


@pytest.fixture(autouse=True)
def _cancel_jobs_after_each_test(request):
    yield
    if "slurm" in request.fixturenames:
        request.getfixturevalue("slurm").cancel_all()


@pytest.fixture(scope="module")
def slurm():
    env = {**os.environ, "SLURM_CONF": str(SLURM_DIR / "slurm.conf")}
    already_up = subprocess.run(["sinfo", "-h"], env=env, capture_output=True, timeout=30).returncode == 0 \
        if (SLURM_DIR / "slurm.conf").exists() else False
    try:
        started = subprocess.run(["bash", str(CLUSTER), "start"], env=env, capture_output=True, text=True,
                                 timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"the SLURM daemons could not start: {exc}")
    if started.returncode != 0:
        pytest.skip(f"the SLURM daemons could not start: {started.stderr[-2000:]}")
    cluster = Slurm(env)
    yield cluster
    cluster.cancel_all()
    if not already_up:
        subprocess.run(["bash", str(CLUSTER), "stop"], env=env, capture_output=True, timeout=120)


SOURCES = [
    "the patient reports chest pain radiating to the left arm since this morning with sweating",
    "mild cough and fever for three days, no shortness of breath, lungs clear on auscultation",
    "follow up visit after knee surgery, swelling reduced, walking with a cane, pain controlled",
    "headache with visual aura twice a week, worse with bright light, relieved by sleep",
]


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> Path:
    """A small summarization shard set (text only: no image decoding in a 2-CPU job)."""
    from biomedgpt.data.mds import ShardWriter
    from biomedgpt.data.records import make_record

    out = tmp_path_factory.mktemp("slurm-data") / "summarization"
    writer = ShardWriter(str(out))
    for i in range(64):
        text = SOURCES[i % len(SOURCES)]
        writer.write(make_record(f"s{i}", "summarization", {"source": f"{text} case {i}",
                                                             "summary": " ".join(text.split()[:4])}))
    writer.commit()
    return out


def _config(tmp_path: Path, data: Path, name: str, max_steps: int, checkpoint_interval: int) -> Path:
    """A tiny-shaped training run; every step is logged so tests can check the step sequence."""
    cfg = {
        "model": {"size": "tiny", "d_model": 64, "ffn_dim": 128, "encoder_layers": 1, "decoder_layers": 1, "heads": 2,
                  "resnet_layers": [1, 1, 1]},
        "data": {"streams": [{"name": "summarization", "task": "summarization", "remote": str(data)}],
                 "cache_dir": str(tmp_path / f"cache-{name}"), "batch_size": 2, "patch_image_size": 32,
                 "max_src_tokens": 40, "max_tgt_tokens": 12, "num_workers": 0, "group_weights": [1.0]},
        "optim": {"lr": 1e-3, "max_steps": max_steps, "warmup_steps": 1},
        "eval": {"at_end": False, "interval": 0},
        "log": {"interval": 1, "progress_bar": False, "wandb_mode": "disabled"},
        "checkpoint": {"interval": checkpoint_interval, "keep_last_n": 2},
        "output_dir": str(tmp_path / name),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _steps(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [r["step"] for r in records if "step" in r and "loss" in r]


def _sbatch_args(tmp_path: Path, *extra: str) -> list[str]:
    # --time leaves room for a slow machine: the script's --signal=B:USR1@300 would pre-empt a job near it
    return ["--gpus-per-node=0", "--time=20", f"--output={tmp_path}/slurm-%j.out", f"--chdir={REPO}", *extra]



@pytest.fixture(scope="module")
def preempted(slurm, train_data, tmp_path_factory) -> tuple[Path, str, dict[str, str], bool]:
    """A 6-step run with the deepspeed launcher (its processes get SIGUSR1 from SLURM too and must outlive
    it), on n1 and n2 (separate network namespaces) where the cluster has them, else two ranks on one node:
    after two logged steps it gets SIGUSR1 (what ``--signal=B:USR1@N`` delivers), is requeued and runs to
    its end. (run dir, job id, final scontrol record, on two nodes)."""
    two_nodes = "multi" in slurm.partitions
    where = (["--partition=multi", "--nodes=2", "--ntasks-per-node=1",
              "--export=ALL,BIOMEDGPT_LAUNCHER=deepspeed,GLOO_SOCKET_IFNAME=eth0"] if two_nodes else
             ["--partition=debug", "--ntasks-per-node=2", "--export=ALL,BIOMEDGPT_LAUNCHER=deepspeed"])
    tmp = tmp_path_factory.mktemp("slurm-preempt")
    cfg = _config(tmp, train_data, "run", max_steps=6, checkpoint_interval=1000)
    job = slurm.submit(*_sbatch_args(tmp, *where), "launchers/slurm_train.sbatch", "--config", str(cfg))
    run = tmp / "run"
    deadline = time.monotonic() + 240
    while not ((run / "metrics.jsonl").is_file() and len(_steps(run)) >= 2):
        info = slurm.job(job)
        assert not _done(info) and time.monotonic() < deadline, f"no training steps\n{_batch_log(info)}"
        time.sleep(0.2)
    slurm.run("scancel", "--batch", "--signal=USR1", job)
    slurm.wait(job, lambda i: int(i["Restarts"]) >= 1, 120, "requeued")
    return run, job, slurm.wait(job, _done, 300, "finished after the requeue"), two_nodes


def test_preemption_checkpoints_requeues_and_resumes(preempted):
    """The deepspeed launcher's processes get SIGUSR1 from SLURM too; they must outlive it."""
    run, job, info, _ = preempted
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", _batch_log(info)
    steps = _steps(run)
    assert steps == list(range(1, 7)), f"logged steps have a gap or a repeat: {steps}"
    batch_log = _batch_log(info)
    assert "requeueing job" in batch_log and "ranks exited with status 75" in batch_log
    assert "launcher deepspeed" in batch_log
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", (run / "metrics.jsonl").read_text()
                            + "".join(p.read_text() for p in (run / "slurm" / "logs").iterdir())).group(1))
    assert 2 <= resumed < 6
    assert (run / "slurm" / f"job{job}-attempt1" / "environment.txt").is_file()


def test_two_nodes_in_separate_network_namespaces(preempted):
    """n1 and n2 are slurmd daemons in their own network namespaces: ranks rendezvous across them, on the
    first attempt and again after the requeue."""
    run, job, info, two_nodes = preempted
    if not two_nodes:
        pytest.skip("the cluster has no two-node partition (network namespaces could not be made)")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _batch_log(info)
    for attempt in (0, 1):
        capture = run / "slurm" / f"job{job}-attempt{attempt}"
        assert (capture / "hostfile").read_text() == "n1 slots=1\nn2 slots=1\n"
        assert "MASTER_ADDR" not in (capture / "environment.txt").read_text()  # chosen by prepare: n1
    logs = run / "slurm" / "logs"
    node_logs = {p.name: p.read_text() for p in logs.glob("node-*.log")}
    assert set(node_logs) == {"node-0.log", "node-1.log"}
    assert "--node_rank=1" in node_logs["node-1.log"] and "master_addr=n1" in node_logs["node-1.log"]
    # the deepspeed launcher writes one log per rank and start (named by the time it started): both attempts
    rank_logs = sorted(p.name.split("_")[-1] for p in logs.glob("*_rank*.log"))
    assert rank_logs == ["rank0.log", "rank0.log", "rank1.log", "rank1.log"], rank_logs


@pytest.fixture(scope="module")
def sweep(slurm, train_data, tmp_path_factory) -> tuple[Path, dict[int, dict[str, str]]]:
    """A two-entry sweep as a job array, each task two srun ranks: (its folder, index -> final record)."""
    tmp = tmp_path_factory.mktemp("slurm-sweep")
    first = _config(tmp, train_data, "a", max_steps=1, checkpoint_interval=1000)
    second = _config(tmp, train_data, "b", max_steps=1, checkpoint_interval=2)
    (tmp / "sweep.txt").write_text(f"# two runs\n{first}\n\n{second} optim.max_steps=4\n")
    job = slurm.submit(*_sbatch_args(tmp, "--partition=debug", "--ntasks-per-node=2", "--array=0-1"),
                       "launchers/slurm_sweep.sbatch", str(tmp / "sweep.txt"))
    return tmp, {index: slurm.wait(f"{job}_{index}", _done, 300, "finished") for index in (0, 1)}


def test_sweep_array_runs_one_config_per_index(sweep):
    folder, infos = sweep
    for info in infos.values():
        assert info["JobState"] == "COMPLETED", _batch_log(info)
    assert _steps(folder / "a") == [1]
    assert _steps(folder / "b") == [1, 2, 3, 4]  # the entry's own override


def test_sbatch_trains_two_ranks_with_srun(sweep):
    """The sweep's second task: slurm_train's srun launcher (the default), two ranks, 4 steps, checkpoints."""
    folder, infos = sweep
    info = infos[1]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _batch_log(info)
    run = folder / "b"
    assert _steps(run) == [1, 2, 3, 4]
    assert (run / "checkpoints" / LATEST_FILE).is_file()
    assert (run / "config.yaml").is_file()
    assert "launcher srun" in _batch_log(info)
    logs = run / "slurm" / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["rank-0.log", "rank-1.log"]
    capture = run / "slurm" / f"job{info['JobId']}-attempt0"
    environment = (capture / "environment.txt").read_text()
    assert f"SLURM_JOB_ID={info['JobId']}" in environment and "SLURM_TASKS_PER_NODE=2" in environment
    assert yaml.safe_load((capture / "config.yaml").read_text())["optim"]["max_steps"] == 4
