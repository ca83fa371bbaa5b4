"""Streaming multi-task datasets and resumable loaders over MDS shards (local paths or object storage).

One ``streaming.Stream`` per task, mixed by proportion; each row becomes one or more examples through
``biomedgpt.data.tasks``; a resumable loader (streaming's resume protocol) whose ``state_dict()`` goes into
the training checkpoint. Resuming with a different number of ranks works as long as ``num_canonical_nodes`` is
kept (it is stored in the state). Augmentation randomness is a pure function of
(shuffle seed, epoch, sample id), so a resumed run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import functools
import os
import random
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional
from urllib.parse import urlparse

import numpy as np
from torch.utils.data import DataLoader

from biomedgpt.data.collate import collate, first_rows
from biomedgpt.data.config import DataConfig, DataSourceError, StreamConfig, check_local_streams, is_remote
from biomedgpt.data.images import check_image_pixels, import_torchvision
from biomedgpt.data.mds import INDEX, s3_client, split_s3, store_cause
from biomedgpt.data.shared_memory import registration_lock
from biomedgpt.data.streaming_api import MDSReader, Stream, StreamingDataset, World, _ShardState
from biomedgpt.data.tasks import PROCESSORS, TaskContext, process
from biomedgpt.core.hosts import ranks_on_this_host


#: hashes checked when a shard is first read, in order of preference (the first one index.json has)
HASH_PREFERENCE = ("xxh64", "xxh3_64", "xxh128", "sha256", "sha1", "md5")


def file_hash(path: str, algo: str, chunk: int = 1 << 22) -> str:
    """Hex digest of a file, read in 4 MiB pieces (the digest streaming's ``get_hash`` gives its bytes)."""
    if algo.startswith("xxh"):
        import xxhash

        digest = getattr(xxhash, algo)()
    else:
        import hashlib

        digest = hashlib.new(algo)
    with open(path, "rb") as f:
        while piece := f.read(chunk):
            digest.update(piece)
    return digest.hexdigest()


class BadRowsError(DataSourceError):
    """More than ``data.max_bad_fraction`` of the rows read were bad."""


#: max_bad_fraction stops a run only from this many bad rows on (one bad row among the first few is no verdict)
MIN_BAD_ROWS_TO_STOP = 10


class UnsafeIndexError(DataSourceError):
    """An index.json naming a file outside its stream's folder (``../``, an absolute path): refused before
    any shard is downloaded, so an untrusted bucket cannot write anywhere else on this machine."""


def unsafe_file_name(name: str) -> bool:
    """Whether ``name`` (a file name from an index) could resolve outside the folder it is joined to: empty,
    absolute, or with a ``..`` part anywhere (no writer makes one; none is needed to name a file inside)."""
    if not isinstance(name, str) or not name or "\0" in name:
        return True
    return os.path.isabs(name) or ".." in Path(name).parts


class CheckedStream(Stream):
    """streaming's ``Stream`` whose index is checked as soon as it is read (after index.json is fetched,
    before any shard): every file it names (raw and zip shards, a format's sidecar files) must stay
    inside the stream's local folder; streaming itself joins the names to that folder unchecked."""

    def __init__(self, *, name: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stream_name = name

    def get_shards(self, world, allow_unsafe_types: bool) -> list:
        shards = super().get_shards(world, allow_unsafe_types)
        for shard in shards:
            for raw_info, zip_info in shard.file_pairs:
                for info in (raw_info, zip_info):
                    if info is not None and unsafe_file_name(info.basename):
                        raise UnsafeIndexError(
                            f"stream {self.stream_name}: index.json of {self.remote or self.local} names the "
                            f"file {info.basename!r}, outside the stream's folder; refusing the whole stream "
                            "(nothing downloaded): rewrite the index or convert the data again")
        return shards


def check_remote_index(stream: StreamConfig, local: str, cfg: DataConfig) -> None:
    """HEAD an s3:// stream's index.json before streaming fetches it (unless it is cached), so that a denied,
    missing or unreachable store is one line naming the stream, the prefix and the cause, on every rank at once.
    streaming reports each as "index.json not found! …" after its retries, and its other ranks wait
    ``download_timeout`` for the file the local leader never writes."""
    if urlparse(stream.remote).scheme != "s3" or (Path(local) / INDEX).is_file():
        return
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3(stream.remote)
    client = s3_client(cfg.download_timeout, cfg.download_retry)
    try:
        client.head_object(Bucket=bucket, Key=f"{prefix}/{INDEX}" if prefix else INDEX)
        return
    except (BotoCoreError, ClientError) as exc:
        reason = store_cause(client, bucket, exc)
    endpoint = os.environ.get("S3_ENDPOINT_URL") or "the default AWS endpoint"
    raise DataSourceError(f"stream {stream.name}: cannot read {stream.remote.rstrip('/')}/{INDEX} at {endpoint}: "
                          f"{reason}")


def set_distributed_env(rank: int, world_size: int, local_rank: Optional[int] = None,
                        local_world_size: Optional[int] = None) -> None:
    """Give streaming the rank layout it reads from the environment.

    The DeepSpeed launcher sets RANK / WORLD_SIZE / LOCAL_RANK but not LOCAL_WORLD_SIZE; without it
    streaming takes every rank for its own node and the ranks of one node trample each other's shared
    memory. When not given, the local world size is the number of ranks on this host (all-gathered
    host names when torch.distributed is up, else 1 for a single process).
    """
    if local_world_size is None:
        local_world_size = ranks_on_this_host(world_size)
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", rank % local_world_size))
    if world_size % local_world_size:
        raise ValueError(f"world size {world_size} is not a multiple of the local world size {local_world_size}")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(local_world_size))


class TaskStreamingDataset(StreamingDataset):
    """Mixed task streams; ``__getitem__`` gives the row's processed examples (a list)."""

    def __init__(self, streams: list[StreamConfig], cfg: DataConfig, tokenizer, train: bool,
                 cache_subdir: str) -> None:
        if not streams:
            raise ValueError(f"no {'training' if train else 'evaluation'} streams configured")
        check_local_streams(streams)
        built = []
        for s in streams:
            remote, local = (s.remote, s.local or str(Path(cfg.cache_dir) / cache_subdir / s.name)) \
                if is_remote(s.remote) else (None, s.remote)
            if remote is not None:
                check_remote_index(s, local, cfg)
            built.append(CheckedStream(name=s.name, remote=remote, local=local, proportion=s.proportion,
                                       download_retry=cfg.download_retry, download_timeout=cfg.download_timeout))
        try:
            with registration_lock():
                super().__init__(
                    streams=built, batch_size=cfg.batch_size if train else cfg.eval_batch_size,
                    batching_method=cfg.batching if train else "random",
                    shuffle=cfg.shuffle and train, shuffle_seed=cfg.shuffle_seed, shuffle_algo=cfg.shuffle_algo,
                    shuffle_block_size=cfg.shuffle_block_size, num_canonical_nodes=cfg.num_canonical_nodes,
                    epoch_size=cfg.epoch_size if train else None, predownload=cfg.predownload,
                    cache_limit=cfg.cache_limit, download_retry=cfg.download_retry,
                    download_timeout=cfg.download_timeout)
        except UnsafeIndexError:
            raise
        except Exception as exc:
            where = ", ".join(f"{s.name}={s.remote}" for s in streams)
            raise DataSourceError(f"cannot open streams ({where}): {type(exc).__name__}: {exc}") from exc
        self.stream_cfgs = streams
        self._check_local_shards_exist()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.train = train
        self._rows_read = self._bad_rows = 0  # this process's, for max_bad_fraction
        self._checked_shards: set[int] = set()
        self._local_shards: set[int] = set()  # seen whole on disk (no cache_limit: they stay so)
        self._maps: dict = {}  # shard id -> mmap of its raw file (see _mapped_item)
        self._prompts: dict = {}  # constant prompt pieces -> token ids (every sample's TaskContext shares it)
        self._word_start: dict = {}

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        """The raw row, after checking once per shard that its files are whole (no silent garbage)."""
        shard_id, _ = self.spanner[sample_id]
        if shard_id not in self._checked_shards:
            try:
                self.prepare_shard(shard_id)
            except Exception as exc:
                raise DataSourceError(f"stream {self._stream_of(shard_id).name}: cannot fetch shard "
                                      f"{shard_id}: {type(exc).__name__}: {exc}") from exc
            self._check_shard(shard_id)
            self._checked_shards.add(shard_id)
        if self.cfg.cache_limit is None and isinstance(self.shards[shard_id], MDSReader):
            return self._mapped_item(shard_id, self.spanner[sample_id][1])  # nothing is evicted: a map per shard
        return super().get_item(sample_id, retry)

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """streaming's, which its two background threads call for every sample: a file lock, a stat and an
        access-time write each, a third of a core at loader speed. Without ``cache_limit`` nothing is
        evicted, so a shard once seen on disk whole needs nothing more."""
        if shard_id in self._local_shards:
            return
        super().prepare_shard(shard_id, blocking)
        if self.cfg.cache_limit is None and self._shard_states[shard_id] == _ShardState.LOCAL:
            self._local_shards.add(shard_id)

    def _share_work(self, sample_ids):
        """streaming's hand-over of an epoch's sample order from the local leader; a stratified order is
        first dealt so that every rank's batch has each stream's share (streaming strata whole global
        batches only: rank 0 would get the first stream's rows). Reordered in place: the leader reads its
        own part from the same array."""
        if self.batching_method == "stratified" and sample_ids.size:
            sample_ids[...] = deal_strata_to_ranks(sample_ids, np.asarray(self.sample_offset_per_stream))
        return super()._share_work(sample_ids)

    def __getstate__(self) -> dict:
        """Pickled for spawned loader workers: memory maps stay behind (each process maps its own)."""
        return {**self.__dict__, "_maps": {}}

    def _mapped_item(self, shard_id: int, index: int) -> dict:
        """Sample ``index`` of an MDS shard through one memory map per shard and process.

        streaming opens, seeks and closes the shard file for every sample; with no cache eviction the file
        never changes after its check, so the map stays valid.
        """
        import mmap
        import struct

        mapped = self._maps.get(shard_id)
        if mapped is None:
            shard = self.shards[shard_id]
            path = os.path.join(shard.dirname, shard.split or "", shard.raw_data.basename)
            with open(path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[shard_id] = mapped
        begin, end = struct.unpack_from("<II", mapped, (1 + index) * 4)
        if end <= begin:
            raise IndexError(f"sample {index} is not in shard {self.shards[shard_id].raw_data.basename}")
        return self.shards[shard_id].decode_sample(mapped[begin:end])

    def _check_local_shards_exist(self) -> None:
        """Every shard file a local stream's index.json lists is there: else one error names it now, where
        streaming's background thread would fail on it unseen and the epoch would end empty."""
        for shard_id, shard in enumerate(self.shards):
            if is_remote(self._stream_of(shard_id).remote):
                continue
            for raw_info, _ in shard.file_pairs:
                path = os.path.join(shard.dirname, shard.split or "", raw_info.basename)
                if not os.path.exists(path):
                    raise DataSourceError(f"stream {self._stream_of(shard_id).name}: shard file {path} is missing "
                                          f"(its index.json lists it): the dataset is incomplete; convert it again")

    def _stream_of(self, shard_id: int) -> StreamConfig:
        return self.stream_cfgs[int(self.stream_per_shard[shard_id])]

    def _check_shard(self, shard_id: int) -> None:
        """Size and hash of the shard's files against index.json, before any of its samples is used.

        The hash is the strongest one index.json records that this process can compute (xxh64 for our
        shards: about 10 ms per 64 MB shard, once per shard and process).
        """
        shard = self.shards[shard_id]
        for raw_info, _ in shard.file_pairs:
            path = os.path.join(shard.dirname, shard.split or "", raw_info.basename)
            size = os.path.getsize(path) if os.path.exists(path) else -1
            if size != raw_info.bytes:
                raise DataSourceError(f"stream {self._stream_of(shard_id).name}: shard file {path} has "
                                      f"{size} bytes, index.json says {raw_info.bytes} (truncated or replaced)")
            algo = next((a for a in HASH_PREFERENCE if a in (raw_info.hashes or {})), None)
            if algo is None:
                continue  # datasets written without hashes: the size check is all there is
            actual = file_hash(path, algo)
            if actual != raw_info.hashes[algo]:
                raise DataSourceError(f"stream {self._stream_of(shard_id).name}: shard file {path} is corrupt: "
                                      f"{algo} {actual}, index.json says {raw_info.hashes[algo]}")

    def __getitem__(self, sample_id: int) -> list:
        """The row's examples; a bad row (see ``DataConfig.max_bad_fraction``) gives none, with a warning line."""
        shard_id = self.spanner[sample_id][0]
        stream = self.stream_cfgs[int(self.stream_per_shard[shard_id])]
        self._rows_read += 1
        row: dict = {}
        try:
            row = self.get_item(sample_id)
            kinds = PROCESSORS[stream.task][1]
            if row.get("kind") not in kinds:  # the stream's task (or remote) is wrong, not this row
                raise DataSourceError(f"stream {stream.name}: row {row.get('id')!r} is a {row.get('kind')!r} row; "
                                      f"task {stream.task!r} takes {kinds}: check the stream's task or remote")
            if row.get("image"):
                check_image_pixels(row["image"], self.cfg.max_image_pixels, f"row {row.get('id')!r}")
            epoch = max(self.next_epoch - 1, 0) if self.train else 0
            rng = random.Random(f"{self.cfg.shuffle_seed}/{epoch}/{sample_id}")
            ctx = TaskContext(tokenizer=self.tokenizer, cfg=self.cfg, rng=rng, train=self.train,
                              other_row=functools.partial(self._other_row, int(self.stream_per_shard[shard_id]),
                                                          sample_id),
                              loss_group=stream.loss_group, _word_start=self._word_start, prompts=self._prompts)
            return process(stream.task, row, ctx)
        except DataSourceError:
            raise  # the stream or a whole shard: nothing to skip past
        except Exception as exc:  # an undecodable image, a corrupt sample, a row the task cannot use
            return self._skip_bad_row(stream, sample_id, row, exc)

    def _skip_bad_row(self, stream: StreamConfig, sample_id: int, row: dict, exc: Exception) -> list:
        """One warning line naming the row; stop (BadRowsError, one line) once too many rows were bad."""
        self._bad_rows += 1
        uid = row.get("id")
        reason = getattr(exc, "reason", type(exc).__name__)
        where = f"stream {stream.name}, row {uid!r} (sample {sample_id})" if uid else \
            f"stream {stream.name}, sample {sample_id}"
        detail = str(exc).splitlines()[0] if str(exc) else ""
        detail = detail if reason in detail else f"{reason}: {detail}".rstrip(": ")
        print(f"warning: {where}: {detail}; skipped ({self._bad_rows} bad of {self._rows_read} rows read)",
              file=sys.stderr, flush=True)
        if self._bad_rows >= MIN_BAD_ROWS_TO_STOP and self._bad_rows > self.cfg.max_bad_fraction * self._rows_read:
            raise BadRowsError(f"{self._bad_rows} of the {self._rows_read} rows read were bad, more than "
                               f"data.max_bad_fraction={self.cfg.max_bad_fraction:g} (last: {where}: {reason}); "
                               "fix or reconvert the shards, or raise data.max_bad_fraction")
        return []

    def _other_row(self, stream_id: int, sample_id: int, rng: random.Random) -> dict:
        """A random row of the same stream other than ``sample_id`` (negatives for ITM / VQA matching)."""
        start, count = int(self.sample_offset_per_stream[stream_id]), int(self.samples_per_stream[stream_id])
        if count == 1:
            return self.get_item(sample_id)
        other = start + rng.randrange(count - 1)
        return self.get_item(other + 1 if other >= sample_id else other)


def deal_strata_to_ranks(work: np.ndarray, stream_offsets: np.ndarray) -> np.ndarray:
    """A (nodes, ranks, workers, batches, batch size) sample order with each global batch's rows regrouped:
    sorted by stream (order kept within one), then dealt to the ranks in turn, so every rank gets
    ``1/ranks`` of each stream's rows (and padding, -1, last)."""
    nodes, ranks, workers, batches, size = work.shape
    flat = work.transpose(2, 3, 0, 1, 4).reshape(workers * batches, nodes * ranks * size)
    stream = np.searchsorted(stream_offsets, flat, side="right") - 1
    stream[flat < 0] = len(stream_offsets)
    ordered = np.take_along_axis(flat, np.argsort(stream, axis=1, kind="stable"), axis=1)
    dealt = ordered.reshape(workers * batches, size, nodes * ranks).transpose(0, 2, 1)
    return dealt.reshape(workers, batches, nodes, ranks, size).transpose(2, 3, 0, 1, 4)


class ResumableLoader(DataLoader):
    """A DataLoader with ``streaming.StreamingDataLoader``'s resume protocol, whose module this process does not
    import (it imports transformers): it counts the rows given to this rank (rows, not examples: a pretraining
    row can give two), and ``state_dict()`` is the dataset's state after that many rows on every rank."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.num_samples_yielded = 0

    def __iter__(self) -> Iterator[dict]:
        self.num_samples_yielded = 0
        for batch in super().__iter__():
            self.num_samples_yielded += self.batch_size
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict(self.num_samples_yielded * World.detect().num_ranks, False)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)


def _collate_rows(rows: list[list], patch_image_size: int, group_weights: list[float],
                  with_references: bool, constraints=None, sample_patch_num: Optional[int] = None) -> dict:
    examples = [ex for row in rows for ex in row]
    if not examples:
        raise BadRowsError(f"every row of a batch of {len(rows)} was bad (see the warnings above); fix or reconvert "
                           "the shards")
    return collate(examples, patch_image_size, group_weights, with_references, constraints, sample_patch_num)


def _loader(dataset: TaskStreamingDataset, cfg: DataConfig, batch_size: int, drop_last: bool,
            with_references: bool, constraints=None, sample_patch_num: Optional[int] = None) -> ResumableLoader:
    workers = cfg.num_workers
    if workers:
        import_torchvision()  # before the workers fork: see import_torchvision
    return ResumableLoader(
        dataset, batch_size=batch_size, drop_last=drop_last, num_workers=workers,
        prefetch_factor=cfg.prefetch_factor if workers else None, persistent_workers=False,
        collate_fn=functools.partial(_collate_rows, patch_image_size=cfg.patch_image_size,
                                     group_weights=list(cfg.group_weights), with_references=with_references,
                                     constraints=constraints, sample_patch_num=sample_patch_num))


def build_train_loader(cfg: DataConfig, tokenizer, rank: int = 0, world_size: int = 1,
                       local_rank: Optional[int] = None, local_world_size: Optional[int] = None) -> ResumableLoader:
    """The training loader of this rank. Resume with ``loader.load_state_dict(state)`` before iterating;
    ``loader.state_dict()`` (every rank gives the same) goes into the checkpoint."""
    set_distributed_env(rank, world_size, local_rank, local_world_size)
    dataset = TaskStreamingDataset(cfg.streams, cfg, tokenizer, train=True, cache_subdir="train")
    constraints = None
    if cfg.constrain_training:
        from biomedgpt.data.constraints import training_constraints

        constraints = training_constraints(cfg, tokenizer, dataset)
    return _loader(dataset, cfg, cfg.batch_size, drop_last=True, with_references=False, constraints=constraints,
                   sample_patch_num=cfg.sample_patch_num)


def eval_rows_of_rank(max_batches: Optional[int], batch_size: int, world: Optional[World] = None) -> Optional[int]:
    """How many rows this rank evaluates so that the ranks together evaluate the first
    ``max_batches * batch_size`` samples of the global evaluation order (None: every row), the same samples on
    any number of ranks (while ``num_canonical_nodes`` stays fixed; on one host it always does).

    streaming deals that order out one sample at a time, node by node and within a node rank by rank:
    local rank r of node n (of N nodes, W ranks) gets positions ``q * W + r * N + n``, q = 0, 1, ... in
    its loader order, so the first ``ceil((rows - r * N - n) / W)`` rows of every rank are the first ``rows``
    positions. ``world``: streaming's view of the ranks (default: the environment ``set_distributed_env``
    wrote)."""
    if max_batches is None:
        return None
    world = world or World.detect()
    offset = world.rank_of_node * world.num_nodes + world.node
    return max(0, -(-(max_batches * batch_size - offset) // world.num_ranks))


def global_eval_batches(batches: Iterable[dict], max_batches: Optional[int]) -> Iterator[dict]:
    """This rank's share of the first ``max_batches`` global evaluation batches (``eval_rows_of_rank``),
    the last one cut at the share's end. The batch size is the loader's (a plain list: its first batch's)."""
    iterator = iter(batches)
    if max_batches is None:
        yield from iterator
        return
    left = None
    for batch in iterator:
        if left is None:
            size = getattr(batches, "batch_size", None) or len(dict.fromkeys(batch["ids"]))
            left = eval_rows_of_rank(max_batches, size)
        if left <= 0:  # a share of no rows (fewer rows asked for than there are ranks)
            return
        rows = len(dict.fromkeys(batch["ids"]))
        yield batch if rows <= left else first_rows(batch, left)
        left -= rows
        if left <= 0:
            return


def build_eval_loader(cfg: DataConfig, tokenizer, rank: int = 0, world_size: int = 1,
                      local_rank: Optional[int] = None, local_world_size: Optional[int] = None
                      ) -> ResumableLoader:
    """Evaluation loader over ``cfg.eval_streams``: no shuffle, no augmentation, no matching examples,
    batches carry ``references``. Each rank gets its share; streaming pads the last shares by repeating
    rows, so deduplicate by ``ids`` when gathering metrics."""
    set_distributed_env(rank, world_size, local_rank, local_world_size)
    dataset = TaskStreamingDataset(cfg.eval_streams, cfg, tokenizer, train=False, cache_subdir="eval")
    return _loader(dataset, cfg, cfg.eval_batch_size, drop_last=False, with_references=True)
