"""BLIP captioning through HF transformers with SIEVE's official decoding settings."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
from PIL import Image

from sieve_tasks.blip_checkpoint import BlipCheckpointLoader, is_blip_checkpoint
from sieve_tasks.fast_blip import FastBlipDecoder, auto_caption_batch_size
from sieve_tasks.image_pass import ImageView
from sieve_tasks.int8 import quantize_linears
from sieve_tasks.models import Device, is_oom, loads_alone, materialize
from sieve_tasks.settings import Settings
from sieve_tasks.test_models import is_test_model, tiny_model_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

# OpenAI CLIP normalisation: SIEVE feeds BLIP the CLIP ViT-B/32 preprocessing at 224 px.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_style_transform(size: int) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the shorter side (bicubic), center crop, scale to [0, 1], normalise with CLIP mean/std."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def decode_captions(tokenizer: PreTrainedTokenizerFast, tokens: torch.Tensor) -> list[str]:
    """``tokenizer.batch_decode(tokens, skip_special_tokens=True)`` of a fast tokenizer in one native call:
    transformers 5 decodes sequence by sequence in Python (~20 µs each, 8 per image, in the thread that feeds the
    GPU), the tokenizers library decodes the batch in native threads."""
    texts = tokenizer.backend_tokenizer.decode_batch(tokens.tolist(), skip_special_tokens=True)
    # transformers cleans up spaces before punctuation when the tokenizer asks for it, except for BPE models
    if tokenizer.clean_up_tokenization_spaces and type(tokenizer.backend_tokenizer.model).__name__ != "BPE":
        texts = [tokenizer.clean_up_tokenization(text) for text in texts]
    return texts


class CaptionText(Future):
    """A caption batch's text: its tokens become captions in the captioner's own thread once that work is started
    (:meth:`BlipCaptioner.start_text`, or asking for the result starts it)."""

    def __init__(self, start: Callable[[], None]):
        super().__init__()
        self._start = start

    def result(self, timeout: float | None = None) -> list[list[str]]:
        self._start()
        return super().result(timeout)


class BlipCaptioner:
    """Writes ``num_captions`` nucleus-sampled captions per image, reproducibly for a given seed."""

    @loads_alone
    def __init__(self, ref: str, device: Device, settings: Settings):
        from transformers import AutoTokenizer, BlipForConditionalGeneration

        self.device = device
        self.settings = settings
        if is_blip_checkpoint(ref):  # BLIP's original .pth format (SIEVE's own captioner)
            model, self.tokenizer = BlipCheckpointLoader(settings.image_size).load(ref, device.dtype)
        else:
            path = str(tiny_model_dir(ref)) if is_test_model(ref) else materialize(ref)
            model = BlipForConditionalGeneration.from_pretrained(path, dtype=device.dtype)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = model.to(device.device).eval()
        if settings.int8:
            quantize_linears(self.model)
        self.prompt_ids = self.tokenizer(settings.prompt, return_tensors="pt").input_ids
        prompt_tokens = self.prompt_ids.shape[1] - 1  # the decoder's prompt: [DEC] and the words, the [SEP] dropped
        if settings.max_length <= prompt_tokens:
            raise ValueError(f"max_length {settings.max_length} leaves no room for a caption after the prompt's "
                             f"{prompt_tokens} tokens")
        # what strip_prompt removes from each caption: the prompt as its tokens decode (the tokenizer may strip
        # accents and the decoder space out punctuation: "a picture of:" comes back as "a picture of :")
        self.prompt = decode_captions(self.tokenizer, self.prompt_ids[:, 1:-1])[0].strip().lower()
        self.view = ImageView(settings.image_size, CLIP_MEAN, CLIP_STD)
        self.fast = FastBlipDecoder(self.model) if settings.fast_decode else None
        self.oom_splits = 0
        self._texts: ThreadPoolExecutor | None = None  # the thread that turns tokens into captions
        self._unstarted: list[tuple[torch.Tensor, CaptionText]] = []  # launched batches, their text not started
        self._lock = threading.Lock()

    def auto_batch_size(self) -> int:
        """Images per caption batch that fit in half the device's free memory now (CUDA; the model is loaded)."""
        free, _ = torch.cuda.mem_get_info(torch.device(self.device.device))
        vision = self.model.config.vision_config
        image_tokens = (self.settings.image_size // vision.patch_size) ** 2 + 1
        return auto_caption_batch_size(self.model, free, self.settings.num_captions, self.settings.max_length,
                                       image_tokens, self.device.dtype)

    def caption(self, pixel_values: torch.Tensor, seed: int) -> list[list[str]]:
        """Captions for a batch of images (see :meth:`launch`), waiting for them."""
        return self.launch(pixel_values, seed).result()

    def launch(self, pixel_values: torch.Tensor, seed: int) -> Future[list[list[str]]]:
        """Generate a batch's caption tokens now; they become text in the captioner's own thread once
        :meth:`start_text` is called (or the result asked for), so the thread that feeds the model goes on with the
        next launches: the image pass's uint8 views (normalised here, on the model's device) or normalised pixels.
        An out-of-memory batch is captioned in halves."""
        if pixel_values.dtype == torch.uint8:
            pixel_values = self.view.normalize(pixel_values.to(self.device.device, non_blocking=True),
                                               self.device.dtype)
        try:
            tokens = self._generate(pixel_values, seed).cpu()
        except Exception as exc:
            if not is_oom(exc) or pixel_values.shape[0] == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.oom_splits += 1
            half = pixel_values.shape[0] // 2
            log.warning("caption batch of %d ran out of memory; retrying as %d + %d", len(pixel_values), half,
                        len(pixel_values) - half)
            halves: Future[list[list[str]]] = Future()
            halves.set_result(self.caption(pixel_values[:half], seed) + self.caption(pixel_values[half:], seed + half))
            return halves
        captions = CaptionText(self.start_text)
        with self._lock:
            self._unstarted.append((tokens, captions))
        return captions

    def start_text(self) -> None:
        """Turn the launched batches' tokens into text now, in the captioner's own thread. The caption stage calls
        it once the work that follows BLIP on the device (CLIP) is launched: the text's Python work would otherwise
        compete for the interpreter lock with those launches, while the device waits."""
        with self._lock:
            if not self._unstarted:
                return
            if self._texts is None:
                self._texts = ThreadPoolExecutor(1, thread_name_prefix="caption-text")
            for tokens, captions in self._unstarted:
                self._texts.submit(self._make_text, tokens, captions)
            self._unstarted.clear()

    def close(self) -> None:
        """Stop the thread that turns tokens into text (it starts again when next needed)."""
        with self._lock:
            if self._texts is not None:
                self._texts.shutdown()
                self._texts = None

    def _make_text(self, tokens: torch.Tensor, captions: CaptionText) -> None:
        try:
            captions.set_result(self._captions(tokens))
        except BaseException as exc:  # handed to whoever asks for the captions
            captions.set_exception(exc)

    def _generate(self, pixel_values: torch.Tensor, seed: int) -> torch.Tensor:
        if self.fast is not None:
            return self.fast.generate(pixel_values.to(self.device.device, self.device.dtype), self.prompt_ids,
                                      self.settings, seed=seed)
        torch.manual_seed(seed)
        with torch.inference_mode():
            return self._reference_generate(pixel_values, pixel_values.shape[0])

    def _captions(self, tokens: torch.Tensor) -> list[list[str]]:
        """Each image's captions from the (images * num_captions, length) tokens: one native decode call (it
        releases the interpreter lock), the prompt stripped."""
        texts = [self.strip_prompt(t) for t in decode_captions(self.tokenizer, tokens)]
        n = self.settings.num_captions
        return [texts[i * n : (i + 1) * n] for i in range(len(texts) // n)]

    def _reference_generate(self, pixel_values: torch.Tensor, batch: int) -> torch.Tensor:
        """transformers' own ``generate`` with SIEVE's settings (``fast_decode=False``)."""
        s = self.settings
        return self.model.generate(
            pixel_values=pixel_values.to(self.device.device, self.device.dtype),
            input_ids=self.prompt_ids.repeat(batch, 1).to(self.device.device),
            interpolate_pos_encoding=True,
            do_sample=True,
            top_p=s.top_p,
            max_length=s.max_length,
            min_length=s.min_length,
            repetition_penalty=s.repetition_penalty,
            num_return_sequences=s.num_captions,
        )

    def strip_prompt(self, text: str) -> str:
        prompt = self.prompt
        stripped = text.strip()
        return stripped[len(prompt):].strip() if stripped.lower().startswith(prompt) else stripped
