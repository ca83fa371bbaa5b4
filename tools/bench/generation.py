"""Generation throughput (samples/s): VQA beam search inside an answer trie, and captioning with beam 5.

    python -m biomedgpt.tools.bench.generation sizes=[tiny,base] batch_size=8 batches=2

Randomly initialised models of the named sizes on real images (scikit-image's fundus and histology
photos): an untrained captioner rarely ends early, so captioning runs to ``caption_max_len`` (an upper
bound on the time of a trained model). VQA uses the decoder prompt (``prompt_type=prev_output``) and a
trie of ``answers`` answers, as fine-tuned VQA-RAD evaluation does.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from biomedgpt.data.images import eval_transform
from biomedgpt.core.config import parse_cli
from biomedgpt.engine.eval.decoding import pick_device
from biomedgpt.models.config import model_config
from biomedgpt.models.generation import GenerationConfig, Trie, generate
from biomedgpt.models.ofa import BiomedGPT
from biomedgpt.models.tokenizer import Tokenizer

QUESTION = " what modality is this image?"


@dataclass
class BenchConfig:
    sizes: list[str] = field(default_factory=lambda: ["tiny", "base"])
    batch_size: int = 8
    batches: int = 2  # timed batches per measurement (after one warm-up batch)
    image_size: int = 256
    answers: int = 500  # size of the VQA answer set
    caption_max_len: int = 32
    beam_size: int = 5
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads (0: torch's default)
    bpe_dir: Optional[str] = None  # GPT-2 BPE files; None: the packaged copy


def _images(size: int, count: int) -> torch.Tensor:
    from PIL import Image
    from skimage import data as skdata

    photos = [Image.fromarray(skdata.retina()), Image.fromarray(skdata.immunohistochemistry())]
    return torch.stack([eval_transform(photos[i % len(photos)], size) for i in range(count)])


def _answer_set(tokenizer: Tokenizer, count: int) -> list[list[int]]:
    """``count`` distinct one- and two-word answers made of whole-word BPE entries."""
    words = [i for i in range(4, tokenizer.mask_id) if tokenizer.id_to_token(i).startswith("\u0120")
             and tokenizer.id_to_token(i)[1:].isalpha()][:count]
    singles = [[w] for w in words[: count // 2]]
    pairs = [[a, b] for a, b in zip(words[count // 2:], words[: count - len(singles)])]
    return singles + pairs


def _throughput(model, batch: dict, cfg: GenerationConfig, repeats: int, **kwargs) -> float:
    generate(model, **batch, cfg=cfg, **kwargs)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        generate(model, **batch, cfg=cfg, **kwargs)
    return repeats * batch["src_tokens"].shape[0] / (time.perf_counter() - start)


def run(cfg: BenchConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    tokenizer = Tokenizer.from_gpt2_files(cfg.bpe_dir)
    question = tokenizer.encode(QUESTION)
    caption_prompt = tokenizer.encode(" what does the image describe?")
    images = _images(cfg.image_size, cfg.batch_size).to(device)
    trie = Trie(_answer_set(tokenizer, cfg.answers))
    results = {}
    for size in cfg.sizes:
        torch.manual_seed(0)
        model = BiomedGPT(model_config(size, vocab_size=tokenizer.vocab_size)).init_weights().to(device).eval()
        vqa = dict(src_tokens=torch.tensor([[0, *question, 2]] * cfg.batch_size, device=device),
                   patch_images=images)
        caption = dict(src_tokens=torch.tensor([[0, *caption_prompt, 2]] * cfg.batch_size, device=device),
                       patch_images=images)
        results[size] = {
            "vqa_trie_beam_samples_per_s": _throughput(
                model, vqa, GenerationConfig(beam_size=cfg.beam_size, max_len=2), cfg.batches,
                prefix=[question] * cfg.batch_size, constraint=trie),
            "caption_beam_samples_per_s": _throughput(
                model, caption, GenerationConfig(beam_size=cfg.beam_size, max_len=cfg.caption_max_len,
                                                 min_len=cfg.caption_max_len, no_repeat_ngram_size=3), cfg.batches),
        }
        print(json.dumps({size: results[size]}), flush=True)
    return {"settings": {**cfg.__dict__, "threads_used": torch.get_num_threads()}, "results": results}


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(run(parse_cli(BenchConfig, argv, description=__doc__.split("\n\n")[0])), indent=2))


if __name__ == "__main__":
    main()
