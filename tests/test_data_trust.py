"""Untrusted data: indexes that name files outside their stream's folder, S3 overwrites killed midway,
images too large to decode, bad rows in training and evaluation shards (moto's S3 server on loopback).
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import pytest

from biomedgpt.data.loader import UnsafeIndexError, unsafe_file_name
from biomedgpt.data.convert import PrepareConfig, convert
from tests.test_data_convert import free_port, png, read_rows, s3  # noqa: F401  (s3: the moto server fixture)

pytestmark = pytest.mark.timeout(120)


def text_rows(path: Path, count: int, tag: str = "t") -> list[str]:
    path.write_text("".join(f"{tag}{i}\treport {tag} number {i} of the study\n" for i in range(count)))
    return [f"{tag}{i}" for i in range(count)]


def files_outside(root: Path, inside: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and inside not in p.parents}


# ----- index.json file names stay inside the stream's folder --------------------------------------------

def test_unsafe_file_names():
    assert not any(map(unsafe_file_name, ["shard.00000.mds", "sub/shard.00001.mds.zstd", "a..b.mds"]))
    assert all(map(unsafe_file_name, ["../x.mds", "/etc/passwd", "a/../../x", "", "x\0y", "..", "a/../b.mds"]))


def test_index_naming_files_outside_the_cache_is_refused_before_any_download(s3, tmp_path):
    """An S3 index whose shard is ``../../../ZIPSLIP.mds`` (the object exists at that key, so a reader that
    follows the name would fetch it) is refused with one line naming the stream and the name; nothing lands
    outside cache_dir. The same for a zip shard with an absolute name, and for a local stream."""
    text_rows(tmp_path / "text.tsv", 30)
    convert(PrepareConfig(input=str(tmp_path / "text.tsv"), format="text_tsv", output="s3://data/evil",
                          shard_size="1kb", progress=False))
    index = json.loads(s3.get_object(Bucket="data", Key="evil/index.json")["Body"].read())
    good = index["shards"][0]["raw_data"]["basename"]
    shard_bytes = s3.get_object(Bucket="data", Key=f"evil/{good}")["Body"].read()
    # read_rows caches under <tmp>/cache/read-N/s: three levels up is <tmp>
    for bad in ("../../../ZIPSLIP.mds", str(tmp_path / "ABSOLUTE.mds")):
        crafted = json.loads(json.dumps(index))
        crafted["shards"][-1]["raw_data"]["basename"] = bad
        s3.put_object(Bucket="data", Key=f"evil/{bad.lstrip('/')}", Body=shard_bytes)
        s3.put_object(Bucket="data", Key="evil/index.json", Body=json.dumps(crafted).encode())
        with pytest.raises(UnsafeIndexError) as info:
            read_rows("s3://data/evil", tmp_path)
        message = str(info.value)
        assert "\n" not in message and message.startswith("stream s: ") and repr(bad) in message, message
        assert "s3://data/evil" in message
        assert files_outside(tmp_path, tmp_path / "cache") == {tmp_path / "text.tsv"}
        shards = [p.name for p in (tmp_path / "cache").rglob("*.mds")]
        assert shards == [], shards  # refused before any shard, good or bad, was downloaded

    crafted = json.loads(json.dumps(index))
    crafted["shards"][0]["zip_data"] = {"basename": "../../../escape.mds.zstd", "bytes": 1, "hashes": {}}
    s3.put_object(Bucket="data", Key="evil/index.json", Body=json.dumps(crafted).encode())
    with pytest.raises(UnsafeIndexError, match=r"^stream s: .*'\.\./\.\./\.\./escape\.mds\.zstd'"):
        read_rows("s3://data/evil", tmp_path)

    local = tmp_path / "local"
    convert(PrepareConfig(input=str(tmp_path / "text.tsv"), format="text_tsv", output=str(local), progress=False))
    crafted = json.loads((local / "index.json").read_text())
    crafted["shards"][0]["raw_data"]["basename"] = "../text.tsv"
    (local / "index.json").write_text(json.dumps(crafted))
    with pytest.raises(UnsafeIndexError, match=rf"^stream s: index.json of {local} names the file '\.\./text\.tsv'"):
        read_rows(str(local), tmp_path)


# ----- an S3 overwrite killed midway leaves the old dataset readable --------------------------------------

@pytest.mark.timeout(300)
def test_s3_overwrite_killed_mid_upload_keeps_the_old_dataset(s3, tmp_path, monkeypatch):
    """Dataset A at s3://data/ds; an overwrite with B is SIGKILLed once its first shard object has landed:
    A still reads back in full. The next overwrite publishes B, removes A's shards, the killed upload's
    objects and its temporary folder, and leaves no temporary folder of its own."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    a_ids = text_rows(tmp_path / "a.tsv", 60, "a")
    convert(PrepareConfig(input=str(tmp_path / "a.tsv"), format="text_tsv", output="s3://data/ds", shard_size="1kb",
                          progress=False))
    expected = read_rows("s3://data/ds", tmp_path)
    assert [r["id"] for r in expected] == a_ids
    a_keys = {o["Key"] for o in s3.list_objects_v2(Bucket="data", Prefix="ds/")["Contents"]}
    assert not list(temp.glob("mds-*"))

    text_rows(tmp_path / "b.tsv", 30_000, "b")
    proc = subprocess.Popen([sys.executable, "-m", "biomedgpt.tools.prepare_data", f"input={tmp_path / 'b.tsv'}",
                             "format=text_tsv", "output=s3://data/ds", "overwrite=true", "shard_size=4kb",
                             "progress=false"], env={**os.environ, "TMPDIR": str(temp)}, stderr=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 240  # its start (imports) takes a while on a busy machine
    uploaded: list = []
    while not uploaded and time.monotonic() < deadline and proc.poll() is None:
        listing = s3.list_objects_v2(Bucket="data", Prefix="ds/").get("Contents", [])
        uploaded = [o["Key"] for o in listing if o["Key"] not in a_keys]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert uploaded and all(k.startswith("ds/gen-") for k in uploaded), uploaded
    assert read_rows("s3://data/ds", tmp_path) == expected  # the old dataset, complete
    (orphan,) = temp.glob("mds-*")  # the killed conversion's staging folder
    os.utime(orphan, (time.time() - 120, time.time() - 120))  # older than a folder whose lock may not be taken yet

    b_ids = text_rows(tmp_path / "b.tsv", 40, "b")
    convert(PrepareConfig(input=str(tmp_path / "b.tsv"), format="text_tsv", output="s3://data/ds", overwrite=True,
                          shard_size="1kb", progress=False))
    assert [r["id"] for r in read_rows("s3://data/ds", tmp_path)] == b_ids
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="data", Prefix="ds/")["Contents"]}
    index = json.loads(s3.get_object(Bucket="data", Key="ds/index.json")["Body"].read())
    assert keys == {"ds/index.json"} | {f"ds/{s['raw_data']['basename']}" for s in index["shards"]}
    assert not list(temp.glob("mds-*"))  # the killed conversion's folder and this one's are gone


# ----- images above the pixel limit, bad rows in training and evaluation shards ----------------------------

def huge_png(side: int = 13_000) -> bytes:
    """A black 1-bit side x side PNG of a few tens of KB (decoded as RGB: side * side * 3 bytes)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    line = bytes(1 + (side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(line * 1000) for _ in range(side // 1000)) + packer.compress(
        line * (side % 1000)) + packer.flush()
    header = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def test_image_above_the_pixel_limit_is_refused_from_its_header(tmp_path):
    from PIL import Image

    from biomedgpt.data.images import check_image_pixels, storable_image
    from biomedgpt.data.records import BadRecord

    data = huge_png()
    assert len(data) < 300_000 and Image.open(io.BytesIO(data)).size == (13_000, 13_000)
    start = time.monotonic()
    for check in (lambda: storable_image(data, "big.png"), lambda: check_image_pixels(data, name="big.png")):
        with pytest.raises(BadRecord, match=r"^big.png: 13000 x 13000 = 169 Mpx is above the limit of 36 Mpx "
                                            r"\(max_image_pixels=36000000\)$") as info:
            check()
        assert info.value.reason == "image too large"
    assert time.monotonic() - start < 0.5  # nothing decoded (decoding it takes seconds and 0.5 GB)
    check_image_pixels(png(1), 24 * 32)  # at the limit: fine
    with pytest.raises(BadRecord, match=r"32 x 24 = 0.000768 Mpx is above the limit of 0.000767 Mpx"):
        check_image_pixels(png(1), 24 * 32 - 1)

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "big.png").write_bytes(data)
    lines = [json.dumps({"id": f"r{i}", "image": f"{i}.png", "caption": f"report {i}"}) for i in range(30)]
    lines.insert(3, json.dumps({"id": "big", "image": "big.png", "caption": "huge"}))
    for i in range(30):
        (tmp_path / "img" / f"{i}.png").write_bytes(png(i))
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    log = io.StringIO()
    start = time.monotonic()
    summary = convert(PrepareConfig(input=str(tmp_path / "rows.jsonl"), format="jsonl", kind="caption",
                                    image_root=str(tmp_path / "img"), output=str(tmp_path / "out"), progress=False,
                                    max_bad_fraction=0.05), log=log)
    assert time.monotonic() - start < 20
    assert summary.written == 30 and dict(summary.skipped) == {"image too large": 1}
    assert (f"rows.jsonl:4: image too large: {tmp_path / 'img' / 'big.png'}: 13000 x 13000 = 169 Mpx is above "
            "the limit of 36 Mpx") in log.getvalue()


def write_rows(out: Path, records: list[dict]) -> None:
    """Rows straight into shards (what another tool, or a shard damaged after conversion, gives us)."""
    from biomedgpt.data.mds import ShardWriter

    writer = ShardWriter(str(out), size_limit="4kb")
    for record in records:
        writer.write(record)
    writer.commit()


def caption_rows(count: int) -> list[dict]:
    return [{"id": f"c{i}", "kind": "caption", "image": png(i), "meta": {"captions": [f"report {i}"]}}
            for i in range(count)]


def loader_ids(build, cfg, tokenizer) -> list[str]:
    return [uid for batch in build(cfg, tokenizer) for uid in batch["ids"]]


def test_bad_rows_are_skipped_and_counted_in_training_and_evaluation(tmp_path, capfd, canonical_tokenizer):
    """An undecodable image, a row without its fields and an image above the pixel limit are skipped, one
    warning line each naming the row; the training epoch and the evaluation pass go on over every good row.
    A stream that is mostly bad stops with one line."""
    from biomedgpt.data.config import DataConfig, StreamConfig
    from biomedgpt.data.loader import BadRowsError, build_eval_loader, build_train_loader
    from biomedgpt.core.user_errors import one_line

    good = caption_rows(61)  # 64 rows: whole batches of 4
    bad = [{"id": "broken", "kind": "caption", "image": png(99)[:60], "meta": {"captions": ["x"]}},
           {"id": "empty", "kind": "caption", "image": png(98), "meta": {}},
           {"id": "huge", "kind": "caption", "image": huge_png(), "meta": {"captions": ["y"]}}]
    write_rows(tmp_path / "shards", good[:20] + bad[:1] + good[20:40] + bad[1:] + good[40:])
    stream = [StreamConfig(name="cap", task="caption", remote=str(tmp_path / "shards"))]
    cfg = DataConfig(streams=stream, eval_streams=stream, cache_dir=str(tmp_path / "cache"), batch_size=4,
                     eval_batch_size=4, num_workers=0, patch_image_size=32, max_bad_fraction=0.1)
    expected = sorted(r["id"] for r in good)
    start = time.monotonic()
    assert sorted(loader_ids(build_train_loader, cfg, canonical_tokenizer)) == expected
    assert time.monotonic() - start < 20  # the 169 Mpx image was never decoded
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 3, warnings
    assert any("stream cap, row 'broken'" in w and "corrupt image" in w for w in warnings), warnings
    assert any("row 'empty'" in w and "KeyError" in w for w in warnings), warnings
    assert any("row 'huge'" in w and "image too large" in w and "169 Mpx" in w for w in warnings), warnings
    assert sorted(set(loader_ids(build_eval_loader, cfg, canonical_tokenizer))) == expected  # evaluation goes on

    mostly_bad = [dict(r, image=r["image"][:50]) if i % 2 else r for i, r in enumerate(caption_rows(40))]
    write_rows(tmp_path / "mostly_bad", mostly_bad)
    cfg.eval_streams = [StreamConfig(name="bad", task="caption", remote=str(tmp_path / "mostly_bad"))]
    cfg.num_workers = 1  # raised in a loader worker: torch re-raises it with the worker's traceback as message
    with pytest.raises(BadRowsError) as info:
        loader_ids(build_eval_loader, cfg, canonical_tokenizer)
    message = one_line(info.value)
    assert "\n" not in message and message.startswith("10 of the ") and "data.max_bad_fraction=0.1" in message


# ----- a store that refuses: one line naming the prefix and the cause ----------------------------------------

@pytest.fixture
def iam_user(s3):
    """An IAM user of moto's account with no permission: its key, and what a wrong secret looks like."""
    import boto3

    iam = boto3.client("iam", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    name = f"reader{time.monotonic_ns()}"
    iam.create_user(UserName=name)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def test_denied_missing_or_unreachable_store_is_one_line_naming_the_cause(s3, tmp_path, monkeypatch, iam_user):
    """Opening a stream: a wrong secret, an unknown key id, a key without permission, a missing index or bucket,
    an unreachable endpoint each give one line naming the stream, the prefix and the cause (streaming says
    "index.json not found! Either check the bucket path or the bucket permission" for all of them)."""
    from moto.core.authorization import enable_iam_authentication

    from biomedgpt.data.loader import DataSourceError

    text_rows(tmp_path / "text.tsv", 5)
    convert(PrepareConfig(input=str(tmp_path / "text.tsv"), format="text_tsv", output="s3://data/secure",
                          progress=False))
    key_id, secret = iam_user
    endpoint = os.environ["S3_ENDPOINT_URL"]

    def refusal(remote: str = "s3://data/secure") -> str:
        with pytest.raises(DataSourceError) as info:
            read_rows(remote, tmp_path)
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"stream s: cannot read {remote}/index.json at "), message
        return message

    with enable_iam_authentication():
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong" + secret[5:])
        assert refusal().endswith(f"{endpoint}: access denied: wrong secret access key (SignatureDoesNotMatch)")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        assert refusal().endswith(": access denied (403): the credentials have no permission there")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
        assert refusal().endswith("access denied: the store does not know the access key id (InvalidAccessKeyId)")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    assert refusal("s3://data/nothing-here").endswith(": not found")
    assert refusal("s3://no-such-bucket/x").endswith(": no such bucket")
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    assert ": unreachable (EndpointConnectionError: " in refusal()


def test_prepare_data_says_wrong_secret_or_missing_credentials(s3, tmp_path, monkeypatch, capsys, iam_user):
    from moto.core.authorization import enable_iam_authentication

    from biomedgpt.tools.prepare_data import main

    text_rows(tmp_path / "text.tsv", 3)

    def error() -> str:
        with pytest.raises(SystemExit) as info:
            main([f"input={tmp_path / 'text.tsv'}", "format=text_tsv", "output=s3://data/p", "progress=false"])
        assert info.value.code == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("prepare-data: error: cannot write s3://data/p: "), err
        return err

    key_id, secret = iam_user
    with enable_iam_authentication():
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong" + secret[5:])
        assert error().endswith("bucket data: access denied: wrong secret access key (SignatureDoesNotMatch)")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert error().endswith("bucket data: no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                            "AWS_PROFILE) (NoCredentialsError)")


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_train_on_a_denied_bucket_is_one_line_once(s3, tmp_path, monkeypatch, iam_user, repo_root, vocab_dir):
    """`biomedgpt train` on 2 ranks whose stream the store refuses: exit status 1 and one `error:` line (rank 0's)
    naming the prefix and the cause, no traceback (before: 85-154 lines ending "index.json not found! ...")."""
    from moto.core.authorization import enable_iam_authentication

    from tests.test_engine_distributed import TINY_MODEL, launch

    stream = {"name": "caption", "task": "caption", "remote": "s3://data/denied"}
    cfg = {"model": TINY_MODEL, "bpe_dir": str(vocab_dir), "output_dir": str(tmp_path / "run"),
           "data": {"streams": [stream], "cache_dir": str(tmp_path / "cache"), "num_workers": 0,
                    "download_retry": 1, "download_timeout": 10},
           "optim": {"max_steps": 2}, "log": {"wandb_mode": "disabled", "progress_bar": False}}
    key_id, secret = iam_user
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with enable_iam_authentication():
        output = launch(repo_root, cfg, 2, expect=1, timeout=240)
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    endpoint = os.environ["S3_ENDPOINT_URL"]
    assert errors == [f"error: stream caption: cannot read s3://data/denied/index.json at {endpoint}: access denied "
                      "(403): the credentials have no permission there"], output[-4000:]
    assert "Traceback" not in output, output[-4000:]


# ----- data pickles (answer lists, CIDEr-D caches): never loaded; refused with a conversion that works ---------

def test_pickled_side_files_are_refused_with_the_conversion_that_works(tmp_path):
    """The original's answer sets and CIDEr-D cache are pickles: each is refused, unread, with one line whose
    command (the one docs/tasks-and-data.md gives) turns the file into the JSON that then reads the same data."""
    import collections
    import pickle
    import re
    import shlex

    import numpy as np

    from biomedgpt.data.answers import PickledDataError, read_answers
    from biomedgpt.engine.eval.metrics import read_cider_df

    marker = tmp_path / "ran"

    class Crafted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"yes": Crafted()}))
    (tmp_path / "evil.json").write_bytes(pickle.dumps(["yes", Crafted()], protocol=4))  # a pickle by any name
    for name in ("evil.pkl", "evil.json"):
        with pytest.raises(PickledDataError, match=f"{name}: a pickle, which this project does not load"):
            read_answers(tmp_path / name)
    assert not marker.exists()

    docs = (Path(__file__).parents[1] / "docs" / "tasks-and-data.md").read_text()
    released = [(tmp_path / "trainval_ans2label.pkl", {"yes": 0, "no": 1, "left lung": 2}, read_answers,
                 ["yes", "no", "left lung"]),
                (tmp_path / "words.p", {"document_frequency": collections.defaultdict(float, {("a",): 2.0, ("a", "b"): 1.0}),
                                        "ref_len": np.float64(3.0)}, read_cider_df,
                 ({("a",): 2.0, ("a", "b"): 1.0}, pytest.approx(np.log(3.0))))]
    for path, content, reader, expected in released:
        path.write_bytes(pickle.dumps(content, protocol=4))  # the release's protocol
        with pytest.raises(PickledDataError) as refused:
            reader(path)
        command = re.search(r"convert it once, if you trust it: (.*), then give (\S+) \(docs/", str(refused.value))
        assert command and command.group(2) == str(path.with_suffix(".json")), str(refused.value)
        program, flag, code = shlex.split(command.group(1))[:3]
        assert (program, flag) == ("python3", "-c") and code in docs  # the documented conversion is the one printed
        subprocess.run(command.group(1), shell=True, check=True, cwd=tmp_path)
        assert reader(path.with_suffix(".json")) == expected
