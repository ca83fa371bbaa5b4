"""The distributed environment of a SLURM job, derived from SLURM's own variables.

SLURM tells every task who it is (``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NODEID``, the node list
and the tasks per node in its compressed forms); torch and the streaming loader want ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. Neither the
DeepSpeed launcher's ``--launcher slurm`` nor ``srun`` sets those, so this module translates, in pure
Python (no ``scontrol``), and is what the sbatch scripts in ``launchers/`` call::

    python -m biomedgpt.launchers.slurm_env action=prepare -- --config X.yaml k=v    # batch step: prints exports
    srun python -m biomedgpt.launchers.slurm_env action=rank-exec -- --config X.yaml k=v   # one task per rank
    srun --ntasks-per-node=1 python -m biomedgpt.launchers.slurm_env action=node-exec -- --config X.yaml k=v
                                                       # one task per node, ranks by the deepspeed launcher
    python -m biomedgpt.launchers.slurm_env action=show        # print what this task would get

Everything after ``--`` is the training command line (``python -m <module>`` runs it).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Optional, Sequence

from biomedgpt.core.config import parse_cli
from biomedgpt.core.durable import atomic_write_text

# Environment variables whose values must not land in a run directory.
_SECRET = re.compile(r"KEY|SECRET|TOKEN|PASSW|CREDENTIAL|AUTH", re.IGNORECASE)


class SlurmEnvError(ValueError):
    """A SLURM variable is missing or does not parse; the message names it."""


# ---------------------------------------------------------------- node lists and task counts

def _expand_ranges(body: str, expr: str) -> list[str]:
    """``01-03,07`` -> ['01', '02', '03', '07'] (zero padding kept from the range's start)."""
    out = []
    for part in body.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not match:
            raise SlurmEnvError(f"node list {expr!r}: bad range {part!r} in [{body}]")
        lo, hi = match.group(1), match.group(2) or match.group(1)
        if int(hi) < int(lo):
            raise SlurmEnvError(f"node list {expr!r}: range {part!r} runs backwards")
        width = len(lo) if lo.startswith("0") else 0
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def _split_top_level(expr: str) -> list[str]:
    """Split at the commas that are outside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(expr):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise SlurmEnvError(f"node list {expr!r}: nested brackets")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise SlurmEnvError(f"node list {expr!r}: unmatched ']'")
        elif ch == "," and depth == 0:
            items.append(expr[start:i])
            start = i + 1
    if depth != 0:
        raise SlurmEnvError(f"node list {expr!r}: unmatched '['")
    items.append(expr[start:])
    return items


def expand_nodelist(expr: str) -> list[str]:
    """SLURM's compressed host list, e.g. ``gpu[01-03,07],a-[1-2]b,n[1-2]-ib[0-1]``, as host names in order."""
    expr = expr.strip()
    if not expr:
        raise SlurmEnvError("node list is empty")
    hosts: list[str] = []
    for item in _split_top_level(expr):
        if not item:
            raise SlurmEnvError(f"node list {expr!r}: empty entry")
        names = [""]
        for literal, body in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", item):
            suffixes = _expand_ranges(body, expr) if body else [""]
            names = [name + literal + s for name in names for s in suffixes]
        hosts.extend(names)
    return hosts


def expand_tasks_per_node(expr: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` like ``8(x4),2`` -> [8, 8, 8, 8, 2]."""
    counts: list[int] = []
    for part in expr.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise SlurmEnvError(f"tasks per node {expr!r}: bad entry {part!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


# ---------------------------------------------------------------- the derived environment

def _get(env: Mapping[str, str], *names: str) -> str:
    for name in names:
        if env.get(name):
            return env[name]
    raise SlurmEnvError(f"{' / '.join(names)} not set: not inside a SLURM job (or step)?")


def _int(env: Mapping[str, str], *names: str) -> int:
    value = _get(env, *names)
    try:
        return int(value)
    except ValueError:
        raise SlurmEnvError(f"{names[0]}={value!r} is not an integer") from None


def job_hosts(env: Mapping[str, str]) -> list[str]:
    return expand_nodelist(_get(env, "SLURM_JOB_NODELIST", "SLURM_NODELIST"))


def default_port(env: Mapping[str, str]) -> int:
    """A port every task of the job computes alike (when no batch step chose a free one)."""
    return 20000 + _int(env, "SLURM_JOB_ID", "SLURM_JOBID") % 20000


def rank_env(env: Mapping[str, str]) -> dict[str, str]:
    """torch-style variables for this task of an ``srun`` step (one task per rank)."""
    rank = _int(env, "SLURM_PROCID")
    world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    node = _int(env, "SLURM_NODEID")
    local_rank = _int(env, "SLURM_LOCALID")
    per_node = expand_tasks_per_node(_get(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"))
    if sum(per_node) != world:
        raise SlurmEnvError(f"tasks per node {per_node} do not add up to {world} tasks")
    if not 0 <= rank < world:
        raise SlurmEnvError(f"SLURM_PROCID={rank} outside 0..{world - 1}")
    if not 0 <= node < len(per_node):
        raise SlurmEnvError(f"SLURM_NODEID={node} outside the job's {len(per_node)} nodes")
    if not 0 <= local_rank < per_node[node]:
        raise SlurmEnvError(f"SLURM_LOCALID={local_rank} outside node {node}'s {per_node[node]} tasks")
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(per_node[node]),
        "NODE_RANK": str(node),
        "MASTER_ADDR": env.get("MASTER_ADDR") or job_hosts(env)[0],
        "MASTER_PORT": env.get("MASTER_PORT") or str(default_port(env)),
    }


def hostfile_lines(env: Mapping[str, str]) -> list[str]:
    """The deepspeed launcher's hostfile: every job node with its ranks (= its SLURM tasks)."""
    hosts = job_hosts(env)
    slots = expand_tasks_per_node(_get(env, "SLURM_TASKS_PER_NODE"))
    if len(slots) != len(hosts):
        raise SlurmEnvError(f"SLURM_TASKS_PER_NODE covers {len(slots)} nodes, the node list {len(hosts)}")
    return [f"{host} slots={n}" for host, n in zip(hosts, slots)]


def read_hostfile(path: Path) -> list[tuple[str, int]]:
    entries = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        match = re.fullmatch(r"(\S+)\s+slots=(\d+)", line.strip())
        if not match:
            raise SlurmEnvError(f"{path}:{lineno}: not 'HOST slots=N': {line!r}")
        entries.append((match.group(1), int(match.group(2))))
    return entries


def free_port(host: str = "") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- actions

@dataclass
class SlurmEnvConfig:
    """Translate SLURM's variables for the training ranks (see the module docstring)."""

    action: Literal["prepare", "rank-exec", "node-exec", "show"] = "show"
    module: str = "biomedgpt.tools.train"  # the training entry point, run as ``python -m module``
    hostfile: Optional[str] = None  # node-exec: the hostfile ``prepare`` wrote
    log_dir: Optional[str] = None  # node-exec: where the deepspeed launcher writes one log per rank


def _redacted_env(env: Mapping[str, str]) -> str:
    return "".join(f"{k}={'<redacted>' if _SECRET.search(k) else v}\n" for k, v in sorted(env.items()))


def prepare(module: str, train_args: Sequence[str], env: Mapping[str, str]) -> str:
    """Batch step: validate the run config, capture it with the job's environment, write the hostfile.

    ``module`` is the training entry point; its ``parse(argv)`` reads the settings exactly as the ranks
    will, so a bad key fails here, before any node starts. Returns ``export`` lines for the sbatch
    script: the run and log directories, the hostfile and MASTER_ADDR / MASTER_PORT (a port free on
    this, the first, node unless MASTER_PORT is set).
    """
    import importlib

    import yaml

    from biomedgpt.core.config import to_dict

    cfg = importlib.import_module(module).parse(list(train_args))
    run_dir = Path(cfg.output_dir).resolve()
    job_id = _get(env, "SLURM_JOB_ID", "SLURM_JOBID")
    attempt = env.get("SLURM_RESTART_COUNT", "0")
    capture = run_dir / "slurm" / f"job{job_id}-attempt{attempt}"
    log_dir = run_dir / "slurm" / "logs"
    capture.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    hosts = hostfile_lines(env)
    hostfile = run_dir / "slurm" / f"hostfile.job{job_id}"
    atomic_write_text(hostfile, "\n".join(hosts) + "\n")
    atomic_write_text(capture / "hostfile", "\n".join(hosts) + "\n")
    atomic_write_text(capture / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    atomic_write_text(capture / "command.txt", shlex.join(["python", "-m", module, *train_args]) + "\n")
    atomic_write_text(capture / "environment.txt", _redacted_env(env))
    exports = {
        "BIOMEDGPT_RUN_DIR": str(run_dir),
        "BIOMEDGPT_LOG_DIR": str(log_dir),
        "BIOMEDGPT_HOSTFILE": str(hostfile),
        "BIOMEDGPT_CAPTURE_DIR": str(capture),
        "MASTER_ADDR": env.get("MASTER_ADDR") or job_hosts(env)[0],
        "MASTER_PORT": env.get("MASTER_PORT") or str(free_port()),
    }
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in exports.items())


def _exec(argv: list[str], env: dict[str, str]) -> None:
    """Become the launcher / trainer, so SLURM's signals reach it directly.

    SIGUSR1 starts out ignored: a pre-emption warning that lands before the trainer has installed its
    handler must not kill it, and the deepspeed launcher processes (which SLURM signals too) must
    survive it. Python keeps an inherited SIG_IGN; the trainer's own handler replaces it.
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    sys.stdout.flush()
    os.execvpe(argv[0], argv, env)


def rank_exec(cfg: SlurmEnvConfig, train_args: Sequence[str]) -> None:
    env = dict(os.environ)
    env.update(rank_env(env))
    _exec([sys.executable, "-u", "-m", cfg.module, *train_args], env)


def node_exec(cfg: SlurmEnvConfig, train_args: Sequence[str]) -> None:
    """One task per node: start this node's ranks with the deepspeed launcher (no ssh)."""
    if not cfg.hostfile or not cfg.log_dir:
        raise SlurmEnvError("node-exec needs hostfile=... and log_dir=... (written by action=prepare)")
    env = dict(os.environ)
    entries = read_hostfile(Path(cfg.hostfile))
    node = _int(env, "SLURM_NODEID")
    if not 0 <= node < len(entries):
        raise SlurmEnvError(f"SLURM_NODEID={node} but {cfg.hostfile} lists {len(entries)} nodes")
    env["LOCAL_WORLD_SIZE"] = str(entries[node][1])  # deepspeed's launcher sets only LOCAL_SIZE
    env["NODE_RANK"] = str(node)
    master_addr = env.get("MASTER_ADDR") or entries[0][0]
    master_port = env.get("MASTER_PORT") or str(default_port(env))
    argv = [sys.executable, "-u", "-m", "deepspeed.launcher.runner",
            f"--hostfile={cfg.hostfile}", "--no_ssh", f"--node_rank={node}",
            f"--master_addr={master_addr}", f"--master_port={master_port}",
            "--no_local_rank", "--module", f"--enable_each_rank_log={cfg.log_dir}",
            cfg.module, *train_args]
    _exec(argv, env)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    cfg = parse_cli(SlurmEnvConfig, argv[:split])
    train_args = argv[split + 1:]
    try:
        if cfg.action == "prepare":
            sys.stdout.write(prepare(cfg.module, train_args, os.environ))
        elif cfg.action == "rank-exec":
            rank_exec(cfg, train_args)
        elif cfg.action == "node-exec":
            node_exec(cfg, train_args)
        else:
            print(json.dumps(rank_env(os.environ), indent=1))
    except SlurmEnvError as exc:
        print(f"biomedgpt.launchers.slurm_env: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
