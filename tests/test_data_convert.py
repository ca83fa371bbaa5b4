"""Conversion to MDS shards and reading back: TSV, Parquet, JSONL, DICOM; local and a real moto S3 server.

Also the failure paths: bad rows reported by file and line, too many bad rows, a conversion killed
midway, an unreachable store, a missing bucket, a truncated shard.
"""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from biomedgpt.data.config import DataConfig, StreamConfig
from biomedgpt.data.loader import DataSourceError, TaskStreamingDataset
from biomedgpt.data.mds import OutputExistsError
from biomedgpt.data.convert import ConversionError, PrepareConfig, convert

pytestmark = pytest.mark.timeout(120)


def png(seed: int, size=(24, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


def read_rows(remote: str, tmp_path: Path, name: str = "s") -> list[dict]:
    """Every row of a converted dataset, in order, through our streaming dataset (no processing)."""
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), download_retry=1, download_timeout=10, num_workers=0)
    ds = TaskStreamingDataset([StreamConfig(name=name, task="caption", remote=remote)], cfg, None, train=False,
                              cache_subdir=f"read-{time.monotonic_ns()}")
    rows = [ds.get_item(i) for i in range(ds.num_samples)]
    del ds
    return rows


def vision_language_tsv(path: Path) -> list[dict]:
    """A small vision_language.tsv (caption / qa / grounding rows, one bad row) and the rows we expect."""
    lines, expected = [], []
    for i in range(9):
        image = png(i)
        kind = ("caption", "qa", "visual_grounding")[i % 3]
        refs = {"caption": "", "qa": "0.7|!+yes&&0.3|!+no", "visual_grounding": "1,2,10.5,20"}[kind]
        lines.append("\t".join([f"vl{i}", b64(image), f"Caption {i}", "is it normal?", refs, "lung&&heart", "demo", kind]))
        meta = {"objects": ["lung", "heart"], "dataset": "demo"}
        if kind == "caption":
            expected.append({"id": f"vl{i}", "kind": "caption", "meta": {"captions": [f"Caption {i}"], **meta}})
        elif kind == "qa":
            expected.append({"id": f"vl{i}", "kind": "vqa",
                             "meta": {"question": "is it normal?", "answers": {"yes": 0.7, "no": 0.3}, **meta}})
        else:
            expected.append({"id": f"vl{i}", "kind": "grounding",
                             "meta": {"caption": f"Caption {i}", "box": [1.0, 2.0, 10.5, 20.0], **meta}})
        expected[-1]["image"] = image
    lines.insert(4, "vl-bad\tnot base64 !!\tc\tq\t\t\tdemo\tcaption")
    path.write_text("\n".join(lines) + "\n")
    return expected


def test_tsv_roundtrip_and_bad_row_reported(tmp_path, capsys):
    expected = vision_language_tsv(tmp_path / "vl.tsv")
    summary = convert(PrepareConfig(input=str(tmp_path / "vl.tsv"), format="vision_language_tsv",
                                    output=str(tmp_path / "out"), max_bad_fraction=0.2, progress=False))
    assert summary.written == 9 and dict(summary.skipped) == {"corrupt image": 1}
    err = capsys.readouterr().err
    assert f"{tmp_path / 'vl.tsv'}:5: corrupt image" in err and "skipped (corrupt image): 1" in err
    assert read_rows(str(tmp_path / "out"), tmp_path) == expected  # PNG bytes kept, not re-encoded
    with pytest.raises(OutputExistsError):
        convert(PrepareConfig(input=str(tmp_path / "vl.tsv"), format="vision_language_tsv",
                              output=str(tmp_path / "out"), max_bad_fraction=0.2, progress=False))


def test_original_text_formats(tmp_path):
    (tmp_path / "text.tsv").write_text("t1\tthe heart is normal\nt2\tno effusion\n")
    (tmp_path / "nli.tsv").write_text("a\tb\t1\nc\td\t0\ne\tf\t2\n")
    (tmp_path / "sum.tsv").write_text("long question about asthma\tasthma treatment\n")
    (tmp_path / "image.tsv").write_text(f"i1\t{b64(png(1))}\t{' '.join(map(str, range(256)))}\n")
    (tmp_path / "det.tsv").write_text(f"d1\t{b64(png(2))}\t1,2,3,4,7,nodule&&0,0,5,5,8,mass, left\n")
    for name, fmt in (("text", "text_tsv"), ("nli", "mednli_tsv"), ("sum", "meqsum_tsv"), ("image", "image_tsv"),
                      ("det", "detection_tsv")):
        convert(PrepareConfig(input=str(tmp_path / f"{name}.tsv"), format=fmt, output=str(tmp_path / name),
                              progress=False))
    assert [r["meta"] for r in read_rows(str(tmp_path / "text"), tmp_path)] == [
        {"text": "the heart is normal"}, {"text": "no effusion"}]
    assert [r["meta"]["label"] for r in read_rows(str(tmp_path / "nli"), tmp_path)] == [
        "entailment", "neutral", "contradiction"]
    assert read_rows(str(tmp_path / "sum"), tmp_path)[0]["meta"] == {"source": "long question about asthma",
                                                                     "summary": "asthma treatment"}
    assert read_rows(str(tmp_path / "image"), tmp_path)[0]["meta"]["codes"] == list(range(256))
    det = read_rows(str(tmp_path / "det"), tmp_path)[0]["meta"]
    assert det == {"boxes": [[1, 2, 3, 4], [0, 0, 5, 5]], "labels": ["nodule", "mass, left"], "category_ids": [7, 8]}


def test_jsonl_with_image_files_reports_file_and_line(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(6):
        (tmp_path / "img" / f"{i}.png").write_bytes(png(i))
        lines.append(json.dumps({"id": f"r{i}", "image": f"img/{i}.png", "caption": f"report {i}&&alt {i}"}))
    (tmp_path / "img" / "broken.png").write_bytes(png(9)[:40])
    lines.insert(2, "{not json")
    lines.insert(4, json.dumps({"id": "broken", "image": "img/broken.png", "caption": "x"}))
    (tmp_path / "recs.jsonl").write_text("\n".join(lines) + "\n")
    cfg = PrepareConfig(input=str(tmp_path / "recs.jsonl"), format="jsonl", kind="caption", progress=False,
                        output=str(tmp_path / "out"), columns={"captions": "caption"}, max_bad_fraction=0.1)
    with pytest.raises(ConversionError, match=r"of the rows were bad \(max_bad_fraction 10.0%\); nothing published"):
        convert(cfg)
    err = capsys.readouterr().err
    assert f"recs.jsonl:3: malformed row: not valid JSON" in err and "recs.jsonl:5: corrupt image" in err
    assert not (tmp_path / "out").exists()
    cfg.max_bad_fraction = 0.5
    convert(cfg)
    rows = read_rows(str(tmp_path / "out"), tmp_path)
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(6)]
    assert rows[1]["meta"]["captions"] == ["report 1", "alt 1"] and rows[1]["image"] == png(1)


def test_llava_json_one_row_per_turn(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png(1))
    entries = [
        {"id": "a", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A chest X-ray."},
            {"from": "human", "value": "Any effusion? <image>"}, {"from": "gpt", "value": "No.\nLungs are clear."}]},
        {"id": "t", "conversations": [{"from": "human", "value": "Define CT."},
                                      {"from": "gpt", "value": "Tomography."}]},
        {"id": "m", "image": "missing.png", "conversations": [{"from": "human", "value": "q"},
                                                              {"from": "gpt", "value": "a"}]},
        ["not", "an", "entry"],
        {"id": "h", "conversations": [{"from": "human", "value": "q1"}, {"from": "human", "value": "q2"}]},
    ]
    source = tmp_path / "llava.json"
    source.write_text(json.dumps(entries))
    summary = convert(PrepareConfig(input=str(source), format="llava_json", image_root=str(tmp_path / "img"),
                                    output=str(tmp_path / "out"), progress=False, max_bad_fraction=0.5))
    assert summary.written == 3 and dict(summary.skipped) == {"missing image": 1, "malformed row": 2}
    err = capsys.readouterr().err
    assert f"{source}:entry 3, turn 1: missing image" in err and f"{source}:entry 4: malformed row" in err
    assert f"{source}:entry 5, turn 1: malformed row: conversation 'h': turn 1 has roles ['human', 'human']" in err
    rows = read_rows(str(tmp_path / "out"), tmp_path)
    assert [(r["id"], r["kind"], r["meta"]["instruction"], r["meta"]["response"]) for r in rows] == [
        ("a-0", "instruction", "What is shown?", "A chest X-ray."),
        ("a-1", "instruction", "Any effusion?", "No.\nLungs are clear."),
        ("t-0", "instruction", "Define CT.", "Tomography.")]
    assert rows[0]["image"] == rows[1]["image"] == png(1) and rows[2]["image"] == b""
    source.write_text(json.dumps({"id": "a"}))
    with pytest.raises(ValueError, match="llava.json: expected a JSON list of conversations"):
        convert(PrepareConfig(input=str(source), format="llava_json", output=str(tmp_path / "out2"), progress=False))


def test_vqa_answer_types_are_kept(tmp_path, capsys):
    """SLAKE / VQA-RAD ``answer_type`` (OPEN / CLOSED) goes into the rows, normalised; anything else is a bad row."""
    (tmp_path / "i.png").write_bytes(png(0))
    rows = [{"id": "o", "image": "i.png", "question": "what organ?", "answer": "liver", "answer_type": "OPEN"},
            {"id": "c", "image": "i.png", "question": "left or right?", "answer": "left", "answer_type": "CLOSED "},
            {"id": "n", "image": "i.png", "question": "is it normal?", "answer": "yes"},
            {"id": "b", "image": "i.png", "question": "q?", "answer": "a", "answer_type": "OTHER"}]
    source = tmp_path / "vqa.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    convert(PrepareConfig(input=str(source), format="jsonl", kind="vqa", output=str(tmp_path / "out"),
                          progress=False, max_bad_fraction=0.3))
    assert "vqa.jsonl:4: malformed row: answer_type 'OTHER' is not one of ('open', 'closed')" in capsys.readouterr().err
    got = {r["id"]: r["meta"].get("answer_type") for r in read_rows(str(tmp_path / "out"), tmp_path)}
    assert got == {"o": "open", "c": "closed", "n": None}


def test_dicom_folder_windowing_and_inversion(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_modality_lut

    from biomedgpt.data.images import decode_image

    folder = tmp_path / "dcm"
    folder.mkdir()
    for name in ("RG1_UNCR.dcm", "CT_small.dcm", "MR_small.dcm"):
        (folder / name).write_bytes(Path(get_testdata_file(name)).read_bytes())
    convert(PrepareConfig(input=str(folder), format="dicom", kind="caption", output=str(tmp_path / "out"),
                          columns={"captions": "Modality"}, progress=False))
    rows = {r["meta"]["captions"][0]: r for r in read_rows(str(tmp_path / "out"), tmp_path)}
    assert sorted(rows) == ["CR", "CT", "MR"]
    chest = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))  # MONOCHROME1, window 15000 / 30000
    values = apply_modality_lut(chest.pixel_array, chest).astype(float)
    low = 15000 - 0.5 - (30000 - 1) / 2
    expected = 255 - np.clip((values - low) * 255 / (30000 - 1), 0, 255).round()
    stored = rows["CR"]["image"]
    assert stored[:8] == b"\x89PNG\r\n\x1a\n"
    got = np.asarray(decode_image(stored))[..., 0].astype(float)
    assert got.shape == values.shape and np.abs(got - expected).max() <= 1
    assert rows["CR"]["id"] == str(chest.SOPInstanceUID)


def test_killed_conversion_is_never_readable(tmp_path):
    rows = "".join(f"t{i}\tthe lungs are clear and the heart size is normal in study {i}\n" for i in range(200_000))
    (tmp_path / "text.tsv").write_text(rows)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "biomedgpt.tools.prepare_data", f"input={tmp_path / 'text.tsv'}",
                             "format=text_tsv", f"output={out}", "shard_size=64kb", "progress=false"],
                            cwd=Path(__file__).resolve().parents[1], stderr=subprocess.PIPE)
    partial = tmp_path / ".out.partial"
    deadline = time.monotonic() + 60
    while not list(partial.glob("shard.*.mds")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not out.exists() and not (partial / "index.json").exists()
    with pytest.raises(DataSourceError, match="no index.json"):
        read_rows(str(out), tmp_path)


# ----- S3-compatible store (moto's server on loopback) ------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real moto S3 server on 127.0.0.1 with bucket ``data``; S3_ENDPOINT_URL points at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"])
    client.create_bucket(Bucket="data")
    yield client
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def vqa_parquet(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [png(i) for i in range(7)]
    table = pa.table({
        "qid": [f"p{i}" for i in range(7)],
        "question": [f"what is shown in image {i}?" for i in range(7)],
        "answer": ["lung", "heart", "yes", "no", "2", "liver", "brain"],
        "image": [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(images)],  # HF datasets layout
    })
    pq.write_table(table, path, row_group_size=3)
    return [{"id": f"p{i}", "kind": "vqa", "image": images[i],
             "meta": {"question": f"what is shown in image {i}?", "answers": {a: 1.0}, "objects": []}}
            for i, a in enumerate(["lung", "heart", "yes", "no", "2", "liver", "brain"])]


def test_parquet_to_s3_and_back(s3, tmp_path):
    expected = vqa_parquet(tmp_path / "vqa.parquet")
    convert(PrepareConfig(input=str(tmp_path / "vqa.parquet"), format="parquet", kind="vqa", output="s3://data/vqa",
                          columns={"id": "qid", "answers": "answer"}, parquet_batch_rows=2, progress=False,
                          shard_size="8kb"))
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="data", Prefix="vqa/")["Contents"]]
    assert "vqa/index.json" in keys and len(keys) > 2
    assert read_rows("s3://data/vqa", tmp_path) == expected
    with pytest.raises(OutputExistsError):
        convert(PrepareConfig(input=str(tmp_path / "vqa.parquet"), format="parquet", kind="vqa",
                              output="s3://data/vqa", progress=False))


def test_s3_failed_conversion_publishes_no_index(s3, tmp_path):
    (tmp_path / "bad.tsv").write_text("only-one-column\nt1\tgood text\n")
    with pytest.raises(ConversionError, match="nothing published at s3://data/bad"):
        convert(PrepareConfig(input=str(tmp_path / "bad.tsv"), format="text_tsv", output="s3://data/bad",
                              progress=False))
    listing = s3.list_objects_v2(Bucket="data", Prefix="bad/").get("Contents", [])
    assert "bad/index.json" not in [o["Key"] for o in listing]


def test_unreachable_store_and_missing_bucket(s3, tmp_path, monkeypatch):
    with pytest.raises(DataSourceError, match=r"s3://no-such-bucket/x"):
        read_rows("s3://no-such-bucket/x", tmp_path)
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    start = time.monotonic()
    with pytest.raises(DataSourceError, match=r"^stream s: cannot read s3://data/vqa/index.json at \S+: unreachable"):
        read_rows("s3://data/vqa", tmp_path)
    assert time.monotonic() - start < 30


def test_truncated_shard_local_and_remote(s3, tmp_path):
    (tmp_path / "text.tsv").write_text("".join(f"t{i}\tsome report text number {i}\n" for i in range(200)))
    convert(PrepareConfig(input=str(tmp_path / "text.tsv"), format="text_tsv", output=str(tmp_path / "local"),
                          shard_size="2kb", progress=False))
    shard = sorted((tmp_path / "local").glob("shard.*.mds"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataSourceError, match=rf"{shard.name} has {len(data) // 2} bytes, index.json says {len(data)}"):
        read_rows(str(tmp_path / "local"), tmp_path)
    convert(PrepareConfig(input=str(tmp_path / "text.tsv"), format="text_tsv", output="s3://data/text",
                          shard_size="2kb", progress=False))
    remote_name = json.loads(s3.get_object(Bucket="data", Key="text/index.json")["Body"].read())["shards"][1]
    s3.put_object(Bucket="data", Key=f"text/{remote_name['raw_data']['basename']}", Body=data[: len(data) // 2])
    with pytest.raises(DataSourceError, match="truncated"):
        read_rows("s3://data/text", tmp_path)


def _flip_middle(data: bytes) -> bytes:
    """The same size, a few bytes of sample data changed (what a bad disk or a partial overwrite leaves)."""
    middle = len(data) * 2 // 3
    return data[:middle] + bytes(b ^ 0x5A for b in data[middle:middle + 4]) + data[middle + 4:]


def test_same_size_corrupt_shard_fails_before_any_of_its_samples_is_used(s3, tmp_path):
    from biomedgpt.data.loader import build_train_loader

    (tmp_path / "text.tsv").write_text("".join(f"t{i}\tsome report text number {i}\n" for i in range(120)))
    convert(PrepareConfig(input=str(tmp_path / "text.tsv"), format="text_tsv", output=str(tmp_path / "local"),
                          shard_size="2kb", progress=False))
    index = json.loads((tmp_path / "local" / "index.json").read_text())
    counts = [s["samples"] for s in index["shards"]]
    bad = 2
    name = index["shards"][bad]["raw_data"]["basename"]
    first = sum(counts[:bad])
    bad_ids = {f"t{i}" for i in range(first, first + counts[bad])}
    shard = tmp_path / "local" / name
    data = shard.read_bytes()
    shard.write_bytes(_flip_middle(data))
    assert shard.stat().st_size == len(data)

    cfg = DataConfig(streams=[StreamConfig(name="reports", task="text_infilling", remote=str(tmp_path / "local"))],
                     cache_dir=str(tmp_path / "cache"), batch_size=4, num_workers=0, shuffle=True)
    from biomedgpt.models.tokenizer import Tokenizer

    seen: list[str] = []
    with pytest.raises(DataSourceError) as info:
        for batch in build_train_loader(cfg, Tokenizer.from_gpt2_files(None)):
            seen.extend(batch["ids"])
    message = str(info.value)
    assert "\n" not in message and "stream reports" in message and name in message, message
    assert f"index.json says {index['shards'][bad]['raw_data']['hashes']['xxh64']}" in message, message
    assert not bad_ids & set(seen)  # nothing of the corrupt shard reached a batch

    convert(PrepareConfig(input=str(tmp_path / "text.tsv"), format="text_tsv", output="s3://data/corrupt",
                          shard_size="2kb", progress=False))
    remote_name = json.loads(s3.get_object(Bucket="data", Key="corrupt/index.json")["Body"].read())[
        "shards"][bad]["raw_data"]["basename"]  # in the upload's generation folder
    s3.put_object(Bucket="data", Key=f"corrupt/{remote_name}", Body=_flip_middle(data))  # same size, after download
    with pytest.raises(DataSourceError, match=rf"stream s: shard file \S*{name} is corrupt: xxh64 [0-9a-f]+, index"):
        read_rows("s3://data/corrupt", tmp_path)


# ----- conversion errors: one line, exit status 1, never a traceback ---------------------------------------

def test_non_utf8_rows_are_skipped_and_named(tmp_path, capsys):
    tsv = tmp_path / "text.tsv"
    tsv.write_bytes(b"t0\tgood report one\nt1\tbad \xff byte here\nt2\tgood report two\n")
    jsonl = tmp_path / "nli.jsonl"
    jsonl.write_bytes(b'{"s1": "a", "s2": "b", "label": "neutral"}\n{"s1": "\xe9t\xe9", "s2": "b", "label": "neutral"}\n')
    log = io.StringIO()
    summary = convert(PrepareConfig(input=str(tsv), format="text_tsv", output=str(tmp_path / "t"), progress=False,
                                    max_bad_fraction=0.5), log=log)
    assert summary.written == 2 and summary.skipped == {"not UTF-8": 1}
    assert f"{tsv}:2: not UTF-8: byte 0xff at column 8\n" in log.getvalue()
    assert [r["id"] for r in read_rows(str(tmp_path / "t"), tmp_path)] == ["t0", "t2"]
    log = io.StringIO()
    convert(PrepareConfig(input=str(jsonl), format="jsonl", kind="nli", output=str(tmp_path / "n"), progress=False,
                          max_bad_fraction=0.5), log=log)
    assert f"{jsonl}:2: not UTF-8: byte 0xe9 at column 9\n" in log.getvalue()


def _main_error(capsys, *args: str) -> tuple[str, float]:
    from biomedgpt.tools.prepare_data import main

    start = time.monotonic()
    with pytest.raises(SystemExit) as info:
        main(["progress=false", *args])
    elapsed = time.monotonic() - start
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and err.startswith("prepare-data: error: "), err
    return err, elapsed


def test_missing_and_empty_input_are_one_line_errors(tmp_path, capsys):
    err, _ = _main_error(capsys, f"input={tmp_path / 'nope.tsv'}", "format=text_tsv", f"output={tmp_path / 'o'}")
    assert f"no input files at '{tmp_path / 'nope.tsv'}'" in err
    (tmp_path / "empty.tsv").write_text("")
    err, _ = _main_error(capsys, f"input={tmp_path / 'empty.tsv'}", "format=text_tsv", f"output={tmp_path / 'o'}")
    assert err.endswith(f"no rows in {tmp_path / 'empty.tsv'}") and not (tmp_path / "o").exists()
    # the command itself: exit status 1 and the one line, no traceback
    proc = subprocess.run([sys.executable, "-m", "biomedgpt.tools.prepare_data", f"input={tmp_path / 'nope.tsv'}",
                           "format=text_tsv", f"output={tmp_path / 'o'}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "no input files" in proc.stderr


def test_format_comes_from_the_suffix_or_is_asked_for(tmp_path, capsys):
    from biomedgpt.data.convert import PrepareConfig
    from biomedgpt.tools.prepare_data import main

    (tmp_path / "rows.tsv").write_text("1\tsome text\n")
    with pytest.raises(SystemExit) as info:
        main([f"input={tmp_path / 'rows.tsv'}", f"output={tmp_path / 'o'}"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 1 and err.count("\n") == 0 and "Traceback" not in err, err
    assert "a .tsv input needs format= naming its original layout: vision_language_tsv, text_tsv" in err
    assert PrepareConfig(input="a/b.parquet", output="o").format == "parquet"
    assert PrepareConfig(input="a/*.jsonl", output="o").format == "jsonl"
    assert PrepareConfig(input="llava_med.json", output="o").format == "llava_json"
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "IM0001").write_bytes(b"")
    assert PrepareConfig(input=str(tmp_path / "scans"), output="o").format == "dicom"
    assert PrepareConfig(input="x.tsv", output="o", format="text_tsv").format == "text_tsv"


def test_unreachable_or_refusing_store_is_one_line_within_10s(s3, tmp_path, capsys, monkeypatch):
    (tmp_path / "text.tsv").write_text("t0\tsome report\n")
    args = (f"input={tmp_path / 'text.tsv'}", "format=text_tsv")
    err, elapsed = _main_error(capsys, *args, "output=s3://no-such-bucket/x")
    assert "bucket no-such-bucket: no such bucket" in err and os.environ["S3_ENDPOINT_URL"] in err
    port = free_port()
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("AWS_MAX_ATTEMPTS")
    err, elapsed = _main_error(capsys, *args, "output=s3://data/x")
    assert f"object store http://127.0.0.1:{port}, bucket data unreachable after 2 attempt(s)" in err, err
    assert elapsed < 10, elapsed
    err, elapsed = _main_error(capsys, *args, "output=s3://data/x", "store_attempts=1")
    assert "after 1 attempt(s)" in err and elapsed < 10


def _encoded(size: tuple[int, int], fmt: str, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def test_pre_resize_keeps_aspect_scales_boxes_and_is_reported(tmp_path, capsys):
    big, wide, small = _encoded((400, 300), "JPEG"), _encoded((600, 150), "PNG", 1), _encoded((40, 30), "JPEG", 2)
    lines = [f"g0\t{b64(big)}\tthe lesion\t\t40,30,200,150\t\tdemo\tvisual_grounding",
             f"c1\t{b64(wide)}\ta wide strip\t\t\t\tdemo\tcaption",
             f"c2\t{b64(small)}\ta small one\t\t\t\tdemo\tcaption"]
    (tmp_path / "vl.tsv").write_text("\n".join(lines) + "\n")
    summary = convert(PrepareConfig(input=str(tmp_path / "vl.tsv"), format="vision_language_tsv",
                                    output=str(tmp_path / "out"), progress=False, max_image_side=200,
                                    min_image_side=120))
    assert (summary.images, summary.resized) == (3, 2)
    assert ("images pre-resized (longest side <= 200 unless the shortest would drop below 120): 2 of 3"
            in capsys.readouterr().err)
    rows = {r["id"]: r for r in read_rows(str(tmp_path / "out"), tmp_path)}
    grounding = Image.open(io.BytesIO(rows["g0"]["image"]))
    assert grounding.format == "JPEG" and grounding.size == (200, 150)  # longest side 200, aspect kept
    assert rows["g0"]["meta"]["box"] == [20.0, 15.0, 100.0, 75.0]  # still around the same pixels
    strip = Image.open(io.BytesIO(rows["c1"]["image"]))
    assert strip.format == "PNG" and strip.size == (480, 120)  # 200 would take the short side below 120
    assert rows["c2"]["image"] == small  # already small enough: the source bytes as they were
