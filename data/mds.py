"""Writing MDS shards so that readers never trust an unfinished dataset.

Local output: shards go to a hidden ``.NAME.partial`` directory beside the target, which is renamed
into place (``os.replace``) only after ``index.json`` is written. Remote output (``s3://…``; the
endpoint from ``S3_ENDPOINT_URL``): shards are uploaded as they fill and ``index.json`` is uploaded
last, only by :meth:`ShardWriter.commit`; an old ``index.json`` at the prefix is deleted before the
first new shard lands, so a killed conversion leaves a prefix without an index (unreadable), never a
mix of old index and new shards.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from streaming import MDSWriter
from streaming.base.storage.upload import CloudUploader

from biomedgpt.data.records import MDS_COLUMNS

INDEX = "index.json"


class OutputExistsError(FileExistsError):
    """The output already holds a dataset and overwrite was not asked for."""


class StoreError(OSError):
    """The object store cannot be reached or refuses the output (one line: endpoint, bucket, reason)."""


def _s3_client(timeout: float | None = None, attempts: int | None = None):
    import boto3
    from botocore.config import Config

    attempts = attempts if attempts is not None else int(os.environ.get("AWS_MAX_ATTEMPTS", 3))
    options = {"retries": {"max_attempts": attempts, "mode": "standard"}}
    if timeout is not None:
        options.update(connect_timeout=timeout, read_timeout=timeout)
    return boto3.client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None, config=Config(**options))


def _store_reason(exc: Exception) -> str:
    """A botocore failure in a few words (no traceback)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        code = str(error.get("Code", "?"))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("403", "AccessDenied", "Forbidden") or status == 403:
            return "access denied (403)"
        return f"{code}: {error.get('Message') or 'refused'}"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")


def _split_s3(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    return parsed.netloc, parsed.path.lstrip("/").rstrip("/")


class _IndexHeldWriter(MDSWriter):
    """MDSWriter that writes index.json into ``index_dir`` instead of publishing it.

    streaming's own writer submits the index upload once its queue is empty, which can be while the
    last shards are still uploading; we upload the index ourselves after every shard has landed.
    """

    def __init__(self, *, index_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.index_dir = index_dir

    def _write_index(self) -> None:
        with open(os.path.join(self.index_dir, INDEX), "w") as out:
            json.dump({"version": 2, "shards": self.shards}, out, sort_keys=True)


class ShardWriter:
    """MDS writer of our row schema with atomic publication (see module doc)."""

    def __init__(self, out: str, overwrite: bool = False, compression: Optional[str] = None,
                 size_limit: str = "64mb", hashes: tuple[str, ...] = ("xxh64",), store_timeout: float = 3.0,
                 store_attempts: int = 2) -> None:
        self.out = out
        self.store_timeout, self.store_attempts = store_timeout, store_attempts
        self.remote = bool(urlparse(out).scheme) and urlparse(out).scheme != "file"
        self._committed = False
        if self.remote:
            self._prepare_remote(overwrite)
            self._staging = tempfile.mkdtemp(prefix="mds-upload-")
            self._index_dir = tempfile.mkdtemp(prefix="mds-index-")
            target = (self._staging, out)
        else:
            final = Path(out)
            if (final / INDEX).exists() and not overwrite:
                raise OutputExistsError(f"{final} already holds a dataset (index.json); pass overwrite=true")
            final.parent.mkdir(parents=True, exist_ok=True)
            self._staging = str(final.parent / f".{final.name}.partial")
            shutil.rmtree(self._staging, ignore_errors=True)  # a killed earlier conversion's leftovers
            self._index_dir = target = self._staging
        self._writer = _IndexHeldWriter(index_dir=self._index_dir, out=target, columns=MDS_COLUMNS,
                                        compression=compression, hashes=list(hashes), size_limit=size_limit,
                                        exist_ok=True)

    def _prepare_remote(self, overwrite: bool) -> None:
        if urlparse(self.out).scheme != "s3":
            return  # other stores: streaming's uploader; index.json is still written last
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, prefix = _split_s3(self.out)
        key = f"{prefix}/{INDEX}" if prefix else INDEX
        endpoint = os.environ.get("S3_ENDPOINT_URL") or "the default AWS endpoint"
        where = f"object store {endpoint}, bucket {bucket}"
        client = _s3_client(self.store_timeout, self.store_attempts)
        try:
            client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code"))
            reason = "no such bucket" if code in ("404", "NoSuchBucket", "NotFound") else _store_reason(exc)
            raise StoreError(f"cannot write {self.out}: {where}: {reason}") from None
        except BotoCoreError as exc:
            raise StoreError(f"cannot write {self.out}: {where} unreachable after {self.store_attempts} "
                             f"attempt(s) of {self.store_timeout:g} s: {_store_reason(exc)}") from None
        try:
            client.head_object(Bucket=bucket, Key=key)
            exists = True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                raise StoreError(f"cannot write {self.out}: {where}: {_store_reason(exc)}") from None
            exists = False
        except BotoCoreError as exc:
            raise StoreError(f"cannot write {self.out}: {where}: {_store_reason(exc)}") from None
        if exists and not overwrite:
            raise OutputExistsError(f"{self.out} already holds a dataset (index.json); pass overwrite=true")
        if exists:
            client.delete_object(Bucket=bucket, Key=key)

    def write(self, record: dict) -> None:
        self._writer.write(record)

    def commit(self) -> None:
        """Finish the last shard, wait for every shard upload, then publish index.json."""
        self._writer.finish()  # raises if an upload failed
        if self.remote:
            CloudUploader.get((self._index_dir, self.out), keep_local=True, retry=2, exist_ok=True).upload_file(INDEX)
            for path in (self._staging, self._index_dir):
                shutil.rmtree(path, ignore_errors=True)
        else:
            final = Path(self.out)
            trash = None
            if final.exists():
                trash = final.parent / f".{final.name}.old"
                shutil.rmtree(trash, ignore_errors=True)
                os.replace(final, trash)
            os.replace(self._staging, final)
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        self._committed = True

    def abort(self) -> None:
        """Drop everything written (remote shards already uploaded stay, without an index)."""
        if self._committed:
            return
        self._writer.cancel_future_jobs()
        for path in (self._staging, self._index_dir):
            shutil.rmtree(path, ignore_errors=True)
