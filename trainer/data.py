"""Training text and the random batch sampler.

The default corpus is a deterministic sample of the Python standard library's own source files,
which exist on every Python installation, so training needs no download.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Folders under the stdlib path that hold third-party or generated files, not stdlib source.
_EXCLUDED_FOLDERS = frozenset({"site-packages", "dist-packages", "__pycache__"})


class DataError(Exception):
    """Training text that cannot be read or is too short. The message names the file."""


@dataclass(frozen=True)
class Corpus:
    """Training text as bytes, with a description of where it came from."""

    text: bytes
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text).hexdigest()


def load_corpus(path: str | None, max_bytes: int, min_bytes: int) -> Corpus:
    """Read at most `max_bytes` of training text from `path`, or from the stdlib if None.

    Raise DataError if the file cannot be read or gives fewer than `min_bytes` bytes.
    """
    if path is None:
        corpus = _read_stdlib_sample(max_bytes)
    else:
        corpus = _read_file(path, max_bytes)
    if len(corpus.text) < min_bytes:
        raise DataError(
            f"training text from {corpus.source} has {len(corpus.text)} bytes, but one "
            f"sequence needs {min_bytes}; pass a longer --data file or a smaller --seq-len"
        )
    logger.info("training text: %d bytes from %s", len(corpus.text), corpus.source)
    return corpus


def _read_file(path: str, max_bytes: int) -> Corpus:
    try:
        with open(path, "rb") as file:
            text = file.read(max_bytes)
    except OSError as error:
        raise DataError(f"cannot read --data file {path}: {error}; pass a readable text file")
    return Corpus(text=text, source=path)


def _read_stdlib_sample(max_bytes: int) -> Corpus:
    """Read `.py` files of the stdlib in sorted order, depth first, up to `max_bytes` bytes."""
    root = sysconfig.get_paths()["stdlib"]
    chunks: list[bytes] = []
    total = 0
    for folder, subfolders, file_names in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if name not in _EXCLUDED_FOLDERS)
        for name in sorted(file_names):
            if not name.endswith(".py"):
                continue
            try:
                content = Path(folder, name).read_bytes()
            except OSError as error:
                logger.warning("skipping unreadable stdlib file %s: %s", name, error)
                continue
            chunks.append(content[: max_bytes - total])
            total += len(chunks[-1])
            if total >= max_bytes:
                return Corpus(text=b"".join(chunks), source=f"Python stdlib at {root}")
    if total == 0:
        raise DataError(f"no Python source files found under {root}; pass --data FILE")
    return Corpus(text=b"".join(chunks), source=f"Python stdlib at {root}")


class BatchSampler:
    """Draw batches of random byte windows from the corpus with its own torch.Generator.

    The generator state is saved in checkpoints so that a resumed run draws the same batches
    as an uninterrupted one.
    """

    def __init__(self, corpus: Corpus, batch_size: int, seq_len: int, seed: int) -> None:
        self.tokens = torch.frombuffer(bytearray(corpus.text), dtype=torch.uint8)
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self._window = torch.arange(seq_len + 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return inputs and targets, both int64 of shape (batch_size, seq_len)."""
        # Windows are seq_len + 1 bytes long, so starts run up to len - seq_len - 1.
        high = len(self.tokens) - self.seq_len
        starts = torch.randint(high, (self.batch_size,), generator=self.generator)
        windows = self.tokens[starts[:, None] + self._window[None, :]].long()
        return windows[:, :-1], windows[:, 1:]

    def get_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)
