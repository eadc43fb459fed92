"""A shard's samples read in a process of its own: Python's ``tarfile`` parses every member header in Python
(~170 µs a sample), and PIL each image's header (~40 µs), which on a GPU run would hold the interpreter lock of the
process that feeds the accelerator.

The reader is ``python -m sieve_tasks.tar_reader`` (a plain subprocess: it imports only the shard reader, whatever
the parent's main module is). It gets the shard and the storage options on stdin and writes pickled chunks of
:class:`~sieve_tasks.shards.Sample` to stdout, then ``None`` — or the error it met; the pipe bounds how far it reads
ahead.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Iterator

from sieve_tasks import storage
from sieve_tasks.shards import Sample, Shard, read_samples

SAMPLES_PER_MESSAGE = 64


def samples_in_process(shard: Shard, max_pixels: int | None = None) -> Iterator[Sample]:
    """:func:`~sieve_tasks.shards.read_samples` of ``shard`` (image headers checked too, with ``max_pixels``), read
    by a reader process. A read error is raised here,
    a reader that dies is an error too; closing the generator stops the reader."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryFile() as errors:
        reader = subprocess.Popen([sys.executable, "-m", "sieve_tasks.tar_reader"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=errors, env=env)
        try:
            with reader.stdin:
                pickle.dump((shard, max_pixels, storage.options_snapshot()), reader.stdin)
            while True:
                try:
                    message = pickle.load(reader.stdout)
                except EOFError:
                    reader.wait()
                    errors.seek(0)
                    detail = errors.read().decode(errors="replace").strip().splitlines()[-1:]
                    raise RuntimeError(f"the reader of {shard.tar_uri} ended without finishing the shard (exit code "
                                       f"{reader.returncode}){': ' + detail[0] if detail else ''}") from None
                if message is None:
                    return
                if isinstance(message, BaseException):
                    raise message
                yield from message
        finally:
            if reader.poll() is None:
                reader.kill()
            reader.wait()
            reader.stdout.close()


def main() -> None:
    shard, max_pixels, options = pickle.load(sys.stdin.buffer)
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")  # the samples' channel: anything printed goes to stderr
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        with storage.restored_options(options):
            chunk: list[Sample] = []
            for sample in read_samples(shard, max_pixels):
                chunk.append(sample)
                if len(chunk) == SAMPLES_PER_MESSAGE:
                    pickle.dump(chunk, out, protocol=pickle.HIGHEST_PROTOCOL)
                    chunk = []
            if chunk:
                pickle.dump(chunk, out, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.dump(None, out)
    except BrokenPipeError:  # the consumer stopped reading
        return
    except Exception as exc:
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:
            exc = RuntimeError(f"{type(exc).__name__}: {exc}")
        pickle.dump(exc, out)
    out.flush()


if __name__ == "__main__":
    main()
