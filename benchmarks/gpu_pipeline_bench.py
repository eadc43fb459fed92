"""End-to-end pipeline benchmark for a GPU machine (runs on CPU too, at small sizes, as a dry run).

    PYTHONPATH=. python benchmarks/gpu_pipeline_bench.py [--samples 8192 --shards 16] [--minilm DIR] [--out FILE]
    PYTHONPATH=. python benchmarks/gpu_pipeline_bench.py --tiny --out summary.json        # CPU / CI dry run, < 60 s
    PYTHONPATH=. python benchmarks/gpu_pipeline_bench.py --copy-minilm-config DEST      # files to carry, no weights

On a GPU machine without the packaged MiniLM: copy its small files here first (``--copy-minilm-config .minilm``), carry
them, and pass ``--minilm .minilm``; ``--stage-args`` passes further sieve options (e.g. ``--decode-workers 12``).

Builds everything locally (no network): distinct JPEGs of at most 512 px cut from scikit-image's bundled photos
(random crops, scales, flips, colour jitter) in DataComp/img2dataset shards (``NNNNNNNN.tar`` + sidecar parquet),
and random-weight models of full size: BLIP base (``BlipConfig()``, BERT tokenizer + [DEC]), open_clip ViT-B-32 and
all-MiniLM-L6-v2 (its tokenizer and configs from ``--minilm``, random ``BertModel`` weights). Random weights almost
never emit [SEP], so every caption runs to max_length: captioning's worst case. ``--tiny`` builds tiny models of the
same kinds, so the same code path runs. Drives the pipeline through ``sieve_tasks.cli.main``: ``sieve run`` end to end
(each stage's own seconds from its completion markers), then the caption task alone in a fresh run directory, while a
thread samples the GPU's utilisation (``nvidia-smi``); then times ``FastBlipDecoder.generate`` alone on random pixels
at the caption batch size the run chose. Prints one summary block and writes it as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MAX_SIDE = 512
# scikit-image's photos that ship inside its wheel (no download), and what they show
PHOTOS = {
    "astronaut": "an astronaut in a white space suit", "coffee": "a cup of coffee on a saucer",
    "chelsea": "a ginger tabby cat", "rocket": "a rocket on the launch pad",
    "immunohistochemistry": "a stained tissue sample under a microscope",
    "hubble_deep_field": "galaxies in the night sky", "stereo_motorcycle": "a red motorcycle in a studio",
    "retina": "a photograph of a human retina", "camera": "a man with a camera on a tripod",
    "coins": "old coins on a table", "moon": "the surface of the moon", "clock": "a clock on a wall",
    "brick": "a brick wall", "grass": "a patch of grass", "gravel": "a gravel path",
    "cell": "a cell under a microscope",
}
TEMPLATES = ["{}", "Photo of {}", "Close-up of {} in natural light", "{} - stock image", "Vintage picture of {}",
             "{}, high resolution wallpaper", "Beautiful view of {}", "My photo of {} from last summer"]
UNRELATED = ["Buy cheap shoes online free shipping", "Best mortgage rates this year, click here",
             "Download the PDF user manual", "IMG_{n}.JPG", "Wedding dress with lace sleeves",
             "A family dinner at the beach at sunset", "stock photo image {n}", "Un gato durmiendo en el sofá"]
# all-MiniLM-L6-v2's small files: tokenizer, configs, sentence-transformers modules (no weights)
MINILM_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                "1_Pooling/config.json")
_T0 = time.perf_counter()
_sources: dict[str, np.ndarray] = {}


def log(message: str) -> None:
    """Print with the elapsed time, flushed, so a cut-off run still tells where it got."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {message}", flush=True)


# ---------------------------------------------------------------- photos and shards

def _load_sources() -> dict[str, np.ndarray]:
    """The bundled photos as RGB uint8 arrays, loaded once per process (missing ones skipped)."""
    if not _sources:
        import skimage.data

        for name in PHOTOS:
            try:
                image = getattr(skimage.data, name)()
            except (AttributeError, OSError, ImportError, ValueError):
                continue
            image = image[0] if isinstance(image, tuple) else image  # stereo pairs: the left view
            _sources[name] = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
    return _sources


def _variant(image: np.ndarray, rng: np.random.Generator) -> tuple[bytes, int, int]:
    """A distinct JPEG (q90, longer side 384-512 px) from a random crop, flip and colour jitter of ``image``."""
    from PIL import Image

    h, w = image.shape[:2]
    ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = image[y : y + ch, x : x + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    jitter = crop.astype(np.float32) * rng.uniform(0.9, 1.1, size=3) + rng.uniform(-12, 12)
    picture = Image.fromarray(np.clip(jitter, 0, 255).astype(np.uint8))
    scale = int(rng.integers(384, MAX_SIDE + 1)) / max(ch, cw)
    picture = picture.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue(), picture.width, picture.height


def _alt_text(subject: str, rng: np.random.Generator, number: int) -> str:
    """Mostly an alt-text about the photo, a quarter of the time an unrelated one."""
    pool = UNRELATED if rng.random() < 0.25 else TEMPLATES
    return pool[int(rng.integers(len(pool)))].format(subject, n=number)


def write_shard(out: str, shard: int, count: int, seed: int) -> int:
    """Write ``NNNNNNNN.tar`` ({key}.jpg/.txt/.json) and its img2dataset parquet; return the JPEG bytes written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sources = _load_sources()
    names = sorted(sources)
    rng = np.random.default_rng([seed, shard])
    records, total, buffer = [], 0, io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for index in range(count):
            name = names[int(rng.integers(len(names)))]
            jpeg, width, height = _variant(sources[name], rng)
            key = f"{shard:05d}{index:04d}"
            url = f"https://example.com/sieve-bench/{key}.jpg"
            text = _alt_text(PHOTOS[name], rng, shard * count + index)
            record = {"uid": hashlib.md5(url.encode()).hexdigest(), "key": key, "url": url, "caption": text,
                      "status": "success", "error_message": None, "width": width, "height": height,
                      "original_width": width, "original_height": height,
                      "sha256": hashlib.sha256(jpeg).hexdigest()}
            for ext, payload in (("jpg", jpeg), ("txt", text.encode()), ("json", json.dumps(record).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            records.append(record)
            total += len(jpeg)
    Path(out, f"{shard:08d}.tar").write_bytes(buffer.getvalue())
    pq.write_table(pa.Table.from_pylist(records), Path(out, f"{shard:08d}.parquet"))
    return total


def start_pool_build(pool: ProcessPoolExecutor, out: Path, samples: int, shards: int, seed: int) -> list[Future]:
    """Submit one job per shard (the samples spread evenly); the caller builds models meanwhile."""
    out.mkdir(parents=True)
    sizes = [samples // shards + (1 if s < samples % shards else 0) for s in range(shards)]
    return [pool.submit(write_shard, str(out), s, n, seed) for s, n in enumerate(sizes)]


# ---------------------------------------------------------------- models

def default_minilm_dir() -> str | None:
    """The packaged all-MiniLM-L6-v2 directory, when that package is installed."""
    from sieve_tasks.models import DEFAULT_TEXT_ENCODER, materialize

    path = materialize(DEFAULT_TEXT_ENCODER)
    return path if os.path.isdir(path) else None


def copy_minilm_config(source: str, dest: str) -> None:
    """Copy all-MiniLM-L6-v2's tokenizer and config files (no weights) from ``source`` to ``dest``."""
    for name in MINILM_FILES:
        target = Path(dest, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(source, name), target)


def build_blip(directory: Path, minilm: str, tiny: bool) -> None:
    """BLIP base (``BlipConfig()``) or a tiny BLIP, random weights, with BLIP's BERT tokenizer ([DEC] as bos)."""
    import torch
    from transformers import BertTokenizerFast, BlipConfig, BlipForConditionalGeneration

    tokenizer = BertTokenizerFast.from_pretrained(minilm)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    if tiny:
        text = {"vocab_size": len(tokenizer), "hidden_size": 32, "encoder_hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 64,
                "bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id,
                "sep_token_id": tokenizer.sep_token_id, "eos_token_id": tokenizer.sep_token_id}
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "image_size": 384, "patch_size": 32}
        config = BlipConfig(text_config=text, vision_config=vision, projection_dim=32)
    else:
        config = BlipConfig()
        if config.text_config.bos_token_id != tokenizer.bos_token_id:
            raise RuntimeError(f"[DEC] is token {tokenizer.bos_token_id}, BlipConfig() expects "
                               f"{config.text_config.bos_token_id}: not BERT's uncased vocabulary in {minilm}?")
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def build_clip(directory: Path, tiny: bool) -> None:
    """open_clip ViT-B-32 (or a tiny CLIP) with random weights as a local dir for ``--clip DIR``. Leaves
    ``TOKENIZERS_PARALLELISM`` as it was: open_clip's import turns the tokenizers library's threads off for the whole
    process, and the text process ``sieve run`` spawns here later would inherit that (a real ``sieve run`` spawns it
    before CLIP is imported), tokenising its shards on one thread."""
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    try:
        import open_clip
    finally:
        if parallelism is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallelism
    import torch
    from safetensors.torch import save_file

    if tiny:
        model_cfg = {"embed_dim": 32,
                     "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
                     "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    else:
        model_cfg = open_clip.get_model_config("ViT-B-32")
    directory.mkdir(parents=True)
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{directory}", load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(directory / "open_clip_model.safetensors"))


def build_minilm(directory: Path, minilm: str, tiny: bool) -> None:
    """A sentence-transformers dir: MiniLM's tokenizer and configs, random ``BertModel`` weights (tiny: 2x32)."""
    import torch
    from transformers import BertConfig, BertModel

    copy_minilm_config(minilm, str(directory))
    config = BertConfig.from_pretrained(minilm)
    if tiny:
        config.update({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2})
    pooling = directory / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps({**json.loads(pooling.read_text()), "word_embedding_dimension": config.hidden_size}))
    torch.manual_seed(0)
    BertModel(config).eval().save_pretrained(directory)


# ---------------------------------------------------------------- GPU utilisation

class GpuMonitor:
    """Samples ``nvidia-smi``'s utilization.gpu of one GPU every 500 ms in a background thread."""

    def __init__(self, gpu_id: str):
        self.samples: list[tuple[float, float]] = []
        self.process = subprocess.Popen(
            ["nvidia-smi", "-i", gpu_id, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "500"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with contextlib.suppress(ValueError):
                self.samples.append((time.perf_counter(), float(line.strip())))

    def mean(self, start: float, end: float) -> float | None:
        """Mean utilisation (%) of the samples taken in [start, end], None without any."""
        values = [v for t, v in self.samples if start <= t <= end]
        return round(sum(values) / len(values), 1) if values else None

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()
        self.thread.join()
        error = self.process.stderr.read().strip()
        if not self.samples and error:
            log(f"nvidia-smi gave no samples: {error}")


def gpu_monitor(device: str) -> GpuMonitor | None:
    """A monitor of the CUDA device ``device`` (nvidia-smi addresses it by UUID), None without one."""
    import torch

    if not device.startswith("cuda") or shutil.which("nvidia-smi") is None:
        return None
    return GpuMonitor(f"GPU-{torch.cuda.get_device_properties(torch.device(device)).uuid}")


# ---------------------------------------------------------------- pipeline and decoder

def run_cli(argv: list[str]) -> None:
    from sieve_tasks.cli import main as sieve

    log(f"sieve {shlex.join(argv)}")
    with contextlib.redirect_stdout(io.StringIO()) as output:  # per-shard lines; the figures come from files
        status = sieve(argv)
    if status != 0:
        print(output.getvalue(), flush=True)
        raise RuntimeError(f"sieve {argv[0]} exited with status {status}")


def markers(run: Path, output: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((run / output / "_done").glob("*.json"))]


@contextlib.contextmanager
def caption_timeline() -> Iterator[dict[str, float]]:
    """While inside: the times of the first BLIP launch (``first_launch``) and of the last shard the caption stage
    handed on (``captioned``), to tell a run's fixed costs (imports, model loading, process starts, publishing)
    from what its device pipeline sustains."""
    from unittest import mock

    from sieve_tasks import runner
    from sieve_tasks.captioner import BlipCaptioner

    times: dict[str, float] = {}
    launch, caption_shards = BlipCaptioner.launch, runner.caption_shards

    def timed_launch(captioner: BlipCaptioner, *args: Any, **kwargs: Any) -> Any:
        times.setdefault("first_launch", time.perf_counter())
        return launch(captioner, *args, **kwargs)

    def timed_shards(*args: Any, **kwargs: Any) -> Iterator[Any]:
        for captioned in caption_shards(*args, **kwargs):
            times["captioned"] = time.perf_counter()
            yield captioned

    with mock.patch.object(BlipCaptioner, "launch", timed_launch), \
            mock.patch.object(runner, "caption_shards", timed_shards):
        yield times


def run_pipeline(pool: Path, run: Path, model_args: list[str], monitor: GpuMonitor | None) -> dict[str, Any]:
    """``sieve run`` end to end (the caption stage beside the text side of the shards before), then what each stage
    spent: its own seconds from its completion markers (the stages overlap, so they add up to more than the wall
    time); and the run's phases: until the first BLIP launch, captioning, after captioning (the last shards' text
    side, aggregate, publish)."""
    start = time.perf_counter()
    with caption_timeline() as times:
        run_cli(["run", str(pool), str(run), *model_args, "--score", "fused", "--no-progress"])
    end = time.perf_counter()
    summary = json.loads((run / "manifest" / "summary.json").read_text())
    stages, done_by_output = {}, {}
    for stage, output in (("caption", "captions"), ("embed", "embeddings"), ("score", "scores")):
        done = done_by_output[output] = markers(run, output)
        seconds, rows = sum(m["seconds"] for m in done), sum(m["rows"] for m in done)
        stages[stage] = {"seconds": round(seconds, 2), "rows": rows, "rows_per_s": round(rows / seconds, 2)}
    rows, seconds = summary["counts"]["read"], summary["timings_seconds"]["aggregate"]
    stages["aggregate"] = {"seconds": seconds, "rows": rows, "rows_per_s": round(rows / seconds, 2)}
    launched, captioned = times.get("first_launch", end), times.get("captioned", end)
    phases = {"first_launch_after_s": round(launched - start, 2), "captioning_s": round(captioned - launched, 2),
              "captioning_samples_per_s": round(rows / max(captioned - launched, 1e-9), 2),
              "gpu_busy_captioning_pct": monitor.mean(launched, captioned) if monitor else None,
              "after_captioning_s": round(end - captioned, 2)}
    log(f"sieve run: {rows} samples in {end - start:.1f}s = {rows / (end - start):.1f} samples/s, "
        f"GPU busy {_pct(monitor.mean(start, end) if monitor else None, monitor)}; first BLIP launch after "
        f"{phases['first_launch_after_s']:.1f}s, captioning {phases['captioning_s']:.1f}s "
        f"({phases['captioning_samples_per_s']:.1f} samples/s, GPU busy "
        f"{_pct(phases['gpu_busy_captioning_pct'], monitor)}), then {phases['after_captioning_s']:.1f}s to the end")
    return {"seconds": round(end - start, 2), "samples": rows, "samples_per_s": round(rows / (end - start), 2),
            "gpu_busy_pct": monitor.mean(start, end) if monitor else None, "phases": phases, "stages": stages,
            "caption_batch_size": done_by_output["captions"][0]["caption_batch_size"],
            "gpu_decode_refused": sum(m["gpu_decode_refused"] for m in done_by_output["captions"]),
            "health": summary["health"]["verdict"], "kept": summary["counts"]["kept"]}


def caption_alone(pool: Path, run: Path, model_args: list[str], monitor: GpuMonitor | None) -> dict[str, Any]:
    """The caption task by itself (``sieve caption``, a fresh run): its rows/s and how busy it keeps the GPU, over
    the whole task and from its first BLIP launch on (the models' loading and warm-up left out: at the target rate
    8,192 samples are ~4 s of work, as long as the loading)."""
    start = time.perf_counter()
    with caption_timeline() as times:
        run_cli(["caption", str(pool), str(run), *model_args])
    end = time.perf_counter()
    rows = sum(m["rows"] for m in markers(run, "captions"))
    launched = times.get("first_launch", end)
    result = {"seconds": round(end - start, 2), "rows": rows, "rows_per_s": round(rows / (end - start), 2),
              "gpu_busy_pct": monitor.mean(start, end) if monitor else None,
              "first_launch_after_s": round(launched - start, 2),
              "gpu_busy_from_first_launch_pct": monitor.mean(launched, end) if monitor else None}
    log(f"caption task alone: {rows} rows in {end - start:.1f}s = {rows / (end - start):.1f} rows/s, "
        f"GPU busy {_pct(result['gpu_busy_pct'], monitor)}; first BLIP launch after {launched - start:.1f}s, "
        f"GPU busy from then on {_pct(result['gpu_busy_from_first_launch_pct'], monitor)}")
    return result


# what the caption process of a `sieve run` imports before its first BLIP launch (CLIP on)
# (transformers' model modules are lazy: the BLIP classes load with modeling_blip)
CAPTION_PROCESS_IMPORTS = ("sieve_tasks.cli", "sieve_tasks.runner", "sieve_tasks.stages.caption",
                           "sieve_tasks.captioner", "sieve_tasks.encoders", "transformers.models.blip.modeling_blip",
                           "transformers.models.auto.tokenization_auto", "open_clip")


def cold_imports() -> float | None:
    """Seconds a fresh process takes to import :data:`CAPTION_PROCESS_IMPORTS` (the second of two tries: files in
    the page cache), None (with its error printed) if it fails. This process imported them while building the
    models, so the end-to-end time of :func:`run_pipeline` leaves them out; a `sieve run` started from a shell, or a
    caption pod, pays them first."""
    code = (f"import importlib, time; t = time.perf_counter(); "
            f"[importlib.import_module(m) for m in {CAPTION_PROCESS_IMPORTS!r}]; print(time.perf_counter() - t)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if done.returncode:
            log(f"imports of a caption process failed:\n{done.stderr[-2000:]}")
            return None
    seconds = round(float(done.stdout.strip().splitlines()[-1]), 2)
    log(f"imports of a caption process, fresh: {seconds} s")
    return seconds


def decoder_alone(blip: Path, device: str, dtype: str, batch: int, batches: int,
                  monitor: GpuMonitor | None) -> dict[str, Any]:
    """images/s of ``FastBlipDecoder.generate`` on random 224 px pixels with SIEVE's settings, after one warm-up."""
    import torch
    from transformers import AutoTokenizer, BlipForConditionalGeneration

    from sieve_tasks.fast_blip import DecodeConfig, FastBlipDecoder
    from sieve_tasks.settings import Settings

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    model = BlipForConditionalGeneration.from_pretrained(blip, dtype=torch_dtype).eval().to(device)
    settings = Settings()
    prompt = AutoTokenizer.from_pretrained(blip)(settings.prompt, return_tensors="pt").input_ids
    decoder, cfg = FastBlipDecoder(model), DecodeConfig.from_settings(settings)
    pixels = torch.randn(batch, 3, settings.image_size, settings.image_size, generator=torch.Generator().manual_seed(0))
    pixels = pixels.to(device, torch_dtype)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    decoder.generate(pixels, prompt, cfg, seed=0)  # warm-up: allocator, kernels
    sync()
    start = time.perf_counter()
    for i in range(batches):
        decoder.generate(pixels, prompt, cfg, seed=i + 1)
    sync()
    end = time.perf_counter()
    result = {"batch": batch, "batches": batches, "seconds": round(end - start, 2),
              "img_per_s": round(batch * batches / (end - start), 2),
              "gpu_busy_pct": monitor.mean(start, end) if monitor else None}
    log(f"decoder alone: {result['img_per_s']} img/s (batch {batch} x {batches}), "
        f"GPU busy {_pct(result['gpu_busy_pct'], monitor)}")
    return result


# ---------------------------------------------------------------- summary

def _pct(value: float | None, monitor: GpuMonitor | None) -> str:
    if monitor is None:
        return "n/a (no GPU)"
    return "n/a (no sample)" if value is None else f"{value:.1f} %"


def machine() -> dict[str, Any]:
    """CPU, GPU and library versions."""
    import open_clip
    import sentence_transformers
    import torch
    import transformers

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "transformers": transformers.__version__, "open_clip": open_clip.__version__,
            "sentence_transformers": sentence_transformers.__version__}


def print_summary(summary: dict[str, Any], monitor: GpuMonitor | None) -> None:
    """The final block: machine, sizes, per-stage rows/s, end to end, GPU busy, decoder alone."""
    m, e2e, dec = summary["machine"], summary["end_to_end"], summary["decoder_alone"]
    print("\n==== SIEVE pipeline benchmark ====")
    print(f"machine        {m['cpu']}, {m['cpus']} cpus; python {m['python']}")
    print(f"gpu            {m['gpu'] or 'n/a (no GPU)'}")
    print(f"versions       torch {m['torch']}, transformers {m['transformers']}, open_clip {m['open_clip']}, "
          f"sentence-transformers {m['sentence_transformers']}")
    print(f"device         {summary['device']} {summary['dtype']}; models {summary['models']} (random weights)")
    print(f"samples        {summary['samples']} in {summary['shards']} shards, mean JPEG "
          f"{summary['mean_jpeg_kb']} KB, <= {MAX_SIDE} px; built in {summary['build_seconds']} s")
    print(f"caption batch  {summary['caption_batch_size']}; JPEGs the GPU decoder refused (decoded by PIL): "
          f"{summary['gpu_decode_refused']}")
    print(f"{'stage':<12}{'seconds':>9}{'rows':>8}{'rows/s':>11}  (each stage's own time inside sieve run)")
    for stage, r in summary["stages"].items():
        print(f"{stage:<12}{r['seconds']:>9.2f}{r['rows']:>8}{r['rows_per_s']:>11.2f}")
    c = summary["caption_task_alone"]
    print(f"{'caption task':<12}{c['seconds']:>9.2f}{c['rows']:>8}{c['rows_per_s']:>11.2f}  "
          f"{_pct(c['gpu_busy_pct'], monitor)}  (alone, GPU busy; from its first BLIP launch, "
          f"{c['first_launch_after_s']:.1f} s in: {_pct(c['gpu_busy_from_first_launch_pct'], monitor)})")
    print(f"{'end to end':<12}{e2e['seconds']:>9.2f}{e2e['samples']:>8}{e2e['samples_per_s']:>11.2f}  "
          f"{_pct(e2e['gpu_busy_pct'], monitor)}  (samples/s)")
    p = e2e["phases"]
    print(f"  phases     {p['first_launch_after_s']:.2f} s to the first BLIP launch, captioning {p['captioning_s']:.2f} s "
          f"= {p['captioning_samples_per_s']:.2f} samples/s (GPU busy {_pct(p['gpu_busy_captioning_pct'], monitor)}), "
          f"{p['after_captioning_s']:.2f} s after it (last text side, aggregate, publish)")
    imports = summary["cold_imports_s"]
    print(f"  imports    {'failed' if imports is None else f'{imports:.2f} s'} in a fresh process before its first "
          "launch (a `sieve run` from a shell pays them; the end to end above, run in this process, does not)")
    print(f"decoder alone  {dec['img_per_s']} img/s (batch {dec['batch']} x {dec['batches']} batches, "
          f"GPU busy {_pct(dec['gpu_busy_pct'], monitor)})")
    print(f"published      {summary['manifest']} (health {summary['health']}, kept {summary['kept']})", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: 64 samples in 4 shards, tiny models")
    ap.add_argument("--samples", type=int, help="default 8192 (tiny: 64)")
    ap.add_argument("--shards", type=int, help="default 16 (tiny: 4)")
    ap.add_argument("--minilm", help="all-MiniLM-L6-v2 dir (tokenizer + configs; weights not needed); "
                    "default: the packaged copy")
    ap.add_argument("--copy-minilm-config", metavar="DEST", help="only copy MiniLM's small files to DEST and exit")
    ap.add_argument("--caption-batch-size", help="default: auto, the tool's choice (tiny: 8)")
    ap.add_argument("--decoder-batches", type=int, help="timed decoder-alone batches (default 3, tiny 1)")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, ...")
    ap.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto", help="auto: bf16 on CUDA")
    ap.add_argument("--stage-args", default="", help="extra sieve options for caption/embed/score, e.g. "
                    "'--decode-workers 8'")
    ap.add_argument("--workdir", help="where the pool, models and run go (default: a new temporary dir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the summary as JSON here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    minilm = args.minilm or default_minilm_dir()
    if minilm is None:
        raise SystemExit("no all-MiniLM-L6-v2 files: pass --minilm DIR (see --copy-minilm-config)")
    if args.copy_minilm_config:
        copy_minilm_config(minilm, args.copy_minilm_config)
        log(f"copied {len(MINILM_FILES)} files from {minilm} to {args.copy_minilm_config}")
        return 0
    samples = args.samples or (64 if args.tiny else 8192)
    shards = args.shards or (4 if args.tiny else 16)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sieve-gpu-bench-"))
    work = workdir / time.strftime("bench-%Y%m%d-%H%M%S")  # fresh pool, models and run every time
    log(f"building {samples} photos in {shards} shards and the models under {work}")
    with ProcessPoolExecutor(min(shards, os.cpu_count() or 1)) as pool:
        jobs = start_pool_build(pool, work / "pool", samples, shards, args.seed)  # forks before torch is imported
        models = {"captioner": work / "blip", "clip": work / "clip", "text-encoder": work / "minilm"}
        build_blip(models["captioner"], minilm, args.tiny)
        build_clip(models["clip"], args.tiny)
        build_minilm(models["text-encoder"], minilm, args.tiny)
        log("models built (random weights)")
        jpeg_bytes = sum(job.result() for job in jobs)
    build_seconds = round(time.perf_counter() - _T0, 1)
    log(f"photos built: mean {jpeg_bytes / samples / 1e3:.1f} KB per JPEG")

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = ("bf16" if device.startswith("cuda") else "fp32") if args.dtype == "auto" else args.dtype
    batch = args.caption_batch_size or ("8" if args.tiny else "auto")
    model_args = [*(f"--{k}={v}" for k, v in models.items()), f"--device={device}", f"--dtype={dtype}",
                  *([] if batch == "auto" else [f"--caption-batch-size={batch}"]), *shlex.split(args.stage_args)]
    monitor = gpu_monitor(device)
    try:
        pipeline = run_pipeline(work / "pool", work / "run", model_args, monitor)
        caption = caption_alone(work / "pool", work / "caption-only", model_args, monitor)
        decoder = decoder_alone(models["captioner"], device, dtype, pipeline["caption_batch_size"],
                                args.decoder_batches or (1 if args.tiny else 3), monitor)
        imports = cold_imports()
    finally:
        if monitor:
            monitor.stop()
    summary = {
        "machine": machine(), "device": device, "dtype": dtype, "tiny": args.tiny,
        "models": "tiny BLIP / CLIP / MiniLM" if args.tiny else "BLIP base, ViT-B-32, all-MiniLM-L6-v2",
        "samples": samples, "shards": shards, "mean_jpeg_kb": round(jpeg_bytes / samples / 1e3, 1),
        "build_seconds": build_seconds, "caption_batch_size": pipeline["caption_batch_size"],
        "gpu_decode_refused": pipeline["gpu_decode_refused"],
        "stages": pipeline.pop("stages"), "caption_task_alone": caption,
        "end_to_end": {k: pipeline[k] for k in ("seconds", "samples", "samples_per_s", "gpu_busy_pct", "phases")},
        "cold_imports_s": imports,
        "decoder_alone": decoder, "manifest": str(work / "run" / "manifest"),
        "health": pipeline["health"], "kept": pipeline["kept"],
    }
    print_summary(summary, monitor)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
