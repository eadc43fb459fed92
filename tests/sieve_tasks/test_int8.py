import pytest
import torch

from sieve_tasks.int8 import Int8Linear, quantize_linears


def test_int8_linear_matches_fp32_within_quantisation_error():
    torch.manual_seed(0)
    linear = torch.nn.Linear(384, 1536)
    x = torch.randn(3, 7, 384)  # any leading shape, like nn.Linear
    with torch.inference_mode():
        reference, quantised = linear(x), Int8Linear(linear)(x)
    assert quantised.shape == reference.shape and quantised.dtype == torch.float32
    relative = (quantised - reference).norm() / reference.norm()
    assert 0 < relative < 0.02  # 8-bit weights and activations: ~1 % error, never exact


def test_quantize_linears_swaps_every_linear_and_keeps_tied_embeddings():
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(50, 16)
    head = torch.nn.Linear(16, 50)
    head.weight = embedding.weight  # tied, like BLIP's LM head
    model = torch.nn.ModuleDict({"emb": embedding, "block": torch.nn.Sequential(torch.nn.Linear(16, 16)), "head": head})
    assert quantize_linears(model) == 2
    assert isinstance(model["head"], Int8Linear) and isinstance(model["block"][0], Int8Linear)
    assert model["emb"].weight.dtype == torch.float32


def test_quantize_linears_refuses_non_cpu_models():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4)).to("meta")
    with pytest.raises(ValueError, match="CPU only"):
        quantize_linears(model)


def test_activation_range_follows_the_cpu(monkeypatch):
    """Full 8-bit activations only where VNNI sums int8 products in 32 bits; elsewhere PyTorch's 7-bit range."""
    from sieve_tasks import int8

    linear = torch.nn.Linear(8, 8)
    for has_vnni in (True, False):
        monkeypatch.setattr(int8, "full_range_activations", lambda: has_vnni)
        layer = Int8Linear(linear)
        assert layer.reduce_range is not has_vnni
        assert layer(torch.randn(2, 8)).shape == (2, 8)
