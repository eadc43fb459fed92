"""FastBlipDecoder against transformers' BlipForConditionalGeneration.generate: tokens, processed scores, sampling."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer, BlipConfig, BlipForConditionalGeneration
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from sieve_tasks.fast_blip import DecodeConfig, FastBlipDecoder
from sieve_tasks.settings import Settings
from sieve_tasks.test_models import TINY_BLIP, tiny_model_dir

PROMPT = "a picture of "
SIEVE = dict(max_length=20, min_length=5, repetition_penalty=1.1)  # + do_sample, top_p=0.9, 8 sequences


@pytest.fixture(scope="module")
def tiny():
    path = tiny_model_dir(TINY_BLIP)
    model = BlipForConditionalGeneration.from_pretrained(path).eval()
    prompt = AutoTokenizer.from_pretrained(path)(PROMPT, return_tensors="pt").input_ids
    return model, prompt


@pytest.fixture(scope="module")
def small():
    """Bigger than the tiny model, different text/vision widths and head counts, small vocabulary, and an [SEP]
    bias so that some captions end early (padding, early stop and min_length all get exercised)."""
    text = {
        "vocab_size": 4000, "hidden_size": 96, "encoder_hidden_size": 48, "intermediate_size": 192,
        "num_hidden_layers": 3, "num_attention_heads": 4, "max_position_embeddings": 40,
        "bos_token_id": 3999, "pad_token_id": 0, "sep_token_id": 102, "eos_token_id": 102,
    }
    vision = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 3,
              "image_size": 384, "patch_size": 32}
    torch.manual_seed(1)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()
    spread_weights(model)
    with torch.no_grad():
        model.text_decoder.cls.predictions.decoder.bias[102] += 2.5
    prompt = torch.tensor([[101, 1037, 3861, 1997, 102]])  # "[CLS] a picture of [SEP]"
    return model, prompt


MODELS = ["tiny", "small"]


def _hf_generate(model, prompt, pixels, **kwargs):
    with torch.inference_mode():
        return model.generate(pixel_values=pixels, input_ids=prompt.repeat(len(pixels), 1),
                              interpolate_pos_encoding=True, **kwargs)


def _hf_processors(cfg: DecodeConfig, eos: int) -> LogitsProcessorList:
    procs = [RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty),
             MinLengthLogitsProcessor(cfg.min_length, eos)]
    if cfg.do_sample:
        if cfg.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k:
            procs.append(TopKLogitsWarper(cfg.top_k))
        procs.append(TopPLogitsWarper(cfg.top_p))
    return LogitsProcessorList(procs)


def _assert_scores_equal(ours: torch.Tensor, ref: torch.Tensor, atol: float = 1e-4) -> None:
    assert ours.shape == ref.shape
    kept, kept_ref = torch.isfinite(ours), torch.isfinite(ref)
    assert torch.equal(kept, kept_ref), f"kept sets differ in {(kept != kept_ref).sum()} entries"
    assert torch.allclose(ours[kept], ref[kept], atol=atol, rtol=0), (ours[kept] - ref[kept]).abs().max()


@pytest.mark.parametrize("which", MODELS)
def test_greedy_tokens_equal_transformers(which, request):
    model, prompt = request.getfixturevalue(which)
    pixels = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ref = _hf_generate(model, prompt, pixels, do_sample=False, **SIEVE)
    ours = FastBlipDecoder(model).generate(pixels, prompt, DecodeConfig(num_return_sequences=1, do_sample=False))
    assert ours.dtype == ref.dtype and torch.equal(ours, ref)
    assert ours.shape[1] <= 20 and (ours[:, 0] == model.config.text_config.bos_token_id).all()


@pytest.mark.parametrize("which", MODELS)
def test_sampling_with_hf_rng_reproduces_transformers_tokens_and_scores(which, request):
    """Same seed, same random draws: identical captions, and every step's processed scores (repetition penalty,
    min length, transformers' implicit top_k=50, top_p=0.9) equal transformers' own ``output_scores``."""
    model, prompt = request.getfixturevalue(which)
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    ref = _hf_generate(model, prompt, pixels, do_sample=True, top_p=0.9, num_return_sequences=8, output_scores=True,
                       return_dict_in_generate=True, **SIEVE)
    ours, scores = FastBlipDecoder(model).generate(pixels, prompt, Settings(), seed=7, hf_rng=True,
                                                   output_scores=True)
    assert ours.shape[0] == 16
    assert torch.equal(ours, ref.sequences)
    assert len(scores) == len(ref.scores)
    for step, (a, b) in enumerate(zip(scores, ref.scores)):
        _assert_scores_equal(a, b)
        if step == 0:  # min_length 5 counts the 4 prompt tokens: [SEP] is suppressed for the first token only
            assert (a[:, 102] == -math.inf).all()
        assert (torch.isfinite(a).sum(-1) <= 50).all()  # transformers' default top_k=50 is in force


@pytest.mark.parametrize("which", MODELS)
def test_default_sampling_scores_match_transformers_processors_along_own_tokens(which, request):
    """The default (candidate) sampler: teacher-force transformers' model on our sampled tokens and run transformers'
    LogitsProcessorList on its logits; every step must equal our processed scores."""
    model, prompt = request.getfixturevalue(which)
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    cfg = DecodeConfig.from_settings(Settings())
    fast = FastBlipDecoder(model)
    tokens, scores = fast.generate(pixels, prompt, cfg, seed=3, output_scores=True)
    plen = prompt.shape[1] - 1
    assert tokens.shape == (16, plen + len(scores))
    eos, pad = model.config.text_config.sep_token_id, model.config.text_config.pad_token_id
    procs = _hf_processors(cfg, eos)
    with torch.inference_mode():
        embeds = model.vision_model(pixel_values=pixels, interpolate_pos_encoding=True)[0]
        logits = model.text_decoder(input_ids=tokens, encoder_hidden_states=embeds.repeat_interleave(8, 0)).logits
    for step, ours in enumerate(scores):
        cur = plen + step
        ref = procs(tokens[:, :cur], logits[:, cur - 1].float().clone())
        live = (tokens[:, :cur] != eos).all(1)  # rows finished earlier are padded, their scores are irrelevant
        _assert_scores_equal(ours[live], ref[live])
        # every sampled token was allowed; after [SEP] only padding follows
        assert torch.isfinite(ours[live].gather(1, tokens[live, cur : cur + 1])).all()
    ended = (tokens == eos).cumsum(1) > 0
    after = torch.zeros_like(ended)
    after[:, 1:] = ended[:, :-1]
    assert (tokens[after] == pad).all()
    if which == "small":
        assert ended.any(), "the [SEP] bias should end some captions early"


def test_processing_matches_transformers_on_random_logits_with_ties_and_edge_lengths():
    g = torch.Generator().manual_seed(0)
    vocab, eos = 300, 7
    checked = 0
    for case in range(40):
        logits = torch.randn(6, vocab, generator=g) * (0.5 + case % 4)
        if case % 5 == 0:  # ties straddling the top-k boundary
            logits[:, :80] = logits[:, :1].clone()
        if case % 7 == 0:
            logits = logits.round()
        ids = torch.randint(0, vocab, (6, 3 + case % 5), generator=g)
        if case % 3 == 0:
            ids[:, 0] = vocab + 1  # an id beyond the output vocabulary (BLIP's [DEC] can be)
        cfg = DecodeConfig(min_length=5 + case % 3, repetition_penalty=(1.1, 0.8, 1.0)[case % 3],
                           top_p=(0.9, 0.5, 1.0, 0.99)[case % 4], top_k=(50, 0, 10, 1000)[case % 4],
                           temperature=(1.0, 0.7)[case % 2], do_sample=case % 6 != 5)
        ref = _hf_processors(cfg, eos)(ids, logits.clone()) if cfg.top_k or cfg.top_p < 1 else None
        if ref is None:  # no warper in transformers' list when top_k=0 and top_p=1
            ref = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty) if
                                       cfg.repetition_penalty != 1.0 else TemperatureLogitsWarper(1.0),
                                       MinLengthLogitsProcessor(cfg.min_length, eos),
                                       TemperatureLogitsWarper(cfg.temperature)])(ids, logits.clone())
        ours = FastBlipDecoder.process_scores(ids, logits.clone(), cfg, eos)
        _assert_scores_equal(ours, ref, atol=1e-6)
        got = FastBlipDecoder.process_scores(ids, logits.clone(), cfg, eos, candidates=True)
        if isinstance(got, tuple):  # the sampler's candidates: the same kept tokens and values
            vals, idx = got
            _assert_scores_equal(torch.full_like(ours, -math.inf).scatter_(1, idx, vals), ref, atol=1e-6)
            checked += 1
    assert checked >= 5


def test_candidate_sampling_follows_the_processed_distribution():
    scores = torch.full((1, 100), -math.inf)
    scores[0, [3, 17, 42]] = torch.tensor([0.0, 1.0, 2.0])
    vals, idx = scores.topk(5)
    rows = 20000
    picks = FastBlipDecoder.sample((vals.expand(rows, -1), idx.expand(rows, -1)), torch.Generator().manual_seed(0))
    freq = torch.bincount(picks, minlength=100).float() / rows
    expected = scores.softmax(-1)[0]
    assert set(picks.unique().tolist()) == {3, 17, 42}
    assert torch.allclose(freq, expected, atol=0.015)


def test_seeds_reproduce_and_differ(small):
    model, prompt = small
    fast = FastBlipDecoder(model)
    pixels = torch.randn(2, 3, 224, 224)
    a = fast.generate(pixels, prompt, Settings(), seed=5)
    assert torch.equal(a, fast.generate(pixels, prompt, Settings(), seed=5))
    assert not torch.equal(a, fast.generate(pixels, prompt, Settings(), seed=6))
    assert a.shape[0] == 16 and (a[:, :4] == torch.tensor([3999, 1037, 3861, 1997])).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_greedy_mostly_agrees_with_transformers(tiny):
    model, prompt = tiny
    model = BlipForConditionalGeneration.from_pretrained(tiny_model_dir(TINY_BLIP), dtype=torch.bfloat16).cuda().eval()
    pixels = torch.randn(4, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    ref = _hf_generate(model, prompt.cuda(), pixels, do_sample=False, **SIEVE)
    ours = FastBlipDecoder(model).generate(pixels, prompt, DecodeConfig(num_return_sequences=1, do_sample=False))
    assert ours.shape == ref.shape and ours.device.type == "cuda"
    assert (ours == ref).float().mean() > 0.8  # bf16 rounding differs between the two attention paths
    sampled = FastBlipDecoder(model).generate(pixels, prompt, Settings(), seed=0)
    assert sampled.shape[0] == 32


def test_int8_decoder_samples_from_a_close_distribution(small):
    """--int8 is not exact: along the fp32 model's own captions, the int8 model's sampling distribution stays
    close (total variation), and the fp32 model compared with itself gives exactly 0."""
    import copy

    from sieve_tasks.fast_blip import next_token_distributions
    from sieve_tasks.int8 import quantize_linears

    model, prompt = small
    int8 = copy.deepcopy(model)
    quantize_linears(int8)
    cfg = DecodeConfig()
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    fast = FastBlipDecoder(model)
    tokens = fast.generate(pixels, prompt, cfg, seed=0)
    plen = fast.prepare_prompt(prompt, 2).shape[1]
    reference, live = next_token_distributions(model, pixels, tokens, plen, cfg)
    quantised, _ = next_token_distributions(int8, pixels, tokens, plen, cfg)
    variation = 0.5 * (reference - quantised).abs().sum(-1)[live]
    assert live.sum() > 20
    assert 0 < variation.mean() < 0.06 and variation.max() < 0.2
    again = FastBlipDecoder(int8).generate(pixels, prompt, cfg, seed=0)
    assert again.shape[0] == tokens.shape[0]
    self_variation = 0.5 * (reference - next_token_distributions(model, pixels, tokens, plen, cfg)[0]).abs().sum(-1)
    assert float(self_variation.max()) < 1e-5


def spread_weights(model: torch.nn.Module) -> None:
    """BLIP's init (vision std 1e-10, text 0.02) leaves image features nearly constant and attention nearly
    uniform, which would hide attention bugs: fan-in scaled weights make every path matter."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, param[0].numel() ** -0.5)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
