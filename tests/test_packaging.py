"""The project as a user gets it: self-contained, one installable ``biomedgpt`` package, the ``biomedgpt``
command from any folder, and the standard launchers (torchrun, the deepspeed launcher)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(900)

#: A demo run cut to a few seconds: 2 steps of a micro model on small images, no evaluation.
QUICK = ["optim.max_steps=2", "optim.warmup_steps=1", "log.interval=1", "log.progress_bar=false",
         "log.wandb_mode=disabled", "eval.at_end=false", "data.patch_image_size=64", "data.batch_size=4",
         "data.num_workers=0",
         "model={d_model: 32, ffn_dim: 64, encoder_layers: 1, decoder_layers: 1, heads: 2, "
         "resnet_layers: [1, 1, 1]}"]
CODE_FOLDERS = ("models", "data", "engine", "tools", "launchers", "configs", "ds_configs", "tests", "scripts", ".ci")


def _run(cmd: list[str], cwd: Path, timeout: float = 400, env: dict | None = None) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{output[-5000:]}"
    return output


def _work_dir(tmp_path: Path, demo_data: Path) -> Path:
    """An empty folder whose ./runs/demo-data is the prebuilt demo data (the demo recipe's default place)."""
    work = tmp_path / "work"
    (work / "runs").mkdir(parents=True)
    (work / "runs" / "demo-data").symlink_to(demo_data)
    return work


#: the top-level packages of an OFA checkout (models/, data/, ...) that the foreign folder below holds
FOREIGN_PACKAGES = ("models", "data", "engine", "tools")


def _foreign_packages(work: Path) -> None:
    """Make ``work`` look like an OFA checkout's root: its own top-level ``models``, ``data``, ``engine`` and
    ``tools`` packages (and a ``models.config``), each failing loudly when imported."""
    for name in FOREIGN_PACKAGES:
        (work / name).mkdir()
        (work / name / "__init__.py").write_text(f"raise ImportError('the foreign {name} package was imported')\n")
    (work / "models" / "config.py").write_text("raise ImportError('the foreign models.config was imported')\n")


def _checkpoint_tags(run_dir: Path) -> list[str]:
    ckpts = run_dir / "checkpoints"
    return sorted(p.name for p in ckpts.iterdir() if p.is_dir()) if ckpts.is_dir() else []


def test_no_tracked_code_config_or_test_file_reads_the_shared_folder(repo_root):
    if not (repo_root / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files", "-z", "--", *CODE_FOLDERS, "setup.py"], cwd=repo_root,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    needle = ".." + "/shared"  # spelled in two parts so this file does not match itself
    offenders = [f for f in files if f and (repo_root / f).is_file()
                 and needle in (repo_root / f).read_text(errors="ignore")]
    assert not offenders, f"these tracked files mention {needle}: {offenders}"
    assert len(files) > 50


def test_wheel_installs_one_package_and_runs_from_an_empty_folder(tmp_path, repo_root, demo_data):
    """The wheel holds one ``biomedgpt`` package; its command trains (2 ranks), consolidates and infers from a
    folder holding only the demo data, which is also an OFA checkout's root: its own top-level ``models``,
    ``data``, ``engine``, ``tools`` on ``PYTHONPATH`` (and first on ``sys.path`` of ``python -m``) are never
    imported."""
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)],
         repo_root, timeout=300)
    wheel = next(dist.glob("biomedgpt*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"biomedgpt"}, top
    for packaged in ("biomedgpt/configs/demo.yaml", "biomedgpt/configs/finetune/vqa_rad.yaml",
                     "biomedgpt/ds_configs/zero0.json", "biomedgpt/models/vocab/gpt2/encoder.json",
                     "biomedgpt/models/vocab/gpt2/dict.txt", "biomedgpt/launchers/local.sh"):
        assert packaged in names, packaged

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)],
         tmp_path, timeout=300)
    bin_dir = env_dir / "bin"
    work = _work_dir(tmp_path, demo_data)
    # run from an OFA checkout's root (its own models/, data/ ... on the path): nothing of theirs is imported
    _foreign_packages(work)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": str(py), "PYTHONPATH": str(work)}
    where = _run([str(py), "-c", "import biomedgpt.tools.train as t; print(t.__file__)"], work, env=env)
    assert str(env_dir) in where, f"the wheel's package is not the one imported: {where}"

    out = _run([str(bin_dir / "biomedgpt"), "demo", "-n", "2", *QUICK], work, env=env)
    assert "foreign" not in out
    assert _checkpoint_tags(work / "runs" / "demo"), "no checkpoint written under ./runs/demo"
    _run([str(bin_dir / "biomedgpt"), "consolidate", "checkpoint=runs/demo", "output=model", "progress=false"],
         work, env=env)
    assert (work / "model" / "config.json").is_file() and (work / "model" / "tokenizer").is_dir()
    from pydicom.data import get_testdata_file

    dicom = get_testdata_file("CT_small.dcm")
    out = _run([str(bin_dir / "biomedgpt"), "infer", "model_dir=model", f"image={dicom}", "question=what modality?",
                "image_size=64", "device=cpu"], work, env=env)
    row = json.loads(out.strip().splitlines()[-1])
    assert row["image"] == str(dicom) and row["prediction"].strip() and row["question"] == "what modality?"
    leftovers = sorted(p.name for p in work.iterdir() if p.name not in FOREIGN_PACKAGES)
    assert leftovers == ["model", "runs"], f"the run wrote outside ./runs and its outputs: {leftovers}"


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_standard_launchers_train_two_ranks(launcher, tmp_path, demo_data):
    work = _work_dir(tmp_path, demo_data)
    module = "biomedgpt.tools.train"
    if launcher == "deepspeed":
        cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()),
               "--module", module]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(_free_port()), "-m", module]
    _run([*cmd, "--config", "demo", *QUICK], work, env={"DS_ACCELERATOR": "cpu"})
    assert _checkpoint_tags(work / "runs" / "demo"), f"{launcher}: no checkpoint written"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
