"""``position_scheme: rope`` trains under DeepSpeed on 2 CPU ranks (gloo), through the real entry point."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from biomedgpt.models import attention
from biomedgpt.data.convert import PrepareConfig, convert

TINY_ROPE = ("{d_model: 64, ffn_dim: 128, encoder_layers: 1, decoder_layers: 1, heads: 2, resnet_layers: [1, 1, 1], "
             "dropout: 0.0, encoder_drop_path_rate: 0.0, decoder_drop_path_rate: 0.0, position_scheme: rope, "
             "attention_backend: BACKEND}")


def _shape_vqa_shards(tmp_path) -> str:
    """A learnable VQA set: a bright square or disc on black; the answer names the shape."""
    rows = []
    yy, xx = np.mgrid[:48, :48]
    for i in range(16):
        shape = "square" if i % 2 else "circle"
        cy, cx, r = 14 + i % 5 * 4, 14 + i % 3 * 6, 8
        inside = (abs(yy - cy) <= r) & (abs(xx - cx) <= r) if shape == "square" else (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        path = tmp_path / f"img{i}.png"
        Image.fromarray((inside * 255).astype(np.uint8)).convert("RGB").save(path)
        rows.append({"id": f"s{i}", "image": str(path), "question": "what shape is shown?", "answer": shape})
    source = tmp_path / "shapes.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "shards"
    convert(PrepareConfig(input=str(source), format="jsonl", kind="vqa", output=str(out), progress=False))
    return str(out)


@pytest.mark.parametrize("backend", ["sdpa", "flash"])
def test_rope_trains_under_deepspeed_on_two_cpu_ranks(backend, tmp_path, repo_root, vocab_dir):
    if backend == "flash" and not attention.flash_attn_available():
        pytest.skip("flash-attn is not installed here (and its kernels need a CUDA GPU): the flash path of rope "
                    "runs where it is; without it the flash backend is sdpa, trained by the sdpa case")
    shards = _shape_vqa_shards(tmp_path)
    stream = f"[{{name: shapes, task: vqa, remote: {shards}}}]"
    run_dir = tmp_path / "run"
    args = ["--config", "configs/finetune/vqa_rad.yaml", f"model={TINY_ROPE.replace('BACKEND', backend)}",
            f"data.streams={stream}", "data.eval_streams=[]", "data.batch_size=4", "data.patch_image_size=48",
            "data.num_workers=0", f"data.cache_dir={tmp_path / 'cache'}", "optim.max_steps=5", "optim.max_epochs=null",
            "optim.grad_accum=1", "data.answer_set=null", "optim.lr=0.002", "optim.warmup_ratio=0.0", "optim.freeze_encoder_embedding=false",
            "optim.freeze_decoder_embedding=false",
            "optim.label_smoothing=0.0", "ema.enabled=false", "deepspeed.precision=fp32", "deepspeed.zero_stage=2",
            "checkpoint.init_from=null", "checkpoint.interval=0", "eval.interval=0", "log.interval=1",
            "log.progress_bar=false", "log.wandb_mode=disabled", f"bpe_dir={vocab_dir}",
            f"output_dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(repo_root)]))}
    proc = subprocess.run(["bash", "launchers/local.sh", "-n", "2", "--", *args], cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 5, losses
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses
