"""Fast BLIP caption decoding that reuses a loaded ``BlipForConditionalGeneration``'s weights.

``FastBlipDecoder(model).generate(pixel_values, prompt_ids, settings)`` returns the same token layout as
``model.generate(pixel_values=..., input_ids=prompt_ids, interpolate_pos_encoding=True, do_sample=True, top_p=...,
max_length=..., min_length=..., repetition_penalty=..., num_return_sequences=...)`` and samples from the same
distribution with the same logits processing as transformers (checked against transformers' processors in
``tests/sieve_tasks/test_fast_blip.py``). What it does differently:

* the image is encoded once, and each layer's cross-attention keys/values are computed once per image and shared
  by all ``num_return_sequences`` samples and all steps (grouped layout: the samples of an image are that image's
  queries; the image embeddings are never repeated);
* the prompt is run once per image (its self-attention keys/values are then copied to the image's samples);
* a preallocated self-attention KV cache, ``scaled_dot_product_attention`` everywhere (vision encoder too);
* top-k/top-p work on the top-k candidates instead of sorting the vocabulary, in fp32 like transformers; on the
  sync-free path the candidates are picked from the raw logits in their dtype, processed scores only for them;
* on CUDA the decode loop makes no host syncs per step (``sync_free``) and each step's forward is a CUDA graph
  replayed over static buffers (``cuda_graphs``); a failure of the graph path falls back to eager with a warning;
* each shape's graph is captured once per choice of SDPA kernels (``ATTENTION_CHOICES``: torch's own, which is
  cuDNN's fused kernel on Hopper, and the same without cuDNN) and the one whose replay is fastest is kept.

Sampling draws from the same distribution as transformers. By default it samples among the top-k candidates only
(cheap); ``hf_rng=True`` calls ``torch.multinomial`` on the full-vocabulary probabilities exactly like transformers,
so that the same seed draws the same random numbers and gives the same captions as ``model.generate`` (in fp32, up to
float rounding of the logits moving a sample across a probability boundary: rare, then that sequence diverges).

Transformers semantics reproduced (transformers 5.x ``generation/utils.py`` and ``logits_process.py``):
``input_ids[:, 0] = bos`` and the trailing [SEP] of the prompt is dropped (``BlipForConditionalGeneration.generate``);
the processors are RepetitionPenalty (over all previous ids, prompt included), MinLength (eos = [SEP] suppressed while
the length *including the prompt* is below ``min_length``), then for sampling Temperature, TopK (transformers'
default ``top_k=50`` applies when a caller sets only ``top_p``, as SIEVE's captioner does) and TopP
(``min_tokens_to_keep=1``); ``max_length`` counts prompt tokens; finished rows are padded with ``pad_token_id``, and
decoding stops when every row has finished.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

HF_DEFAULT_TOP_K = 50  # transformers' GenerationConfig default, active whenever do_sample=True and top_k is unset
# SDPA kernels a decode step may use; torch picks among each list in its own order. cuDNN's fused kernel, torch's
# choice on an H100, took 29 % of a batch-512 decode there for a 19-position self-attention (BENCHMARKS.md §10):
# which is fastest depends on the card and the shape, so each captured shape is timed with each choice. Both lists
# are explicit: the process-wide flags may have been narrowed (e.g. by the sentence encoder's own choice).
ATTENTION_CHOICES: dict[str, list[SDPBackend]] = {
    "sdpa": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "sdpa without cudnn": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
}


@dataclass(frozen=True)
class DecodeConfig:
    """Decoding settings, transformers' meaning. ``from_settings`` reads SIEVE's :class:`Settings`."""

    num_return_sequences: int = 8
    max_length: int = 20
    min_length: int = 5
    repetition_penalty: float = 1.1
    do_sample: bool = True
    top_p: float = 0.9
    top_k: int | None = HF_DEFAULT_TOP_K
    temperature: float = 1.0

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> DecodeConfig:
        values = {
            "num_return_sequences": settings.num_captions,
            "max_length": settings.max_length,
            "min_length": settings.min_length,
            "repetition_penalty": settings.repetition_penalty,
            "top_p": settings.top_p,
        }
        values.update(overrides)
        return cls(**values)


class _Layer:
    """Plain references to one BlipTextLayer's parameters (no copies)."""

    def __init__(self, layer: torch.nn.Module):
        sa, ca = layer.attention, layer.crossattention
        self.q, self.k, self.v = sa.self.query, sa.self.key, sa.self.value
        self.o, self.ln1 = sa.output.dense, sa.output.LayerNorm
        self.cq, self.ck, self.cv = ca.self.query, ca.self.key, ca.self.value
        self.co, self.ln2 = ca.output.dense, ca.output.LayerNorm
        self.fc1, self.act = layer.intermediate.dense, layer.intermediate.intermediate_act_fn
        self.fc2, self.ln3 = layer.output.dense, layer.output.LayerNorm


def _ln(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _lin(x: torch.Tensor, lin: torch.nn.Module) -> torch.Tensor:
    if isinstance(lin, torch.nn.Linear):
        return F.linear(x, lin.weight, lin.bias)
    return lin(x)  # sieve_tasks.int8.Int8Linear


def _penalize(scores: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenalty on the scores of earlier tokens: negative ones times, others divided by it."""
    return torch.where(scores < 0, scores * penalty, scores / penalty)


class _StaticStep:
    """Static buffers of one decode shape and, when captured, a CUDA graph of ``_decode_step`` over them.

    Uncaptured (CPU), calling it runs the very same step eagerly on the same buffers: that is what the tests check,
    so only capture and replay are left untested without a GPU.
    """

    REPLAYS = 3  # timed replays per attention choice

    def __init__(self, dec: FastBlipDecoder, rows: int, images: int, tmax: int, image_tokens: int, capture: bool):
        dev, dt = dec.device, dec.dtype
        shape = (len(dec.layers), rows, dec.heads, tmax, dec.head_dim)
        self.cache_k = torch.zeros(shape, device=dev, dtype=dt)
        self.cache_v = torch.zeros(shape, device=dev, dtype=dt)
        self.bias = torch.full((1, tmax), -math.inf, device=dev, dtype=dt)
        self.bias[:, 0] = 0  # warm-up and capture run on position 0: no all -inf softmax (NaN) in the cache
        self.tok = torch.full((rows,), dec.pad_id, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        key_shape = ((images, dec.heads, image_tokens, dec.head_dim) if dec.sdpa_text
                     else (images, dec.heads, dec.head_dim, image_tokens))
        self.cross = [(torch.zeros(key_shape, device=dev, dtype=dt),
                       torch.zeros((images, dec.heads, image_tokens, dec.head_dim), device=dev, dtype=dt))
                      for _ in dec.layers]
        head = dec.head_out
        self.out = (torch.empty((rows, head.out_features), device=dev, dtype=dt)
                    if isinstance(head, torch.nn.Linear) else None)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.attention: str | None = None  # the kept graph's ATTENTION_CHOICES entry
        self.replay_ms: dict[str, float] = {}  # per choice: one replay, mean of REPLAYS (when there was a choice)
        if capture:
            self._capture_fastest(dec)

    def _eager(self, dec: FastBlipDecoder) -> torch.Tensor:
        return dec._decode_step(self.tok, self.pos, self.cross, self.cache_k, self.cache_v, self.bias, self.out)

    def _capture_fastest(self, dec: FastBlipDecoder) -> None:
        """Capture the step with each of the decoder's attention choices and keep the graph that replays fastest
        (replays before :meth:`load` only write the cache that ``load`` clears). A choice that fails to capture is
        skipped with a warning while another one captures; if none does, the last failure is raised (out of memory
        with no graph yet: at once, and the caller halves the batch)."""
        failure: Exception | None = None
        for name, backends in dec.attention_choices.items():
            try:
                graph, logits = self._capture(dec, backends)
            except torch.cuda.OutOfMemoryError:
                if self.graph is None:
                    raise  # the caller halves the batch
                log.warning("capturing the decode step with %s ran out of memory; keeping %s", name, self.attention)
                break  # a second graph's memory is what did not fit
            except Exception as exc:  # noqa: BLE001 -- another choice may capture; if none does, it is raised
                log.warning("capturing the decode step with %s failed: %s", name, exc)
                failure = exc
                continue
            if len(dec.attention_choices) > 1:
                self.replay_ms[name] = self._replay_ms(graph, dec.device)
                if self.graph is not None and self.replay_ms[name] >= self.replay_ms[self.attention]:
                    continue
            self.graph, self.logits, self.attention = graph, logits, name
        if self.graph is None:
            raise failure
        if self.replay_ms:
            log.info("decode step %s: kept %s (replay ms: %s)", tuple(self.cache_k.shape), self.attention,
                     {name: round(ms, 3) for name, ms in self.replay_ms.items()})

    def _capture(self, dec: FastBlipDecoder, backends: list[SDPBackend]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream, then capture (the recipe of ``torch.cuda.graphs``' documentation), with SDPA
        limited to ``backends``.

        ``thread_local``: the image pass's producer thread keeps decoding (nvJPEG, allocations) on its own stream
        while a shape is captured here; torch's default mode, ``global``, makes such calls from any other thread an
        error, which would cost the producer its GPU decode and this decoder its graphs.
        """
        with sdpa_kernel(backends):
            side = torch.cuda.Stream(device=dec.device)
            side.wait_stream(torch.cuda.current_stream(dec.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._eager(dec)
            torch.cuda.current_stream(dec.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                logits = self._eager(dec)
        return graph, logits

    def _replay_ms(self, graph: torch.cuda.CUDAGraph, device: torch.device) -> float:
        """Milliseconds of one replay on the device (CUDA events; one replay first to warm up)."""
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(torch.cuda.current_stream(device))
        for _ in range(self.REPLAYS):
            graph.replay()
        end.record(torch.cuda.current_stream(device))
        end.synchronize()
        return start.elapsed_time(end) / self.REPLAYS

    def load(self, cross: list[tuple[torch.Tensor, torch.Tensor]], plen: int) -> None:
        """Start a batch: this batch's cross-attention K/V, an empty cache, positions below ``plen`` visible."""
        for (sk, sv), (k, v) in zip(self.cross, cross):
            sk.copy_(k)
            sv.copy_(v)
        self.cache_k.zero_()  # masked positions get weight 0, and 0 * NaN left by an earlier batch would be NaN
        self.cache_v.zero_()
        self.bias.fill_(-math.inf)
        self.bias[:, :plen] = 0

    def __call__(self, dec: FastBlipDecoder, tok: torch.Tensor, pos: int) -> torch.Tensor:
        self.tok.copy_(tok)
        self.pos.fill_(pos)
        if self.graph is None:
            return self._eager(dec)
        self.graph.replay()
        return self.logits


class FastBlipDecoder:
    """Caption sampler for a ``BlipForConditionalGeneration`` (eval mode), sharing its parameters.

    ``cuda_graphs`` (None: on for CUDA without ``compile``): decode steps replay a CUDA graph per (rows, images,
    max length, image tokens) shape, the last ``GRAPH_CACHE`` shapes kept; True on CPU runs the same static-buffer
    step uncaptured. ``sync_free`` (None: on for CUDA): no host sync per decode step (see ``sync_free_scores``);
    whether every caption has ended is checked every ``CHECK_EVERY`` steps and the output trimmed to what the
    step-by-step loop returns; ``candidates_from_logits`` (default on): its sampling candidates are found among the
    raw logits' best (``sync_free_scores``' ``from_logits``), off to time processing the whole vocabulary instead.
    ``attention``: the names of :data:`ATTENTION_CHOICES` each captured shape is timed with (default all; one name
    fixes the kernels, e.g. to compare them).
    """

    GRAPH_CACHE = 3
    CHECK_EVERY = 4
    TIE_MARGIN = 50  # extra top-k candidates that hold tokens tied with the k-th value (see sync_free_scores)

    def __init__(self, model: torch.nn.Module, *, compile: bool = False, sdpa_vision: bool = True,
                 cuda_graphs: bool | None = None, sync_free: bool | None = None, sdpa_text: bool | None = None,
                 candidates_from_logits: bool = True, attention: tuple[str, ...] = tuple(ATTENTION_CHOICES)):
        self.model = model
        text = model.text_decoder
        cfg = text.config
        self.cfg = cfg
        self.bos_id = int(cfg.bos_token_id)
        self.eos_id = int(cfg.sep_token_id)  # BLIP's generate passes eos_token_id=sep_token_id
        self.pad_id = int(cfg.pad_token_id)
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.hidden = cfg.hidden_size
        self.scale_div = math.sqrt(self.head_dim)  # transformers divides the scores by sqrt(head_dim)
        emb = text.bert.embeddings
        self.word_emb, self.pos_emb = emb.word_embeddings.weight, emb.position_embeddings.weight
        self.emb_ln = emb.LayerNorm
        self.layers = [_Layer(layer) for layer in text.bert.encoder.layer]
        head = text.cls.predictions
        self.head_dense, self.head_act = head.transform.dense, head.transform.transform_act_fn
        self.head_ln = head.transform.LayerNorm
        self.head_out = head.decoder
        self.sdpa_vision = sdpa_vision
        self._step = torch.compile(self._decode_step, dynamic=False) if compile else self._decode_step
        on_cuda = self.device.type == "cuda"
        self.cuda_graphs = (on_cuda and not compile) if cuda_graphs is None else cuda_graphs
        self.sync_free = on_cuda if sync_free is None else sync_free
        # the decoder's attention through SDPA's fused kernels on CUDA (plain matmuls there run as small batched
        # GEMMs and GEMVs); on CPU the plain matmuls are an order of magnitude faster than its kernels
        self.sdpa_text = on_cuda if sdpa_text is None else sdpa_text
        self.candidates_from_logits = candidates_from_logits  # see sync_free_scores' from_logits
        if not attention or set(attention) - set(ATTENTION_CHOICES):
            raise ValueError(f"attention must name some of {list(ATTENTION_CHOICES)}, not {attention!r}")
        # without SDPA in the step (plain matmuls) there is nothing to choose
        self.attention_choices = {name: ATTENTION_CHOICES[name] for name in (attention if self.sdpa_text else
                                                                             attention[:1])}
        self._graphs: OrderedDict[tuple[int, int, int, int], _StaticStep] = OrderedDict()

    # ------------------------------------------------------------------ model pieces

    @property
    def device(self) -> torch.device:
        return self.word_emb.device

    @property
    def dtype(self) -> torch.dtype:
        return self.word_emb.dtype

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision encoder output (``last_hidden_state`` after ``post_layernorm``), 224 px via interpolated positions."""
        vm = self.model.vision_model
        if not self.sdpa_vision:
            return vm(pixel_values=pixel_values, interpolate_pos_encoding=True)[0]
        x = vm.embeddings(pixel_values, interpolate_pos_encoding=True)
        bsz, seq, dim = x.shape
        for layer in vm.encoder.layers:
            attn = layer.self_attn
            h = _ln(x, layer.layer_norm1)
            qkv = _lin(h, attn.qkv).view(bsz, seq, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            ctx = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=attn.scale)
            x = x + _lin(ctx.transpose(1, 2).reshape(bsz, seq, dim), attn.projection)
            h = _ln(x, layer.layer_norm2)
            x = x + _lin(layer.mlp.activation_fn(_lin(h, layer.mlp.fc1)), layer.mlp.fc2)
        return _ln(x, vm.post_layernorm)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(..., T, hidden) -> (..., heads, T, head_dim)."""
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(-2, -3)

    def cross_kv(self, image_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer cross-attention keys (images, heads, image_tokens, head_dim) — for the plain matmuls
        transposed to (images, heads, head_dim, image_tokens) — and values (images, heads, image_tokens,
        head_dim): computed once per image, shared by its samples and all steps."""
        keys = [self._heads(_lin(image_embeds, ly.ck)) for ly in self.layers]
        if not self.sdpa_text:
            keys = [k.transpose(-1, -2) for k in keys]
        return [(k.contiguous(), self._heads(_lin(image_embeds, ly.cv)).contiguous())
                for k, ly in zip(keys, self.layers)]

    def _cross_ffn(self, ly: _Layer, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Cross-attention + feed-forward for x of shape (images * samples, [T,] hidden), rows image-major.

        Grouped layout: the samples (and positions) of one image are that image's queries against its keys/values,
        so the image keys/values are never repeated. Plain matmuls: for a handful of queries against ~200 keys
        they beat the CPU flash-attention kernel by an order of magnitude.
        """
        k, v = kv
        q = _lin(x, ly.cq).view(k.shape[0], -1, self.heads, self.head_dim).transpose(1, 2)
        if self.sdpa_text:
            ctx = F.scaled_dot_product_attention(q, k, v, scale=1 / self.scale_div)
        else:  # k is transposed: (images, heads, head_dim, image_tokens)
            ctx = torch.matmul(torch.matmul(q, k).div_(self.scale_div).softmax(-1), v)
        ctx = ctx.transpose(1, 2).reshape(x.shape)
        x = _ln(_lin(ctx, ly.co) + x, ly.ln2)
        return _ln(_lin(ly.act(_lin(x, ly.fc1)), ly.fc2) + x, ly.ln3)

    def _logits(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        h = _ln(self.head_act(_lin(x, self.head_dense)), self.head_ln)
        if out is None:
            return _lin(h, self.head_out)
        # reuse one (rows, vocab) buffer across steps: on CPU a fresh ~8 MB tensor per step costs page faults
        return torch.addmm(self.head_out.bias, h, self.head_out.weight.t(), out=out)

    def _prefill(self, ids: torch.Tensor, cross: list, cache_k: torch.Tensor, cache_v: torch.Tensor, groups: int):
        """Run the prompt once per image; write its self-attention K/V into every sample's cache rows."""
        p = ids.shape[1]
        x = _ln(F.embedding(ids, self.word_emb) + self.pos_emb[:p], self.emb_ln)  # (images, P, hidden)
        for i, ly in enumerate(self.layers):
            q, k, v = (self._heads(_lin(x, lin)) for lin in (ly.q, ly.k, ly.v))
            cache_k[i, :, :, :p] = k.repeat_interleave(groups, dim=0)
            cache_v[i, :, :, :p] = v.repeat_interleave(groups, dim=0)
            ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
            x = _ln(_lin(ctx, ly.o) + x, ly.ln1)
            x = self._cross_ffn(ly, x, cross[i])
        return self._logits(x[:, -1])  # (images, vocab)

    def _decode_step(self, tok: torch.Tensor, pos: torch.Tensor, cross: list, cache_k: torch.Tensor,
                     cache_v: torch.Tensor, bias: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """One token per row at position ``pos`` (a 1-element tensor). Self-attention runs over the whole
        preallocated cache with ``bias`` (0 for filled positions, -inf beyond), so shapes never change."""
        rows = tok.shape[0]
        x = _ln(F.embedding(tok, self.word_emb) + self.pos_emb.index_select(0, pos), self.emb_ln)  # (rows, hidden)
        for i, ly in enumerate(self.layers):
            q, k, v = (_lin(x, lin).view(rows, self.heads, 1, self.head_dim) for lin in (ly.q, ly.k, ly.v))
            ck, cv = cache_k[i], cache_v[i]  # (rows, heads, T, head_dim)
            ck.index_copy_(2, pos, k)
            cv.index_copy_(2, pos, v)
            if self.sdpa_text:
                ctx = F.scaled_dot_product_attention(q, ck, cv, attn_mask=bias, scale=1 / self.scale_div)
            else:
                att = (torch.matmul(q, ck.transpose(-1, -2)).div_(self.scale_div) + bias).softmax(-1)
                ctx = torch.matmul(att, cv)
            ctx = ctx.reshape(rows, self.hidden)
            x = _ln(_lin(ctx, ly.o) + x, ly.ln1)
            x = self._cross_ffn(ly, x, cross[i])
        return self._logits(x, out)

    # ------------------------------------------------------------------ logits processing (transformers semantics)

    @staticmethod
    def process_scores(ids: torch.Tensor, logits: torch.Tensor, cfg: DecodeConfig, eos_id: int,
                       candidates: bool = False, inplace: bool = False, ids_in_vocab: bool | None = None):
        """Processed fp32 scores for the next token given all previous ids (prompt included), like transformers'
        RepetitionPenalty -> MinLength [-> Temperature -> TopK -> TopP when sampling].

        Returns the (rows, vocab) scores with removed tokens at -inf; with ``candidates=True`` and top-k active it
        returns ``(values, token_ids)`` of the top-k candidates instead (removed ones at -inf), which is all that
        sampling needs, without building the full tensor. ``inplace=True`` allows overwriting fp32 ``logits``;
        ``ids_in_vocab`` (all ids < vocab size) saves a device sync per step when the caller knows it.
        """
        scores = FastBlipDecoder._penalized(ids, logits, cfg, eos_id, inplace, ids_in_vocab)
        if not cfg.do_sample:
            return scores
        if cfg.temperature != 1.0:
            scores = scores / cfg.temperature
        vocab = scores.shape[-1]
        top_k = min(cfg.top_k, vocab) if cfg.top_k else 0
        if top_k:
            vals, idx = torch.topk(scores, min(top_k + 1, vocab))  # descending; one extra to detect ties
            if top_k < vocab and bool((vals[:, top_k] == vals[:, top_k - 1]).any()):
                # ties at the k-th value: transformers keeps all of them
                scores = scores.masked_fill(scores < vals[:, top_k - 1 : top_k], -math.inf)
            else:  # transformers keeps exactly these k tokens
                vals, idx = vals[:, :top_k], idx[:, :top_k]
                asc = vals.flip(-1)
                # Top-p over the k candidates equals transformers' ascending sort of the whole vocabulary, where every
                # other token is -inf (probability 0, cumulative sum unchanged) -- unless candidates tie: then the
                # unstable full sort decides which tied token is cut, so take that path below.
                if cfg.top_p >= 1.0 or not bool((asc[:, 1:] == asc[:, :-1]).any()):
                    if cfg.top_p < 1.0:
                        remove = asc.softmax(-1).cumsum(-1) <= 1 - cfg.top_p
                        remove[:, -1] = False
                        vals = asc.masked_fill(remove, -math.inf).flip(-1)
                    if candidates:
                        return vals, idx
                    return torch.full_like(scores, -math.inf).scatter_(1, idx, vals)
                scores = torch.full_like(scores, -math.inf).scatter_(1, idx, vals)
        if cfg.top_p < 1.0:
            sorted_logits, sorted_idx = torch.sort(scores, descending=False)
            remove = sorted_logits.softmax(-1).cumsum(-1) <= 1 - cfg.top_p
            remove[..., -1:] = False
            scores = scores.masked_fill(remove.scatter(1, sorted_idx, remove), -math.inf)
        return scores

    @staticmethod
    def _penalized(ids: torch.Tensor, logits: torch.Tensor, cfg: DecodeConfig, eos_id: int, inplace: bool,
                   ids_in_vocab: bool | None) -> torch.Tensor:
        """fp32 scores after RepetitionPenalty and MinLength."""
        scores = logits.float()
        if scores is logits and not inplace:
            scores = scores.clone()
        vocab = scores.shape[-1]
        if cfg.repetition_penalty != 1.0:
            pen = cfg.repetition_penalty
            if ids_in_vocab is None:
                ids_in_vocab = int(ids.max()) < vocab
            if not ids_in_vocab:  # transformers ignores ids beyond the output vocabulary
                padded = F.pad(scores, (0, 1))
                ids_c = ids.clamp(max=vocab)
                g = padded.gather(1, ids_c)
                scores = padded.scatter_(1, ids_c, _penalize(g, pen))[:, :vocab]
            else:
                g = scores.gather(1, ids)
                scores.scatter_(1, ids, _penalize(g, pen))
        if cfg.min_length > 0 and ids.shape[1] < cfg.min_length:
            scores[:, eos_id] = -math.inf
        return scores

    @classmethod
    def sync_free_scores(cls, ids: torch.Tensor, logits: torch.Tensor, cfg: DecodeConfig, eos_id: int, *,
                         candidates: bool = True, inplace: bool = False, ids_in_vocab: bool = True,
                         margin: int | None = None, from_logits: bool = True) -> tuple[Any, torch.Tensor]:
        """``process_scores`` without host syncs: returns ``(scores or (values, token_ids), overflow)``.

        Top-k keeps every token tied with the k-th value; they are found among ``top_k + margin`` candidates
        (``margin``, default ``TIE_MARGIN``) and top-p runs over the kept candidates in ascending order, tied
        candidates in topk's arbitrary order (transformers' unstable sort orders ties arbitrarily too). ``overflow``
        (a bool tensor on the device) is set when ties at the k-th value may reach past the candidates: only then
        can the result differ from transformers', and ``generate`` redoes that step on the exact path.
        ``from_logits``: candidates are found without processing the whole vocabulary (:meth:`_candidates_from_logits`)
        where that is exact (a repetition penalty of at least 1).
        """
        vocab = logits.shape[-1]
        top_k = min(cfg.top_k or 0, vocab)
        no_overflow = torch.zeros((), dtype=torch.bool, device=logits.device)
        if not cfg.do_sample or top_k in (0, vocab):  # no tie check on these paths; top_k = vocab keeps everything
            cfg = replace(cfg, top_k=0)
            return cls.process_scores(ids, logits, cfg, eos_id, inplace=inplace, ids_in_vocab=ids_in_vocab), no_overflow
        width = min(top_k + (cls.TIE_MARGIN if margin is None else margin), vocab)
        if candidates and from_logits and cfg.repetition_penalty >= 1.0:
            vals, idx = cls._candidates_from_logits(ids, logits, cfg, eos_id, width)
        else:
            scores = cls._penalized(ids, logits, cfg, eos_id, inplace, ids_in_vocab)
            if cfg.temperature != 1.0:
                scores = scores / cfg.temperature
            vals, idx = torch.topk(scores, width)
        thr = vals[:, top_k - 1 : top_k]
        overflow = (vals[:, -1:] == thr).any() if width < vocab else no_overflow
        vals = vals.masked_fill(vals < thr, -math.inf)
        if cfg.top_p < 1.0:
            asc = vals.flip(-1)
            remove = asc.softmax(-1).cumsum(-1) <= 1 - cfg.top_p
            remove[:, -1] = False
            vals = asc.masked_fill(remove, -math.inf).flip(-1)
        if candidates:
            return (vals, idx), overflow
        return torch.full_like(scores, -math.inf).scatter_(1, idx, vals), overflow

    @staticmethod
    def _candidates_from_logits(ids: torch.Tensor, logits: torch.Tensor, cfg: DecodeConfig, eos_id: int,
                                width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``width`` best processed fp32 scores, descending, and their token ids: the same values as processing
        the whole vocabulary, found among the best raw logits in their own dtype (bf16 on CUDA: no fp32 copy of the
        (rows, vocab) logits, half the bytes for top-k to select from). A repetition penalty of at least 1 and the
        min-length rule only lower scores, one token per earlier id (and [SEP]), so the processed best ``width`` lie
        among the raw best ``width`` plus that many; ids beyond the vocabulary match no candidate, as transformers
        ignores them."""
        lowered = ids.shape[1] if cfg.repetition_penalty != 1.0 else 0
        short = cfg.min_length > 0 and ids.shape[1] < cfg.min_length
        raw, idx = torch.topk(logits, min(width + lowered + short, logits.shape[-1]))
        vals = raw.float()
        if lowered:
            pen = cfg.repetition_penalty
            seen = (idx[:, :, None] == ids[:, None, :]).any(-1)
            vals = torch.where(seen, _penalize(vals, pen), vals)
        if short:
            vals = vals.masked_fill(idx == eos_id, -math.inf)
        if cfg.temperature != 1.0:
            vals = vals / cfg.temperature
        vals, order = torch.topk(vals, width)
        return vals, idx.gather(1, order)

    @staticmethod
    def sample(scores, generator: torch.Generator | None) -> torch.Tensor:
        """One token per row from processed scores (full tensor or ``(values, token_ids)`` candidates).

        Exponential race (argmax of p / Exp(1) noise): what ``torch.multinomial(p, 1)`` computes, with the same
        random draws, minus multinomial's validity check, which syncs with the host.
        """
        vals, idx = scores if isinstance(scores, tuple) else (scores, None)
        probs = F.softmax(vals, dim=-1)
        pick = probs.div_(torch.empty_like(probs).exponential_(generator=generator)).argmax(-1)
        return pick if idx is None else idx.gather(1, pick[:, None]).squeeze(1)

    # ------------------------------------------------------------------ generate

    def prepare_prompt(self, prompt_ids: torch.Tensor, batch: int) -> torch.Tensor:
        """Tokenizer output ([CLS] ... [SEP]) -> decoder prompt ([DEC] ...), like BlipForConditionalGeneration.generate:
        the first id becomes bos, the last one (the tokenizer's [SEP]) is dropped."""
        ids = torch.as_tensor(prompt_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.shape[0] == 1 and batch > 1:
            ids = ids.expand(batch, -1)
        if ids.shape[0] != batch:
            raise ValueError(f"prompt_ids has {ids.shape[0]} rows for {batch} images")
        ids = ids.clone()
        ids[:, 0] = self.bos_id
        return ids[:, :-1].to(self.device)

    @torch.inference_mode()
    def generate(self, pixel_values: torch.Tensor, prompt_ids: torch.Tensor, settings: Any = None, *,
                 seed: int | None = None, generator: torch.Generator | None = None, output_scores: bool = False,
                 hf_rng: bool = False, teacher_tokens: torch.Tensor | None = None, **overrides: Any):
        """Token ids of shape (images * num_return_sequences, length), image-major, prompt included.

        ``settings``: a :class:`DecodeConfig`, or SIEVE's ``Settings`` (num_captions, top_p, min/max_length,
        repetition_penalty), or None for DecodeConfig defaults; keyword ``overrides`` replace fields (e.g.
        ``do_sample=False`` for greedy). Randomness: ``generator``, else a fresh one seeded with ``seed``, else
        torch's global generator (transformers' behaviour: ``torch.manual_seed(s)`` then generate draws the same
        numbers). With ``output_scores`` returns ``(tokens, tuple of processed per-step scores)``.

        Sampling draws from the top-k candidates only (same distribution as transformers, far fewer random numbers).
        ``hf_rng=True`` instead samples the full-vocabulary probabilities with ``torch.multinomial`` exactly like
        transformers, which consumes the random stream identically: same seed -> the same captions as
        ``model.generate`` up to float rounding (costs about one extra ``exponential_`` over rows x vocab per step).
        ``teacher_tokens`` (as this returns them) are fed instead of sampled ones: with ``output_scores``, the
        processed distributions along given captions, e.g. to compare bf16 with CUDA graphs against fp32.
        """
        if settings is None:
            cfg = DecodeConfig(**overrides)
        elif isinstance(settings, DecodeConfig):
            cfg = DecodeConfig(**{**settings.__dict__, **overrides})
        else:
            cfg = DecodeConfig.from_settings(settings, **overrides)
        if generator is None and seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        if cfg.max_length > self.cfg.max_position_embeddings:
            raise ValueError(f"max_length {cfg.max_length} exceeds {self.cfg.max_position_embeddings} positions")
        args = (pixel_values, prompt_ids, cfg, generator, output_scores, hf_rng, teacher_tokens)
        if self.cuda_graphs:
            try:
                return self._generate(*args, static=True)
            except torch.cuda.OutOfMemoryError:
                self._graphs.clear()  # free the static buffers before the caller retries smaller batches
                raise
            except Exception:
                log.warning("CUDA-graph decoding failed; decoding eagerly from now on", exc_info=True)
                self.cuda_graphs = False
                self._graphs.clear()
        return self._generate(*args, static=False)

    def _static_step(self, rows: int, images: int, tmax: int, image_tokens: int) -> _StaticStep:
        """The static buffers (and graph, captured on CUDA) of this shape; least recently used shapes are dropped."""
        key = (rows, images, tmax, image_tokens)
        step = self._graphs.pop(key, None)
        if step is None:
            while len(self._graphs) >= self.GRAPH_CACHE:
                self._graphs.popitem(last=False)
            step = _StaticStep(self, *key, capture=self.device.type == "cuda")
        self._graphs[key] = step
        return step

    def _generate(self, pixel_values: torch.Tensor, prompt_ids: torch.Tensor, cfg: DecodeConfig,
                  generator: torch.Generator | None, output_scores: bool, hf_rng: bool,
                  teacher_tokens: torch.Tensor | None, static: bool):
        images = pixel_values.shape[0]
        groups = cfg.num_return_sequences
        rows = images * groups
        prompt = self.prepare_prompt(prompt_ids, images)
        plen = prompt.shape[1]
        image_embeds = self.encode_images(pixel_values.to(self.device, self.dtype))
        cross = self.cross_kv(image_embeds)

        tmax = max(cfg.max_length - 1, plen)  # the last token is never fed back
        if static:
            step_fn = self._static_step(rows, images, tmax, image_embeds.shape[1])
            step_fn.load(cross, plen)
            cache_k, cache_v, bias, cross = step_fn.cache_k, step_fn.cache_v, step_fn.bias, step_fn.cross
        else:
            shape = (len(self.layers), rows, self.heads, tmax, self.head_dim)
            # zero-filled: masked-out positions get weight 0, and 0 * garbage could be NaN
            cache_k = torch.zeros(shape, device=self.device, dtype=self.dtype)
            cache_v = torch.zeros(shape, device=self.device, dtype=self.dtype)
            bias = torch.full((1, tmax), -math.inf, device=self.device, dtype=self.dtype)
            bias[:, :plen] = 0
            positions = torch.arange(tmax, device=self.device)  # slices of it: no host-to-device copy per step
            logits_buf = None
            if isinstance(self.head_out, torch.nn.Linear) and self.dtype == torch.float32:
                logits_buf = torch.empty((rows, self.head_out.out_features), device=self.device)

        def feed(tok: torch.Tensor, cur: int) -> torch.Tensor:
            """Logits for the next position after feeding ``tok`` at position ``cur - 1``."""
            bias[:, cur - 1] = 0
            if static:
                return step_fn(self, tok, cur - 1)
            return self._step(tok, positions[cur - 1 : cur], cross, cache_k, cache_v, bias, logits_buf)

        width = max(cfg.max_length, plen + 1)
        ids = torch.empty((rows, width), dtype=torch.long, device=self.device)
        ids[:, :plen] = prompt.repeat_interleave(groups, dim=0)
        if teacher_tokens is not None:  # padded: the sync-free loop may run past the captions' end
            teacher_tokens = F.pad(teacher_tokens.to(self.device), (0, width - teacher_tokens.shape[1]),
                                   value=self.pad_id)
        cur = plen
        unfinished = torch.ones(rows, dtype=torch.bool, device=self.device)
        scores_out: list[torch.Tensor] = []
        ids_in_vocab = int(prompt.max()) < self.head_out.out_features  # sampled ids always are
        logits = self._prefill(prompt, cross, cache_k, cache_v, groups).repeat_interleave(groups, dim=0)
        exact = not self.sync_free
        alive = torch.ones(width - plen, dtype=torch.bool, device=self.device)  # sync-free: any row unfinished
        overflow = torch.zeros(width - plen, dtype=torch.bool, device=self.device)  # after each step
        candidates = not (output_scores or hf_rng)
        while True:
            step = cur - plen
            if exact:
                scores = self.process_scores(ids[:, :cur], logits, cfg, self.eos_id, candidates=candidates,
                                             inplace=not output_scores, ids_in_vocab=ids_in_vocab)
            else:
                scores, overflow[step] = self.sync_free_scores(ids[:, :cur], logits, cfg, self.eos_id,
                                                               candidates=candidates, inplace=not output_scores,
                                                               ids_in_vocab=ids_in_vocab, margin=self.TIE_MARGIN,
                                                               from_logits=self.candidates_from_logits)
            if output_scores:
                scores_out.append(scores)
            if teacher_tokens is not None:
                nxt = teacher_tokens[:, cur]
            elif cfg.do_sample:
                nxt = self.sample(scores, generator)
            else:
                nxt = scores.argmax(-1)
            nxt = torch.where(unfinished, nxt, self.pad_id)
            ids[:, cur] = nxt
            cur += 1
            unfinished &= nxt != self.eos_id
            if exact:
                if cur >= cfg.max_length or not bool(unfinished.any()):
                    break
            else:
                alive[step] = unfinished.any()
                if cur >= cfg.max_length or (step + 1) % self.CHECK_EVERY == 0:
                    first_overflow, n_alive = self._check(overflow[: step + 1], alive[: step + 1])
                    if first_overflow >= 0:
                        # Redo from that step on the exact path. Whether a step overflows depends only on the
                        # tokens before it, so dropping it and the later draws keeps the distribution exact.
                        exact = True
                        cur = plen + first_overflow
                        del scores_out[first_overflow:]
                        unfinished = (ids[:, plen:cur] != self.eos_id).all(1)
                        bias[:, plen:] = -math.inf
                        bias[:, plen : cur - 1] = 0
                        if cur == plen:
                            logits = self._prefill(prompt, cross, cache_k, cache_v, groups)
                            logits = logits.repeat_interleave(groups, dim=0)
                        else:
                            logits = feed(ids[:, cur - 1], cur)
                        continue
                    if cur >= cfg.max_length or n_alive <= step:
                        # transformers stops after the first step that leaves every row finished
                        cur = plen + min(step + 1, n_alive + 1)
                        del scores_out[cur - plen :]
                        break
            logits = feed(nxt, cur)
        tokens = ids[:, :cur].contiguous()
        return (tokens, tuple(scores_out)) if output_scores else tokens

    @staticmethod
    def _check(overflow: torch.Tensor, alive: torch.Tensor) -> tuple[int, int]:
        """One host sync: the first step that overflowed (-1 if none) and the number of steps after which some row
        was still unfinished."""
        first = torch.where(overflow.any(), overflow.int().argmax(), -1)
        first_overflow, n_alive = torch.stack((first, alive.sum())).tolist()
        return first_overflow, n_alive


def auto_caption_batch_size(decoder_or_model: Any, free_bytes: int, num_captions: int = 8, max_length: int = 20,
                            image_tokens: int = 197, dtype: torch.dtype = torch.bfloat16) -> int:
    """Images per caption batch for ``free_bytes`` of free device memory: the largest power of two whose estimated
    working set (below) fits in half of it, clamped to [8, 1024]; the halving on out-of-memory stays the safety net.

    ``decoder_or_model``: a FastBlipDecoder, a BlipForConditionalGeneration or a BlipConfig (only sizes are read).
    ``image_tokens``: 197 for 224 px at patch 16. Per image: the self-attention KV cache (twice: the graph cache
    keeps a static copy per shape), the per-layer cross-attention K/V (twice: the static copy), the largest vision
    layer's activations, decoder activations, and fp32 logits with the few full-vocabulary copies processing makes.
    """
    model = getattr(decoder_or_model, "model", decoder_or_model)
    config = getattr(model, "config", model)
    text, vision = config.text_config, config.vision_config
    size = torch.empty((), dtype=dtype).element_size()
    rows, layers, hidden = num_captions, text.num_hidden_layers, text.hidden_size
    kv_cache = 2 * layers * rows * 2 * max_length * hidden * size
    cross = 2 * layers * 2 * image_tokens * hidden * size
    vision_acts = image_tokens * (6 * vision.hidden_size + 2 * vision.intermediate_size) * size
    vision_acts += vision.num_attention_heads * image_tokens**2 * size  # attention scores if SDPA picks math
    decoder_acts = rows * (6 * hidden + 2 * text.intermediate_size) * size
    logits = rows * text.vocab_size * (size + 4 * 4)
    per_image = kv_cache + cross + vision_acts + decoder_acts + logits
    fits = max(1, (free_bytes // 2) // per_image)
    return int(min(1024, max(8, 1 << (fits.bit_length() - 1))))


@torch.inference_mode()
def next_token_distributions(model: torch.nn.Module, pixel_values: torch.Tensor, tokens: torch.Tensor,
                             prompt_length: int, cfg: DecodeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling distribution of every generated position of ``tokens`` (teacher-forced through ``model``'s own
    forward, processed like transformers), to compare two models along the same captions (e.g. fp32 vs int8).

    Returns probabilities (rows, steps, vocab) and a (rows, steps) mask of the positions still being decoded.
    """
    text = model.text_decoder.config
    images = pixel_values.repeat_interleave(tokens.shape[0] // pixel_values.shape[0], dim=0)
    logits = model(pixel_values=images, input_ids=tokens, interpolate_pos_encoding=True).logits
    probs, live = [], []
    for t in range(prompt_length, tokens.shape[1]):
        scores = FastBlipDecoder.process_scores(tokens[:, :t], logits[:, t - 1], cfg, int(text.sep_token_id))
        probs.append(scores.softmax(-1))
        live.append(~(tokens[:, prompt_length:t] == int(text.sep_token_id)).any(1))
    return torch.stack(probs, 1), torch.stack(live, 1)
