import numpy as np
import torch
import pytest

from sieve_tasks.encoders import TextEncoder, open_clip_name
from sieve_tasks.int8 import Int8Linear
from sieve_tasks.models import DEFAULT_TEXT_ENCODER, Device

TEXTS = ["a dog running on the beach", "a cat", "a red car in a city street", "", "a dog running on the beach",
         "two people riding bicycles", "Un gato durmiendo en el sofá"]


@pytest.fixture(scope="module")
def fp32():
    return TextEncoder(DEFAULT_TEXT_ENCODER, Device.choose("cpu"), 4)


def test_identical_texts_share_one_vector_and_order_is_kept(fp32):
    vectors = fp32.encode(TEXTS)
    assert vectors.shape == (len(TEXTS), 384) and vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors[0], vectors[4])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    single = fp32.model.encode([TEXTS[2]], normalize_embeddings=True)[0]
    np.testing.assert_allclose(vectors[2], single, atol=1e-5)


def test_int8_encoder_stays_close_to_fp32(fp32):
    int8 = TextEncoder(DEFAULT_TEXT_ENCODER, Device.choose("cpu"), 3, int8=True)
    layers = [type(m) for m in int8.model.modules()]
    assert Int8Linear in layers and torch.nn.Linear not in layers
    reference, quantised = fp32.encode(TEXTS), int8.encode(TEXTS)
    deviation = np.abs(reference @ reference.T - quantised @ quantised.T)
    assert 0 < deviation.max() < 0.06 and deviation.mean() < 0.02


def test_clip_references():
    assert open_clip_name("ViT-B-32:openai") == ("ViT-B-32", "openai")
    assert open_clip_name("ViT-L-14:/models/l14.safetensors") == ("ViT-L-14", "/models/l14.safetensors")
    with pytest.raises(ValueError, match="NAME:PRETRAINED"):
        open_clip_name("ViT-B-32")


def test_clip_tokenizer_processes_give_open_clips_tokens():
    from sieve_tasks.encoders import ClipEncoder
    from sieve_tasks.test_models import TINY_CLIP

    texts = TEXTS + ["Caf&eacute; &amp; Bar &lt;3", "Ã©tÃ© mojibake", "word " * 100, "  spaces\tand\nlines  "]
    inline = ClipEncoder(TINY_CLIP, Device.choose("cpu"), 4)
    pooled = ClipEncoder(TINY_CLIP, Device.choose("cpu"), 4, tokenizer_processes=2)
    try:
        futures = [pooled.tokenize(texts[i : i + 3]) for i in range(0, len(texts), 3)]
        tokens = np.concatenate([f.result() for f in futures])
    finally:
        pooled.close()
    expected = inline.tokenizer(texts).numpy()
    assert tokens.shape == (len(texts), 77) and np.array_equal(tokens, expected)
    assert np.array_equal(inline.tokenize(texts).result(), expected)
    vectors = inline.encode_tokens(tokens)
    assert vectors.shape == (len(texts), inline.dim)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(len(texts)))


def test_native_tokenisation_gives_the_tokens_transformers_gives(fp32):
    texts = TEXTS + ["word " * 400, "Caf&eacute; Ã©tÃ© ＦＵＬＬ 😀👍🏽 ١٢٣", "  spaces\tand\nlines  ", "x" * 3000]
    tokenizer = fp32.model.tokenizer
    expected = tokenizer(texts, truncation=True, max_length=fp32.model.max_seq_length)["input_ids"]
    assert max(map(len, expected)) == fp32.model.max_seq_length  # truncation is exercised
    assert [e.ids for e in fp32.word_pieces.encode_batch_fast(texts)] == expected
