"""Byte-level corpus and a deterministic, world-size-invariant batch sampler.

The default corpus (``dist_muonclip/support/corpus.txt.gz``) ships with the package: about 3 MB of
CPython standard-library source (PSF license, see ``dist_muonclip/support/CORPUS.md``), rebuilt
reproducibly by :func:`build_stdlib_corpus`. Tokens are raw bytes (vocabulary 256), so no tokenizer
and no download are needed.

The sampler is a pure function of ``(seed, split, step)``: the *global* batch at step ``t`` is the
same for every world size and each rank takes its contiguous slice of rows, so concatenating the
ranks' slices in rank order gives exactly the single-process batch. This is what lets the
distributed tests use a single-process run as their oracle.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
from pathlib import Path

import torch

__all__ = [
    "VOCAB_SIZE",
    "DEFAULT_CORPUS_PATH",
    "STDLIB_CORPUS_FILES",
    "load_corpus",
    "split_corpus",
    "batch_for_step",
    "eval_batches",
    "build_stdlib_corpus",
]

VOCAB_SIZE = 256
DEFAULT_CORPUS_PATH = Path(__file__).resolve().parent / "corpus.txt.gz"
SPLITS = ("train", "eval")

# Files of the CPython 3.11 standard library concatenated (in this order) into the default corpus.
STDLIB_CORPUS_FILES = (
    "argparse.py", "textwrap.py", "dataclasses.py", "functools.py", "inspect.py", "typing.py",
    "difflib.py", "collections/__init__.py", "json/__init__.py", "json/decoder.py",
    "json/encoder.py", "json/scanner.py", "json/tool.py", "logging/__init__.py",
    "logging/config.py", "logging/handlers.py", "email/*.py", "http/*.py", "unittest/*.py",
    "asyncio/*.py", "statistics.py", "fractions.py", "decimal.py", "_pydecimal.py",
    "calendar.py", "csv.py", "string.py", "heapq.py", "bisect.py", "random.py", "shutil.py",
    "pathlib.py", "tempfile.py", "subprocess.py", "threading.py", "queue.py", "contextlib.py",
    "abc.py", "enum.py", "copy.py", "pprint.py", "reprlib.py", "ast.py", "dis.py", "tokenize.py",
    "pdb.py",
)


def build_stdlib_corpus(out_path: str | os.PathLike, *, stdlib_dir: str | os.PathLike | None = None) -> int:
    """Write the default corpus: the files of :data:`STDLIB_CORPUS_FILES` from ``stdlib_dir``.

    Each file is preceded by a ``# ==== <name> ====`` line. The gzip stream has mtime 0 so the
    output bytes depend only on the input files. Returns the number of uncompressed bytes.
    """
    import sysconfig

    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    parts: list[bytes] = []
    for pattern in STDLIB_CORPUS_FILES:
        for path in sorted(root.glob(pattern)):
            parts.append(f"# ==== {path.relative_to(root).as_posix()} ====\n".encode())
            parts.append(path.read_bytes())
    data = b"".join(parts)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(data)
    Path(out_path).write_bytes(buf.getvalue())
    return len(data)


@functools.lru_cache(maxsize=4)
def _load_tokens(path: str) -> torch.Tensor:
    raw = Path(path).read_bytes()
    data = gzip.decompress(raw) if path.endswith(".gz") else raw
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def load_corpus(path: str | os.PathLike | None = None) -> torch.Tensor:
    """The corpus as a 1-D ``torch.uint8`` tensor of byte tokens (cached per path: do not modify it).

    ``path`` may be a ``.gz`` file or plain text/bytes; default: the shipped corpus.
    """
    path = Path(path) if path is not None else DEFAULT_CORPUS_PATH
    if not path.is_file():
        raise ValueError(f"corpus path={str(path)!r} is not a file; pass an existing text file "
                         "(plain or .gz) or leave it unset for the shipped corpus")
    return _load_tokens(str(path.resolve()))


def split_corpus(tokens: torch.Tensor, *, eval_fraction: float = 0.1) -> dict[str, torch.Tensor]:
    """Split the corpus into a ``train`` head and a held-out ``eval`` tail (views, no copy)."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={eval_fraction} must be in (0, 1)")
    cut = int(len(tokens) * (1.0 - eval_fraction))
    return {"train": tokens[:cut], "eval": tokens[cut:]}


def _step_seed(seed: int, split: str, step: int) -> int:
    # A hash rather than seed + step so that neighbouring (seed, step) pairs give unrelated streams.
    digest = hashlib.sha256(f"dist_muonclip:{seed}:{split}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def batch_for_step(
    step: int,
    *,
    global_batch: int,
    seq_len: int,
    rank: int = 0,
    world_size: int = 1,
    split: str = "train",
    seed: int = 0,
    corpus: dict[str, torch.Tensor] | None = None,
    eval_fraction: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of the global batch of step ``step``.

    The global batch is ``global_batch`` windows of ``seq_len + 1`` bytes at offsets drawn
    uniformly from the split with a generator seeded by ``(seed, split, step)``; rank ``r`` gets
    rows ``[r * b, (r + 1) * b)`` with ``b = global_batch // world_size``.

    Returns ``(inputs, targets)``, both int64 ``[global_batch // world_size, seq_len]`` with
    ``targets[:, i] = inputs[:, i + 1]`` in the underlying text (next-byte prediction).
    ``corpus``: output of :func:`split_corpus` (default: the shipped corpus split 90/10).
    """
    for name, value in (("step", step), ("global_batch", global_batch), ("seq_len", seq_len),
                        ("rank", rank), ("world_size", world_size), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if global_batch < 1 or seq_len < 1:
        raise ValueError(f"global_batch={global_batch} and seq_len={seq_len} must be >= 1")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if global_batch % world_size:
        raise ValueError(f"global_batch={global_batch} must be divisible by world_size={world_size}; "
                         "choose a global batch that is a multiple of the number of ranks")
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    if corpus is None:
        corpus = split_corpus(load_corpus(), eval_fraction=eval_fraction)
    tokens = corpus[split]
    num_starts = len(tokens) - seq_len
    if num_starts < 1:
        raise ValueError(f"seq_len={seq_len} is too long for the {split!r} split "
                         f"({len(tokens)} tokens); use a shorter seq_len or a larger corpus")
    gen = torch.Generator().manual_seed(_step_seed(seed, split, step))
    offsets = torch.randint(0, num_starts, (global_batch,), generator=gen)
    local = global_batch // world_size
    offsets = offsets[rank * local:(rank + 1) * local]
    windows = torch.stack([tokens[o:o + seq_len + 1] for o in offsets.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]


def eval_batches(num_batches: int, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed held-out batches used for evaluation: steps ``0 .. num_batches-1`` of ``split="eval"``.

    Keyword arguments are those of :func:`batch_for_step` (except ``step`` and ``split``).
    """
    if num_batches < 1:
        raise ValueError(f"num_batches={num_batches} must be >= 1")
    return [batch_for_step(i, split="eval", **kwargs) for i in range(num_batches)]
