"""A shard's samples read in a process of its own: Python's ``tarfile`` parses every member header in Python
(~170 µs a sample), and PIL each image's header (~40 µs), which on a GPU run would hold the interpreter lock of the
process that feeds the accelerator.

The reader is ``python -m sieve_tasks.tar_reader FD`` (a plain subprocess: it imports only the shard reader,
whatever the parent's main module is). It gets its request (the shard, the pixel limit, the storage options) as JSON
on stdin and writes the samples as an Arrow IPC stream, 64 a record batch, to a pipe of their own (file descriptor FD;
on stdout anything printed as it starts would corrupt them); the pipe bounds how far it reads ahead. An error ends
it with exit status 1 and the error as JSON on the last line of stderr; a stream that breaks off is an error
whatever the exit status. Nothing is pickled. A reader costs ~0.5 s to start (imports; pyarrow's first conversion
imports pandas): while the caption stage runs on CUDA, one is kept started ahead of need (:func:`keep_spare_reader`),
waiting for its request — the first one while the models load, each next one while a shard is read (a short shard
takes less than a reader's start).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import pyarrow as pa

from sieve_tasks import storage
from sieve_tasks.shards import Sample, Shard, read_samples

SAMPLES_PER_BATCH = 64
PIPE_BUFFER = 1 << 20  # bytes read from the reader at a time
ERROR_PREFIX = "tar-reader-error: "
SAMPLE_SCHEMA = pa.schema([  # Sample's fields, in order
    ("shard", pa.string()), ("position", pa.int64()), ("key", pa.string()), ("uid", pa.string()),
    ("text", pa.string()), ("url", pa.string()), ("meta", pa.string()), ("image", pa.large_binary()),
    ("reason", pa.string()), ("text_truncated", pa.bool_()), ("width", pa.int64()), ("height", pa.int64()),
])  # meta as JSON text
# errors the reader's caller may handle by type (a missing shard, a storage failure); any other is a RuntimeError
RAISED_AS = {error.__name__: error for error in (FileNotFoundError, PermissionError, storage.StorageError, OSError)}


@dataclass
class Reader:
    """A reader process and its files."""

    process: subprocess.Popen
    samples: IO[bytes]  # the read end of the samples' pipe
    errors: IO[bytes]  # the file that takes the process's stdout and stderr

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for file in (self.process.stdin, self.samples, self.errors):
            if file is not None:
                file.close()


_spare: list[Reader] = []  # at most one reader started ahead of need, waiting for its request
_keeping = False  # whether a taken spare is replaced at once
_spare_lock = threading.Lock()


def keep_spare_reader() -> None:
    """From now on (until :func:`stop_spare_reader`) keep one reader process started ahead of need: each
    :func:`samples_in_process` takes it, its start-up (~0.5 s: imports, warm-up) done, and starts the next one."""
    global _keeping
    with _spare_lock:
        _keeping = True
        if not _spare:
            _spare.append(_spawn())


def stop_spare_reader() -> None:
    """Stop keeping a spare reader, and stop the one waiting."""
    global _keeping
    with _spare_lock:
        _keeping = False
        while _spare:
            _spare.pop().stop()


def samples_in_process(shard: Shard, max_pixels: int | None = None) -> Iterator[Sample]:
    """:func:`~sieve_tasks.shards.read_samples` of ``shard`` (image headers checked too, with ``max_pixels``), read
    by a reader process (the spare one, if started and alive). A read error is raised here, a reader that dies is
    an error too; closing the generator stops the reader."""
    try:
        request = json.dumps({"shard": dataclasses.asdict(shard), "max_pixels": max_pixels,
                              "storage_options": storage.options_snapshot()})
    except TypeError as exc:
        raise TypeError(f"storage options must be JSON values to reach the tar reader process ({exc})") from None
    reader = _taken_spare() or _spawn()
    try:
        with reader.process.stdin:
            reader.process.stdin.write(request.encode())
        broken = None
        try:
            for batch in pa.ipc.open_stream(reader.samples):
                columns = batch.to_pydict()
                columns["meta"] = [json.loads(meta) for meta in columns["meta"]]
                for values in zip(*(columns[name] for name in SAMPLE_SCHEMA.names)):
                    yield Sample(*values)
        except pa.ArrowInvalid as exc:  # the stream broke off: the reader's exit status may say why
            broken = exc
        if reader.process.wait() != 0:
            raise _reader_error(shard, reader.process.returncode, reader.errors)
        if broken is not None:
            raise RuntimeError(f"the samples of {shard.tar_uri} came from the reader broken off ({broken})")
    finally:
        reader.stop()


def _spawn() -> Reader:
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    errors = tempfile.TemporaryFile()
    samples, samples_out = os.pipe()
    try:
        process = subprocess.Popen([sys.executable, "-m", "sieve_tasks.tar_reader", str(samples_out)],
                                   stdin=subprocess.PIPE, stdout=errors, stderr=errors, env=env,
                                   pass_fds=(samples_out,))
    except BaseException:
        os.close(samples)
        errors.close()
        raise
    finally:
        os.close(samples_out)
    return Reader(process, os.fdopen(samples, "rb", buffering=PIPE_BUFFER), errors)


def _taken_spare() -> Reader | None:
    with _spare_lock:
        if not _spare:
            return None
        reader = _spare.pop()
        if _keeping:  # the next read's reader starts now
            _spare.append(_spawn())
    if reader.process.poll() is None:
        return reader
    reader.stop()  # it died waiting: a fresh one is started instead
    return None


def _reader_error(shard: Shard, status: int, errors) -> Exception:
    errors.seek(0)
    lines = errors.read().decode(errors="replace").strip().splitlines()
    last = lines[-1] if lines else ""
    if last.startswith(ERROR_PREFIX):
        error = json.loads(last[len(ERROR_PREFIX):])
        kind = RAISED_AS.get(error["type"])
        return kind(error["message"]) if kind else RuntimeError(f"{error['type']}: {error['message']}")
    return RuntimeError(f"the reader of {shard.tar_uri} ended without finishing the shard (exit code {status})"
                        + (f": {last}" if last else ""))


def _batch(samples: list[Sample]) -> pa.RecordBatch:
    columns = {name: [getattr(sample, name) for sample in samples] for name in SAMPLE_SCHEMA.names}
    columns["meta"] = [json.dumps(meta) for meta in columns["meta"]]
    return pa.RecordBatch.from_pydict(columns, SAMPLE_SCHEMA)


def main() -> int:
    _batch([])  # pyarrow's first conversion from Python objects imports pandas (~0.3 s): before the request comes
    text = sys.stdin.read()
    if not text:  # a spare reader whose caller ended without a request
        return 0
    request = json.loads(text)
    out = os.fdopen(int(sys.argv[1]), "wb")  # the samples' own pipe
    try:
        with storage.restored_options(request["storage_options"]), pa.ipc.new_stream(out, SAMPLE_SCHEMA) as stream:
            chunk: list[Sample] = []
            for sample in read_samples(Shard(**request["shard"]), request["max_pixels"]):
                chunk.append(sample)
                if len(chunk) == SAMPLES_PER_BATCH:
                    stream.write_batch(_batch(chunk))
                    chunk = []
            if chunk:
                stream.write_batch(_batch(chunk))
        out.close()
    except BrokenPipeError:  # the consumer stopped reading
        return 0
    except Exception as exc:
        print(ERROR_PREFIX + json.dumps({"type": type(exc).__name__, "message": str(exc)}), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
