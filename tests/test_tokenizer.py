"""The unified vocabulary: canonical GPT-2/fairseq ids, BART-dir equivalence, round trips, the trained BPE."""
from __future__ import annotations

import importlib.util
import json
import pickle
import shutil
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from biomedgpt.models.config import CANONICAL_VOCAB_SIZE
from biomedgpt.models.tokenizer import CONFIG_FILE, MERGES_FILE, VOCAB_FILE, Tokenizer, TokenizerError
from biomedgpt.tools import train_tokenizer

FIXED_TEXTS = [
    "",
    " what is the modality of this image?",
    "Pneumothorax — résumé, naïve façade, Ångström, Zürich",
    "胸部X線写真 正常 / 흉부 엑스레이 / 肺部CT",
    "emoji 🫁🩻😀👩‍⚕️ and flags 🇨🇭",
    "line one\nline two\r\n\ttabbed   spaces  \n\n",
    "math ∑ x² ≤ 3·10⁻⁴, arrows → ←",
    "  leading and trailing  ",
    "<s> and </s> and <pad> and <unk> are plain text here",
    "<bin_1000> <code_99999> <bin_-1> <mask",
    "\x00\x01\x7f control chars",
]

PROMPT = ' which region does the text " left lung " describe?'


@pytest.fixture(scope="module")
def canonical(vocab_dir: Path) -> Tokenizer:
    return Tokenizer.from_gpt2_files(vocab_dir)


def _iu_xray_reports() -> list[str]:
    """FINDINGS / IMPRESSION / INDICATION texts of the Indiana University chest X-ray reports."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or spec.origin is None:
        pytest.fail("torchxrayvision's data folder is needed (pip install --no-deps torchxrayvision)")
    texts = []
    with tarfile.open(Path(spec.origin).parent / "data" / "NLMCXR_reports.tgz") as archive:
        for member in archive:
            if member.isfile() and member.name.endswith(".xml"):
                root = ET.parse(archive.extractfile(member)).getroot()
                texts += [el.text for el in root.iter("AbstractText") if el.text]
    return texts


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory) -> Path:
    """A BPE trained by the CLI on the real IU X-ray report text."""
    work = tmp_path_factory.mktemp("trained")
    (work / "reports").mkdir()
    texts = _iu_xray_reports()
    assert len(texts) > 5000
    half = len(texts) // 2
    (work / "reports" / "a.txt").write_text("\n".join(texts[:half]) + "\n", encoding="utf-8")
    (work / "reports" / "b.txt").write_text("\n".join(texts[half:]) + "\n", encoding="utf-8")
    train_tokenizer.main([f"inputs=[{work}/reports/*.txt]", f"output_dir={work}/tok", "bpe_vocab_size=2000"])
    return work / "tok"


@pytest.fixture(scope="module")
def trained(trained_dir: Path) -> Tokenizer:
    return Tokenizer.load(trained_dir)


# ---- canonical vocabulary -------------------------------------------------------------------------------


def test_canonical_ids(canonical: Tokenizer) -> None:
    for text, idx in [(" what", 99), (" the", 5), ("?", 116), (" yes", 4420), (" no", 117), (" maybe", 2085)]:
        assert canonical.encode(text) == [idx], text
    assert (canonical.bos_id, canonical.pad_id, canonical.eos_id, canonical.unk_id) == (0, 1, 2, 3)
    assert canonical.mask_id == 50264
    assert canonical.first_code_id == 50265 == canonical.code_id(0)
    assert canonical.first_bin_id == 58457 == canonical.bin_id(0)
    assert canonical.vocab_size == 59457 == CANONICAL_VOCAB_SIZE
    assert (canonical.num_codes, canonical.num_bins) == (8192, 1000)
    assert canonical.code_id(8191) == 58456 and canonical.bin_id(999) == 59456
    # The fairseq fillers occupy 50261..50263 but text never produces them.
    assert canonical.id_to_token(50261) == "madeupword0000"
    assert 50261 not in canonical.encode("madeupword0000 madeupword0001")


def test_special_tokens_in_text(canonical: Tokenizer) -> None:
    ids = canonical.encode(PROMPT + " region: <bin_12> <bin_0><bin_999>")
    assert ids[:len(canonical.encode(PROMPT))] == canonical.encode(PROMPT)
    bins = [i for i in ids if canonical.is_bin(i)]
    assert bins == [canonical.bin_id(12), canonical.bin_id(0), canonical.bin_id(999)]
    assert canonical.encode("<mask> x<code_5><code_8191>") == [
        canonical.mask_id, canonical.encode(" x")[0], canonical.code_id(5), canonical.code_id(8191)]
    # Sequence markers are ordinary text inside a report; out-of-range names are ordinary text too.
    for plain in ["<s>", "</s>", "<pad>", "<unk>", "<bin_1000>", "<code_8192>"]:
        ids = canonical.encode(plain)
        assert len(ids) > 1 and not any(canonical.is_bin(i) or canonical.is_code(i) for i in ids), plain
        assert canonical.decode(ids) == plain


def test_decode_renders_specials_and_skips_markers(canonical: Tokenizer) -> None:
    body = canonical.encode(" yes")
    ids = [canonical.bos_id] + body + [canonical.unk_id, canonical.mask_id, canonical.code_id(3),
                                       canonical.bin_id(7), canonical.eos_id, canonical.pad_id, canonical.pad_id]
    assert canonical.decode(ids) == " yes<unk><mask><code_3><bin_7>"
    torch = pytest.importorskip("torch")
    assert canonical.decode(torch.tensor(ids)) == " yes<unk><mask><code_3><bin_7>"
    with pytest.raises(TokenizerError, match="59457 is outside"):
        canonical.decode([5, 59457])
    with pytest.raises(TokenizerError, match="-1 is outside"):
        canonical.decode([-1])


@pytest.mark.parametrize("text", FIXED_TEXTS)
def test_round_trip_fixed(canonical: Tokenizer, text: str) -> None:
    assert canonical.decode(canonical.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_round_trip_any_unicode(canonical: Tokenizer, text: str) -> None:
    ids = canonical.encode(text)
    assert all(0 <= i < canonical.mask_id for i in ids) or "<" in text
    assert canonical.decode(ids) == text


def test_bins_and_codes(canonical: Tokenizer) -> None:
    assert canonical.coord_to_bin(0) == canonical.bin_id(0)
    assert canonical.coord_to_bin(512) == canonical.bin_id(999)
    assert canonical.coord_to_bin(256) == canonical.bin_id(500)  # 499.5 rounds half to even
    assert canonical.coord_to_bin(100, max_image_size=256) == canonical.bin_id(round(100 / 256 * 999))
    for c in [0.0, 1.3, 77.7, 255.0, 511.9]:
        back = canonical.bin_to_coord(canonical.coord_to_bin(c))
        assert abs(back - c) <= 512 / 999 / 2 + 1e-9
    assert canonical.bin_to_coord(canonical.bin_id(999)) == 512
    assert canonical.is_code(canonical.code_id(0)) and not canonical.is_code(canonical.bin_id(0))
    assert canonical.is_bin(canonical.bin_id(999)) and not canonical.is_bin(canonical.mask_id)
    with pytest.raises(TokenizerError, match="outside the image"):
        canonical.coord_to_bin(600)
    with pytest.raises(TokenizerError, match="outside the image"):
        canonical.coord_to_bin(-5)
    with pytest.raises(TokenizerError, match="not a location bin"):
        canonical.bin_to_coord(canonical.code_id(1))
    with pytest.raises(TokenizerError, match="image code 8192"):
        canonical.code_id(8192)
    with pytest.raises(TokenizerError, match="location bin -1"):
        canonical.bin_id(-1)


def test_encode_rejects_non_text(canonical: Tokenizer) -> None:
    with pytest.raises(TypeError, match="expects a str"):
        canonical.encode(b"bytes")


# ---- BART directory ----------------------------------------------------------------------------------------


def _write_bart_dir(vocab_dir: Path, out: Path, with_fillers: bool) -> Path:
    """vocab.json + merges.txt laid out as HF's BART/RoBERTa files: fairseq ids, <mask> after the base."""
    bpe = vocab_dir
    encoder = json.loads((bpe / "encoder.json").read_text(encoding="utf-8"))
    by_gpt2_id = {i: t for t, i in encoder.items()}
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for k, line in enumerate((bpe / "dict.txt").read_text(encoding="utf-8").splitlines()):
        symbol = line.split(" ")[0]
        if symbol.isdigit():
            vocab[by_gpt2_id[int(symbol)]] = 4 + k
        elif with_fillers:
            vocab[symbol] = 4 + k
    vocab["<mask>"] = 4 + k + 1
    out.mkdir()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    shutil.copyfile(bpe / "vocab.bpe", out / "merges.txt")
    return out


@pytest.mark.parametrize("with_fillers", [True, False])
def test_bart_dir_gives_canonical_ids(canonical, vocab_dir, tmp_path, with_fillers) -> None:
    bart = Tokenizer.from_bart_dir(_write_bart_dir(vocab_dir, tmp_path / "bart", with_fillers))
    assert bart == canonical
    assert (bart.mask_id, bart.first_code_id, bart.first_bin_id, bart.vocab_size) == (50264, 50265, 58457, 59457)
    text = PROMPT + " region: <bin_3> <bin_4> yes 🩻"
    assert bart.encode(text) == canonical.encode(text)


def test_bart_dir_with_misplaced_mask(vocab_dir, tmp_path) -> None:
    directory = _write_bart_dir(vocab_dir, tmp_path / "bart", with_fillers=True)
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    vocab["<mask>"] = 50300
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"vocab\.json: <mask> has id 50300, .* must be 50264"):
        Tokenizer.from_bart_dir(directory)


# ---- save / load -------------------------------------------------------------------------------------------


def test_save_load_round_trip(canonical: Tokenizer, tmp_path: Path) -> None:
    canonical.save(tmp_path / "ckpt" / "tokenizer")
    directory = tmp_path / "ckpt" / "tokenizer"
    assert sorted(p.name for p in directory.iterdir()) == sorted([CONFIG_FILE, MERGES_FILE, VOCAB_FILE])
    config = json.loads((directory / CONFIG_FILE).read_text())
    assert (config["vocab_size"], config["mask_id"], config["first_bin_id"]) == (59457, 50264, 58457)
    loaded = Tokenizer.load(directory)
    assert loaded == canonical and loaded.source == canonical.source
    text = PROMPT + " <bin_1> <code_2> <mask> résumé 😀\n"
    assert loaded.encode(text) == canonical.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
    # Our own directory is also a BART-style directory with the same ids.
    assert Tokenizer.from_bart_dir(directory) == canonical
    # Worker processes receive the tokenizer by pickling.
    assert pickle.loads(pickle.dumps(canonical)).encode(text) == canonical.encode(text)


def test_load_rejects_inconsistent_directory(canonical: Tokenizer, tmp_path: Path) -> None:
    directory = tmp_path / "tok"
    canonical.save(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    with pytest.raises(TokenizerError, match=r"vocab\.json: no entry for id\(s\) \[50264, .* 999 bins"):
        Tokenizer.load(_with_config(directory, tmp_path / "fewer_bins", dict(config, num_bins=999)))
    vocab = json.loads((directory / VOCAB_FILE).read_text(encoding="utf-8"))
    del vocab["<bin_999>"]
    missing_bin = _with_config(directory, tmp_path / "missing_bin", config)
    (missing_bin / VOCAB_FILE).write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"vocab\.json: 59456 entries, expected ids 0\.\.59456"):
        Tokenizer.load(missing_bin)
    with pytest.raises(TokenizerError, match="vocab_size 60000 does not match"):
        Tokenizer.load(_with_config(directory, tmp_path / "size", dict(config, vocab_size=60000)))
    with pytest.raises(TokenizerError, match="not a biomedgpt-tokenizer"):
        Tokenizer.load(_with_config(directory, tmp_path / "format", dict(config, format="other")))
    with pytest.raises(TokenizerError, match=rf"{CONFIG_FILE}: file not found"):
        Tokenizer.load(tmp_path / "does-not-exist")


def _with_config(source: Path, target: Path, config: dict) -> Path:
    shutil.copytree(source, target)
    (target / CONFIG_FILE).write_text(json.dumps(config))
    return target


# ---- bad GPT-2 files ---------------------------------------------------------------------------------------


def _gpt2_copy(vocab_dir: Path, target: Path) -> Path:
    shutil.copytree(vocab_dir, target)
    for path in target.iterdir():
        path.chmod(0o644)
    return target


def _replace_line(path: Path, lineno: int, text: str) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize(
    "file, lineno, text, message",
    [
        ("dict.txt", 7, "13", r"dict\.txt:7: expected 'SYMBOL COUNT', got '13'"),
        ("dict.txt", 9, "13 many", r"dict\.txt:9: expected 'SYMBOL COUNT'"),
        ("dict.txt", 10, "99999 5", r"dict\.txt:10: GPT-2 id 99999 is not in encoder\.json"),
        ("dict.txt", 11, "13 5", r"dict\.txt:11: symbol 13 appears twice"),
        ("vocab.bpe", 3, "Ġ a b", r"vocab\.bpe:3: expected 'A B'"),
        ("vocab.bpe", 4, "Ġ zzzzzz", r"vocab\.bpe:4: 'zzzzzz' is not in the vocabulary"),
    ],
)
def test_malformed_gpt2_files_name_file_and_line(vocab_dir, tmp_path, file, lineno, text, message) -> None:
    directory = _gpt2_copy(vocab_dir, tmp_path / "bpe")
    _replace_line(directory / file, lineno, text)
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_gpt2_files(directory)


def test_missing_gpt2_file(vocab_dir, tmp_path) -> None:
    directory = _gpt2_copy(vocab_dir, tmp_path / "bpe")
    (directory / "encoder.json").unlink()
    with pytest.raises(TokenizerError, match=r"encoder\.json: file not found"):
        Tokenizer.from_gpt2_files(directory)


def test_dict_missing_gpt2_ids(vocab_dir, tmp_path) -> None:
    directory = _gpt2_copy(vocab_dir, tmp_path / "bpe")
    lines = (directory / "dict.txt").read_text(encoding="utf-8").splitlines()
    (directory / "dict.txt").write_text("\n".join(lines[:-200]) + "\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"dict\.txt: 197 GPT-2 ids of encoder\.json have no line"):
        Tokenizer.from_gpt2_files(directory)


# ---- the project's own trained BPE -------------------------------------------------------------------------


def test_trained_tokenizer_layout_and_round_trip(trained: Tokenizer) -> None:
    tok = trained
    assert tok.source == "trained:2 files"
    assert tok.mask_id == 2000  # specials follow the base BPE directly
    assert (tok.first_code_id, tok.first_bin_id, tok.vocab_size) == (2001, 2001 + 8192, 2001 + 8192 + 1000)
    assert [tok.id_to_token(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    report = "The cardiac silhouette and mediastinum size are within normal limits. No pneumothorax.\n"
    ids = tok.encode(report)
    assert len(ids) < len(report) / 3  # the BPE learned the report vocabulary
    assert all(4 <= i < tok.mask_id for i in ids)
    for text in FIXED_TEXTS + [report, PROMPT + " <bin_0> <bin_999> <code_7> <mask>"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<bin_12><code_5><mask>") == [tok.bin_id(12), tok.code_id(5), tok.mask_id]
    assert tok.coord_to_bin(512) == tok.bin_id(999)


@settings(max_examples=100, deadline=None)
@given(text=st.text())
def test_trained_round_trip_any_unicode(trained: Tokenizer, text: str) -> None:
    assert trained.decode(trained.encode(text)) == text


def test_trained_save_load(trained: Tokenizer, trained_dir: Path, tmp_path: Path) -> None:
    tok = trained
    tok.save(tmp_path / "again")
    again = Tokenizer.load(tmp_path / "again")
    assert again == tok
    assert (tmp_path / "again" / VOCAB_FILE).read_bytes() == (trained_dir / VOCAB_FILE).read_bytes()
    assert (tmp_path / "again" / MERGES_FILE).read_bytes() == (trained_dir / MERGES_FILE).read_bytes()


def test_train_cli_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"'.*nothing-\*\.txt' matches no file"):
        train_tokenizer.train(train_tokenizer.TrainTokenizerConfig(
            inputs=[str(tmp_path / "nothing-*.txt")], output_dir=str(tmp_path / "out")))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("good line\nr\xe9sum\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not UTF-8 text"):
        train_tokenizer.train(train_tokenizer.TrainTokenizerConfig(inputs=[str(latin1)], output_dir=str(tmp_path)))
    for bad in (["inputs=[x.txt]", "output_dir=o", "bpe_vocab_size=100"], ["output_dir=o"],
                ["inputs=[x.txt]", "output_dir=o", "vocab=10"]):
        with pytest.raises(SystemExit):
            train_tokenizer.main(bad)
    assert not (tmp_path / "out").exists()
