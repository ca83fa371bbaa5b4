"""Sequence generation for BiomedGPT: batched beam search (or sampling) over the decoder's KV cache, a
forced decoder prefix, token constraints, and teacher-forced scoring of a fixed list of candidates.

Conventions (fairseq / OFA): hypothesis scores sum the log-probabilities of the generated tokens and
``</s>`` (the forced prefix is not scored), normalised by ``length ** len_penalty``; a sample stops once
``beam_size`` hypotheses have ended. A constraint masks disallowed tokens to -inf before the
log-softmax (fine-tuned models: the probability mass is renormalised over the allowed tokens) or,
in the zero-shot variant, after it (a pretrained model's scores stay those of the full vocabulary).

Synced decoding (``sync``, for a model partitioned across ranks whose parameters are gathered collectively
around every module call, so every rank must make the same sequence of encoder / decoder calls): a rank whose samples are done
keeps replaying its last decoder step on one row until every rank is done (transformers'
``synced_gpus``); candidate scoring runs one kind of decoder call (no KV cache) and pads to the most
calls any rank makes. The model must run the same sub-modules for every input (true for text and
image inputs; decoding image codes on some ranks only would not be).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from biomedgpt.models.config import ConstraintMode, GenerationConfig
from biomedgpt.models.ofa import BiomedGPT, DecoderCache, EncoderOutput

BOS, PAD, EOS = 0, 1, 2
NEG_INF = float("-inf")

@dataclass
class Hypothesis:
    tokens: list[int]  # generated tokens, without the forced prefix and without </s>
    score: float  # (normalised) sum of log-probabilities
    finished: bool = True  # False: cut by the position limit before </s>


class StepSync(Protocol):
    """Agreement between ranks that decode in lockstep (see the module docstring)."""

    def all_done(self, done: bool) -> bool:
        """Collective: True when every rank is done."""

    def max_count(self, n: int) -> int:
        """Collective: the largest ``n`` of all ranks."""

    def padded(self, calls: int) -> None:
        """Account ``calls`` decoder calls made only to keep ranks in step."""


class Constraint(Protocol):
    """Allowed next tokens given what each row has generated so far (prefix excluded)."""

    def allowed(self, generated: list[tuple[int, ...]], vocab_size: int, device: torch.device) -> Tensor:
        """[rows, vocab_size] bool."""


class Trie:
    """The token sequences of a closed answer set (each ending in ``</s>``): what may follow a prefix."""

    def __init__(self, sequences: Sequence[Sequence[int]]):
        if not sequences:
            raise ValueError("a constraint trie needs at least one allowed sequence")
        self._next: dict[tuple[int, ...], set[int]] = {}
        for seq in sequences:
            seq = list(seq) + [EOS]
            for i, token in enumerate(seq):
                self._next.setdefault(tuple(seq[:i]), set()).add(token)
        self._lists = {k: sorted(v) for k, v in self._next.items()}

    def next_tokens(self, prefix: Sequence[int]) -> list[int]:
        return self._lists.get(tuple(prefix), [])

    def allowed(self, generated: list[tuple[int, ...]], vocab_size: int, device: torch.device) -> Tensor:
        mask = torch.zeros(len(generated), vocab_size, dtype=torch.bool)
        for row, prefix in enumerate(generated):
            mask[row, self.next_tokens(prefix)] = True
        return mask.to(device)


class TokenRange:
    """Only ids in ``[start, stop)`` (plus ``</s>``): location bins for grounding, image codes for infilling."""

    def __init__(self, start: int, stop: int):
        if not 0 <= start < stop:
            raise ValueError(f"empty token range [{start}, {stop})")
        self.start, self.stop = start, stop

    def allowed(self, generated: list[tuple[int, ...]], vocab_size: int, device: torch.device) -> Tensor:
        mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        mask[self.start:self.stop] = True
        mask[EOS] = True
        return mask.expand(len(generated), -1)


def decoder_prefixes(prev_output_tokens: Tensor, target: Tensor) -> list[list[int]]:
    """The forced decoder prompt of each sample of a batch (``prompt_type=prev_output``): the tokens after
    ``<s>`` whose target is pad before the first scored token; empty lists for ordinary samples."""
    scored = target.ne(PAD)
    lead = torch.where(scored.any(1), scored.float().argmax(1), torch.zeros_like(scored[:, 0], dtype=torch.long))
    return [prev_output_tokens[i, 1:1 + int(n)].tolist() for i, n in enumerate(lead)]


# ----------------------------------------------------------------------------------------------
# Search
# ----------------------------------------------------------------------------------------------


def _reorder_self_attention(cache: DecoderCache, index: Tensor) -> None:
    """Beam reordering inside each sample: cross-attention keys are the same for every beam of a sample,
    so only the self-attention keys/values move (cheaper than ``cache.reorder``)."""
    cache.self_kv = [None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))
                     for kv in cache.self_kv]


def _no_repeat_ngram_bans(tokens: Tensor, start: Tensor, n: int) -> Tensor:
    """[rows, V]-indexable (row, token) pairs that would repeat an n-gram of the generated part."""
    rows, t = tokens.shape
    if t < n:
        return tokens.new_zeros((0, 2))
    grams = tokens.unfold(1, n, 1)  # [rows, t-n+1, n]
    last = tokens[:, t - n + 1:]  # [rows, n-1]
    match = (grams[:, :, :-1] == last[:, None, :]).all(-1)
    gram_start = torch.arange(grams.shape[1], device=tokens.device)
    match &= gram_start[None, :] >= start[:, None]  # only n-grams inside the generated part
    match &= (t - n + 1 >= start)[:, None]  # the current (n-1)-gram must be generated too
    row, gram = match.nonzero(as_tuple=True)
    return torch.stack([row, grams[row, gram, -1]], dim=1)


def _filter_for_sampling(lprobs: Tensor, top_k: int, top_p: float) -> Tensor:
    if top_k > 0:
        kth = lprobs.topk(min(top_k, lprobs.shape[-1]), dim=-1).values[:, -1:]
        lprobs = lprobs.masked_fill(lprobs < kth, NEG_INF)
    if top_p < 1.0:
        sorted_lp, order = lprobs.sort(dim=-1, descending=True)
        mass_before = sorted_lp.softmax(-1).cumsum(-1) - sorted_lp.softmax(-1)
        drop = (mass_before >= top_p).scatter(-1, order, mass_before >= top_p)
        lprobs = lprobs.masked_fill(drop, NEG_INF)
    return lprobs


@torch.no_grad()
def generate(model: BiomedGPT, src_tokens: Tensor, patch_images: Optional[Tensor] = None,
             patch_masks: Optional[Tensor] = None, cfg: GenerationConfig = GenerationConfig(),
             prefix: Optional[Sequence[Sequence[int]]] = None, constraint: Optional[Constraint] = None,
             code_masks: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
             sync: Optional[StepSync] = None) -> list[list[Hypothesis]]:
    """Hypotheses per input (best first, up to ``beam_size``).

    ``prefix[i]`` is forced after ``<s>`` for input i (prefixes may differ in length: the common part
    is fed in one decoder call, then each sample is forced until its own prefix ends).
    """
    model.eval()
    device = src_tokens.device
    batch, k, vocab = src_tokens.shape[0], cfg.beam_size, model.cfg.vocab_size
    prefixes = [[BOS] + list(p) for p in prefix] if prefix is not None else [[BOS]] * batch
    if len(prefixes) != batch:
        raise ValueError(f"{len(prefixes)} prefixes for a batch of {batch}")
    plen_sample = torch.tensor([len(p) for p in prefixes], device=device)
    limit = model.cfg.max_target_positions
    if int(plen_sample.max()) >= limit:
        raise ValueError(f"decoder prefix of {int(plen_sample.max())} tokens leaves no room under "
                         f"max_target_positions {limit}")
    forced = torch.full((batch, int(plen_sample.max())), PAD, dtype=torch.long, device=device)
    for i, p in enumerate(prefixes):
        forced[i, :len(p)] = torch.tensor(p, device=device)

    expand = torch.arange(batch, device=device).repeat_interleave(k)
    enc: EncoderOutput = model.encode(src_tokens, patch_images, patch_masks).reorder(expand)
    codes = code_masks.repeat_interleave(k) if code_masks is not None else None
    forced_rows, plen = forced[expand], plen_sample[expand]
    tokens = forced_rows[:, :int(plen_sample.min())]
    scores = torch.zeros(batch, k, device=device)
    if not cfg.sampling:
        scores[:, 1:] = NEG_INF  # all beams start identical: expand only the first
    cache = model.new_cache() if cfg.use_cache else None
    alive = list(range(batch))  # original index of each running sample
    finalized: list[list[Hypothesis]] = [[] for _ in range(batch)]

    while True:
        t = tokens.shape[1]
        rows = tokens.shape[0]
        logits = model.decode(tokens, enc, codes, cache)[:, -1].float() / cfg.temperature
        gen_len = t - plen
        free = gen_len >= 0
        allowed = torch.ones(rows, vocab, dtype=torch.bool, device=device)
        allowed[:, [PAD, BOS]] = False
        if constraint is not None:
            starts = plen.tolist()
            generated = [tuple(row[s:]) if s <= t else () for row, s in zip(tokens.tolist(), starts)]
            cmask = constraint.allowed(generated, vocab, device)
            if cfg.constraint_mode == "before":
                logits = logits.masked_fill(~cmask, NEG_INF)
            allowed &= cmask
        allowed[:, EOS] &= gen_len >= cfg.min_len
        at_limit = (gen_len >= cfg.max_len) | (t + 1 >= limit)
        allowed[at_limit] &= F.one_hot(torch.tensor(EOS, device=device), vocab).bool()
        if cfg.no_repeat_ngram_size > 0:
            bans = _no_repeat_ngram_bans(tokens, plen, cfg.no_repeat_ngram_size)
            allowed[bans[:, 0], bans[:, 1]] = False
        lprobs = F.log_softmax(logits, dim=-1).masked_fill(~allowed, NEG_INF)
        still_forced = ~free
        if still_forced.any():
            lprobs[still_forced] = NEG_INF
            lprobs[still_forced, forced_rows[still_forced, t]] = 0.0

        n = len(alive)
        if cfg.sampling:
            cand_scores, cand_beams, cand_tokens = _sample_candidates(lprobs, scores, cfg, generator)
        else:
            flat = (scores[:, :, None] + lprobs.view(n, k, vocab)).view(n, -1)
            cand_scores, index = flat.topk(min(2 * k, flat.shape[1]), dim=1)
            cand_beams, cand_tokens = index // vocab, index % vocab
        is_eos = cand_tokens.eq(EOS)
        ending = is_eos[:, :k] & torch.isfinite(cand_scores[:, :k])
        for i, j in ending.nonzero().tolist():
            sample = alive[i]
            if len(finalized[sample]) >= k:
                continue
            row = i * k + int(cand_beams[i, j])
            generated = tokens[row, int(plen[row]):].tolist()
            score = float(cand_scores[i, j])
            if cfg.normalize_scores:
                score /= (len(generated) + 1) ** cfg.len_penalty
            finalized[sample].append(Hypothesis(generated, score))

        # the next beams: the best candidates that do not end (ending ones rank last, then dead)
        rank = torch.arange(cand_scores.shape[1], device=device)[None] + is_eos.long() * cand_scores.shape[1]
        order = rank.topk(k, dim=1, largest=False).indices
        next_beams, next_tokens = cand_beams.gather(1, order), cand_tokens.gather(1, order)
        next_scores = cand_scores.gather(1, order).masked_fill(next_tokens.eq(EOS), NEG_INF)
        done = [len(finalized[s]) >= k or not torch.isfinite(next_scores[i]).any() for i, s in enumerate(alive)]
        if sync is not None:
            if sync.all_done(all(done)):
                break
            if all(done):
                _replay_until_all_done(model, tokens, enc, codes, cache, sync)
                break
        elif all(done):
            break
        keep = torch.tensor([i for i, d in enumerate(done) if not d], device=device)
        row_index = (keep[:, None] * k + next_beams[keep]).view(-1)
        tokens = torch.cat([tokens.index_select(0, row_index), next_tokens[keep].view(-1, 1)], dim=1)
        scores = next_scores[keep]
        if len(keep) < n:  # samples left the batch: everything per row follows
            alive = [alive[i] for i in keep.tolist()]
            enc = enc.reorder(row_index)
            forced_rows, plen = forced_rows.index_select(0, row_index), plen.index_select(0, row_index)
            codes = codes.index_select(0, row_index) if codes is not None else None
            if cache is not None:
                cache.reorder(row_index)
        elif cache is not None:
            _reorder_self_attention(cache, row_index)
    return [_best_first(h, k) for h in finalized]


def _replay_until_all_done(model: BiomedGPT, tokens: Tensor, enc: EncoderOutput, codes: Optional[Tensor],
                           cache: Optional[DecoderCache], sync: StepSync) -> None:
    """This rank is done, others are not: repeat the last decoder step (the same kind of call, cached
    keys cut back by one position) on one row until every rank is done."""
    one = torch.zeros(1, dtype=torch.long, device=tokens.device)
    tokens, enc = tokens.index_select(0, one), enc.reorder(one)
    codes = codes.index_select(0, one) if codes is not None else None
    if cache is not None:
        cache.reorder(one)
    calls = 0
    while True:
        if cache is not None:
            cache.self_kv = [None if kv is None else (kv[0][:, :, :-1], kv[1][:, :, :-1]) for kv in cache.self_kv]
            cache.length -= 1
        model.decode(tokens, enc, codes, cache)
        calls += 1
        if sync.all_done(True):
            break
    sync.padded(calls)


def _sample_candidates(lprobs: Tensor, scores: Tensor, cfg: GenerationConfig,
                       generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor, Tensor]:
    """One sampled token per beam, then k dead fillers (so ending beams leave the same 2k-candidate shape)."""
    n, k = scores.shape
    filtered = _filter_for_sampling(lprobs, cfg.top_k, cfg.top_p)
    dead = ~torch.isfinite(filtered).any(-1)
    probs = filtered.softmax(-1).nan_to_num(0.0)
    probs[dead, EOS] = 1.0
    token = torch.multinomial(probs, 1, generator=generator).view(n, k)
    step = lprobs.gather(1, token.view(-1, 1)).view(n, k)
    cand_scores = torch.cat([scores + step, torch.full_like(scores, NEG_INF)], dim=1)
    beams = torch.arange(k, device=scores.device).expand(n, k)
    cand_tokens = torch.cat([token, torch.full_like(token, PAD)], dim=1)
    return cand_scores, torch.cat([beams, beams], dim=1), cand_tokens


def _best_first(hyps: list[Hypothesis], k: int) -> list[Hypothesis]:
    return sorted(hyps, key=lambda h: -h.score)[:k]


# ----------------------------------------------------------------------------------------------
# Teacher-forced scoring of a closed candidate list
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def score_candidates(model: BiomedGPT, src_tokens: Tensor, candidates: Sequence[Sequence[int]],
                     patch_images: Optional[Tensor] = None, patch_masks: Optional[Tensor] = None,
                     prefix: Optional[Sequence[Sequence[int]]] = None, constraint: Optional[Trie] = None,
                     constraint_mode: ConstraintMode = "before", max_rows: int = 256,
                     sync: Optional[StepSync] = None, with_eos: bool = True) -> Tensor:
    """[batch, len(candidates)] sum of log p(candidate tokens + ``</s>``), teacher-forced; ``with_eos=False``
    leaves ``</s>`` out (targets trained without it: MedNLI's one answer token after the ``src`` prompt).

    With ``constraint`` (a trie of the candidates) and mode "before", each position's distribution is
    renormalised over the tokens the trie allows there (OFA's all-candidate VQA); mode "after" or no
    constraint scores against the full vocabulary. Samples sharing a prefix length share one prefix
    pass through the KV cache; candidates then run in chunks of at most ``max_rows`` decoder rows.
    With ``sync`` every chunk is one uncached decoder call over prefix + candidates (one kind of call on
    every rank), padded to the most calls of any rank.
    """
    model.eval()
    device = src_tokens.device
    batch, vocab = src_tokens.shape[0], model.cfg.vocab_size
    if not candidates:
        raise ValueError("no candidates to score")
    prefixes = [[BOS] + list(p) for p in prefix] if prefix is not None else [[BOS]] * batch
    enc = model.encode(src_tokens, patch_images, patch_masks)
    longest = max(len(c) for c in candidates)
    cand_in = torch.full((len(candidates), longest), PAD, dtype=torch.long, device=device)
    cand_tgt = torch.full((len(candidates), longest + 1), PAD, dtype=torch.long, device=device)
    for c, seq in enumerate(candidates):
        cand_in[c, :len(seq)] = torch.tensor(list(seq), dtype=torch.long, device=device)
        scored = list(seq) + [EOS] if with_eos else list(seq)
        cand_tgt[c, :len(scored)] = torch.tensor(scored, dtype=torch.long, device=device)
    masks = None
    if constraint is not None and constraint_mode == "before":
        masks = torch.ones(len(candidates), longest + 1, vocab, dtype=torch.bool)  # unscored positions: any token
        for c, seq in enumerate(candidates):
            for j in range(len(seq) + int(with_eos)):
                masks[c, j] = False
                masks[c, j, constraint.next_tokens(seq[:j])] = True
        masks = masks.to(device)

    out = torch.empty(batch, len(candidates), device=device)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prefixes):
        by_length.setdefault(len(p), []).append(i)
    groups = list(by_length.values())
    chunks = [max(1, max_rows // len(members)) for members in groups]
    calls = [-(-len(candidates) // c) for c in chunks]
    if sync is not None:  # every rank makes, per group, one prefix call then the same number of chunk calls
        n_groups = sync.max_count(len(groups))
        calls = [sync.max_count(calls[i] if i < len(groups) else 0) for i in range(n_groups)]
    one = torch.zeros(1, dtype=torch.long, device=device)
    for gi, n_calls in enumerate(calls):
        real = gi < len(groups)
        members = groups[gi] if real else [0]
        idx = torch.tensor(members, device=device)
        pre = torch.tensor([prefixes[i] for i in members], dtype=torch.long, device=device)
        group_enc = enc.reorder(idx)
        cache = model.new_cache()
        first = model.decode(pre, group_enc, cache=cache)[:, -1:].float()  # predicts each candidate's 1st token
        g = len(members)
        starts = list(range(0, len(candidates), chunks[gi])) if real else []
        for start in starts:
            cands = torch.arange(start, min(start + chunks[gi], len(candidates)), device=device)
            c_n = len(cands)
            rows = torch.arange(g, device=device).repeat_interleave(c_n)
            row_cands = cands.repeat(g)
            chunk_cache = copy.copy(cache)
            chunk_cache.reorder(rows)
            inputs = torch.cat([pre.index_select(0, rows), cand_in.index_select(0, row_cands)], dim=1)
            logits = model.decode(inputs, group_enc.reorder(rows), cache=chunk_cache).float()
            logits = torch.cat([first.index_select(0, rows), logits], dim=1)
            if masks is not None:
                logits = logits.masked_fill(~masks.index_select(0, row_cands), NEG_INF)
            target = cand_tgt.index_select(0, row_cands)
            lprobs = F.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            total = lprobs.masked_fill(target.eq(PAD), 0.0).sum(1)
            out[idx.repeat_interleave(c_n), row_cands] = total
        padding = n_calls - len(starts) + (0 if real else 1)
        for _ in range(n_calls - len(starts)):  # the same kind of call as a chunk: one row, cached prefix
            chunk_cache = copy.copy(cache)
            chunk_cache.reorder(one)
            model.decode(torch.cat([pre[:1], cand_in[:1]], dim=1), group_enc.reorder(one), cache=chunk_cache)
        if sync is not None and padding:
            sync.padded(padding)
    return out
