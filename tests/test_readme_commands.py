"""Every command of the README's ``bash`` blocks, run as a new user runs it: from an empty folder, as written,
with the inputs the README assumes a user has (made here in the documented formats from packaged real data)
and only tiny size overrides added. The commands are read from README.md at test time, so a README command
that breaks, or a new one nobody classified, fails this test. What cannot run here (a GPU cluster, the whole
install, a released file of gigabytes) is listed in SKIPPED with the reason; nothing is skipped silently."""
from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_data_convert import free_port, read_rows
from tests.test_scaling_sweep import TINY as TINY_SWEEP, check_the_readme_sweep

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

#: README commands that cannot run in a test, and why (matched exactly, comments stripped).
SKIPPED = {
    "bash scripts/demo.sh": "installs the pinned environment, then the 7-minute demo (the demo's own test holds it)",
    "bash scripts/test.sh": "the whole test suite, this test included",
    "biomedgpt train -n 8 --config pretrain_base deepspeed.zero_stage=3 optim.lr=5e-5":
        "8 ranks of the base model on the pretraining mixture's data (a GPU node)",
}

#: a model small enough for seconds per step on 2 CPU cores (any model.* key is a documented override)
TINY_MODEL = ["model.d_model=32", "model.ffn_dim=64", "model.encoder_layers=1", "model.decoder_layers=1",
              "model.heads=2", "model.resnet_layers=[1,1,1]"]
#: a run of 2 steps on small batches
TINY_RUN = [*TINY_MODEL, "optim.max_steps=2", "data.batch_size=2", "data.eval_batch_size=4", "eval.max_batches=1",
            "data.num_workers=0", "data.patch_image_size=64", "log.progress_bar=false"]

#: README command (as written, comments stripped) -> (overrides appended, files it must leave behind)
RUNS: dict[str, tuple[list[str], list[str]]] = {
    "biomedgpt import-checkpoint source=biomedgpt_base.pt output=ckpt/biomedgpt-base":
        ([], ["ckpt/biomedgpt-base/model.safetensors", "ckpt/biomedgpt-base/config.json"]),
    "biomedgpt import-checkpoint source=biomedgpt_base.pt ema=true output=ckpt/base-ema":
        ([], ["ckpt/base-ema/model.safetensors"]),
    "biomedgpt train --help": ([], []),
    "biomedgpt prepare-data input=vision_language.tsv format=vision_language_tsv output=s3://bucket/vl":
        ([], []),  # checked in the bucket (test_readme_command)
    "biomedgpt prepare-data input=vqa.parquet format=parquet kind=vqa output=shards/vqa columns={answers: answer}":
        ([], ["shards/vqa/index.json"]),
    "biomedgpt prepare-data input=reports.jsonl kind=caption image_root=images/ output=shards/cap":
        ([], ["shards/cap/index.json"]),
    "biomedgpt prepare-data input=dicoms/ format=dicom kind=caption columns={captions: StudyDescription} "
    "output=shards/dcm": ([], ["shards/dcm/index.json"]),
    "biomedgpt prepare-data input=llava_med.json format=llava_json image_root=images/ output=shards/instruct":
        ([], ["shards/instruct/index.json"]),
    "biomedgpt train --config finetune/vqa_rad model.size=base checkpoint.init_from=ckpt/biomedgpt-base":
        # the imported stand-in is tiny-shaped; fp16 falls back to fp32 on CPU; 2 steps, evaluated on val
        ([*TINY_RUN, "optim.grad_accum=1", "eval.interval=2", "eval.downstream.max_batches=1"], ["runs/vqa_rad/best/model.safetensors"]),
    "biomedgpt evaluate recipe=runs/vqa_rad/config.yaml split=test model_dir=runs/vqa_rad/best "
    "output_dir=eval/vqa_rad": ([], ["eval/vqa_rad/results.json",
                                                                     "eval/vqa_rad/predictions.jsonl"]),
    "biomedgpt infer model_dir=runs/vqa_rad/best image=scan.dcm task=vqa question=what modality is this? "
    "answers=data/vqa_rad/trainval_ans2label.json": (["image_size=64"], []),
    "biomedgpt infer model_dir=runs/meqsum/best task=summarization text=SUBJECT: aspirin MESSAGE: what dose for a "
    "child?": ([], []),
    "biomedgpt infer model_dir=runs/mednli/best task=nli text=the patient has a fever "
    "hypothesis=the patient is febrile": ([], []),
    "biomedgpt inspect-checkpoint path=runs/demo": ([], []),
    # the bracketed settings are optional (dropped from the line): ema=true needs a run trained with EMA,
    # verify=true a ZeRO 1-3 checkpoint (the demo's is stage 0; tests/test_checkpoint_tools.py verifies)
    "biomedgpt consolidate checkpoint=runs/demo output=models/demo dtype=bf16":
        ([], ["models/demo/model.safetensors", "models/demo/config.json"]),
    "biomedgpt reshard checkpoint=runs/demo": ([], []),
    "biomedgpt export-hf model=models/demo output=export/demo-hf": ([], ["export/demo-hf"]),
    "biomedgpt export-hf model=models/demo output=export/demo-tf format=transformers image_size=256":
        ([], ["export/demo-tf/config.json", "export/demo-tf/modeling_biomedgpt.py", "export/demo-tf/model.safetensors"]),
    "biomedgpt sweep --config sweeps/demo_sizes": (TINY_SWEEP, ["runs/sweeps/demo_sizes/report.md"]),
    "biomedgpt sweep --config sweeps/demo_sizes overrides.optim.max_steps=10 root=/tmp/sweeps":
        # root= moved into this test's folder (the only change); one tiny size of 2 steps (the line above
        # trains the two sizes that the collect and fit-scaling lines below read)
        (["axes=[{name: model, labels: [micro], values: [{d_model: 16, ffn_dim: 32, encoder_layers: 1, "
          "decoder_layers: 1, heads: 2}]}]", *TINY_SWEEP[1:]], ["sweeps-root/demo_sizes/report.md"]),
    "biomedgpt collect sweep_dir=runs/sweeps/demo_sizes": ([], ["runs/sweeps/demo_sizes/results.parquet"]),
    "biomedgpt fit-scaling sweep_dir=runs/sweeps/demo_sizes": ([], ["runs/sweeps/demo_sizes/fits.json"]),
    "biomedgpt estimate --config pretrain_xlarge gpus_per_node=8 nodes=2": ([], []),
    "biomedgpt estimate model.size=xlarge deepspeed.zero_stage=3 deepspeed.precision=bf16 data.batch_size=16 "
    "data.patch_image_size=384 gpu=A100 gpus_per_node=8 nodes=2 interconnect_gbps=50": ([], []),
    "biomedgpt estimate --config demo gpu=cpu gpus_per_node=1 measure=true":  # the demo's steps take ~10 s here
        ([*TINY_MODEL, "data.batch_size=2", "data.patch_image_size=64"], []),
}


def readme_commands() -> list[str]:
    """The command lines of README.md's ``bash`` blocks: continuations joined, comments and the
    optional ``[key=value]`` settings of a synopsis dropped, quoting resolved as a shell does."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", README.read_text(), re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = [w for w in shlex.split(line, comments=True) if not re.fullmatch(r"\[.*\]", w)]
            if words:
                commands.append(shlex.join(words).replace("'", ""))
    return commands


def as_written(words: list[str]) -> str:
    return shlex.join(words).replace("'", "")


def test_every_readme_command_is_classified():
    """A README command nobody ran or skipped here (new, or changed) fails: the test follows the README."""
    commands = readme_commands()
    unknown = [c for c in commands if c not in RUNS and c not in SKIPPED]
    assert not unknown, f"README commands neither run nor skipped by this test: {unknown}"
    stale = [c for c in [*RUNS, *SKIPPED] if c not in commands]
    assert not stale, f"commands this test runs that the README no longer has: {stale}"


def _readme_words() -> list[tuple[str, list[str]]]:
    """(as written, argv) of every runnable README command, in README order."""
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", README.read_text(), re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = [w for w in shlex.split(line, comments=True) if not re.fullmatch(r"\[.*\]", w)]
            if words and as_written(words) in RUNS:
                out.append((as_written(words), words))
    return out


def _write_inputs(folder: Path, demo_data: Path) -> None:
    """The files the README assumes a user has, in the documented formats, from packaged real data."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pydicom.data import get_testdata_file

    from biomedgpt.data.demo import SKIMAGE_CAPTIONS, skimage_rows

    images = {row["id"].removeprefix("skimage-"): row["image"] for row in skimage_rows()}
    (folder / "images").mkdir()
    for name, data in images.items():
        (folder / "images" / f"{name}.png").write_bytes(data)
    tsv = []  # the original vision_language.tsv: uid, image, caption, question, refs, objects, dataset, type
    for i, (name, caption) in enumerate(SKIMAGE_CAPTIONS.items()):
        b64 = base64.urlsafe_b64encode(images[name]).decode()
        tsv.append("\t".join([f"c{i}", b64, caption, "", "", "", "skimage", "caption"]))
        tsv.append("\t".join([f"q{i}", b64, "", "is this a fundus image?",
                              f"1.0|!+{'yes' if 'fundus' in caption or name == 'retina' else 'no'}", "", "skimage",
                              "qa"]))
    (folder / "vision_language.tsv").write_text("\n".join(tsv) + "\n")
    answers = {"retina": "fundus", "microaneurysms": "fundus", "immunohistochemistry": "histology",
               "cell": "microscopy"}
    pq.write_table(pa.table({"id": list(answers), "question": ["what kind of image is this?"] * len(answers),
                             "answer": list(answers.values()),
                             "image": [{"bytes": images[n], "path": f"{n}.png"} for n in answers]}),
                   folder / "vqa.parquet")
    (folder / "reports.jsonl").write_text("".join(json.dumps({"id": n, "image": f"{n}.png", "caption": c}) + "\n"
                                                  for n, c in SKIMAGE_CAPTIONS.items()))
    (folder / "llava_med.json").write_text(json.dumps([
        {"id": n, "image": f"{n}.png", "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                                                         {"from": "gpt", "value": c}]}
        for n, c in SKIMAGE_CAPTIONS.items()]))
    (folder / "dicoms").mkdir()
    for name in ("RG1_UNCR.dcm", "MR2_UNCI.dcm", "RG3_UNCI.dcm", "CT_small.dcm"):  # each has a StudyDescription
        shutil.copy(get_testdata_file(name), folder / "dicoms" / name)
    shutil.copy(get_testdata_file("RG1_UNCR.dcm"), folder / "scan.dcm")
    # finetune/vqa_rad's data (data/vqa_rad/{train,val,test} + the answer set), here the demo's DICOM VQA shards
    vqa_rad = folder / "data" / "vqa_rad"
    vqa_rad.mkdir(parents=True)
    for split, source in (("train", "train"), ("val", "val"), ("test", "val")):
        (vqa_rad / split).symlink_to(demo_data / "dicom_vqa" / source, target_is_directory=True)
    demo_answers = sorted({answer for split in ("train", "val")
                           for row in read_rows(str(demo_data / "dicom_vqa" / split), folder.parent, split)
                           for answer in row["meta"]["answers"]})
    (vqa_rad / "trainval_ans2label.json").write_text(json.dumps({a: i for i, a in enumerate(demo_answers)}))


def _released_file(model_dir: Path, path: Path) -> None:
    """A fairseq-layout released file (``model`` and ``extra_state.ema``) of a trained model directory: the
    project's export names back to the original's, as BiomedGPT's own checkpoints hold them."""
    import torch
    from safetensors.torch import load_file

    state = load_file(model_dir / "model.safetensors")
    torch.save({"model": state, "extra_state": {"ema": state}}, path)


def run(argv: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "biomedgpt.tools.cli", *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, demo_data):
    """An empty folder holding what a user of the README has: the demo shards where the demo config looks
    for them, the input files of prepare-data, a released-format checkpoint, a small trained demo run
    (whose best model also stands in for the MeQSum / MedNLI fine-tuned models), a moto S3 server."""
    from moto.server import ThreadedMotoServer
    import boto3

    folder = tmp_path_factory.mktemp("readme") / "fresh"
    (folder / "runs").mkdir(parents=True)
    (folder / "runs" / "demo-data").symlink_to(demo_data, target_is_directory=True)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = dict(os.environ)
    os.environ.update({"S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1",
                       "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "2"})
    s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    s3.create_bucket(Bucket="bucket")
    try:
        _write_inputs(folder, demo_data)
        done = run(["train", "--config", "demo", *TINY_RUN], folder)
        assert done.returncode == 0, done.stderr[-3000:]
        _released_file(folder / "runs" / "demo" / "best", folder / "biomedgpt_base.pt")
        for task in ("meqsum", "mednli"):
            (folder / "runs" / task).mkdir()
            shutil.copytree(folder / "runs" / "demo" / "best", folder / "runs" / task / "best")
        yield folder, s3
    finally:
        server.stop()
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.parametrize("command", [c for c, _ in _readme_words()], ids=lambda c: c[:60])
def test_readme_command(workspace, command, tmp_path):
    """The README command as written (plus its tiny overrides) exits 0 and leaves its output behind."""
    folder, s3 = workspace
    words = dict(_readme_words())[command]
    extra, outputs = RUNS[command]
    argv = [w if w != "root=/tmp/sweeps" else f"root={folder / 'sweeps-root'}" for w in words[1:]]
    done = run([*argv, *extra], folder)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    for output in outputs:
        assert (folder / output).exists(), f"{command}: {output} missing\n{done.stdout[-2000:]}"
    if "s3://bucket/vl" in command:
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="bucket", Prefix="vl/")["Contents"]]
        assert "vl/index.json" in keys
    if command.startswith("biomedgpt infer"):
        assert done.stdout.strip(), command
    if command == "biomedgpt sweep --config sweeps/demo_sizes":
        check_the_readme_sweep(folder, tmp_path, done.stdout)
