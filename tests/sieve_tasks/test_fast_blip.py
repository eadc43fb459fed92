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

from sieve_tasks.fast_blip import ATTENTION_CHOICES, DecodeConfig, FastBlipDecoder, auto_caption_batch_size
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


@pytest.mark.parametrize("sdpa_text", [False, True])
@pytest.mark.parametrize("which", MODELS)
def test_sampling_with_hf_rng_reproduces_transformers_tokens_and_scores(which, sdpa_text, request):
    """Same seed, same random draws: identical captions, and every step's processed scores (repetition penalty,
    min length, transformers' implicit top_k=50, top_p=0.9) equal transformers' own ``output_scores`` — with the
    decoder's attention as plain matmuls (CPU's default) and through SDPA (CUDA's)."""
    model, prompt = request.getfixturevalue(which)
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    ref = _hf_generate(model, prompt, pixels, do_sample=True, top_p=0.9, num_return_sequences=8, output_scores=True,
                       return_dict_in_generate=True, **SIEVE)
    ours, scores = FastBlipDecoder(model, sdpa_text=sdpa_text).generate(pixels, prompt, Settings(), seed=7,
                                                                        hf_rng=True, output_scores=True)
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


def test_each_captured_shape_keeps_the_attention_choice_that_replays_fastest(tiny, monkeypatch):
    """Capture and timing need CUDA; here they are stood in for, to check what is kept: the fastest choice's graph
    and logits, every choice timed once; one choice, or plain-matmul attention, is captured without timing."""
    from torch.nn.attention import SDPBackend

    from sieve_tasks import fast_blip

    captured, timed, replay = [], [], {}

    def capture(step, dec, backends):
        captured.append(backends)
        return f"graph {len(captured)}", torch.full((1,), float(len(captured)))

    def replay_ms(step, graph, device):
        timed.append(graph)
        return replay[graph]

    monkeypatch.setattr(fast_blip._StaticStep, "_capture", capture)
    monkeypatch.setattr(fast_blip._StaticStep, "_replay_ms", replay_ms)
    for names in (tuple(fast_blip.ATTENTION_CHOICES), tuple(reversed(fast_blip.ATTENTION_CHOICES))):
        for first_ms, second_ms, kept in ((2.5, 1.5, 1), (1.0, 1.5, 0), (1.5, 1.5, 0)):
            captured.clear(), timed.clear()
            replay.update({"graph 1": first_ms, "graph 2": second_ms})
            dec = FastBlipDecoder(tiny[0], sdpa_text=True, attention=names)
            step = fast_blip._StaticStep(dec, rows=8, images=1, tmax=6, image_tokens=5, capture=True)
            assert captured == [fast_blip.ATTENTION_CHOICES[name] for name in names]
            assert timed == ["graph 1", "graph 2"] and step.replay_ms == {names[0]: first_ms, names[1]: second_ms}
            assert step.graph == f"graph {kept + 1}" and float(step.logits[0]) == kept + 1
            assert step.attention == names[kept]
    for flags in (dict(sdpa_text=True, attention=("sdpa without cudnn",)), dict(sdpa_text=False)):
        captured.clear(), timed.clear()
        step = fast_blip._StaticStep(FastBlipDecoder(tiny[0], **flags), 8, 1, 6, 5, capture=True)
        assert len(captured) == 1 and timed == [] and step.graph == "graph 1" and step.replay_ms == {}
    with pytest.raises(ValueError, match="attention must name"):
        FastBlipDecoder(tiny[0], attention=("flash",))

    def capture_without_cudnn_only(step, dec, backends):  # a choice that cannot capture is skipped
        if SDPBackend.CUDNN_ATTENTION in backends:
            raise RuntimeError("capture failed")
        return capture(step, dec, backends)

    monkeypatch.setattr(fast_blip._StaticStep, "_capture", capture_without_cudnn_only)
    captured.clear(), timed.clear()
    step = fast_blip._StaticStep(FastBlipDecoder(tiny[0], sdpa_text=True), 8, 1, 6, 5, capture=True)
    assert step.attention == "sdpa without cudnn" and step.graph == "graph 1" and step.replay_ms.keys() == {
        "sdpa without cudnn"}
    with pytest.raises(RuntimeError, match="capture failed"):  # none captures: generate decodes eagerly
        fast_blip._StaticStep(FastBlipDecoder(tiny[0], sdpa_text=True, attention=("sdpa",)), 8, 1, 6, 5, capture=True)

    def out_of_memory_second(step, dec, backends):  # the second graph does not fit beside the first: keep the first
        if captured:
            raise torch.cuda.OutOfMemoryError("no room")
        return capture(step, dec, backends)

    monkeypatch.setattr(fast_blip._StaticStep, "_capture", out_of_memory_second)
    captured.clear(), timed.clear()
    step = fast_blip._StaticStep(FastBlipDecoder(tiny[0], sdpa_text=True), 8, 1, 6, 5, capture=True)
    assert step.graph == "graph 1" and step.attention == "sdpa" and len(captured) == 1
    captured.append("full")
    with pytest.raises(torch.cuda.OutOfMemoryError):  # no graph at all: the caller halves the batch
        fast_blip._StaticStep(FastBlipDecoder(tiny[0], sdpa_text=True), 8, 1, 6, 5, capture=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_equals_eager(small):
    """Capture and replay, the part the CPU tests cannot run: same kernels, so fp32 tokens and scores are equal."""
    import copy

    model = copy.deepcopy(small[0]).cuda()
    pixels = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    eager, eager_scores = FastBlipDecoder(model, cuda_graphs=False).generate(
        pixels, small[1], Settings(), seed=3, hf_rng=True, output_scores=True)
    fast = FastBlipDecoder(model)
    for _ in range(2):  # capture, then replay of the cached graph
        ours, scores = fast.generate(pixels, small[1], Settings(), seed=3, hf_rng=True, output_scores=True)
        assert fast.cuda_graphs and all(step.graph is not None for step in fast._graphs.values())
        assert all(step.replay_ms.keys() == ATTENTION_CHOICES.keys() for step in fast._graphs.values())
        assert torch.equal(ours, eager)  # fp32: cuDNN and flash attention do not apply, same kernels either way
        for a, b in zip(scores, eager_scores):
            _assert_scores_equal(a, b, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_are_captured_while_the_image_pass_decodes_on_cuda(small, sample_pool, tmp_path):
    """In a CUDA run the producer thread decodes with nvJPEG on its own stream while the decoder captures each new
    shape: neither may cost the other its GPU path (no eager fallback, no JPEG refused)."""
    import copy
    import threading

    from sieve_tasks.image_pass import ImagePass, Need
    from sieve_tasks.pool import register_pool

    shard = register_pool(sample_pool, str(tmp_path / "run"))[-1]
    images = ImagePass((224,), 10**8, 4, 2, device="cuda")
    stop, failures = threading.Event(), []

    def decode_until_stopped() -> None:
        try:
            while not stop.is_set():
                for batch in images.batches(shard, lambda item: Need.PIXELS):
                    batch.pixels_on(torch.device("cuda"))
        except Exception as exc:
            failures.append(exc)

    producer = threading.Thread(target=decode_until_stopped)
    producer.start()
    try:
        fast = FastBlipDecoder(copy.deepcopy(small[0]).cuda())
        for images_in_batch in range(1, 9):  # a new shape, so a new capture, each time
            for max_length in (12, 20):
                fast.generate(torch.randn(images_in_batch, 3, 224, 224), small[1], Settings(), seed=1,
                              max_length=max_length)
                assert fast.cuda_graphs and all(step.graph is not None for step in fast._graphs.values())
    finally:
        stop.set()
        producer.join()
    assert not failures and images.gpu_refused == 0


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


@pytest.mark.parametrize("flags", [dict(sync_free=True), dict(cuda_graphs=True),
                                   dict(sync_free=True, cuda_graphs=True)])
def test_sync_free_and_static_buffer_paths_equal_the_step_by_step_loop(small, flags):
    """The sync-free loop (trimmed at the end) and the static-buffer step that CUDA graphs capture (run uncaptured on
    CPU): with transformers' random draws (hf_rng) the same seed gives the same tokens and scores as the step-by-step
    loop, whose equality with transformers is tested above; greedy captions that all end early get trimmed alike."""
    model, prompt = small
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    plain, fast = FastBlipDecoder(model, sync_free=False, cuda_graphs=False), FastBlipDecoder(model, **flags)
    greedy = DecodeConfig(num_return_sequences=1, do_sample=False, max_length=35)
    for cfg, kwargs in ((DecodeConfig(), dict(hf_rng=True, output_scores=True)), (greedy, dict(output_scores=True))):
        ref, ref_scores = plain.generate(pixels, prompt, cfg, seed=11, **kwargs)
        ours, scores = fast.generate(pixels, prompt, cfg, seed=11, **kwargs)
        assert torch.equal(ours, ref) and len(scores) == len(ref_scores)
        for a, b in zip(scores, ref_scores):
            _assert_scores_equal(a, b, atol=1e-6)
    assert ref.shape[1] < 35, "the greedy captions should all end before max_length"
    if not flags.get("sync_free"):  # the candidate sampler draws the same numbers when the loop does not change
        assert torch.equal(fast.generate(pixels, prompt, Settings(), seed=5),
                           plain.generate(pixels, prompt, Settings(), seed=5))
    if flags.get("cuda_graphs"):
        assert len(fast._graphs) == 2 and all(step.graph is None for step in fast._graphs.values())


def _assert_equal_up_to_tie_order(ours: torch.Tensor, ref: torch.Tensor, atol: float = 1e-6) -> None:
    """Same number of kept tokens per row with the same values: which of several tied tokens top-p cuts is arbitrary
    (transformers' unstable sort)."""
    assert torch.equal(torch.isfinite(ours).sum(-1), torch.isfinite(ref).sum(-1))
    assert torch.allclose(ours.sort(-1).values, ref.sort(-1).values, atol=atol, rtol=0)


def test_sync_free_scores_match_transformers_with_ties_and_flag_overflow():
    g = torch.Generator().manual_seed(1)
    vocab, eos = 300, 7
    compared = 0
    for case in range(40):
        logits = torch.randn(6, vocab, generator=g) * (0.5 + case % 4)
        if case % 5 == 0:
            logits[:, :30] = logits[:, :1].clone()  # ties straddling the top-k boundary, within the margin
        if case % 7 == 0:
            logits = logits.round()
        ids = torch.randint(0, vocab, (6, 3 + case % 5), generator=g)
        cfg = DecodeConfig(min_length=5 + case % 3, repetition_penalty=(1.1, 0.8, 1.0)[case % 3],
                           top_p=(0.9, 0.5, 1.0, 0.99)[case % 4], top_k=(50, 0, 10, 300)[case % 4],
                           temperature=(1.0, 0.7)[case % 2], do_sample=case % 6 != 5)
        ref = _hf_processors(cfg, eos)(ids, logits.clone()) if cfg.top_k or cfg.top_p < 1 else None
        if ref is None:
            ref = FastBlipDecoder.process_scores(ids, logits.clone(), cfg, eos)
        ours, overflow = FastBlipDecoder.sync_free_scores(ids, logits.clone(), cfg, eos, candidates=False)
        if overflow:  # rounded logits: ties past the margin, generate would redo the step on the exact path
            assert case % 7 == 0
            continue
        compared += 1
        _assert_equal_up_to_tie_order(ours, ref)
        got, _ = FastBlipDecoder.sync_free_scores(ids, logits.clone(), cfg, eos)
        if isinstance(got, tuple):  # candidates when top-k is active, else the full scores as above
            got = torch.full_like(ours, -math.inf).scatter_(1, got[1], got[0])
        _assert_equal_up_to_tie_order(got, ref)
    assert compared >= 34
    tied = torch.zeros(2, vocab)
    tied[:, :5] = 1.0  # 295 tokens tie at the 10th value: more than 10 + margin candidates
    assert FastBlipDecoder.sync_free_scores(ids[:2], tied, DecodeConfig(top_k=10), eos, margin=20)[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_candidates_from_logits_equal_the_best_of_the_processed_vocabulary(dtype):
    """The sync-free sampler's candidates, found among the raw logits' best, have exactly the values (and tokens)
    of the best processed fp32 scores over the whole vocabulary, also when the penalty and min-length push the raw
    best out (earlier ids are each row's best raw tokens, [SEP] the best of all), with ids beyond the vocabulary."""
    g = torch.Generator().manual_seed(3)
    vocab, eos, compared = 200, 7, 0
    for case in range(48):
        logits = (torch.randn(5, vocab, generator=g) * (1 + case % 3)).to(dtype)
        best = logits.float().topk(6).indices
        ids = torch.cat([best[:, : 1 + case % 6], torch.randint(0, vocab + 3, (5, 2), generator=g)], 1)
        if case % 4 == 0:
            logits[:, eos] = logits.float().max() + 1
        cfg = DecodeConfig(min_length=(0, 20)[case % 2], repetition_penalty=(1.1, 2.0, 1.0)[case % 3],
                           temperature=(1.0, 0.7)[case % 4 // 2])
        width = 1 + case % 8
        full = FastBlipDecoder._penalized(ids, logits, cfg, eos, inplace=False, ids_in_vocab=False)
        ref_vals, ref_idx = (full / cfg.temperature).topk(width + 1)  # one more: ties across the cut
        vals, idx = FastBlipDecoder._candidates_from_logits(ids, logits, cfg, eos, width)
        assert vals.dtype == torch.float32 and torch.equal(vals, ref_vals[:, :width]), case
        untied = (ref_vals[:, 1:] != ref_vals[:, :-1]).all(1) & torch.isfinite(ref_vals).all(1)  # rows
        assert torch.equal(idx[untied], ref_idx[untied, :width]), case
        compared += int(untied.sum())
    assert compared >= 120  # of 240 rows


def test_sync_free_candidates_from_logits_sample_what_full_processing_samples(small):
    model, prompt = small
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(8))
    ours, full = (FastBlipDecoder(model, sync_free=True, candidates_from_logits=flag) for flag in (True, False))
    for seed in range(3):
        assert torch.equal(ours.generate(pixels, prompt, Settings(), seed=seed),
                           full.generate(pixels, prompt, Settings(), seed=seed))


def test_sync_free_overflow_redoes_steps_on_the_exact_path(small):
    """Groups of 4 tokens with identical head weights tie everywhere; with a margin of 3 candidates ties overflow
    now and then (here first at step 8), the loop goes back to the first overflowing step and finishes exactly:
    scores equal transformers' processors along the sampled tokens (up to the order of ties)."""
    import copy

    model, prompt = small
    model = copy.deepcopy(model)
    head = model.text_decoder.cls.predictions.decoder
    with torch.no_grad():
        group = torch.arange(head.out_features) // 4 * 4
        head.weight.copy_(head.weight[group])
        head.bias.copy_(head.bias[group])
    fast = FastBlipDecoder(model, sync_free=True, cuda_graphs=True)
    fast.TIE_MARGIN = 3
    checks = []
    fast._check = lambda *a: checks.append(FastBlipDecoder._check(*a)) or checks[-1]
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    cfg = DecodeConfig(num_return_sequences=2)
    tokens, scores = fast.generate(pixels, prompt, cfg, seed=3, output_scores=True)
    first_overflow = max(first for first, _ in checks)
    assert first_overflow > 0, f"ties should have overflowed the candidates after some steps: {checks}"
    plen = prompt.shape[1] - 1
    assert tokens.shape[1] == plen + len(scores)
    procs = _hf_processors(cfg, model.config.text_config.sep_token_id)
    with torch.inference_mode():
        embeds = model.vision_model(pixel_values=pixels, interpolate_pos_encoding=True)[0]
        logits = model.text_decoder(input_ids=tokens, encoder_hidden_states=embeds.repeat_interleave(2, 0)).logits
    for step, ours in enumerate(scores):
        cur = plen + step
        live = (tokens[:, :cur] != model.config.text_config.sep_token_id).all(1)
        ref = procs(tokens[:, :cur], logits[:, cur - 1].float().clone())
        _assert_equal_up_to_tie_order(ours[live], ref[live], atol=1e-4)
        assert torch.isfinite(ours[live].gather(1, tokens[live, cur : cur + 1])).all()


def test_sampling_by_exponential_race_draws_what_multinomial_draws():
    probs = torch.randn(64, 500, generator=torch.Generator().manual_seed(0)).mul(3).softmax(-1)
    ref = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(9)).squeeze(1)
    assert torch.equal(FastBlipDecoder.sample(probs.log(), torch.Generator().manual_seed(9)), ref)


def test_auto_caption_batch_size_from_full_size_config():
    config = BlipConfig()  # BLIP base sizes; nothing is allocated
    gib = 1 << 30
    sizes = [auto_caption_batch_size(config, free * gib, 8, 20, 197, torch.bfloat16) for free in (0, 4, 16, 70, 1000)]
    assert sizes == sorted(sizes) and sizes[0] == 8 and sizes[-1] == 1024
    assert all(size & (size - 1) == 0 for size in sizes)
    assert auto_caption_batch_size(config, 16 * gib, 8, 20, 197, torch.float32) <= sizes[2]
    assert 64 <= auto_caption_batch_size(config, 70 * gib, 8, 20, 197, torch.bfloat16) <= 1024


def test_gpu_decoder_check_dry_runs_on_cpu(capsys):
    from benchmarks.gpu_decoder_check import main

    assert main(["--tiny", "--device", "cpu", "--batches", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "FAILED" not in out, out
    assert out.count("img/s (best of 1") == 7  # the seven variants
    assert "with graphs vs fp32" in out and "total variation mean 0.0000" in out


def spread_weights(model: torch.nn.Module) -> None:
    """BLIP's init (vision std 1e-10, text 0.02) leaves image features nearly constant and attention nearly
    uniform, which would hide attention bugs: fan-in scaled weights make every path matter."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, param[0].numel() ** -0.5)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
