"""Training step on a batch where half the samples are text-only: today's path vs images only where present.

    biomedgpt bench text-only sizes=[tiny,base] image_size=480 batch=4

"today" runs the ResNet on every sample's placeholder image and the encoder over all image tokens (masked
for text-only samples): ``Encoder.image_rows_only = False``. "now" runs the stem only on samples with an
image and text-only samples without image tokens (the train step's forward, ``split_by_modality``). Same
weights, same batch, in one run, on the CPU with ``threads`` torch threads: forward + backward + AdamW step,
best of ``steps`` after ``warmup`` steps, in CPU-seconds of this process (robust on a shared machine with one
thread) and wall seconds. Also prints the largest logit difference between the two paths (eval mode).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field


@dataclass
class BenchConfig:
    """Step time of half-text-only batches, today's path vs the text-only fast path."""

    sizes: list[str] = field(default_factory=lambda: ["tiny", "base"])
    image_size: int = 480
    batch: int = 4  # half of it text-only
    src_len: int = 80
    tgt_len: int = 30
    steps: int = 2
    warmup: int = 1
    threads: int = 1


def make_batch(cfg: BenchConfig, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    b = cfg.batch
    src = torch.randint(4, vocab, (b, cfg.src_len), generator=g)
    src[::2, 12:] = 1  # image samples: a short prompt; text-only samples: the whole source
    prev = torch.randint(4, vocab, (b, cfg.tgt_len), generator=g)
    images = torch.randint(0, 256, (b, 3, cfg.image_size, cfg.image_size), generator=g, dtype=torch.uint8)
    masks = torch.tensor([i % 2 == 0 for i in range(b)])
    images[~masks] = 0
    return dict(src_tokens=src, prev_output_tokens=prev, patch_images=images, patch_masks=masks,
                code_masks=torch.zeros(b, dtype=torch.bool)), torch.randint(4, vocab, (b, cfg.tgt_len), generator=g)


def step_time(model, batch: dict, target, cfg: BenchConfig) -> float:
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    best = (float("inf"), float("inf"))
    for i in range(cfg.warmup + cfg.steps):
        start, cpu = time.perf_counter(), time.process_time()
        logits = model(**batch)
        loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= cfg.warmup:
            best = min(best, (time.process_time() - cpu, time.perf_counter() - start))
    return best


def run(cfg: BenchConfig) -> dict:
    import torch

    from biomedgpt.models.config import model_config
    from biomedgpt.engine.distributed.modality_passes import split_by_modality
    from biomedgpt.models.ofa import BiomedGPT

    torch.set_num_threads(cfg.threads)
    results = {}
    print(f"batch {cfg.batch} ({cfg.batch - cfg.batch // 2} with a {cfg.image_size} px image, {cfg.batch // 2} "
          f"text-only), src {cfg.src_len}, tgt {cfg.tgt_len}, CPU, {cfg.threads} thread(s); forward + backward + "
          f"AdamW, best of {cfg.steps} after {cfg.warmup} warm-up:")
    print(f"  {'size':6s} {'today CPU-s':>11s} {'now CPU-s':>10s} {'ratio':>6s} {'today wall-s':>12s} "
          f"{'now wall-s':>10s} {'ratio':>6s} {'max |dlogit|':>13s}")
    for size in cfg.sizes:
        torch.manual_seed(0)
        model = split_by_modality(BiomedGPT(model_config(size, dropout=0.0)).init_weights(), same_calls=False)
        batch, target = make_batch(cfg, model.cfg.vocab_size)
        model.eval()
        with torch.no_grad():
            now_logits = model(**batch)
            model.encoder.image_rows_only = False
            today_logits = model(**batch)
            model.encoder.image_rows_only = True
        diff = float((now_logits - today_logits).abs().max())
        del now_logits, today_logits
        model.train()
        for module in model.modules():  # the same BatchNorm arithmetic in both paths (statistics frozen)
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()
        model.encoder.image_rows_only = False
        today = step_time(model, batch, target, cfg)
        model.encoder.image_rows_only = True
        now = step_time(model, batch, target, cfg)
        results[size] = (today, now, diff)
        print(f"  {size:6s} {today[0]:11.2f} {now[0]:10.2f} {now[0] / today[0]:6.2f} {today[1]:12.2f} "
              f"{now[1]:10.2f} {now[1] / today[1]:6.2f} {diff:13.2e}")
        sys.stdout.flush()
        del model
    return results


def main(argv: list[str] | None = None) -> None:
    from biomedgpt.core.config import parse_cli

    run(parse_cli(BenchConfig, argv))


if __name__ == "__main__":
    main()
