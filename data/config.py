"""Settings of the training / evaluation data: one stream of MDS shards per task, mixed by proportion.

Plain dataclasses, built by ``biomedgpt.core.config.from_dict`` (unknown keys are errors).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Optional
from urllib.parse import urlparse

from biomedgpt.core.config import PathStr
from biomedgpt.core.user_errors import UserError

#: the file that makes a folder (or a bucket prefix) an MDS dataset
INDEX = "index.json"

#: What one stream's rows are turned into (see ``biomedgpt.data.tasks``).
StreamTask = Literal[
    "pretrain_vl",  # vision_language rows: caption+ITM, VQA+VQA matching, grounding+grounded captioning
    "caption", "itm", "vqa", "vqa_matching", "grounding", "grounded_caption",
    "text_infilling", "image_infilling", "detection",
    "nli", "summarization", "classification", "instruction",
]

#: How training images are made (``biomedgpt.data.images``; evaluation always resizes to size x size, bicubic):
#: resize: that resize only (the original's VQA and captioning fine-tuning); ofa_augment: random short side,
#: centre crop, RandAugment (OFA pretraining); medmnist: the original MedMNIST fine-tuning's timm-style
#: random resized crop, flip, RandAugment and random erasing.
TrainTransform = Literal["resize", "ofa_augment", "medmnist"]
#: Stream tasks with box targets (pretrain_vl: its grounding rows): only ``ofa_augment`` moves boxes with pixels.
BOXED_TASKS = frozenset({"pretrain_vl", "grounding", "grounded_caption", "detection"})
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@dataclass
class StreamConfig:
    """One task's shards. ``remote`` is ``s3://bucket/prefix`` (or gs://, ...) or a local/shared path."""

    name: str  # the stream's name (unique; names its cache folder and its per-task metrics)
    task: StreamTask  # how its rows become examples (biomedgpt.data.tasks)
    remote: PathStr  # a local or shared folder, or s3://bucket/prefix
    local: Optional[PathStr] = None  # cache dir for a remote; default: <DataConfig.cache_dir>/<name>
    proportion: Optional[float] = None  # share of the mixture; None: all streams by their size
    loss_group: int = 0  # index into DataConfig.group_weights (the pretraining ×2 sub-batch is group 1)
    # The dataset split these shards hold. Training evaluates (and selects the best model on) the eval streams
    # that are not "test"; `biomedgpt evaluate split=test` evaluates the test ones (engine/eval/config.py).
    split: Optional[Literal["train", "valid", "test"]] = None

    def __post_init__(self) -> None:
        if self.proportion is not None and self.proportion <= 0:
            raise ValueError(f"stream {self.name}: proportion must be positive, got {self.proportion}")
        if self.loss_group < 0:
            raise ValueError(f"stream {self.name}: loss_group must be >= 0, got {self.loss_group}")


@dataclass
class DataConfig:
    """Streams, batch shape, length limits, transforms and loader settings of one run."""

    streams: list[StreamConfig] = field(default_factory=list)  # training streams, mixed by proportion
    # evaluation streams (split: valid selects the best model)
    eval_streams: list[StreamConfig] = field(default_factory=list)
    cache_dir: PathStr = "/tmp/biomedgpt-mds-cache"  # local copies of remote shards
    batch_size: int = 16  # rows drawn per rank per step (a pretraining row can give two examples)
    eval_batch_size: int = 16  # rows per rank per evaluation batch
    patch_image_size: int = 256  # image side in pixels the model sees (the original's --patch-image-size)
    max_image_size: int = 512  # coordinate range quantised into location bins
    max_src_tokens: int = 80  # source length limit (--max-src-length)
    # target length limit (--max-tgt-length; words for captions and summaries, as the original)
    max_tgt_tokens: int = 30
    # random image patches the encoder keeps per sample of the pretraining image-text rows in training (OFA's
    # --sample-patch-num; 196 in pretraining); None: every patch. The training batches carry it (data.collate)
    sample_patch_num: Optional[int] = None
    # loss weight of each loss group (the pretraining mixture's x2 sub-batch is group 1)
    group_weights: list[float] = field(default_factory=lambda: [1.0, 2.0])
    train_transform: TrainTransform = "ofa_augment"  # training images: resize / ofa_augment / medmnist
    # the model's input is (pixel / 255 - mean) / std per RGB channel; saved with the model it trains
    # (ImageNet's 0.485 0.456 0.406 / 0.229 0.224 0.225: the original's --imagenet-default-mean-and-std)
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    # VQA decoder prompt (OFA --prompt-type): none; src: the whole source; prev_output: the source without </s>
    vqa_prompt_type: Literal["none", "src", "prev_output"] = "none"
    vqa_add_objects: bool = False  # OFA --add-object: append " object: {objects}" (even when empty) to VQA sources
    # NLI decoder prompt (OFA --prompt-type of the mnli task; MedNLI: src): the answer token is scored after it
    text_prompt_type: Literal["none", "src", "prev_output"] = "none"
    noise_ratio: float = 0.0  # OFA --noise-ratio: share of summarization decoder inputs replaced by random text ids
    # OFA's trie-constrained training: training batches carry constraint_masks (per target position, the tokens
    # the answer set allows after the answer so far) for vqa, nli and classification streams; the loss
    # normalises and smooths over those tokens only
    constrain_training: bool = False
    # the closed answer set of vqa / classification streams (OFA's --ans2label-file converted to JSON answer ->
    # index, a JSON list, or one answer per line; a pickle is refused with its conversion); None: every answer of
    # the training streams' rows. nli's set is fixed (yes / no / maybe)
    answer_set: Optional[PathStr] = None
    text_mask_ratio: float = 0.3
    poisson_lambda: float = 3.0
    num_workers: int = 2
    prefetch_factor: int = 2
    # random: rows drawn by proportion over the epoch; stratified: every rank's batch takes from each stream
    # its proportion of batch_size rows (the pretraining mixture's fixed composition, as the original's)
    batching: Literal["random", "stratified"] = "random"
    shuffle: bool = True
    shuffle_seed: int = 9176
    shuffle_algo: str = "py1e"
    shuffle_block_size: Optional[int] = None
    num_canonical_nodes: Optional[int] = None  # keep fixed across restarts with different rank counts
    epoch_size: Optional[int] = None  # samples per epoch over all streams; None: sum of stream sizes
    predownload: Optional[int] = None  # samples each worker fetches ahead (streaming's); None: its default
    cache_limit: Optional[str] = None  # e.g. "50gb": evict shards beyond this
    download_retry: int = 2  # attempts per shard / index download
    download_timeout: float = 60.0  # seconds per shard / index download attempt
    # A bad row (undecodable image or sample, image above max_image_pixels) is skipped with one warning line naming
    # it, in training and evaluation streams; past max_bad_fraction of the rows a loader process read, it stops.
    max_bad_fraction: float = 0.01  # bad rows tolerated, as a share of the rows read (judged from the 10th bad row)
    max_image_pixels: int = 36_000_000  # images above width x height (from the header, before decoding) are bad rows

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be positive, got {self.max_image_pixels}")
        for name in ("batch_size", "eval_batch_size", "patch_image_size", "max_src_tokens", "max_tgt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.sample_patch_num is not None and self.sample_patch_num < 1:
            raise ValueError(f"sample_patch_num must be positive (or null: every patch), got {self.sample_patch_num}")
        if self.download_retry < 1:
            raise ValueError(f"download_retry is the number of attempts, at least 1; got {self.download_retry}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean and image_std take one value per RGB channel, got {self.image_mean} "
                             f"and {self.image_std}")
        if min(self.image_std) <= 0:
            raise ValueError(f"image_std must be positive, got {self.image_std}")
        boxed = sorted({s.task for s in self.streams} & BOXED_TASKS)
        if self.train_transform == "medmnist" and boxed:
            raise ValueError(f"train_transform medmnist crops and flips without moving boxes; training streams of "
                             f"task {', '.join(boxed)} need ofa_augment or resize")
        if not 0.0 <= self.noise_ratio < 1.0:
            raise ValueError(f"noise_ratio must be in [0, 1), got {self.noise_ratio}")
        if not 0.0 <= self.text_mask_ratio < 1.0:
            raise ValueError(f"text_mask_ratio must be in [0, 1), got {self.text_mask_ratio}")
        for streams in (self.streams, self.eval_streams):
            names = [s.name for s in streams]
            if len(set(names)) != len(names):
                raise ValueError(f"stream names must be unique, got {names}")
            for s in streams:
                if s.loss_group >= len(self.group_weights):
                    raise ValueError(f"stream {s.name}: loss_group {s.loss_group} has no entry in "
                                     f"group_weights {self.group_weights}")
            given = [s.proportion is not None for s in streams]
            if any(given) and not all(given):
                raise ValueError(f"give a proportion for every stream or for none: {names}")
        if self.batching == "stratified" and not all(s.proportion is not None for s in self.streams):
            raise ValueError("batching: stratified takes each stream's share of a batch from its proportion: "
                             "give every training stream a proportion")


class DataSourceError(UserError, RuntimeError):
    """A stream that cannot be read: unreachable store, missing index, truncated shard."""


def is_remote(path: str) -> bool:
    return bool(urlparse(path).scheme) and urlparse(path).scheme != "file"


def check_local_streams(streams: Iterable[StreamConfig]) -> None:
    """Every local stream is a converted dataset (its index.json is there), or one line names the stream and
    the folder. Torch-free: the train command checks before it starts torch, DeepSpeed and streaming."""
    for stream in streams:
        if not is_remote(stream.remote) and not (Path(stream.remote) / INDEX).is_file():
            raise DataSourceError(f"stream {stream.name}: no index.json under {stream.remote} (not a converted "
                                  f"dataset, or its conversion did not finish)")
