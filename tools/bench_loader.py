"""Loader throughput: MDS shards (local, and a moto S3 server on loopback) vs. the original base64 TSV.

    python -m biomedgpt.tools.bench_loader rows=512 patch_image_size=256

Builds a caption dataset from real images (scikit-image's fundus / histology / cell images and
pydicom-data's DICOMs, randomly cropped to ``source_size``), writes it in the original caption TSV format
(url-safe base64 JPEG) and converts that TSV to MDS. Then it times one process (one core: torch
threads 1, no loader workers) through decode, training transforms, tokenisation and collation:
from local shards, from the S3-compatible server (cold cache), and from the TSV read the way the
original FileDataset does (seek to the row's byte offset, split the line, base64-decode). Prints
samples per CPU-second (per core) and per wall second for each, and the dataset size on disk in both formats.
"""
from __future__ import annotations

import base64
import io
import os
import random
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from typing import Optional
from pathlib import Path

import numpy as np


@dataclass
class BenchConfig:
    """Measure loader samples/s per core and shard size vs. TSV size."""

    workdir: str = "/tmp/biomedgpt-bench-loader"
    rows: int = 512
    source_size: int = 384
    patch_image_size: int = 256
    batch_size: int = 16
    s3: bool = True
    bpe_dir: Optional[str] = None  # GPT-2 BPE files; None: the packaged copy


def source_images() -> list[np.ndarray]:
    from pydicom.data import get_testdata_file
    from skimage import data as skdata

    from biomedgpt.data.images import dicom_to_uint8

    images = [skdata.retina(), skdata.immunohistochemistry(), skdata.microaneurysms(), skdata.cell()]
    for name in ("CT_small.dcm", "MR_small.dcm", "RG1_UNCR.dcm"):
        images.append(dicom_to_uint8(get_testdata_file(name)))
    return [np.stack([im] * 3, -1) if im.ndim == 2 else im[..., :3] for im in images]


def write_tsv(cfg: BenchConfig, path: Path) -> None:
    """The original caption TSV: uniq_id, image_id, caption, (empty), url-safe base64 JPEG."""
    from PIL import Image

    rng = random.Random(0)
    images = source_images()
    with open(path, "w") as f:
        for i in range(cfg.rows):
            pixels = images[i % len(images)]
            image = Image.fromarray(pixels)
            scale = max(cfg.source_size / min(image.size), 1.0)
            image = image.resize((round(image.width * scale), round(image.height * scale)))
            x, y = rng.randint(0, image.width - cfg.source_size), rng.randint(0, image.height - cfg.source_size)
            buf = io.BytesIO()
            image.crop((x, y, x + cfg.source_size, y + cfg.source_size)).save(buf, format="JPEG", quality=90)
            caption = f"biomedical image number {i} showing tissue and structures"
            f.write(f"c{i}\timg{i}\t{caption}\t\t{base64.urlsafe_b64encode(buf.getvalue()).decode()}\n")


def time_loader(loader, rows: int) -> tuple[float, float]:
    """(samples per CPU second of this process, samples per wall second)."""
    start, cpu, seen = time.perf_counter(), time.process_time(), 0
    for batch in loader:
        seen += len(batch["ids"])
    if seen < rows * 0.9:
        raise RuntimeError(f"loader yielded {seen} of {rows} samples")
    return seen / (time.process_time() - cpu), seen / (time.perf_counter() - start)


def time_tsv_baseline(cfg: BenchConfig, data_cfg, tsv: Path, tokenizer) -> tuple[float, float]:
    """The original's path: row offsets, then per sample seek + readline + split + base64 + the same processing."""
    from biomedgpt.data.collate import collate
    from biomedgpt.data.records import make_record
    from biomedgpt.data.tasks import TaskContext, process

    offsets, pos = [], 0
    with open(tsv, "rb") as f:
        for line in f:
            offsets.append(pos)
            pos += len(line)
    order = list(range(len(offsets)))
    random.Random(0).shuffle(order)
    start, cpu, batch = time.perf_counter(), time.process_time(), []
    with open(tsv, "rb") as f:
        for n, row in enumerate(order, start=1):
            f.seek(offsets[row])
            uid, _, caption, _, image = f.readline().decode("utf-8").rstrip("\n").split("\t")
            data = base64.urlsafe_b64decode(image)
            record = make_record(uid, "caption", {"captions": [caption]}, data)
            ctx = TaskContext(tokenizer=tokenizer, cfg=data_cfg, rng=random.Random(n), train=True,
                              other_row=lambda rng: record)
            batch.extend(process("caption", record, ctx))
            if len(batch) == cfg.batch_size:
                collate(batch, cfg.patch_image_size, data_cfg.group_weights)
                batch = []
    return len(order) / (time.process_time() - cpu), len(order) / (time.perf_counter() - start)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def start_moto() -> str:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    os.environ.update(S3_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import boto3

    boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"]).create_bucket(Bucket="bench")
    return "s3://bench/captions"


def run(cfg: BenchConfig) -> dict[str, float]:
    """Samples per CPU-second of each path (robust on a shared machine), and both sizes in bytes."""
    import torch
    from streaming.base.util import clean_stale_shared_memory

    from biomedgpt.data.config import DataConfig, StreamConfig
    from biomedgpt.data.loader import build_train_loader
    from biomedgpt.models.tokenizer import Tokenizer
    from biomedgpt.tools.prepare_data import PrepareConfig, convert

    torch.set_num_threads(1)
    work = Path(cfg.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tsv = work / "caption.tsv"
    write_tsv(cfg, tsv)
    convert(PrepareConfig(input=str(tsv), format="caption_tsv", output=str(work / "mds"), progress=False),
            log=io.StringIO())
    tokenizer = Tokenizer.from_gpt2_files(cfg.bpe_dir)

    def data_cfg(remote: str) -> DataConfig:
        return DataConfig(streams=[StreamConfig(name="captions", task="caption", remote=remote)],
                          batch_size=cfg.batch_size, patch_image_size=cfg.patch_image_size, num_workers=0,
                          cache_dir=str(work / "cache"))

    results = {"local_mds": time_loader(build_train_loader(data_cfg(str(work / "mds")), tokenizer), cfg.rows)}
    if cfg.s3:
        remote = start_moto()
        convert(PrepareConfig(input=str(tsv), format="caption_tsv", output=remote, progress=False), log=io.StringIO())
        clean_stale_shared_memory()
        results["s3_mds_cold_cache"] = time_loader(build_train_loader(data_cfg(remote), tokenizer), cfg.rows)
    results["tsv_base64_baseline"] = time_tsv_baseline(cfg, data_cfg(str(work / "mds")), tsv, tokenizer)
    print(f"{cfg.rows} rows, {cfg.source_size}px JPEG sources -> {cfg.patch_image_size}px patches, "
          f"batch {cfg.batch_size}, 1 thread (decode + RandAugment transforms + tokenise + collate):")
    for name, (per_cpu, per_wall) in results.items():
        print(f"  {name:22s} {per_cpu:8.1f} samples per CPU-second  ({per_wall:.1f}/s wall)")
    tsv_bytes, mds_bytes = tsv.stat().st_size, du(work / "mds")
    print(f"  size on disk: TSV {tsv_bytes / 2**20:.1f} MiB, MDS {mds_bytes / 2**20:.1f} MiB "
          f"({mds_bytes / tsv_bytes:.2f}x)")
    return {**{name: per_cpu for name, (per_cpu, _) in results.items()}, "tsv_bytes": tsv_bytes,
            "mds_bytes": mds_bytes}


def main(argv: list[str] | None = None) -> None:
    from biomedgpt.engine.config import parse_cli

    run(parse_cli(BenchConfig, argv))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
