"""The BLIP captioner: official decoding settings, reproducibility, and out-of-memory batch splitting."""

import pytest
import torch

from sieve_tasks.captioner import BlipCaptioner, clip_style_transform, decode_captions
from sieve_tasks.models import Device
from sieve_tasks.settings import Settings
from sieve_tasks.test_models import TINY_BLIP


@pytest.fixture(scope="module")
def captioner():
    return BlipCaptioner(TINY_BLIP, Device.choose("cpu"), Settings(profile="test"))


def test_eight_captions_per_image_reproducible_for_a_seed(captioner):
    pixels = torch.randn(3, 3, 224, 224)
    first = captioner.caption(pixels, seed=11)
    assert len(first) == 3 and all(len(c) == 8 for c in first)
    assert captioner.caption(pixels, seed=11) == first
    assert captioner.caption(pixels, seed=12) != first


def test_decoding_uses_the_official_settings(monkeypatch):
    captioner = BlipCaptioner(TINY_BLIP, Device.choose("cpu"), Settings(profile="test", fast_decode=False))
    seen = {}
    original = captioner.model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(captioner.model, "generate", spy)
    captioner.caption(torch.randn(1, 3, 224, 224), seed=0)
    assert seen["do_sample"] and seen["top_p"] == 0.9 and seen["num_return_sequences"] == 8
    assert (seen["min_length"], seen["max_length"], seen["repetition_penalty"]) == (5, 20, 1.1)
    assert seen["interpolate_pos_encoding"] is True  # the checkpoint is trained at 384 px, fed at 224
    assert captioner.tokenizer.decode(seen["input_ids"][0], skip_special_tokens=True) == "a picture of"


def test_out_of_memory_batch_is_split_and_recorded(captioner, monkeypatch):
    original = captioner._generate

    def fragile(pixels, seed):
        if pixels.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(pixels, seed)

    monkeypatch.setattr(captioner, "_generate", fragile)
    captions = captioner.caption(torch.randn(8, 3, 224, 224), seed=3)
    assert len(captions) == 8 and all(len(c) == 8 for c in captions)
    assert captioner.oom_splits == 3  # 8 → 4+4 → 2+2 and 2+2


def test_other_errors_are_not_swallowed(captioner, monkeypatch):
    monkeypatch.setattr(captioner, "_generate", lambda p, s: (_ for _ in ()).throw(ValueError("bad input")))
    with pytest.raises(ValueError, match="bad input"):
        captioner.caption(torch.randn(4, 3, 224, 224), seed=0)


def test_prompt_is_stripped(captioner):
    assert captioner.strip_prompt("a picture of a dog on a beach") == "a dog on a beach"
    assert captioner.strip_prompt("a dog") == "a dog"


@pytest.mark.parametrize("prompt", ["une photo prise à ", "a picture of: ", "a 'picture' of ", "A PICTURE OF "])
def test_a_prompt_is_stripped_as_its_tokens_decode(prompt):
    """BLIP's uncased tokenizer strips accents and its decoder spaces out punctuation: the prompt is matched as it
    comes back, not as it was written (it stayed in every caption)."""
    settings = Settings(profile="test", prompt=prompt)
    captioner = BlipCaptioner(settings.captioner, Device.choose("cpu", "fp32"), settings)
    tokens = captioner.tokenizer.convert_tokens_to_ids(["a", "dog", "[SEP]"])
    caption = torch.cat([captioner.prompt_ids[:, :-1], torch.tensor([tokens])], 1)
    assert captioner._captions(caption.repeat(settings.num_captions, 1)) == [["a dog"] * settings.num_captions]


@pytest.mark.parametrize("clean_up", [True, False])
def test_captions_decode_in_one_native_call_as_transformers_decodes_them(captioner, clean_up, monkeypatch):
    tokenizer = captioner.tokenizer
    monkeypatch.setattr(tokenizer, "clean_up_tokenization_spaces", clean_up)
    words = ["dog", "'", "s", ".", ",", "?", "!", "n't", "do", "##g", "[UNK]", tokenizer.bos_token, "[CLS]", "[SEP]",
             "[PAD]", "a", "picture", "of", "é", "##ing"]
    ids = tokenizer.convert_tokens_to_ids(words)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.tensor(ids)[torch.randint(len(ids), (512, 20), generator=generator)]
    tokens = torch.cat([tokens, torch.randint(1000, 30000, (512, 20), generator=generator)])
    expected = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    assert decode_captions(tokenizer, tokens) == expected


def test_clip_style_preprocessing_shape():
    from PIL import Image

    tensor = clip_style_transform(224)(Image.new("RGB", (640, 427), (255, 0, 0)))
    assert tuple(tensor.shape) == (3, 224, 224)


def test_launched_batches_become_text_in_the_captioners_thread(captioner):
    """``launch`` generates now; the text is made in the captioner's own thread once ``start_text`` is called (or
    the result asked for); batches launched one after the other give what ``caption`` gives; ``close`` stops the
    thread, and a later launch starts it again."""
    import threading

    def text_thread() -> bool:
        return any(t.name.startswith("caption-text") for t in threading.enumerate())

    captioner.close()
    pixels = [torch.randn(2, 3, 224, 224), torch.randn(3, 3, 224, 224)]
    launched = [captioner.launch(p, seed=5 + i) for i, p in enumerate(pixels)]
    assert not text_thread() and not any(captions.done() for captions in launched)
    captioner.start_text()
    assert text_thread()
    assert [f.result() for f in launched] == [captioner.caption(p, seed=5 + i) for i, p in enumerate(pixels)]
    captioner.close()
    assert not any(t.name.startswith("caption-text") for t in threading.enumerate())
    assert len(captioner.launch(pixels[0], seed=5).result()) == 2  # asking for the result starts the text
    captioner.close()
