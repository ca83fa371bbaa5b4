"""Loader throughput per core: the original system's TSV path vs. this project's training loader (MDS shards).

    biomedgpt bench loader rows=1000 patch_sizes=[256,480]

Builds ``rows`` rows of an original-format ``vision_language.tsv`` (caption rows, url-safe base64 JPEG q95,
longest side <= ``max_source_side``) from real packaged images (scikit-image's retina / histology / cell
images and pydicom-data's DICOMs, randomly scaled and cropped) and converts it with
``prepare_data format=vision_language_tsv``, pre-resizing the images for each run as its transform needs
(``max_image_side`` / ``min_image_side`` = ``training_image_sides(patch, train_transform)``: 256 / 256 for
``resize`` at 256 px, 672 / 480 -- no change for sources <= 512 px -- for ``ofa_augment``). Then, on one pinned core (torch threads 1, no loader
workers), for each patch size and in one run:

- ``original``: what OFA/BiomedGPT's caption dataset does per sample: seek to the row's byte offset, read and
  split the line, url-safe base64 -> PIL -> RGB, bicubic resize to size x size, float tensor normalised with
  mean = std = 0.5 (torchvision ``Resize``/``ToTensor``/``Normalize``), pre_caption, GPT-2 BPE of the prompt and
  the caption (every sample), and a collate that stacks images and pads tokens;
- ``resize`` / ``ofa_augment``: ``biomedgpt.data.loader.build_train_loader`` (task ``caption``,
  ``data.train_transform``), the batch with uint8 images (normalised later on the device);
- ``s3 (moto)``: the ``resize`` loader from a moto S3 server (a separate process on 127.0.0.1,
  cold cache) next to the same loader on local shards.

Prints samples per CPU-second of this process (and per wall second), the ratio to ``original``, and with
``profile=true`` where the project loader's time goes.
"""
from __future__ import annotations

import base64
import cProfile
import io
import os
import pstats
import random
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np


#: the training transforms timed (``data.train_transform``): resize-only and OFA's augmentation
TRANSFORMS = ("resize", "ofa_augment")


@dataclass
class BenchConfig:
    """Loader samples per CPU-second on one core: the original TSV path vs. our loader (resize / ofa_augment)."""

    workdir: str = "/tmp/biomedgpt-bench-loader"
    rows: int = 1000
    max_source_side: int = 512
    patch_sizes: list[int] = field(default_factory=lambda: [256, 480])
    batch_size: int = 16
    repeats: int = 2  # each path timed this many times, interleaved; the best is reported
    s3: bool = True
    profile: bool = False  # cProfile of the project's loader (both transforms, the first patch size)
    core: Optional[int] = None  # pin to this CPU (default: the last one this process may use)
    bpe_dir: Optional[str] = None  # GPT-2 BPE files; None: the packaged copy


def source_images() -> list[np.ndarray]:
    from pydicom.data import get_testdata_file
    from skimage import data as skdata

    from biomedgpt.data.images import dicom_to_uint8

    images = [skdata.retina(), skdata.immunohistochemistry(), skdata.microaneurysms(), skdata.cell()]
    for name in ("CT_small.dcm", "MR_small.dcm", "RG1_UNCR.dcm", "US1_UNCR.dcm"):
        images.append(dicom_to_uint8(get_testdata_file(name)))
    return [np.stack([im] * 3, -1) if im.ndim == 2 else im[..., :3] for im in images]


CAPTIONS = ("the heart size is normal and the lungs are clear", "no acute cardiopulmonary abnormality",
            "stained tissue section with scattered nuclei", "fundus photograph with a visible optic disc",
            "axial slice showing soft tissue and bone")


def write_tsv(cfg: BenchConfig, path: Path) -> None:
    """Original vision_language rows: uniq_id, image (base64 JPEG), caption, question, refs, objects, dataset, type."""
    from PIL import Image

    rng = random.Random(0)
    images = source_images()
    with open(path, "w") as f:
        for i in range(cfg.rows):
            image = Image.fromarray(images[i % len(images)])
            side = rng.randint(cfg.max_source_side * 5 // 8, cfg.max_source_side)
            scale = side / max(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.BICUBIC)
            w, h = rng.randint(image.width * 3 // 4, image.width), rng.randint(image.height * 3 // 4, image.height)
            x, y = rng.randint(0, image.width - w), rng.randint(0, image.height - h)
            buf = io.BytesIO()
            image.crop((x, y, x + w, y + h)).save(buf, format="JPEG", quality=95)
            caption = f"{CAPTIONS[i % len(CAPTIONS)]} in study {i}"
            b64 = base64.urlsafe_b64encode(buf.getvalue()).decode()
            f.write(f"vl{i}\t{b64}\t{caption}\t\t\t\tbench\tcaption\n")


class OriginalCaptionDataset:
    """OFA's FileDataset + CaptionDataset for training rows, as they are (no caching, float images)."""

    def __init__(self, tsv: Path, tokenizer, size: int, max_src: int = 80, max_tgt: int = 30) -> None:
        from torchvision import transforms

        self.path, self.tokenizer, self.max_tgt = tsv, tokenizer, max_tgt
        self.offsets, pos = [], 0
        with open(tsv, "rb") as f:
            for line in f:
                self.offsets.append(pos)
                pos += len(line)
        self.file = open(tsv, "rb")
        self.transform = transforms.Compose([
            lambda image: image.convert("RGB"),
            transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(), transforms.Normalize(mean=[0.5] * 3, std=[0.5] * 3)])

    def __len__(self) -> int:
        return len(self.offsets)

    def encode(self, text: str, length: int) -> list[int]:
        return list(self.tokenizer.encode(" " + text.strip()))[:length]

    def __getitem__(self, index: int) -> dict:
        import torch
        from PIL import Image

        from biomedgpt.data.records import clean_caption

        self.file.seek(self.offsets[index])
        uniq_id, image, caption, *_ = self.file.readline().decode("utf-8").rstrip("\n").split("\t")
        image = Image.open(io.BytesIO(base64.urlsafe_b64decode(image)))
        patch_image = self.transform(image)
        caption = clean_caption(caption, self.max_tgt)
        src = [0] + self.encode(" what does the image describe?", 80) + [2]
        tgt = self.encode(caption, self.max_tgt)
        return {"id": uniq_id, "source": torch.tensor(src), "patch_image": patch_image,
                "target": torch.tensor(tgt + [2]), "prev_output": torch.tensor([0] + tgt)}


def original_collate(samples: list[dict]) -> dict:
    import torch

    def pad(key: str) -> torch.Tensor:
        rows = [s[key] for s in samples]
        out = torch.full((len(rows), max(len(r) for r in rows)), 1, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out

    return {"id": [s["id"] for s in samples], "src_tokens": pad("source"), "prev_output_tokens": pad("prev_output"),
            "target": pad("target"), "patch_images": torch.stack([s["patch_image"] for s in samples]),
            "patch_masks": torch.ones(len(samples), dtype=torch.bool)}


def time_original(dataset: OriginalCaptionDataset, batch_size: int) -> tuple[float, float]:
    order = list(range(len(dataset)))
    random.Random(0).shuffle(order)
    start, cpu, batch = time.perf_counter(), time.process_time(), []
    for index in order:
        batch.append(dataset[index])
        if len(batch) == batch_size:
            original_collate(batch)
            batch = []
    return len(order) / (time.process_time() - cpu), len(order) / (time.perf_counter() - start)


def time_loader(loader, rows: int) -> tuple[float, float]:
    """(samples per CPU second of this process, samples per wall second)."""
    start, cpu, seen = time.perf_counter(), time.process_time(), 0
    for batch in loader:
        seen += len(batch["ids"])
    if seen < rows * 0.9:
        raise RuntimeError(f"loader yielded {seen} of {rows} samples")
    return seen / (time.process_time() - cpu), seen / (time.perf_counter() - start)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def start_moto(work: Path) -> tuple[subprocess.Popen, str]:
    """A moto S3 server in its own process (its CPU is not this process's), bucket ``bench``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(work / "moto.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    os.environ.update(S3_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"moto server did not start (see {work / 'moto.log'})")
            time.sleep(0.2)
    import boto3

    boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"]).create_bucket(Bucket="bench")
    return proc, "s3://bench/vl"


def pin_one_core(core: Optional[int]) -> int:
    import torch

    allowed = sorted(os.sched_getaffinity(0))
    core = allowed[-1] if core is None else core
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    return core


def run(cfg: BenchConfig) -> dict[str, float]:
    """Samples per CPU-second of each path and patch size; ratios to the original."""
    from biomedgpt.data.config import DataConfig, StreamConfig
    from biomedgpt.data.images import training_image_sides
    from biomedgpt.data.loader import build_train_loader
    from biomedgpt.models.tokenizer import Tokenizer
    from biomedgpt.data.convert import PrepareConfig, convert

    core = pin_one_core(cfg.core)
    work = Path(cfg.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tsv = work / "vision_language.tsv"
    write_tsv(cfg, tsv)
    stores: dict[tuple[int, int], tuple[Path, str]] = {}

    def store(size: int, transform: str) -> str:
        """The rows converted with the pre-resize a run at this patch size and training transform needs."""
        sides = training_image_sides(size, transform)
        if sides not in stores:
            out = work / f"mds-{sides[0]}x{sides[1]}"
            summary = convert(PrepareConfig(input=str(tsv), format="vision_language_tsv", output=str(out),
                                            progress=False, max_image_side=sides[0], min_image_side=sides[1]),
                              log=io.StringIO())
            stores[sides] = (out, f"{summary.resized} of {summary.images} images pre-resized")
        return str(stores[sides][0])

    tokenizer = Tokenizer.from_gpt2_files(cfg.bpe_dir)
    n_cache = iter(range(10 ** 6))

    def loader(remote: str, size: int, transform: str):
        data = DataConfig(streams=[StreamConfig(name="vl", task="caption", remote=remote)], train_transform=transform,
                          batch_size=cfg.batch_size, patch_image_size=size, num_workers=0,
                          cache_dir=str(work / f"cache{next(n_cache)}"))
        return build_train_loader(data, tokenizer)

    results: dict[str, tuple[float, float]] = {}

    def best(name: str, value: tuple[float, float]) -> None:
        results[name] = max(results.get(name, (0.0, 0.0)), value)

    for size in cfg.patch_sizes:
        original = OriginalCaptionDataset(tsv, tokenizer, size)
        for _ in range(cfg.repeats):
            best(f"{size}/original", time_original(original, cfg.batch_size))
            for transform in TRANSFORMS:
                best(f"{size}/{transform}", time_loader(loader(store(size, transform), size, transform), cfg.rows))
    if cfg.s3:
        proc, remote = start_moto(work)
        try:
            size = cfg.patch_sizes[0]
            sides = training_image_sides(size, "resize")
            convert(PrepareConfig(input=str(tsv), format="vision_language_tsv", output=remote, progress=False,
                                  max_image_side=sides[0], min_image_side=sides[1]), log=io.StringIO())
            for _ in range(cfg.repeats):
                best(f"{size}/resize local", time_loader(loader(store(size, "resize"), size, "resize"), cfg.rows))
                best(f"{size}/resize s3 (moto, cold cache)", time_loader(loader(remote, size, "resize"), cfg.rows))
        finally:
            proc.terminate()
            proc.wait(10)

    print(f"{cfg.rows} vision_language rows, JPEG q95 sources <= {cfg.max_source_side} px, batch {cfg.batch_size}, "
          f"one core (cpu {core}, torch threads 1, no loader workers); best of {cfg.repeats}:")
    print(f"  {'patch':>5s}  {'path':38s} {'samples/CPU-s':>13s} {'samples/wall-s':>14s} {'vs original':>11s}")
    for name, (per_cpu, per_wall) in results.items():
        size, path = name.split("/", 1)
        base = results.get(f"{size}/original", (per_cpu,))[0]
        print(f"  {size:>5s}  {path:38s} {per_cpu:13.1f} {per_wall:14.1f} {per_cpu / base:10.2f}x")
    tsv_bytes = tsv.stat().st_size
    print(f"  the loader reads the rows converted with max_image_side / min_image_side = "
          f"biomedgpt.data.images.training_image_sides(patch, train_transform) (what that run's transform resamples "
          f"from; the original reads the TSV of the unresized sources, {tsv_bytes / 2**20:.1f} MiB):")
    for size in cfg.patch_sizes:
        for transform in TRANSFORMS:
            out, note = stores[training_image_sides(size, transform)]
            print(f"    {size:>4d} px {transform:11s}: {out.name} ({note}; "
                  f"{du(out) / 2**20:.1f} MiB, {du(out) / tsv_bytes:.2f}x the TSV)")
    if cfg.profile:
        size = cfg.patch_sizes[0]
        for transform in TRANSFORMS:
            profiler = cProfile.Profile(time.thread_time)  # this thread's CPU: wall time would count other jobs
            it = loader(store(size, transform), size, transform)
            cpu, main = time.process_time(), time.thread_time()
            profiler.enable()
            time_loader(it, cfg.rows)
            profiler.disable()
            cpu, main = time.process_time() - cpu, time.thread_time() - main
            print(f"\nprofile: project loader, {size} px, {transform}: {main:.2f} s CPU in the "
                  f"loading thread, {max(cpu - main, 0.0):.2f} s in streaming's background threads "
                  f"(tottime of the loading thread, top 14):")
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(14)
    sys.stdout.flush()
    return {name: per_cpu for name, (per_cpu, _) in results.items()}


def main(argv: list[str] | None = None) -> None:
    from biomedgpt.core.config import parse_cli

    run(parse_cli(BenchConfig, argv))


if __name__ == "__main__":
    main()
