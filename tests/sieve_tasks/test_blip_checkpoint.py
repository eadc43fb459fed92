"""BLIP's original checkpoints (``{"model": state_dict}`` in salesforce/BLIP's naming) as the captioner."""

from __future__ import annotations

import hashlib
import http.server
import json
import pathlib
import threading

import pytest
import torch
from transformers import BlipConfig, BlipForConditionalGeneration

from sieve_tasks import blip_checkpoint
from sieve_tasks.blip_checkpoint import (
    PRESETS,
    BlipCheckpointLoader,
    CheckpointError,
    Preset,
    blip_base_config,
    blip_tokenizer,
    fetch_checkpoint,
    is_blip_checkpoint,
    read_state_dict,
)
from sieve_tasks.captioner import BlipCaptioner
from sieve_tasks.models import Device
from sieve_tasks.settings import CAPTION_SETTINGS, Settings
from sieve_tasks.stages.caption import CaptionStage
from tests.sieve_tasks.test_fast_blip import spread_weights

CPU = Device.choose("cpu")


def tiny_blip(image_size: int) -> BlipForConditionalGeneration:
    """A tiny BLIP with BLIP's tokenizer vocabulary; fan-in scaled weights so that every weight changes the captions
    (BLIP's own init leaves the image features almost constant, which would hide a wrong vision mapping)."""
    tokenizer = blip_tokenizer()
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "encoder_hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 64,
            "bos_token_id": tokenizer.bos_token_id, "pad_token_id": 0, "sep_token_id": 102, "eos_token_id": 102}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": image_size, "patch_size": 32}
    torch.manual_seed(image_size)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()
    spread_weights(model)
    return model


def blip_original_state_dict(model: BlipForConditionalGeneration) -> dict[str, torch.Tensor]:
    """``model``'s weights as salesforce/BLIP's BLIP_Pretrain names them (models/vit.py, models/med.py), with the
    pretraining-only entries such a checkpoint also holds."""
    vm = model.vision_model
    sd = {
        "visual_encoder.cls_token": vm.embeddings.class_embedding,
        "visual_encoder.pos_embed": vm.embeddings.position_embedding,
        "visual_encoder.patch_embed.proj.weight": vm.embeddings.patch_embedding.weight,
        "visual_encoder.patch_embed.proj.bias": vm.embeddings.patch_embedding.bias,
        "visual_encoder.norm.weight": vm.post_layernorm.weight,
        "visual_encoder.norm.bias": vm.post_layernorm.bias,
    }
    for i, block in enumerate(vm.encoder.layers):
        for name, module in (("norm1", block.layer_norm1), ("attn.qkv", block.self_attn.qkv),
                             ("attn.proj", block.self_attn.projection), ("norm2", block.layer_norm2),
                             ("mlp.fc1", block.mlp.fc1), ("mlp.fc2", block.mlp.fc2)):
            sd[f"visual_encoder.blocks.{i}.{name}.weight"] = module.weight
            sd[f"visual_encoder.blocks.{i}.{name}.bias"] = module.bias
    sd.update({f"text_decoder.{k}": v for k, v in model.text_decoder.state_dict().items()})
    positions = model.config.text_config.max_position_embeddings
    sd["text_decoder.bert.embeddings.position_ids"] = torch.arange(positions).expand(1, -1)  # a buffer in med.py
    # pretraining-only: ITC/ITM text encoder, momentum encoders, projections, queues, temperature
    sd.update({f"text_encoder.{k}": torch.randn_like(v.float()) for k, v in model.text_decoder.bert.state_dict().items()})
    sd.update({k.replace("visual_encoder.", "visual_encoder_m.", 1): torch.randn_like(v) for k, v in list(sd.items())
               if k.startswith("visual_encoder.")})
    sd.update({"vision_proj.weight": torch.randn(16, 32), "text_proj.weight": torch.randn(16, 32),
               "itm_head.weight": torch.randn(2, 32), "itm_head.bias": torch.randn(2),
               "image_queue": torch.randn(16, 57), "text_queue": torch.randn(16, 57),
               "queue_ptr": torch.zeros(1, dtype=torch.long), "temp": torch.tensor(0.07)})
    return {k: v.detach().clone() for k, v in sd.items()}


def write_checkpoint(directory: pathlib.Path, model: BlipForConditionalGeneration, *, config: bool = True
                     ) -> pathlib.Path:
    """The checkpoint file as BLIP's pretrain.py saves it, with the tiny architecture's config.json beside it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model_tiny.pth"
    torch.save({"model": blip_original_state_dict(model), "config": {"image_size": 224, "vit": "base"}, "epoch": 19},
               path)
    if config:
        model.config.save_pretrained(directory)
    return path


def _pair(root: pathlib.Path, image_size: int):
    model = tiny_blip(image_size)
    model.save_pretrained(root / "hf")
    blip_tokenizer().save_pretrained(root / "hf")
    return model, root / "hf", write_checkpoint(root / "pth", model)


@pytest.fixture(scope="module", params=[224, 384], ids=["same-grid", "interpolated"])
def pair(request, tmp_path_factory):
    """(source model, HF-format directory, .pth) for a tiny BLIP trained at ``param`` px, captioning at 224."""
    return _pair(tmp_path_factory.mktemp(f"blip{request.param}"), request.param)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The same for a tiny BLIP trained at 384 px, where one case is enough."""
    return _pair(tmp_path_factory.mktemp("tiny"), 384)


@pytest.mark.parametrize("fast_decode", [True, False], ids=["fast-decoder", "generate"])
def test_pth_captions_equal_the_hf_format_model(pair, fast_decode):
    _, hf_dir, pth = pair
    settings = Settings(fast_decode=fast_decode)
    pixels = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    expected = BlipCaptioner(str(hf_dir), CPU, settings).caption(pixels, seed=7)
    assert BlipCaptioner(str(pth), CPU, settings).caption(pixels, seed=7) == expected
    assert len({c for captions in expected for c in captions}) > 3  # real, varied captions were compared


def test_every_weight_arrives_and_positions_are_interpolated_as_blip_does(pair):
    source, _, pth = pair
    loaded, _ = BlipCheckpointLoader(224).load(str(pth), torch.float32)
    position = "vision_model.embeddings.position_embedding"
    got = loaded.state_dict()
    for key, value in source.state_dict().items():
        if key != position:
            assert torch.equal(got[key], value), key
    embeddings = source.vision_model.embeddings
    if embeddings.position_embedding.shape[1] == 50:  # trained at 224: used as it is
        assert torch.equal(got[position], embeddings.position_embedding)
    else:  # trained at 384 (12x12 patches), fed 224 (7x7): class position kept, the grid resized bicubically
        expected = embeddings.interpolate_pos_encoding(torch.zeros(1, 50, 32), 224, 224)
        assert got[position].shape == (1, 50, 32) and torch.equal(got[position], expected)
        assert torch.equal(got[position][:, 0], embeddings.position_embedding[:, 0])
    assert loaded.config.vision_config.image_size == 224


def test_pretraining_entries_are_ignored_and_listed(tiny, caplog):
    caplog.set_level("INFO", logger="sieve_tasks.blip_checkpoint")
    BlipCheckpointLoader(224).load(str(tiny[2]), torch.float32)
    listed = next(r.getMessage() for r in caplog.records if "pretraining-only" in r.getMessage())
    for prefix in ("text_encoder", "visual_encoder_m", "image_queue", "itm_head", "vision_proj", "temp"):
        assert prefix in listed


def test_a_pickle_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    path = tmp_path / "evil.pth"
    torch.save({"model": {"visual_encoder.cls_token": torch.zeros(1)}, "extra": Payload()}, path)
    with pytest.raises(CheckpointError) as error:
        BlipCaptioner(str(path), CPU, Settings())
    message = str(error.value)
    assert str(path) in message and "\n" not in message and "weights_only" in message
    assert not marker.exists()


def test_unreadable_and_mismatched_files_are_clear_errors(tmp_path, tiny):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=f"{junk}: not a readable torch checkpoint"):
        read_state_dict(junk)
    state = blip_original_state_dict(tiny[0])
    del state["visual_encoder.norm.weight"]
    broken = tmp_path / "broken" / "model.pth"
    broken.parent.mkdir()
    torch.save({"model": state}, broken)
    tiny[0].config.save_pretrained(broken.parent)
    with pytest.raises(CheckpointError, match="missing: vision_model.post_layernorm.weight"):
        BlipCheckpointLoader(224).load(str(broken), torch.float32)
    with pytest.raises(CheckpointError, match="wrong shape"):  # no config.json beside: BLIP base, 768 wide
        BlipCheckpointLoader(224).load(str(write_checkpoint(tmp_path / "noconfig", tiny[0], config=False)),
                                       torch.float32)


def test_a_bare_state_dict_is_read_and_unknown_vision_entries_are_refused(tmp_path, tiny):
    state = blip_original_state_dict(tiny[0])
    bare = tmp_path / "bare" / "model.pth"
    bare.parent.mkdir()
    torch.save(state, bare)
    assert read_state_dict(bare).keys() == state.keys()
    torch.save({"model": {**state, "visual_encoder.dist_token": torch.zeros(1, 1, 32)}}, bare)
    tiny[0].config.save_pretrained(bare.parent)
    with pytest.raises(CheckpointError, match="ViT does not have: visual_encoder.dist_token"):
        BlipCheckpointLoader(224).load(str(bare), torch.float32)


def test_default_architecture_and_tokenizer_are_blips():
    config = blip_base_config()
    text, vision = config.text_config, config.vision_config
    assert (text.num_attention_heads, text.num_hidden_layers, text.hidden_size, text.vocab_size) == (12, 12, 768, 30524)
    assert (vision.patch_size, vision.hidden_size, vision.num_hidden_layers, vision.layer_norm_eps) == (16, 768, 12, 1e-6)
    tokenizer = blip_tokenizer()
    assert len(tokenizer) == 30524
    assert tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [30522, 30523]
    # token ids of bert-base-uncased, as asserted by transformers' BLIP conversion script
    ids = tokenizer("a picture of a woman sitting on the beach with her dog").input_ids
    assert ids == [101, 1037, 3861, 1997, 1037, 2450, 3564, 2006, 1996, 3509, 2007, 2014, 3899, 102]


def test_caption_fingerprint_includes_the_checkpoint_sha256(tmp_path, tiny):
    pth = tiny[2]
    stage = CaptionStage(str(tmp_path / "run"), Settings(captioner=str(pth)))
    assert stage.stage_settings()["captioner_sha256"] == hashlib.sha256(pth.read_bytes()).hexdigest()
    hf = CaptionStage(str(tmp_path / "run"), Settings())
    assert hf.stage_settings() == Settings().fingerprinted(CAPTION_SETTINGS)  # HF captioners: fingerprints unchanged


def test_presets_name_blips_published_files_without_downloading(monkeypatch):
    monkeypatch.setattr(blip_checkpoint.storage, "download", lambda *a: pytest.fail("downloaded"))
    base = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/"
    assert {name: p.url.removeprefix(base) for name, p in PRESETS.items()} == {
        "blip-base-14m": "model_base_14M.pth", "blip-base-129m": "model_base.pth",
        "blip-base-capfilt-large": "model_base_capfilt_large.pth"}
    assert all(is_blip_checkpoint(name) for name in PRESETS)
    assert Settings(captioner="blip-base-14m").captioner == "blip-base-14m"
    assert not is_blip_checkpoint("Salesforce/blip-image-captioning-base")


class _Server:
    """A static file server on 127.0.0.1 that counts the GETs of each path."""

    def __init__(self, directory: pathlib.Path):
        self.gets: dict[str, int] = {}
        gets = self.gets

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(directory), **kwargs)

            def do_GET(self):
                gets[self.path] = gets.get(self.path, 0) + 1
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def served(tmp_path, tiny):
    """The tiny checkpoint (and its config.json) served over HTTP."""
    served_file = write_checkpoint(tmp_path / "www" / "blip", tiny[0])
    server = _Server(tmp_path / "www")
    yield server, tiny[1], served_file
    server.close()


def test_url_is_downloaded_once_with_its_sha256_recorded(served, monkeypatch, tmp_path):
    server, hf_dir, pth = served
    monkeypatch.setenv("SIEVE_CACHE", str(tmp_path / "cache"))
    url = f"{server.url}/blip/model_tiny.pth"
    sha256 = hashlib.sha256(pth.read_bytes()).hexdigest()
    first = fetch_checkpoint(url)
    assert first.sha256 == sha256
    assert first.path.with_name("model_tiny.pth.sha256").read_text() == f"{sha256}  model_tiny.pth\n"
    assert (first.path.parent / "config.json").is_file()  # the tiny architecture came along
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    expected = BlipCaptioner(str(hf_dir), CPU, Settings()).caption(pixels, 3)
    assert BlipCaptioner(url, CPU, Settings()).caption(pixels, 3) == expected
    assert fetch_checkpoint(url) == first
    assert server.gets["/blip/model_tiny.pth"] == 1


def test_preset_download_is_verified_against_its_hash(served, monkeypatch, tmp_path):
    server, _, pth = served
    monkeypatch.setenv("SIEVE_CACHE", str(tmp_path / "cache"))
    url = f"{server.url}/blip/model_tiny.pth"
    monkeypatch.setitem(PRESETS, "blip-base-14m", Preset(url, sha256="0" * 64))
    with pytest.raises(CheckpointError, match="does not match the expected 0000"):
        fetch_checkpoint("blip-base-14m")
    assert not list((tmp_path / "cache").rglob("*.pth"))  # nothing kept
    monkeypatch.setitem(PRESETS, "blip-base-14m", Preset(url, size=pth.stat().st_size + 1))
    with pytest.raises(CheckpointError, match="expected"):
        fetch_checkpoint("blip-base-14m")
    sha256 = hashlib.sha256(pth.read_bytes()).hexdigest()
    monkeypatch.setitem(PRESETS, "blip-base-14m", Preset(url, sha256=sha256, size=pth.stat().st_size))
    assert fetch_checkpoint("blip-base-14m").sha256 == sha256


@pytest.mark.slow
def test_s3_checkpoint_runs_the_pipeline(s3_server, tiny, sample_pool, tmp_path, monkeypatch):
    from sieve_tasks import storage
    from sieve_tasks.cli import main

    monkeypatch.setenv("SIEVE_CACHE", str(tmp_path / "cache"))
    fs, _ = storage.filesystem("s3://sieve-test/")
    pth = tiny[2]
    fs.put_file(str(pth), "sieve-test/checkpoints/model_tiny.pth")
    fs.put_file(str(pth.parent / "config.json"), "sieve-test/checkpoints/config.json")
    run = tmp_path / "run"
    uri = "s3://sieve-test/checkpoints/model_tiny.pth"
    assert main(["run", sample_pool, str(run), "--captioner", uri, "--clip", "none", "--no-progress"]) == 0
    summary = json.loads((run / "manifest" / "summary.json").read_text())
    sha256 = hashlib.sha256(pth.read_bytes()).hexdigest()
    assert summary["models"]["captioner"] == uri and summary["models"]["captioner_sha256"] == sha256
    assert summary["counts"]["scored"] == 16
    marker = json.loads((run / "captions" / "_done" / "00000000.json").read_text())
    assert marker["settings"]["captioner_sha256"] == sha256
