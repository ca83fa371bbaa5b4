"""BiomedGPT for stock ``transformers`` (``trust_remote_code=True``): the project's own model and beam search.

Written into an exported directory by ``biomedgpt export-hf format=transformers`` beside the project's
plain-PyTorch modules (``ofa``, ``attention``, ``kernels``, ``config``, ``generation``, imports made
relative), so the logits and the generated tokens are those of ``biomedgpt infer`` on the same weights.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import Seq2SeqLMOutput

from .attention import attention  # noqa: F401  (imported here so transformers copies it with this file)
from .configuration_biomedgpt import BiomedGPTConfig
from .generation import GenerationConfig as SearchConfig
from .generation import generate as beam_search
from .kernels import BACKENDS  # noqa: F401  (as above)
from .ofa import BiomedGPT

IGNORE_INDEX = -100  # transformers' label value for positions without a loss
# generate() keyword -> the project's search setting
SEARCH_SETTINGS = {"num_beams": "beam_size", "max_new_tokens": "max_len", "min_new_tokens": "min_len",
                   "length_penalty": "len_penalty", "no_repeat_ngram_size": "no_repeat_ngram_size",
                   "do_sample": "sampling", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p"}


class BiomedGPTForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """Image + prompt -> text. ``input_ids``: ``<s> prompt </s>`` (the exported tokenizer adds both);
    ``pixel_values``: images as the exported image processor gives them (resized, normalised)."""

    config_class = BiomedGPTConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    # one embedding matrix, registered under three names; model.safetensors stores it once
    _tied_weights_keys = ["model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"]

    def __init__(self, config: BiomedGPTConfig):
        super().__init__(config)
        self.model = BiomedGPT(config.model_config())
        self.post_init()

    def _init_weights(self, module):
        """Nothing: every weight comes from model.safetensors (``BiomedGPT.init_weights`` is the training init)."""

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids: torch.LongTensor, pixel_values: Optional[torch.Tensor] = None,
                decoder_input_ids: Optional[torch.LongTensor] = None, patch_masks: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None, return_dict: bool = True, **unused) -> Seq2SeqLMOutput:
        """Logits [B, T, V]; with ``labels`` (-100: no loss) and no ``decoder_input_ids``, the decoder reads
        ``<s>`` + the labels shifted right, and the loss is their mean cross-entropy."""
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("give decoder_input_ids or labels")
            shifted = labels.new_full(labels.shape, self.config.decoder_start_token_id)
            shifted[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, self.config.pad_token_id)
            decoder_input_ids = shifted
        logits = self.model(input_ids, decoder_input_ids, pixel_values, patch_masks)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        output = Seq2SeqLMOutput(loss=loss, logits=logits)
        return output if return_dict else output.to_tuple()

    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor, pixel_values: Optional[torch.Tensor] = None,
                 patch_masks: Optional[torch.Tensor] = None, generation_config=None, **settings) -> torch.LongTensor:
        """The best hypothesis per input as ``<s> tokens </s>`` (padded), found by the project's search
        (``generation.generate``, the one ``biomedgpt infer`` runs). Settings: ``generation_config.json``'s,
        overridden by keywords (num_beams, max_new_tokens, min_new_tokens, length_penalty,
        no_repeat_ngram_size, do_sample, temperature, top_k, top_p)."""
        unknown = sorted(set(settings) - set(SEARCH_SETTINGS))
        if unknown:
            raise ValueError(f"generate() does not take {unknown}; it takes {sorted(SEARCH_SETTINGS)}")
        base = generation_config if generation_config is not None else self.generation_config
        search = {}
        for hf_name, name in SEARCH_SETTINGS.items():
            value = settings.get(hf_name, getattr(base, hf_name, None))
            if value is not None and (hf_name not in ("top_k", "top_p", "temperature") or
                                      settings.get("do_sample", getattr(base, "do_sample", False))):
                search[name] = value
        hypotheses = beam_search(self.model, input_ids, pixel_values, patch_masks, SearchConfig(**search))
        cfg = self.config
        rows = [[cfg.decoder_start_token_id] + h[0].tokens + ([cfg.eos_token_id] if h[0].finished else [])
                for h in hypotheses]
        out = torch.full((len(rows), max(map(len, rows))), cfg.pad_token_id, dtype=torch.long,
                         device=input_ids.device)
        for i, row in enumerate(rows):
            out[i, :len(row)] = torch.tensor(row, device=input_ids.device)
        return out
