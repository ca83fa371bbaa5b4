"""Beam search, sampling, constraints and candidate scoring against brute-force references on a tiny model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from biomedgpt.models.config import model_config
from biomedgpt.models.generation import (BOS, EOS, PAD, GenerationConfig, TokenRange, Trie, decoder_prefixes, generate,
                               score_candidates)
from biomedgpt.models.ofa import BiomedGPT

VOCAB = 512
PREFIXES = [[5, 6, 7], [8], [9, 10]]
ANSWERS = [[10, 11], [10, 12, 13], [20], [21, 22], [300]]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> BiomedGPT:
    torch.manual_seed(0)
    cfg = model_config("tiny", d_model=64, ffn_dim=128, encoder_layers=1, decoder_layers=1, heads=2,
                       resnet_layers=[1, 1, 1], vocab_size=VOCAB, dropout=0.0)
    return BiomedGPT(cfg).init_weights().eval()


@pytest.fixture(scope="module")
def inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, VOCAB, (3, 7), generator=g)
    src[:, 0], src[:, -1] = BOS, EOS
    src[2, -2:] = torch.tensor([EOS, PAD])  # a right-padded source
    return dict(src_tokens=src, patch_images=torch.randn(3, 3, 32, 32, generator=g),
                patch_masks=torch.tensor([True, True, False]))


def _log_probs(model, inputs, i: int, tokens: list[int]) -> torch.Tensor:
    """Full (uncached) next-token log-probabilities of sample i after decoder input ``tokens``."""
    logits = model(inputs["src_tokens"][i:i + 1], torch.tensor([tokens]), inputs["patch_images"][i:i + 1],
                   inputs["patch_masks"][i:i + 1])
    return F.log_softmax(logits[0, -1].float(), -1)


@torch.no_grad()
def _greedy(model, inputs, i: int, max_len: int, prefix=()) -> list[int]:
    tokens, out = [BOS, *prefix], []
    while len(out) < max_len:
        lprobs = _log_probs(model, inputs, i, tokens)
        lprobs[[PAD, BOS]] = float("-inf")
        token = int(lprobs.argmax())
        if token == EOS:
            break
        out.append(token)
        tokens.append(token)
    return out


@pytest.mark.parametrize("prefix", [None, PREFIXES])
def test_beam_one_is_greedy(model, inputs, prefix):
    hyps = generate(model, **inputs, cfg=GenerationConfig(beam_size=1, max_len=8), prefix=prefix)
    for i, options in enumerate(hyps):
        assert options[0].tokens == _greedy(model, inputs, i, 8, prefix[i] if prefix else ())


@pytest.mark.parametrize("settings", [dict(beam_size=4), dict(beam_size=3, no_repeat_ngram_size=2),
                                      dict(beam_size=4, len_penalty=0.5, min_len=3),
                                      dict(beam_size=2, sampling=True, top_k=20)])
def test_cached_equals_uncached(model, inputs, settings):
    outputs = []
    for use_cache in (True, False):
        cfg = GenerationConfig(max_len=8, use_cache=use_cache, **settings)
        hyps = generate(model, **inputs, cfg=cfg, prefix=PREFIXES, generator=torch.Generator().manual_seed(3))
        outputs.append([[(h.tokens, round(h.score, 4)) for h in options] for options in hyps])
    assert outputs[0] == outputs[1]
    assert all(len(options) == settings["beam_size"] for options in outputs[0])


def test_lengths_and_no_repeat_ngram(model, inputs):
    hyps = generate(model, **inputs, cfg=GenerationConfig(beam_size=3, min_len=5, max_len=9, no_repeat_ngram_size=2))
    for options in hyps:
        for h in options:
            assert 5 <= len(h.tokens) <= 9
            grams = list(zip(h.tokens, h.tokens[1:]))
            assert len(grams) == len(set(grams))
    # an untrained model repeats itself without the blocking: the test above is not vacuous
    plain = generate(model, **inputs, cfg=GenerationConfig(beam_size=1, max_len=9))
    assert any(len(set(zip(o[0].tokens, o[0].tokens[1:]))) < len(o[0].tokens) - 1 for o in plain)


@pytest.mark.parametrize("mode", ["before", "after"])
def test_trie_decoding_only_yields_listed_answers(model, inputs, mode):
    trie = Trie(ANSWERS)
    hyps = generate(model, **inputs, cfg=GenerationConfig(beam_size=5, max_len=3, constraint_mode=mode),
                    prefix=PREFIXES, constraint=trie)
    for options in hyps:
        assert options and all(h.tokens in ANSWERS for h in options)
        assert len({tuple(h.tokens) for h in options}) == len(options)  # distinct answers
    assert all(len(o) == len(ANSWERS) for o in hyps)  # beam 5 over 5 answers finds each once


def test_token_range_gives_exactly_four_bins(model, inputs):
    first_bin = 400
    hyps = generate(model, **inputs, cfg=GenerationConfig(beam_size=2, min_len=4, max_len=4),
                    constraint=TokenRange(first_bin, VOCAB))
    for options in hyps:
        assert all(len(h.tokens) == 4 and min(h.tokens) >= first_bin for h in options)


def test_top_k_one_sampling_is_greedy(model, inputs):
    hyps = generate(model, **inputs, cfg=GenerationConfig(beam_size=1, max_len=6, sampling=True, top_k=1))
    assert [o[0].tokens for o in hyps] == [_greedy(model, inputs, i, 6) for i in range(3)]


@pytest.mark.parametrize("mode, with_eos", [("before", True), ("after", True), ("before", False)])
def test_candidate_scores_match_brute_force(model, inputs, mode, with_eos):
    """``with_eos=False``: answers trained without ``</s>`` (MedNLI's one token after the src prompt) are scored
    on their own tokens, as the original's argmax over the answers at the last position."""
    trie = Trie(ANSWERS)
    scores = score_candidates(model, inputs["src_tokens"], ANSWERS, inputs["patch_images"], inputs["patch_masks"],
                              prefix=PREFIXES, constraint=trie, constraint_mode=mode, max_rows=4,
                              with_eos=with_eos)
    brute = torch.zeros(3, len(ANSWERS))
    with torch.no_grad():
        for i in range(3):
            for c, answer in enumerate(ANSWERS):
                logits = model(inputs["src_tokens"][i:i + 1], torch.tensor([[BOS, *PREFIXES[i], *answer]]),
                               inputs["patch_images"][i:i + 1], inputs["patch_masks"][i:i + 1])[0]
                for j, token in enumerate(answer + [EOS] if with_eos else answer):
                    step = logits[len(PREFIXES[i]) + j].float()
                    if mode == "before":
                        allowed = torch.zeros(VOCAB, dtype=torch.bool)
                        allowed[trie.next_tokens(answer[:j])] = True
                        step = step.masked_fill(~allowed, float("-inf"))
                    brute[i, c] += F.log_softmax(step, -1)[token]
    torch.testing.assert_close(scores, brute, atol=1e-4, rtol=1e-4)
    assert scores.argmax(1).tolist() == brute.argmax(1).tolist()


def test_decoder_prefixes_from_prompted_batch():
    prev = torch.tensor([[BOS, 5, 6, 7, 30, 31], [BOS, 40, 41, PAD, PAD, PAD], [BOS, 8, 50, PAD, PAD, PAD]])
    target = torch.tensor([[PAD, PAD, PAD, 30, 31, EOS], [40, 41, EOS, PAD, PAD, PAD], [PAD, 50, EOS, PAD, PAD, PAD]])
    assert decoder_prefixes(prev, target) == [[5, 6, 7], [], [8]]


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="min_len"):
        GenerationConfig(min_len=5, max_len=2)
    with pytest.raises(ValueError, match="at least one"):
        Trie([])


class _OthersRunLonger:
    """Rank agreement as seen by a rank whose peers need ``extra`` more decoder steps / calls than it does
    (the 2-rank ZeRO-3 run is tests/test_zero3_eval.py); records this rank's decoder calls."""

    def __init__(self, model, extra: int):
        self.extra, self.padding, self.calls = extra, 0, 0
        self.remaining = None
        original = model.decode

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        model.decode = counted

    def all_done(self, done: bool) -> bool:
        if not done:
            return False
        self.remaining = self.extra if self.remaining is None else self.remaining - 1
        return self.remaining == 0

    def max_count(self, n: int) -> int:
        return n + self.extra

    def padded(self, calls: int) -> None:
        self.padding += calls


@pytest.mark.parametrize("use_cache", [True, False])
def test_synced_generation_keeps_stepping_without_changing_results(model, inputs, use_cache):
    """A rank that is done replays its last decoder step until the others are: same hypotheses, one extra
    decoder call per extra step of the others, of the same kind (cached or not) as the real steps."""
    cfg = GenerationConfig(beam_size=3, max_len=6, use_cache=use_cache)
    trie = Trie(ANSWERS)
    alone = generate(model, **inputs, cfg=cfg, prefix=PREFIXES, constraint=trie)
    sync = _OthersRunLonger(model, extra=4)
    try:
        synced = generate(model, **inputs, cfg=cfg, prefix=PREFIXES, constraint=trie, sync=sync)
    finally:
        del model.decode
    assert [[(h.tokens, h.score) for h in hs] for hs in synced] == [[(h.tokens, h.score) for h in hs] for hs in alone]
    assert sync.padding == 4


def test_synced_candidate_scoring_pads_to_the_most_calls(model, inputs):
    alone = score_candidates(model, inputs["src_tokens"], ANSWERS, inputs["patch_images"], inputs["patch_masks"],
                             prefix=PREFIXES, constraint=Trie(ANSWERS), max_rows=4)
    sync = _OthersRunLonger(model, extra=2)
    try:
        synced = score_candidates(model, inputs["src_tokens"], ANSWERS, inputs["patch_images"], inputs["patch_masks"],
                                  prefix=PREFIXES, constraint=Trie(ANSWERS), max_rows=4, sync=sync)
    finally:
        del model.decode
    assert torch.equal(synced, alone)
    # 3 prefix lengths -> 3 groups of 1 sample (5 candidates, chunks of 4: 2 calls) + 2 padding groups; every
    # group's chunk count is padded by 2
    groups, chunk_calls = 3 + 2, [2 + 2] * 3 + [0 + 2] * 2
    assert sync.calls == groups + sum(chunk_calls)
    assert sync.padding == sum(chunk_calls) - 2 * 3 + 2
