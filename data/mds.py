"""Writing MDS shards so that readers never trust an unfinished dataset.

Local output: shards go to a hidden ``.NAME.partial`` directory beside the target, which is renamed
into place (``os.replace``) only after ``index.json`` is written. Remote output (``s3://…``; the
endpoint from ``S3_ENDPOINT_URL``): shards are uploaded as they fill into a fresh generation folder
under the prefix (``gen-<UTC time>-<random>/shard.NNNNN.mds``, the index names them so), and
``index.json`` is replaced last, only by :meth:`ShardWriter.commit`, in one PUT. A killed or failed
conversion therefore leaves the previous dataset (index and shards) readable in full; after the new
index is in place, the objects only the old index named and other generations' folders are deleted.
The local staging folder is one ``mds-upload-*`` temporary folder, removed on success, failure and
SIGTERM; one left by a killed (SIGKILL) conversion (its flock released by the OS) is removed by the next
remote conversion on the machine.
"""
from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from biomedgpt.core.durable import publish_directory
from biomedgpt.data.config import INDEX
from biomedgpt.data.records import MDS_COLUMNS
from biomedgpt.data.streaming_api import CloudUploader, MDSWriter

GENERATION = "gen-"  # remote shards live under <prefix>/gen-<UTC time>-<random>/
TEMP_PREFIX = "mds-upload-"


class OutputExistsError(FileExistsError):
    """The output already holds a dataset and overwrite was not asked for."""


class StoreError(OSError):
    """The object store cannot be reached or refuses the output (one line: endpoint, bucket, reason)."""


def s3_client(timeout: float | None = None, attempts: int | None = None):
    import boto3
    from botocore.config import Config

    attempts = attempts if attempts is not None else int(os.environ.get("AWS_MAX_ATTEMPTS", 3))
    options = {"retries": {"max_attempts": attempts, "mode": "standard"}}
    if timeout is not None:
        options.update(connect_timeout=timeout, read_timeout=timeout)
    # a session of its own: boto3's default session keeps the first credentials it resolved for the process
    return boto3.session.Session().client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None,
                                          config=Config(**options))


#: S3 error codes -> the cause in words (what the user must fix differs: key id, secret, policy, name)
_DENIED = {
    "InvalidAccessKeyId": "access denied: the store does not know the access key id (InvalidAccessKeyId)",
    "SignatureDoesNotMatch": "access denied: wrong secret access key (SignatureDoesNotMatch)",
    "AccessDenied": "access denied (403): the credentials have no permission there",
    "403": "access denied (403)",
    "Forbidden": "access denied (403)",
}
_NOT_FOUND = {"NoSuchBucket": "no such bucket", "NoSuchKey": "not found", "404": "not found", "NotFound": "not found"}


def store_reason(exc: Exception) -> str:
    """A botocore failure in a few words (no traceback): denied (which credential), not found, no credentials,
    unreachable."""
    from botocore.exceptions import (ConnectionError as BotoConnectionError, NoCredentialsError,
                                     PartialCredentialsError)

    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return ("no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) "
                f"({type(exc).__name__})")
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        code = str(error.get("Code", "?"))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _DENIED:
            return _DENIED[code]
        if status == 403:
            return f"access denied (403, {code})"
        if code in _NOT_FOUND:
            return _NOT_FOUND[code]
        return f"{code}: {error.get('Message') or 'refused'}"
    if isinstance(exc, BotoConnectionError):
        return f"unreachable ({_error_text(exc)})"
    return _error_text(exc)


def _error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")


def store_cause(client, bucket: str, exc: Exception) -> str:
    """``store_reason``, made precise with one more request: a HEAD's 403 carries no error code (a listing
    says which credential is wrong) and its 404 does not say whether the bucket or the object is missing."""
    from botocore.exceptions import BotoCoreError, ClientError

    reason = store_reason(exc)
    try:
        if reason.startswith("access denied (403)"):
            client.list_objects_v2(Bucket=bucket, MaxKeys=1)
        elif reason == "not found":
            client.head_bucket(Bucket=bucket)
    except ClientError as probe:
        code = str(probe.response.get("Error", {}).get("Code"))
        return "no such bucket" if code in ("404", "NoSuchBucket", "NotFound") else store_reason(probe)
    except BotoCoreError:
        pass
    return reason


def split_s3(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    return parsed.netloc, parsed.path.lstrip("/").rstrip("/")


class _IndexHeldWriter(MDSWriter):
    """MDSWriter that writes index.json into ``index_dir`` instead of publishing it.

    streaming's own writer submits the index upload once its queue is empty, which can be while the
    last shards are still uploading; we upload the index ourselves after every shard has landed.
    """

    def __init__(self, *, index_dir: str, folder: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.index_dir, self.folder = index_dir, folder

    def _write_index(self) -> None:
        shards = copy.deepcopy(self.shards)
        for shard in shards:  # the index sits above the generation folder the shards went to
            for key in ("raw_data", "zip_data"):
                if self.folder and shard.get(key):
                    shard[key]["basename"] = f"{self.folder}/{shard[key]['basename']}"
        with open(os.path.join(self.index_dir, INDEX), "w") as out:
            json.dump({"version": 2, "shards": shards}, out, sort_keys=True)


class ShardWriter:
    """MDS writer of our row schema with atomic publication (see module doc)."""

    def __init__(self, out: str, overwrite: bool = False, compression: Optional[str] = None,
                 size_limit: str = "64mb", hashes: tuple[str, ...] = ("xxh64",), store_timeout: float = 3.0,
                 store_attempts: int = 2) -> None:
        self.out = out
        self.store_timeout, self.store_attempts = store_timeout, store_attempts
        self.remote = bool(urlparse(out).scheme) and urlparse(out).scheme != "file"
        self._committed = False
        self._old_files: set[str] = set()  # what the index being replaced names (deleted once replaced)
        self._temp_lock = None  # held while the remote staging folder is in use (see remove_orphaned_temp_dirs)
        self.folder = ""
        if self.remote:
            self._old_files = self._prepare_remote(overwrite)
            remove_orphaned_temp_dirs()
            self.folder = f"{GENERATION}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(4)}"
            self._temp = tempfile.mkdtemp(prefix=TEMP_PREFIX)
            self._temp_lock = _hold_lock(self._temp)
            self._staging, self._index_dir = os.path.join(self._temp, "shards"), os.path.join(self._temp, "index")
            os.mkdir(self._staging)
            os.mkdir(self._index_dir)
            target = (self._staging, f"{out.rstrip('/')}/{self.folder}")
        else:
            final = Path(out)
            if (final / INDEX).exists() and not overwrite:
                raise OutputExistsError(f"{final} already holds a dataset (index.json); pass overwrite=true")
            final.parent.mkdir(parents=True, exist_ok=True)
            self._staging = str(final.parent / f".{final.name}.partial")
            shutil.rmtree(self._staging, ignore_errors=True)  # a killed earlier conversion's leftovers
            self._temp = self._index_dir = target = self._staging
        self._writer = _IndexHeldWriter(index_dir=self._index_dir, folder=self.folder, out=target, columns=MDS_COLUMNS,
                                        compression=compression, hashes=list(hashes), size_limit=size_limit,
                                        exist_ok=True)

    def _prepare_remote(self, overwrite: bool) -> set[str]:
        """Check the store and bucket; the files the current index names (empty when there is none)."""
        if urlparse(self.out).scheme != "s3":
            return set()  # other stores: streaming's uploader; index.json is still replaced last
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

        bucket, prefix = split_s3(self.out)
        key = f"{prefix}/{INDEX}" if prefix else INDEX
        endpoint = os.environ.get("S3_ENDPOINT_URL") or "the default AWS endpoint"
        where = f"object store {endpoint}, bucket {bucket}"
        client = s3_client(self.store_timeout, self.store_attempts)
        try:
            client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            raise StoreError(f"cannot write {self.out}: {where}: {store_cause(client, bucket, exc)}") from None
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise StoreError(f"cannot write {self.out}: {where}: {store_reason(exc)}") from None
        except BotoCoreError as exc:
            raise StoreError(f"cannot write {self.out}: {where} unreachable after {self.store_attempts} "
                             f"attempt(s) of {self.store_timeout:g} s: {_error_text(exc)}") from None
        try:
            client.head_object(Bucket=bucket, Key=key)
            exists = True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                raise StoreError(f"cannot write {self.out}: {where}: {store_reason(exc)}") from None
            exists = False
        except BotoCoreError as exc:
            raise StoreError(f"cannot write {self.out}: {where}: {store_reason(exc)}") from None
        if exists and not overwrite:
            raise OutputExistsError(f"{self.out} already holds a dataset (index.json); pass overwrite=true")
        if not exists:
            return set()
        try:
            index = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
            return {info["basename"] for shard in index["shards"] for info in (shard.get("raw_data"),
                                                                                 shard.get("zip_data")) if info}
        except (ClientError, BotoCoreError, ValueError, KeyError, TypeError):
            return set()  # an unreadable old index: its shards are left, only other generations are removed

    def write(self, record: dict) -> None:
        self._writer.write(record)

    def commit(self) -> None:
        """Finish the last shard, wait for every shard upload, then publish index.json."""
        self._writer.finish()  # raises if an upload failed
        if self.remote:
            CloudUploader.get((self._index_dir, self.out), keep_local=True, retry=2, exist_ok=True).upload_file(INDEX)
            self._committed = True  # the new dataset is published; what follows only frees space
            self._remove_temp()
            self._remove_unreferenced()
        else:
            publish_directory(self._staging, self.out)
        self._committed = True

    def abort(self) -> None:
        """Drop everything written; the published dataset (if any) is untouched. Remote shards already
        uploaded are deleted where the store allows (else the next publication at the prefix removes them)."""
        if self._committed:
            return
        self._writer.cancel_future_jobs()
        self._remove_temp()
        if self.remote and urlparse(self.out).scheme == "s3":
            self._writer.executor.shutdown(wait=True)  # no upload lands after the deletion
            self._delete_where(lambda name: name.startswith(f"{self.folder}/"), quiet=True)

    def _remove_temp(self) -> None:
        shutil.rmtree(self._temp, ignore_errors=True)
        if self._temp_lock is not None:
            self._temp_lock.close()
            self._temp_lock = None

    def _remove_unreferenced(self) -> None:
        """After publication: delete what only the replaced index named, and every other generation's folder
        (killed or failed conversions' uploads). Failures only leave garbage, reported in one line."""
        if urlparse(self.out).scheme != "s3":
            return
        pattern = re.compile(rf"{re.escape(GENERATION)}[^/]+/")

        def stale(name: str) -> bool:
            if name.startswith(f"{self.folder}/"):
                return False
            return name in self._old_files or bool(pattern.match(name))

        self._delete_where(stale, quiet=False)

    def _delete_where(self, stale, quiet: bool) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, prefix = split_s3(self.out)
        base = f"{prefix}/" if prefix else ""
        client = s3_client(self.store_timeout, self.store_attempts)
        try:
            keys = [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base)
                    for obj in page.get("Contents", []) if stale(obj["Key"][len(base):])]
            for start in range(0, len(keys), 1000):
                client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[start:start + 1000]],
                                                             "Quiet": True})
        except (BotoCoreError, ClientError) as exc:
            if not quiet:
                print(f"warning: {self.out} is published, but its replaced shards were not all deleted "
                      f"({store_reason(exc)}); the next publication there retries", file=sys.stderr, flush=True)


TEMP_LOCK = ".in-use"
TEMP_MIN_AGE_S = 60.0  # a staging folder younger than this is never taken for orphaned


def _hold_lock(folder: str):
    """An exclusive flock on a file in ``folder``, held by the open file (the OS drops it when the process dies)."""
    import fcntl

    handle = open(os.path.join(folder, TEMP_LOCK), "w")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def remove_orphaned_temp_dirs() -> None:
    """Delete this user's ``mds-upload-*`` staging folders whose conversion is gone (a SIGKILL leaves them): their
    lock is free. A lock, not a process id, so that processes in other PID namespaces sharing /tmp are safe."""
    import fcntl

    for path in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"):
        try:
            info = path.stat()
            if info.st_uid != os.getuid() or not (path / TEMP_LOCK).is_file() or \
                    time.time() - info.st_mtime < TEMP_MIN_AGE_S:
                continue  # another user's, not one of ours, or just being created (its lock maybe not yet taken)
            with open(path / TEMP_LOCK, "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue  # in use (BlockingIOError), or gone meanwhile
