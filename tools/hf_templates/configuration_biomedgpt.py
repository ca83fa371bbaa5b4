"""BiomedGPT's configuration for stock ``transformers`` (written into an exported directory by
``biomedgpt export-hf format=transformers``; ``.config`` is the project's ModelConfig, bundled beside it)."""
import dataclasses

from transformers import PretrainedConfig

from .config import ModelConfig

MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


class BiomedGPTConfig(PretrainedConfig):
    """Every ModelConfig field as an attribute (the architecture), plus the special token ids."""

    model_type = "biomedgpt"

    def __init__(self, **kwargs):
        defaults = dataclasses.asdict(ModelConfig())
        for name in MODEL_FIELDS:
            setattr(self, name, kwargs.pop(name, defaults[name]))
        for key, value in (("bos_token_id", 0), ("pad_token_id", self.pad_id), ("eos_token_id", 2),
                           ("decoder_start_token_id", 0), ("is_encoder_decoder", True)):
            kwargs.setdefault(key, value)
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        """The project's ModelConfig (validated by its ``__post_init__``)."""
        return ModelConfig(**{name: getattr(self, name) for name in MODEL_FIELDS})
