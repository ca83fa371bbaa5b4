"""Train the project's own byte-level BPE on a text corpus and write a tokenizer directory.

``python -m biomedgpt.tools.train_tokenizer inputs='[reports/*.txt]' output_dir=out/tok bpe_vocab_size=8000``

The result has the same layout as the canonical GPT-2 vocabulary (``<s> <pad> </s> <unk>``, the BPE
entries, ``<mask>``, codes, bins) and is read back with ``biomedgpt.models.tokenizer.Tokenizer.load``.
"""
from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from biomedgpt.core.config import parse_cli
from biomedgpt.models.tokenizer import NUM_BINS, NUM_CODES, RESERVED, Tokenizer

_BYTE_SYMBOLS = 256


@dataclass
class TrainTokenizerConfig:
    """Train a byte-level BPE tokenizer (UTF-8 text files; every line is seen with its newline)."""

    inputs: list[str] = field(default_factory=list)  # text files or glob patterns
    output_dir: str = ""
    bpe_vocab_size: int = 50260  # base entries including <s> <pad> </s> <unk> and the 256 byte symbols
    min_frequency: int = 2  # a pair must occur this often to be merged
    num_codes: int = NUM_CODES
    num_bins: int = NUM_BINS

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("inputs: give at least one text file or glob pattern")
        if not self.output_dir:
            raise ValueError("output_dir: required")
        if self.bpe_vocab_size < len(RESERVED) + _BYTE_SYMBOLS:
            raise ValueError(f"bpe_vocab_size: must hold the 4 reserved tokens and {_BYTE_SYMBOLS} byte "
                             f"symbols (>= {len(RESERVED) + _BYTE_SYMBOLS}), got {self.bpe_vocab_size}")
        if self.min_frequency < 1:
            raise ValueError(f"min_frequency: must be >= 1, got {self.min_frequency}")


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Files named by ``patterns`` (sorted within each glob); a pattern that matches no file is an error."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise FileNotFoundError(f"inputs: {pattern!r} matches no file")
        files.extend(Path(m) for m in matches)
    return files


def _lines(files: Sequence[Path]) -> Iterator[str]:
    for path in files:
        with open(path, encoding="utf-8") as f:
            lineno = 0
            try:
                for lineno, line in enumerate(f, start=1):
                    yield line
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}: not UTF-8 text after line {lineno} ({exc})") from None


def train(cfg: TrainTokenizerConfig) -> Tokenizer:
    """Learn the BPE with HF ``tokenizers`` and wrap it in the unified id layout."""
    files = expand_inputs(cfg.inputs)
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.bpe_vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(RESERVED),  # trainer gives them ids 0..3, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(_lines(files), trainer=trainer)
    vocab = hf.get_vocab()
    base = sorted(vocab, key=vocab.__getitem__)
    merges = [tuple(pair) for pair in json.loads(hf.to_str())["model"]["merges"]]
    source = f"trained:{len(files)} files"
    return Tokenizer(base, merges, cfg.num_codes, cfg.num_bins, source=source)


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_cli(TrainTokenizerConfig, argv)
    tokenizer = train(cfg)
    tokenizer.save(cfg.output_dir)
    print(f"wrote {cfg.output_dir}: {tokenizer.mask_id} BPE entries, vocab_size {tokenizer.vocab_size}")


if __name__ == "__main__":
    main()
