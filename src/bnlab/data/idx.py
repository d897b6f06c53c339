"""The IDX file format (LeCun et al., "The MNIST database of handwritten digits", 1998), gzipped.

    offset 0   magic  = 0x00 0x00 <type> <ndim>     type 0x08 = unsigned byte
    offset 4   ndim big-endian uint32 sizes          (N,) for labels, (N, H, W) for images
    offset 4 + 4·ndim   N·H·W bytes, C order

Parsing is one ``np.frombuffer`` over the decompressed bytes (no per-sample Python). Every
problem raises :class:`DataError` naming the file, what was expected, what came, and the fix.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import zlib
from pathlib import Path

import numpy as np

GZIP_MAGIC = b"\x1f\x8b"
UBYTE = 0x08  # the only IDX element type the MNIST-style datasets use


class DataError(ValueError):
    """A dataset file is missing, unreadable or not what it should be.

    The message names the file and says how to fix it; ``path`` is that file (or directory)
    when there is one.
    """

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


def md5_of(data: bytes) -> str:
    """Hex MD5 of ``data``: the checksum the dataset's authors publish for each ``.gz`` file."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _what_it_looks_like(raw: bytes) -> str:
    """A short guess at the kind of a wrong IDX header, so the message points at the mix-up."""
    if len(raw) >= 4 and raw[:3] == b"\x00\x00\x08":
        return {1: " (a label file)", 3: " (an image file)"}.get(raw[3], "")
    return ""


def parse_idx(raw: bytes, *, ndim: int, path: Path, fix: str) -> np.ndarray:
    """Decompressed IDX bytes -> a read-only uint8 array of the shape the header declares.

    ``ndim`` is the rank the caller expects (1 for labels, 3 for images); ``fix`` is appended
    to every error message.
    """
    want = (UBYTE << 8) | ndim
    got = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if got != want:
        came = f"0x{got:08x}{_what_it_looks_like(raw)}" if got is not None else f"{len(raw)} bytes"
        raise DataError(
            f"{path}: expected IDX magic 0x{want:08x} (unsigned bytes, {ndim} dimension"
            f"{'s' if ndim > 1 else ''}), got {came}. {fix}",
            path,
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"{path}: expected a {header}-byte IDX header, the file ends after {len(raw)} "
            f"bytes. {fix}",
            path,
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    payload = len(raw) - header
    if payload != math.prod(dims):
        raise DataError(
            f"{path}: the header declares shape {dims} = {math.prod(dims)} bytes of data, the "
            f"file holds {payload} ({'truncated' if payload < math.prod(dims) else 'extra'} "
            f"data). {fix}",
            path,
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_gz(path: Path, *, ndim: int, fix: str) -> tuple[np.ndarray, str]:
    """Read one gzipped IDX file: ``(array, md5 of the .gz bytes)``.

    The array is read-only (it views the decompressed buffer); copy it before writing to it.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found. {fix}", path) from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror}). {fix}", path) from None
    if data[:2] != GZIP_MAGIC:
        hint = (
            " It looks like an uncompressed IDX file: compress it with `gzip` first."
            if data[:3] == b"\x00\x00\x08"
            else ""
        )
        raise DataError(
            f"{path}: expected a gzip file (starting with bytes 1f 8b), got "
            f"{data[:2].hex(' ') or 'an empty file'}.{hint} {fix}",
            path,
        )
    try:
        raw = gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as e:
        # EOFError: stream cut short; BadGzipFile (an OSError): CRC/length; zlib.error: corrupt
        raise DataError(
            f"{path}: not a valid gzip stream ({e}); the file is truncated or corrupted. {fix}",
            path,
        ) from None
    return parse_idx(raw, ndim=ndim, path=path, fix=fix), md5_of(data)


__all__ = ["DataError", "md5_of", "parse_idx", "read_idx_gz"]
