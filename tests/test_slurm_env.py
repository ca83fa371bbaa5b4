"""The rank environment the SLURM scripts derive from SLURM's variables (no cluster needed)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from biomedgpt.launchers.slurm_env import (
    SlurmEnvError,
    expand_nodelist,
    expand_tasks_per_node,
    hostfile_lines,
    prepare,
    rank_env,
    read_hostfile,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("expr, hosts", [
    ("vm", ["vm"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("a-[1-2]b", ["a-1b", "a-2b"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("gpu[01-02],cpu7,a-[1-2]b", ["gpu01", "gpu02", "cpu7", "a-1b", "a-2b"]),
    ("rack[1-2]-n[0-1]", ["rack1-n0", "rack1-n1", "rack2-n0", "rack2-n1"]),
    ("node-1.cluster", ["node-1.cluster"]),
])
def test_expand_nodelist(expr, hosts):
    assert expand_nodelist(expr) == hosts


@pytest.mark.parametrize("expr, problem", [
    ("gpu[01-03", "unmatched '['"),
    ("gpu01]", "unmatched ']'"),
    ("gpu[3-1]", "runs backwards"),
    ("gpu[a-b]", "bad range"),
    ("gpu[[1-2]]", "nested"),
    ("a,,b", "empty entry"),
    ("", "empty"),
])
def test_expand_nodelist_errors_name_the_expression(expr, problem):
    with pytest.raises(SlurmEnvError, match=re.escape(problem)):
        expand_nodelist(expr)
    with pytest.raises(SlurmEnvError, match=re.escape(repr(expr)) if expr else "empty"):
        expand_nodelist(expr)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2") == [2]
    assert expand_tasks_per_node("8(x4)") == [8, 8, 8, 8]
    assert expand_tasks_per_node("8(x2),4,2(x2)") == [8, 8, 4, 2, 2]
    with pytest.raises(SlurmEnvError, match="bad entry"):
        expand_tasks_per_node("8x4")


def _task_env(nodelist: str, tasks_per_node: str, procid: int, **extra: str) -> dict[str, str]:
    """The variables SLURM gives task ``procid`` of a block-distributed srun step."""
    per_node = expand_tasks_per_node(tasks_per_node)
    node, before = 0, 0
    while procid >= before + per_node[node]:
        before += per_node[node]
        node += 1
    return {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": nodelist, "SLURM_STEP_NODELIST": nodelist,
        "SLURM_NTASKS": str(sum(per_node)), "SLURM_STEP_NUM_TASKS": str(sum(per_node)),
        "SLURM_TASKS_PER_NODE": tasks_per_node, "SLURM_STEP_TASKS_PER_NODE": tasks_per_node,
        "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid - before), "SLURM_NODEID": str(node),
        **extra,
    }


def test_one_node_two_tasks():
    envs = [rank_env(_task_env("vm", "2", r)) for r in range(2)]
    assert [(e["RANK"], e["LOCAL_RANK"]) for e in envs] == [("0", "0"), ("1", "1")]
    for e in envs:
        assert e["WORLD_SIZE"] == "2" and e["LOCAL_WORLD_SIZE"] == "2" and e["NODE_RANK"] == "0"
        assert e["MASTER_ADDR"] == "vm"
        assert e["MASTER_PORT"] == str(20000 + 4242 % 20000)


def test_four_nodes_eight_gpus():
    nodelist = "gpu[01-03,07]"
    envs = [rank_env(_task_env(nodelist, "8(x4)", r, MASTER_PORT="29611")) for r in range(32)]
    assert sorted(int(e["RANK"]) for e in envs) == list(range(32))
    assert {e["WORLD_SIZE"] for e in envs} == {"32"}
    assert {e["LOCAL_WORLD_SIZE"] for e in envs} == {"8"}
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs} == {("gpu01", "29611")}
    by_node = {}
    for e in envs:
        by_node.setdefault(e["NODE_RANK"], []).append(int(e["LOCAL_RANK"]))
    assert by_node == {str(n): list(range(8)) for n in range(4)}
    # rank = node * 8 + local rank under SLURM's block distribution
    assert all(int(e["RANK"]) == int(e["NODE_RANK"]) * 8 + int(e["LOCAL_RANK"]) for e in envs)


def test_uneven_nodes_get_their_own_local_world_size():
    envs = [rank_env(_task_env("a-[1-2]b", "3,1", r)) for r in range(4)]
    assert [e["LOCAL_WORLD_SIZE"] for e in envs] == ["3", "3", "3", "1"]
    assert envs[3]["NODE_RANK"] == "1" and envs[3]["LOCAL_RANK"] == "0"


def test_master_addr_from_the_batch_step_wins():
    env = rank_env(_task_env("n[1-2]", "1(x2)", 1, MASTER_ADDR="10.0.0.5", MASTER_PORT="1234"))
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.5", "1234")


@pytest.mark.parametrize("change, problem", [
    ({"SLURM_PROCID": "8"}, "SLURM_PROCID=8 outside"),
    ({"SLURM_LOCALID": "5"}, "SLURM_LOCALID=5 outside"),
    ({"SLURM_STEP_TASKS_PER_NODE": "3(x2)"}, "do not add up"),
    ({"SLURM_PROCID": "x"}, "SLURM_PROCID='x' is not an integer"),
])
def test_inconsistent_variables_are_named(change, problem):
    with pytest.raises(SlurmEnvError, match=problem):
        rank_env({**_task_env("gpu[1-2]", "4(x2)", 1), **change})


def test_outside_slurm_says_so():
    with pytest.raises(SlurmEnvError, match="SLURM_PROCID not set"):
        rank_env({})


def test_hostfile_for_the_deepspeed_launcher(tmp_path):
    env = {"SLURM_JOB_NODELIST": "gpu[01-03,07]", "SLURM_TASKS_PER_NODE": "8(x4)"}
    lines = hostfile_lines(env)
    assert lines == ["gpu01 slots=8", "gpu02 slots=8", "gpu03 slots=8", "gpu07 slots=8"]
    path = tmp_path / "hostfile"
    path.write_text("\n".join(lines) + "\n")
    assert read_hostfile(path) == [("gpu01", 8), ("gpu02", 8), ("gpu03", 8), ("gpu07", 8)]
    path.write_text("gpu01 slots=8\ngpu02\n")
    with pytest.raises(SlurmEnvError, match=r"hostfile:2"):
        read_hostfile(path)
    with pytest.raises(SlurmEnvError, match="covers 3 nodes"):
        hostfile_lines({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "2(x3)"})


def test_prepare_captures_the_run_and_exports(tmp_path):
    env = {**_task_env("n[1-2]", "2(x2)", 0), "SLURM_RESTART_COUNT": "1", "WANDB_API_KEY": "hush"}
    out = tmp_path / "run"
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"output_dir: {out}\n")
    exports = prepare("biomedgpt.tools.train", ["--config", str(cfg_file), "optim.max_steps=3"], env)
    values = dict(line.removeprefix("export ").split("=", 1) for line in exports.splitlines())
    assert values["BIOMEDGPT_RUN_DIR"] == str(out)
    assert values["MASTER_ADDR"] == "n1" and 1024 <= int(values["MASTER_PORT"]) < 65536
    capture = out / "slurm" / "job4242-attempt1"
    assert values["BIOMEDGPT_CAPTURE_DIR"] == str(capture)
    assert (capture / "hostfile").read_text() == "n1 slots=2\nn2 slots=2\n"
    assert Path(values["BIOMEDGPT_HOSTFILE"]).read_text() == "n1 slots=2\nn2 slots=2\n"
    assert "max_steps: 3" in (capture / "config.yaml").read_text()
    environment = (capture / "environment.txt").read_text()
    assert "SLURM_JOB_NODELIST=n[1-2]" in environment and "WANDB_API_KEY=<redacted>" in environment
    assert "optim.max_steps=3" in (capture / "command.txt").read_text()


def test_prepare_rejects_a_bad_config_before_anything_starts(tmp_path):
    with pytest.raises(SystemExit):
        prepare("biomedgpt.tools.train", [f"output_dir={tmp_path}", "optim.max_stepz=3"], _task_env("vm", "2", 0))
    assert not (tmp_path / "slurm").exists()


def test_rank_exec_sets_the_environment_for_the_real_process(tmp_path):
    """rank-exec replaces itself with ``python -m MODULE``; that process sees the derived variables."""
    (tmp_path / "dump_env.py").write_text(
        "import json, os, signal, sys\n"
        "keys = ['RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT']\n"
        "print(json.dumps({'env': {k: os.environ[k] for k in keys}, 'argv': sys.argv[1:],\n"
        "                  'usr1_ignored': signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN}))\n")
    inherited = {k: v for k, v in os.environ.items()  # a process group set up earlier in this worker is not SLURM's
                 if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env = {**inherited, **_task_env("gpu[01-03,07]", "8(x4)", 13),
           "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    done = subprocess.run([sys.executable, "-m", "biomedgpt.launchers.slurm_env", "action=rank-exec", "module=dump_env",
                           "--", "--config", "x.yaml", "a.b=1"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["env"] == {"RANK": "13", "LOCAL_RANK": "5", "WORLD_SIZE": "32", "LOCAL_WORLD_SIZE": "8",
                          "MASTER_ADDR": "gpu01", "MASTER_PORT": str(20000 + 4242)}
    assert got["argv"] == ["--config", "x.yaml", "a.b=1"]
    assert got["usr1_ignored"]  # an early pre-emption warning cannot kill it before its handler exists
