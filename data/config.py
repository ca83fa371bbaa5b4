"""Settings of the training / evaluation data: one stream of MDS shards per task, mixed by proportion.

Plain dataclasses, built by ``biomedgpt.engine.config.from_dict`` (unknown keys are errors).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from biomedgpt.engine.config import PathStr

#: What one stream's rows are turned into (see ``biomedgpt.data.tasks``).
StreamTask = Literal[
    "pretrain_vl",  # vision_language rows: caption+ITM, VQA+VQA matching, grounding+grounded captioning
    "caption", "itm", "vqa", "vqa_matching", "grounding", "grounded_caption",
    "text_infilling", "image_infilling", "detection",
    "nli", "summarization", "classification", "instruction",
]


@dataclass
class StreamConfig:
    """One task's shards. ``remote`` is ``s3://bucket/prefix`` (or gs://, ...) or a local/shared path."""

    name: str
    task: StreamTask
    remote: PathStr  # a local or shared folder, or s3://bucket/prefix
    local: Optional[PathStr] = None  # cache dir for a remote; default: <DataConfig.cache_dir>/<name>
    proportion: Optional[float] = None  # share of the mixture; None: all streams by their size
    loss_group: int = 0  # index into DataConfig.group_weights (the pretraining ×2 sub-batch is group 1)
    # The dataset split these shards hold. Training evaluates (and selects the best model on) the eval streams
    # that are not "test"; `biomedgpt evaluate split=test` evaluates the test ones (engine/eval_config.py).
    split: Optional[Literal["train", "valid", "test"]] = None

    def __post_init__(self) -> None:
        if self.proportion is not None and self.proportion <= 0:
            raise ValueError(f"stream {self.name}: proportion must be positive, got {self.proportion}")
        if self.loss_group < 0:
            raise ValueError(f"stream {self.name}: loss_group must be >= 0, got {self.loss_group}")


@dataclass
class DataConfig:
    """Streams, batch shape, length limits, transforms and loader settings of one run."""

    streams: list[StreamConfig] = field(default_factory=list)
    eval_streams: list[StreamConfig] = field(default_factory=list)
    cache_dir: PathStr = "/tmp/biomedgpt-mds-cache"
    batch_size: int = 16  # rows drawn per rank per step (a pretraining row can give two examples)
    eval_batch_size: int = 16
    patch_image_size: int = 256
    max_image_size: int = 512  # coordinate range quantised into location bins
    max_src_tokens: int = 80
    max_tgt_tokens: int = 30
    group_weights: list[float] = field(default_factory=lambda: [1.0, 2.0])
    augment: bool = True  # random resize + centre crop + RandAugment on training images
    vqa_prompt_type: Literal["none", "src", "prev_output"] = "none"  # prev_output: question prefix fed to the decoder
    vqa_add_objects: bool = False  # append " object: {objects}" to VQA sources
    # Declared for recipes; implemented by other issue-23 changes (task formatting, training features, transforms):
    text_prompt_type: Literal["none", "src", "prev_output"] = "none"  # --prompt-type of text tasks (MedNLI: src)
    noise_ratio: float = 0.0  # --noise-ratio: share of decoder-input tokens replaced by random text tokens
    constrain_training: bool = False  # answer-set constraint masks in the training loss (VQA, NLI, MedMNIST)
    answer_set: Optional[PathStr] = None  # --ans2label-file (None: answers from the training data)
    train_transform: Literal["resize", "ofa_augment", "medmnist"] = "ofa_augment"  # training image transform
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # --imagenet-default-mean-and-std
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    text_mask_ratio: float = 0.3
    poisson_lambda: float = 3.0
    num_workers: int = 2
    prefetch_factor: int = 2
    shuffle: bool = True
    shuffle_seed: int = 9176
    shuffle_algo: str = "py1e"
    shuffle_block_size: Optional[int] = None
    num_canonical_nodes: Optional[int] = None  # keep fixed across restarts with different rank counts
    epoch_size: Optional[int] = None  # samples per epoch over all streams; None: sum of stream sizes
    predownload: Optional[int] = None
    cache_limit: Optional[str] = None  # e.g. "50gb": evict shards beyond this
    download_retry: int = 2  # attempts per shard / index download
    download_timeout: float = 60.0

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_batch_size", "patch_image_size", "max_src_tokens", "max_tgt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.download_retry < 1:
            raise ValueError(f"download_retry is the number of attempts, at least 1; got {self.download_retry}")
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
