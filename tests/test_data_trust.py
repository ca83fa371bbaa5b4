"""Untrusted data: indexes that name files outside their stream's folder, S3 overwrites killed midway,
images too large to decode, bad rows in training and evaluation shards (moto's S3 server on loopback).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from biomedgpt.data.loader import UnsafeIndexError, unsafe_file_name
from biomedgpt.tools.prepare_data import PrepareConfig, convert
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
    assert [p.name.split("-")[:3] for p in temp.glob("mds-*")] == [["mds", "upload", str(proc.pid)]]

    b_ids = text_rows(tmp_path / "b.tsv", 40, "b")
    convert(PrepareConfig(input=str(tmp_path / "b.tsv"), format="text_tsv", output="s3://data/ds", overwrite=True,
                          shard_size="1kb", progress=False))
    assert [r["id"] for r in read_rows("s3://data/ds", tmp_path)] == b_ids
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="data", Prefix="ds/")["Contents"]}
    index = json.loads(s3.get_object(Bucket="data", Key="ds/index.json")["Body"].read())
    assert keys == {"ds/index.json"} | {f"ds/{s['raw_data']['basename']}" for s in index["shards"]}
    assert not list(temp.glob("mds-*"))  # the killed conversion's folder and this one's are gone
