"""The unified BiomedGPT vocabulary: byte-level BPE text, image codes and location bins in one id space.

Layout (fixed by the released OFA/BiomedGPT checkpoints): ids 0..3 are ``<s> <pad> </s> <unk>``, then
the base BPE entries, then ``<mask>``, ``<code_0>``..``<code_{num_codes-1}>`` and
``<bin_0>``..``<bin_{num_bins-1}>``. The base BPE comes from GPT-2's files in fairseq order
(:meth:`Tokenizer.from_gpt2_files`), a HF BART directory (:meth:`Tokenizer.from_bart_dir`) or the
project's own training (``tools/train_tokenizer.py``); :meth:`Tokenizer.save` writes a directory that
:meth:`Tokenizer.load` restores to exactly the same ids, so a checkpoint carries its tokenizer.

Encoding runs on the data-loading hot path, so one HF ``tokenizers`` object is built per instance and
reused. ``<mask>``, ``<code_i>`` and ``<bin_j>`` written literally in text map to their ids (prompts
carry location bins); ``<s> <pad> </s> <unk>`` in text stay ordinary text, so a report that happens to
contain ``</s>`` never ends a sequence early.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from biomedgpt.core.durable import atomic_write_text

BOS, PAD, EOS, UNK = "<s>", "<pad>", "</s>", "<unk>"
RESERVED = (BOS, PAD, EOS, UNK)
MASK = "<mask>"
NUM_CODES = 8192
NUM_BINS = 1000

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
CONFIG_FILE = "tokenizer_config.json"
FORMAT = "biomedgpt-tokenizer"
FORMAT_VERSION = 1
MERGES_HEADER = "#version: 0.2"

_GPT2_ENCODER = "encoder.json"
_GPT2_MERGES = "vocab.bpe"
_FAIRSEQ_DICT = "dict.txt"
#: The public GPT-2 vocabulary and fairseq's GPT-2 dictionary (the released checkpoints' id space), shipped.
GPT2_VOCAB_DIR = Path(__file__).resolve().parent / "vocab" / "gpt2"
_FILLER = "madeupword{:04d}"  # fairseq's name for ids that exist but no text produces


class TokenizerError(ValueError):
    """Tokenizer files or arguments that cannot give a valid vocabulary; the message names the source."""


def load_any_tokenizer(path: str | os.PathLike | None) -> "Tokenizer":
    """A tokenizer from whichever layout ``path`` holds (None: the packaged GPT-2 BPE, the released id space):
    a saved tokenizer, GPT-2's files or a BART directory."""
    from biomedgpt.models.model_dir import CheckpointError

    if path is None:
        return Tokenizer.from_gpt2_files()
    path = Path(path)
    if (path / CONFIG_FILE).exists():
        return Tokenizer.load(path)
    if (path / _GPT2_ENCODER).exists():
        return Tokenizer.from_gpt2_files(path)
    if (path / VOCAB_FILE).exists():
        return Tokenizer.from_bart_dir(path)
    raise CheckpointError(f"{path}: no tokenizer found (expected {CONFIG_FILE}, {_GPT2_ENCODER} or {VOCAB_FILE})")


def _code_token(i: int) -> str:
    return f"<code_{i}>"


def _bin_token(j: int) -> str:
    return f"<bin_{j}>"


class Tokenizer:
    """Unified vocabulary over a byte-level BPE.

    ``base_tokens`` are the BPE's entries in id order, starting with ``<s> <pad> </s> <unk>``; the
    special entries (mask, codes, bins) follow them. ``merges`` are the BPE merge rules in priority order.
    """

    bos_id, pad_id, eos_id, unk_id = 0, 1, 2, 3

    def __init__(
        self,
        base_tokens: Sequence[str],
        merges: Sequence[tuple[str, str]],
        num_codes: int = NUM_CODES,
        num_bins: int = NUM_BINS,
        source: str = "",
    ) -> None:
        if tuple(base_tokens[:4]) != RESERVED:
            raise TokenizerError(f"{source}: the first four base entries must be {list(RESERVED)}, "
                                 f"got {list(base_tokens[:4])}")
        if num_codes < 1 or num_bins < 2:
            raise TokenizerError(f"{source}: need num_codes >= 1 and num_bins >= 2, "
                                 f"got {num_codes} and {num_bins}")
        self.num_codes = num_codes
        self.num_bins = num_bins
        self.source = source
        self.mask_id = len(base_tokens)
        self.first_code_id = self.mask_id + 1
        self.first_bin_id = self.first_code_id + num_codes
        self.vocab_size = self.first_bin_id + num_bins
        specials = [MASK] + [_code_token(i) for i in range(num_codes)] + [_bin_token(j) for j in range(num_bins)]
        self._tokens = list(base_tokens) + specials
        self._merges = [tuple(m) for m in merges]
        vocab = {}
        for i, token in enumerate(self._tokens):
            if token in vocab:
                raise TokenizerError(f"{source}: token {token!r} appears at ids {vocab[token]} and {i}")
            vocab[token] = i
        missing = [c for c in pre_tokenizers.ByteLevel.alphabet() if c not in vocab]
        if missing:
            raise TokenizerError(f"{source}: not a byte-level BPE, {len(missing)} of the 256 byte symbols "
                                 f"are missing (e.g. {missing[:5]})")
        try:
            hf = HFTokenizer(models.BPE(vocab=vocab, merges=self._merges))
        except Exception as exc:  # the Rust side raises plain Exception for bad merges
            raise TokenizerError(f"{source}: invalid BPE: {exc}") from exc
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        # Already in the model's vocabulary, so HF keeps their ids and only matches them in raw text.
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        self._hf = hf
        self._skipped_on_decode = frozenset((self.bos_id, self.pad_id, self.eos_id))

    # ---- construction from files -------------------------------------------------------------------

    @classmethod
    def from_gpt2_files(cls, directory: str | os.PathLike | None = None, num_codes: int = NUM_CODES,
                        num_bins: int = NUM_BINS) -> "Tokenizer":
        """GPT-2 BPE (encoder.json + vocab.bpe) in fairseq order (dict.txt), as in released checkpoints.

        ``directory`` None: the copy packaged with the project (``GPT2_VOCAB_DIR``)."""
        directory = Path(GPT2_VOCAB_DIR if directory is None else directory)
        encoder = _read_json_mapping(directory / _GPT2_ENCODER)
        by_gpt2_id = {}
        for token, gpt2_id in encoder.items():
            if not isinstance(gpt2_id, int) or gpt2_id in by_gpt2_id:
                raise TokenizerError(f"{directory / _GPT2_ENCODER}: bad or repeated id {gpt2_id!r} for {token!r}")
            by_gpt2_id[gpt2_id] = token
        base = list(RESERVED) + _read_fairseq_dict(directory / _FAIRSEQ_DICT, by_gpt2_id)
        merges = _read_merges(directory / _GPT2_MERGES, set(base))
        return cls(base, merges, num_codes, num_bins, source=f"gpt2:{directory}")

    @classmethod
    def from_bart_dir(cls, directory: str | os.PathLike, num_codes: int = NUM_CODES,
                      num_bins: int = NUM_BINS) -> "Tokenizer":
        """A HF BART/RoBERTa-style directory: vocab.json (fairseq id space) + merges.txt."""
        return cls._from_vocab_dir(Path(directory), num_codes, num_bins, source=f"bart:{directory}")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Restore a directory written by :meth:`save` (ids identical to the saved tokenizer)."""
        directory = Path(directory)
        config_path = directory / CONFIG_FILE
        config = _read_json_mapping(config_path)
        if config.get("format") != FORMAT or config.get("version") != FORMAT_VERSION:
            raise TokenizerError(f"{config_path}: not a {FORMAT} v{FORMAT_VERSION} config "
                                 f"(format={config.get('format')!r}, version={config.get('version')!r})")
        for key, kind in (("num_codes", int), ("num_bins", int), ("vocab_size", int), ("source", str)):
            if not isinstance(config.get(key), kind):
                raise TokenizerError(f"{config_path}: {key!r} must be a {kind.__name__}, got {config.get(key)!r}")
        tok = cls._from_vocab_dir(directory, config["num_codes"], config["num_bins"], source=config["source"],
                                  complete=True)
        if tok.vocab_size != config["vocab_size"]:
            raise TokenizerError(f"{config_path}: vocab_size {config['vocab_size']} does not match "
                                 f"{directory / VOCAB_FILE} ({tok.vocab_size})")
        return tok

    @classmethod
    def _from_vocab_dir(cls, directory: Path, num_codes: int, num_bins: int, source: str,
                        complete: bool = False) -> "Tokenizer":
        """vocab.json + merges.txt whose ids are already final; specials in the file must sit where they belong.

        HF ports may leave out the code/bin entries and fairseq's trailing filler ids; ``complete`` (our
        own saved format) requires every id.
        """
        vocab_path = directory / VOCAB_FILE
        vocab = _read_json_mapping(vocab_path)
        special_names = {MASK} | {_code_token(i) for i in range(num_codes)} | {_bin_token(j) for j in range(num_bins)}
        base_by_id: dict[int, str] = {}
        for token, idx in vocab.items():
            if not isinstance(idx, int) or idx < 0:
                raise TokenizerError(f"{vocab_path}: id of {token!r} must be a non-negative integer, got {idx!r}")
            if token in special_names:
                continue
            if idx in base_by_id:
                raise TokenizerError(f"{vocab_path}: id {idx} is given to both {base_by_id[idx]!r} and {token!r}")
            base_by_id[idx] = token
        size = max(base_by_id, default=-1) + 1
        gaps = [i for i in range(size) if i not in base_by_id]
        if gaps:
            raise TokenizerError(f"{vocab_path}: no entry for id(s) {gaps[:5]}; base ids must be contiguous, "
                                 f"with {num_codes} codes and {num_bins} bins after them")
        base = [base_by_id[i] for i in range(size)]
        if complete and len(vocab) != size + 1 + num_codes + num_bins:
            raise TokenizerError(f"{vocab_path}: {len(vocab)} entries, expected ids 0..{size + num_codes + num_bins} "
                                 f"({size} base entries, <mask>, {num_codes} codes, {num_bins} bins)")
        if not complete and size < vocab.get(MASK, 0) <= -(-size // 8) * 8:
            # fairseq pads its dictionary to a multiple of 8 with fillers that HF ports may leave out
            base += [_FILLER.format(k) for k in range(vocab[MASK] - size)]
        merges = _read_merges(directory / MERGES_FILE, set(base))
        tok = cls(base, merges, num_codes, num_bins, source=source)
        for token, idx in vocab.items():
            if token in special_names and tok._hf.token_to_id(token) != idx:
                raise TokenizerError(f"{vocab_path}: {token} has id {idx}, but after {tok.mask_id} base entries "
                                     f"it must be {tok._hf.token_to_id(token)}")
        return tok

    def save(self, directory: str | os.PathLike) -> None:
        """Write vocab.json, merges.txt and tokenizer_config.json (each atomically; the config last)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vocab = {token: i for i, token in enumerate(self._tokens)}
        atomic_write_text(directory / VOCAB_FILE, json.dumps(vocab, ensure_ascii=False))
        atomic_write_text(directory / MERGES_FILE, self.merges_text())
        config = {
            "format": FORMAT, "version": FORMAT_VERSION, "source": self.source,
            "vocab_size": self.vocab_size, "num_codes": self.num_codes, "num_bins": self.num_bins,
            "mask_id": self.mask_id, "first_code_id": self.first_code_id, "first_bin_id": self.first_bin_id,
        }
        atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")

    def merges_text(self) -> str:
        """The merge rules as a ``merges.txt`` (GPT-2 / BART format)."""
        return "\n".join([MERGES_HEADER] + [f"{a} {b}" for a, b in self._merges]) + "\n"

    def backend(self) -> HFTokenizer:
        """A copy of the HF ``tokenizers`` object that encodes (for exports that wrap it)."""
        return HFTokenizer.from_str(self._hf.to_str())

    # ---- text ---------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` (no ``<s>``/``</s>``); literal ``<mask>``, ``<code_i>``, ``<bin_j>`` map to their ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Inverse of :meth:`encode`; ``<s>``, ``</s>``, ``<pad>`` are dropped, other specials written out."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise TokenizerError(f"id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._hf.decode([i for i in ids if i not in self._skipped_on_decode], skip_special_tokens=False)

    def id_to_token(self, idx: int) -> str:
        """The vocabulary entry of ``idx`` (byte-level form for BPE entries)."""
        if not 0 <= idx < self.vocab_size:
            raise TokenizerError(f"id {idx} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._tokens[idx]

    # ---- image codes and location bins --------------------------------------------------------------

    def code_id(self, i: int) -> int:
        if not 0 <= i < self.num_codes:
            raise TokenizerError(f"image code {i} is outside 0..{self.num_codes - 1}")
        return self.first_code_id + i

    def bin_id(self, j: int) -> int:
        if not 0 <= j < self.num_bins:
            raise TokenizerError(f"location bin {j} is outside 0..{self.num_bins - 1}")
        return self.first_bin_id + j

    def is_code(self, idx: int) -> bool:
        return self.first_code_id <= idx < self.first_bin_id

    def is_bin(self, idx: int) -> bool:
        return self.first_bin_id <= idx < self.vocab_size

    def coord_to_bin(self, c: float, max_image_size: float = 512) -> int:
        """Id of the bin of pixel coordinate ``c`` (round half to even, as OFA's tensor ``round``)."""
        j = round(c / max_image_size * (self.num_bins - 1))
        if not 0 <= j < self.num_bins:
            raise TokenizerError(f"coordinate {c} is outside the image (0..{max_image_size})")
        return self.first_bin_id + j

    def bin_to_coord(self, idx: int, max_image_size: float = 512) -> float:
        """Pixel coordinate at the centre of bin id ``idx`` (inverse of :meth:`coord_to_bin`)."""
        if not self.is_bin(idx):
            raise TokenizerError(f"id {idx} is not a location bin ({self.first_bin_id}..{self.vocab_size - 1})")
        return (idx - self.first_bin_id) / (self.num_bins - 1) * max_image_size

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tokenizer):
            return NotImplemented
        return (self._tokens, self._merges, self.num_codes, self.num_bins) == (
            other._tokens, other._merges, other.num_codes, other.num_bins)

    __hash__ = None  # equal by content, like the lists it holds

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, mask_id={self.mask_id})"


# ---- file readers ---------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"{path}: not UTF-8 text ({exc})") from None


def _read_json_mapping(path: Path) -> dict:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _read_fairseq_dict(path: Path, by_gpt2_id: dict[int, str]) -> list[str]:
    """Base entries after the reserved four: line k of dict.txt is fairseq id 4 + k.

    A line is ``SYMBOL COUNT [#fairseq:overwrite]``; SYMBOL is a GPT-2 id or a filler name.
    """
    tokens, seen = [], set()
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        fields = line.split(" ")
        if len(fields) == 3 and fields[2] == "#fairseq:overwrite":
            fields = fields[:2]
        if len(fields) != 2 or not fields[0] or not fields[1].isdigit():
            raise TokenizerError(f"{path}:{lineno}: expected 'SYMBOL COUNT', got {line!r}")
        symbol = fields[0]
        if symbol.isdigit():
            if int(symbol) not in by_gpt2_id:
                raise TokenizerError(f"{path}:{lineno}: GPT-2 id {symbol} is not in {_GPT2_ENCODER}")
            token = by_gpt2_id[int(symbol)]
        else:
            token = symbol
        if token in seen:
            raise TokenizerError(f"{path}:{lineno}: symbol {symbol} appears twice")
        seen.add(token)
        tokens.append(token)
    missing = sorted(i for i, t in by_gpt2_id.items() if t not in seen)
    if missing:
        raise TokenizerError(f"{path}: {len(missing)} GPT-2 ids of {_GPT2_ENCODER} have no line "
                             f"(e.g. {missing[:5]})")
    return tokens


def _read_merges(path: Path, vocab: set[str]) -> list[tuple[str, str]]:
    """``A B`` per line after an optional ``#version`` header; both parts and A+B must be vocabulary entries."""
    merges = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise TokenizerError(f"{path}:{lineno}: expected 'A B', got {line!r}")
        for token in (parts[0], parts[1], parts[0] + parts[1]):
            if token not in vocab:
                raise TokenizerError(f"{path}:{lineno}: {token!r} is not in the vocabulary")
        merges.append((parts[0], parts[1]))
    return merges
