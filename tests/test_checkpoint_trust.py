"""Crafted checkpoints run nothing: every way the project reads a checkpoint file refuses one whose pickle
reaches code (``torch.os.system``, ``builtins.eval``, ``posix.system``, a ``__reduce__`` to
``subprocess.call`` in both pickle protocols) with one line naming the file and the global, and the
marker file each payload would create never appears. Also: files written through the atomic helper get
the process umask's modes; missing and truncated checkpoints get one line from every command."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from biomedgpt.engine.checkpoint.layout import LATEST_FILE, META_FILE, model_states_file, optim_states_file

REPO = Path(__file__).resolve().parents[1]
TAG = "step_00000002"


class _Reduce:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _archive(path: Path, pickled: bytes) -> None:
    """A torch.save zip archive whose data.pkl is ``pickled``."""
    template = io.BytesIO()
    torch.save({}, template)
    source = zipfile.ZipFile(io.BytesIO(template.getvalue()))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for info in source.infolist():
            out.writestr(info.filename, pickled if info.filename.endswith("data.pkl") else source.read(info))


def _call(protocol: int, module: str, name: str, arg: str) -> bytes:
    """``module.name(arg)`` as a pickle (GLOBAL, one string argument, REDUCE)."""
    data = arg.encode()
    return (bytes([0x80, protocol]) + b"c" + f"{module}\n{name}\n".encode() + b"X" + len(data).to_bytes(4, "little")
            + data + b"\x85R.")


def craft(vector: str, path: Path, marker: Path) -> None:
    if vector == "torch.os.system":  # the hole in the old hand-written unpickler, which trusted all of torch
        _archive(path, _call(4, "torch", "os.system", f"touch {marker}"))
    elif vector == "builtins.eval":
        _archive(path, _call(2, "builtins", "eval", f"__import__('pathlib').Path({str(marker)!r}).touch()"))
    elif vector == "posix.system":
        _archive(path, _call(2, "posix", "system", f"touch {marker}"))
    else:  # torch.save of an object whose __reduce__ calls subprocess.call, pickle protocol 2 or 4
        protocol = int(vector[-1])
        torch.save({"module": _Reduce(subprocess.call, ["touch", str(marker)])}, path, pickle_protocol=protocol)


VECTORS = {"torch.os.system": "torch.os.system", "builtins.eval": "builtins.eval", "posix.system": "posix.system",
           # protocol 2 spells subprocess.call as Python 2's commands.call (pickle's fix_imports)
           "subprocess.call, protocol 2": "commands.call", "subprocess.call, protocol 4": "subprocess.call"}


@pytest.fixture(params=list(VECTORS))
def crafted_run(request, tmp_path):
    """A run folder whose newest complete tag holds the crafted file as rank 0's DeepSpeed model states."""
    out = tmp_path / "run"
    tag_dir = out / "checkpoints" / TAG
    tag_dir.mkdir(parents=True)
    marker = tmp_path / "MARKER"
    craft(request.param, tag_dir / model_states_file(), marker)
    (tag_dir / META_FILE).write_text(json.dumps({"step": 2, "world_size": 1, "zero_stage": 0}))
    (out / "checkpoints" / LATEST_FILE).write_text(TAG)
    yield out, tag_dir / model_states_file(), VECTORS[request.param]
    assert not marker.exists(), f"the crafted checkpoint ran code ({request.param})"


def _error_lines(err: str, global_name: str) -> list[str]:
    return [line for line in err.splitlines() if global_name in line]


def test_commands_refuse_a_crafted_checkpoint_in_one_line(crafted_run, tmp_path, capsys, vocab_dir):
    from biomedgpt.tools import consolidate, import_checkpoint, inspect_checkpoint, reshard

    out, crafted, name = crafted_run
    commands = {"inspect-checkpoint": (inspect_checkpoint.main, [f"path={out}"]),
                "consolidate": (consolidate.main, [f"checkpoint={out}", f"output={tmp_path / 'model'}"]),
                "reshard": (reshard.main, [f"checkpoint={out}"]),
                "import-checkpoint": (import_checkpoint.main, [f"source={crafted}", f"output={tmp_path / 'imp'}",
                                                               f"tokenizer={vocab_dir}"])}
    for command, (main, argv) in commands.items():
        assert main(argv) == 1, command
        captured = capsys.readouterr()
        lines = _error_lines(captured.out + captured.err, name)
        assert len(lines) == 1 and f"{crafted}: refers to {name}" in lines[0], (command, captured)
        assert "Traceback" not in captured.err, command
    assert not (tmp_path / "model").exists() and not (tmp_path / "imp").exists()
    assert not (crafted.parent / "universal").exists()


def test_resume_reads_refuse_a_crafted_checkpoint(crafted_run):
    """What the trainer reads when it resumes: the pre-check of every file, its rank state, and every file
    DeepSpeed's ``load_checkpoint`` loads (through the checkpoint engine ``CheckpointManager.attach`` sets)."""
    from biomedgpt.engine.checkpoint.manager import CheckpointManager, ResumeError
    from biomedgpt.engine.checkpoint.resume_checks import check_resumable

    out, crafted, name = crafted_run
    manager = CheckpointManager(out, rank=0, world_size=1, keep_last_n=2)
    assert manager.latest() == TAG
    with pytest.raises(ResumeError, match=f"{crafted}: refers to {name}.*checkpoint {TAG} cannot be resumed"):
        check_resumable(manager.root, TAG, 0, {"size": "tiny"})
    engine = type("Engine", (), {"checkpoint_engine": None})()
    manager.attach(engine)
    with pytest.raises(ResumeError, match=f"{crafted}: refers to {name}"):
        engine.checkpoint_engine.load(str(crafted), map_location=torch.device("cpu"))
    crafted.rename(crafted.parent / "rank_00000.pt")
    with pytest.raises(ResumeError, match=f"rank_00000.pt: refers to {name}"):
        manager.load_rank_state(TAG)


def test_readers_stand_ins_read_what_deepspeed_pickles(tmp_path):
    """The readers allow DeepSpeed's classes by name with stand-ins (no deepspeed import): the names are
    DeepSpeed's own, and a file holding its real objects reads back with the same values; DeepSpeed's
    loads (``live``) get its classes."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from biomedgpt.engine.checkpoint.load import checkpoint_globals, load_checkpoint_file

    live = checkpoint_globals(live=True)
    assert [name for _, name in checkpoint_globals()] == [f"{c.__module__}.{c.__qualname__}" for c, _ in live]
    path = tmp_path / "optim.pt"
    torch.save({"zero_stage": ZeroStageEnum.weights, "fp32": LossScaler(1.0),
                "fp16": DynamicLossScaler(2.0 ** 16, 1000, min_scale=1, delayed_shift=2, consecutive_hysteresis=True),
                "slice": fragment_address(numel=3, start=5), "flat": torch.arange(4.0)}, path)
    read = load_checkpoint_file(path)
    assert read["zero_stage"] == 3 and int(read["zero_stage"]) == 3
    assert (read["fp32"].cur_scale, read["fp16"].cur_scale, read["fp16"].delayed_shift) == (1.0, 2.0 ** 16, 2)
    assert (read["slice"].numel, read["slice"].start) == (3, 5) and read["flat"].tolist() == [0, 1, 2, 3]
    assert isinstance(load_checkpoint_file(path, mmap=False, live=True)["fp16"], DynamicLossScaler)


def test_every_file_of_a_tag_is_checked_before_deepspeed_tools_read_it(tmp_path):
    """A crafted optimizer shard, rank state or stray model-states file beside valid ones is refused by
    ``open_checkpoint`` (which runs before ``zero_to_fp32``/``ds_to_universal`` would unpickle it)."""
    from biomedgpt.engine.checkpoint.zero_reader import open_checkpoint
    from biomedgpt.models.checkpoint import UnsafeCheckpointError

    marker = tmp_path / "MARKER"
    for name in (optim_states_file(0), "rank_00000.pt", model_states_file(1)):
        tag_dir = tmp_path / name / TAG
        tag_dir.mkdir(parents=True)
        torch.save({"module": {"w": torch.zeros(2)}, "buffer_names": [], "dp_world_size": 1}, tag_dir / model_states_file())
        craft("torch.os.system", tag_dir / name, marker)
        with pytest.raises(UnsafeCheckpointError, match=f"{tag_dir / name}: refers to torch.os.system"):
            open_checkpoint(tag_dir)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["missing", "truncated", "junk"])
def test_missing_or_truncated_checkpoints_get_one_line(tmp_path, capsys, vocab_dir, damage):
    from biomedgpt.tools import consolidate, import_checkpoint, inspect_checkpoint, reshard

    tag_dir = tmp_path / "run" / "checkpoints" / TAG
    tag_dir.mkdir(parents=True)
    path = tag_dir / model_states_file()
    torch.save({"module": {"w": torch.zeros(1000)}, "buffer_names": [], "dp_world_size": 1}, path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1500])
    elif damage == "junk":
        path.write_bytes(os.urandom(2000))
    (tag_dir.parent / LATEST_FILE).write_text(TAG)
    missing = tmp_path / "nowhere"
    target = missing if damage == "missing" else tmp_path / "run"
    source = missing / "x.pt" if damage == "missing" else path
    for main, argv in ((inspect_checkpoint.main, [f"path={target}"]),
                       (consolidate.main, [f"checkpoint={target}", f"output={tmp_path / 'model'}"]),
                       (reshard.main, [f"checkpoint={target}"]),
                       (import_checkpoint.main, [f"source={source}", f"output={tmp_path / 'imp'}",
                                                 f"tokenizer={vocab_dir}"])):
        assert main(argv) == 1, (main.__module__, damage)
        captured = capsys.readouterr()
        named = str(missing) if damage == "missing" else str(path)
        lines = [line for line in (captured.out + captured.err).splitlines() if named in line]
        assert len(lines) == 1 and "Traceback" not in captured.err, (main.__module__, captured)


def test_atomic_writes_get_the_umask_modes(tmp_path, vocab_dir):
    """``latest``, ``meta.json``, ``config.yaml`` (core/durable.py) and model folders (consolidated,
    imported: their tokenizer files too) are readable by the group and others under umask 022, as any
    file the process writes."""
    from biomedgpt.core.durable import atomic_write_text
    from biomedgpt.models.checkpoint import write_dir_atomically
    from biomedgpt.models.tokenizer import Tokenizer

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "latest", TAG)
        out = write_dir_atomically(tmp_path / "model", lambda d: Tokenizer.from_gpt2_files(vocab_dir).save(d / "tok"),
                                   False)
        os.umask(0o027)
        atomic_write_text(tmp_path / "meta.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "latest").stat().st_mode & 0o777 == 0o644
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in (out / "tok").iterdir()} == {0o644}
    assert (tmp_path / "meta.json").stat().st_mode & 0o777 == 0o640


def test_a_failed_atomic_write_leaves_the_old_file_or_folder_and_no_temporary(tmp_path):
    """core/durable.py, the one atomic write: an error midway leaves the previous file / folder as it was
    and nothing beside it; a finished write replaces it."""
    from biomedgpt.core.durable import atomic_file, atomic_write_text, write_dir_atomically

    atomic_write_text(tmp_path / "latest", "old")
    with pytest.raises(OSError, match="disk gone"):
        with atomic_file(tmp_path / "latest", "w") as f:
            f.write("half of the new")
            raise OSError("disk gone")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights").write_text("old")

    def fail(folder: Path) -> None:
        (folder / "weights").write_text("half")
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        write_dir_atomically(tmp_path / "model", fail)
    assert (tmp_path / "latest").read_text() == "old" and (tmp_path / "model" / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "model"]
    atomic_write_text(tmp_path / "latest", b"new")
    write_dir_atomically(tmp_path / "model", lambda folder: (folder / "weights").write_text("new"))
    assert (tmp_path / "latest").read_text() == "new" and (tmp_path / "model" / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "model"]


def test_every_rename_into_place_is_core_durables():
    """Files and folders are published only through core/durable.py (fsynced, then renamed): no other module
    renames or fsyncs. Exceptions: ds_to_universal's output moved inside its unpublished folder, the
    watchdog's stack log flushed to disk."""
    root = Path(__file__).resolve().parents[1]
    allowed = {("core/durable.py", "os.replace("), ("core/durable.py", "os.fsync("),
               ("engine/checkpoint/manager.py", "os.replace("), ("engine/distributed/watchdog.py", "os.fsync(")}
    found = []
    for folder in ("core", "models", "data", "engine", "tools", "launchers"):
        for path in sorted((root / folder).rglob("*.py")):
            text = path.read_text()
            for call in ("os.replace(", "os.rename(", ".rename(", "os.fsync(", "shutil.move("):
                name = str(path.relative_to(root))
                if call in text and (name, call) not in allowed:
                    found.append(f"{name}: {call}")
    assert not found, found


# ----------------------------------------------------------------------------------------------
# Disk full during a save: one line at the failing save, latest untouched
# ----------------------------------------------------------------------------------------------


def worker_disk_full(mount: Path) -> None:
    """One gloo rank, writing in the background, then synchronously: a tiny ZeRO-2 engine saves step 1,
    the filesystem is filled to half a checkpoint, step 2 is saved; prints the reported line
    (``CheckpointWriteError``) and ``latest``."""
    import deepspeed

    from biomedgpt.engine.checkpoint.manager import CheckpointManager, CheckpointWriteError
    from biomedgpt.engine.distributed.process_group import init_distributed
    from biomedgpt.models.config import ModelSpec
    from biomedgpt.models.ofa import BiomedGPT

    init_distributed("gloo")
    model = BiomedGPT(ModelSpec(size="tiny", d_model=64, ffn_dim=128, encoder_layers=1, decoder_layers=1,
                                resnet_layers=[1, 1, 1], vocab_size=1000).build())
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config={
        "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9})
    for background in (True, False):
        out = mount / str(background)
        manager = CheckpointManager(out, 0, 1, keep_last_n=1, background=background)
        manager.save(engine, 1, {"step": 1}, {"rng": torch.get_rng_state()}, 2)
        manager.wait()
        size = sum(p.stat().st_size for p in (manager.root / "step_00000001").iterdir())
        free = os.statvfs(out).f_bavail * os.statvfs(out).f_frsize
        (mount / "filler").write_bytes(b"\0" * max(0, free - size // 2))
        try:
            manager.save(engine, 2, {"step": 2}, {"rng": torch.get_rng_state()}, 2)
            print(f"{background} returned from save", flush=True)  # background: the write goes on, training too
            manager.wait()
            assert manager.write_failed
            manager.raise_write_failure()  # what the trainer does at its next step (the flag all-reduced)
        except CheckpointWriteError as exc:
            print(f"{background} line: {exc.line}", flush=True)
        print(f"{background} latest: {(manager.root / 'latest').read_text()}", flush=True)
        manager.close()
        (mount / "filler").unlink()


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_is_reported_at_the_failing_save(small_tmpfs):
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))}
    done = subprocess.run([sys.executable, __file__, str(small_tmpfs)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "True returned from save" in lines and "False returned from save" not in lines, lines
    for background in (True, False):
        root = small_tmpfs / str(background) / "checkpoints"
        assert (f"{background} line: no space left on {root}: checkpoint step 2 not written; latest is step 1"
                in lines), lines
        assert f"{background} latest: step_00000001" in lines
        assert (root / "step_00000001" / META_FILE).exists() and not (root / "step_00000002" / META_FILE).exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    worker_disk_full(Path(sys.argv[1]))
