"""A cheap structural check of a GGUF file, in pure stdlib.

The magic alone passes a file cut short by a failed copy or download.  This
walks the header (version, counts), the key/value section and the tensor
infos, computes where the tensor data starts (``general.alignment``, default
32) and how many bytes each tensor needs (its ggml type's block and type
size), and compares the result with the file's size.  It reads the header
through ``mmap`` and never the tensor data, so it costs a fraction of a
second even for a multi-GiB model.

:func:`gguf_problem` returns ``None`` for a file that is structurally whole,
else one line saying what is wrong.  A newer GGUF version or tensor type that
this table does not know is not an error: the check then vouches only for
what it understands.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from pathlib import Path
from typing import BinaryIO

__all__ = ["GGML_BLOCK", "NotRegularFileError", "file_kind", "gguf_problem", "open_regular"]

#: ggml tensor type id -> (elements per block, bytes per block), as in
#: ggml.h / gguf-py's GGML_QUANT_SIZES.
GGML_BLOCK: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 40),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
    39: (32, 17),  # MXFP4
    40: (64, 36),  # NVFP4
    41: (128, 18),  # Q1_0
}

# GGUF metadata value types: fixed sizes; 8 = string, 9 = array
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 8


class _Bad(Exception):
    pass


class _Reader:
    def __init__(self, buf: mmap.mmap | bytes) -> None:
        self.buf = buf
        self.pos = 0
        self.size = len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Bad(f"file ends inside {what} (at byte {self.pos} of {self.size}): truncated or corrupt")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = struct.unpack_from("<I", self.buf, self.pos)
        self.pos += 4
        return int(v)

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = struct.unpack_from("<Q", self.buf, self.pos)
        self.pos += 8
        return int(v)

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def string(self, what: str) -> bytes:
        n = self.u64(what)
        self.need(n, what)
        s = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return s

    def value(self, vtype: int, what: str, depth: int = 0) -> int | None:
        """Skip one metadata value; return it if it is a UINT32 (for general.alignment)."""
        if vtype in _SCALAR:
            if vtype == _UINT32:
                return self.u32(what)
            self.skip(_SCALAR[vtype], what)
        elif vtype == _STRING:
            self.skip(self.u64(what), what)
        elif vtype == _ARRAY:
            if depth >= _MAX_NESTING:
                raise _Bad(f"{what}: arrays nested too deep")
            etype, count = self.u32(what), self.u64(what)
            if etype in _SCALAR:
                self.skip(count * _SCALAR[etype], what)
            elif etype in (_STRING, _ARRAY):
                # every element takes at least 8 bytes: a corrupt count fails here, not after a long loop
                self.need(count * 8, what)
                for _ in range(count):
                    self.value(etype, what, depth + 1)
            else:
                raise _Bad(f"{what}: unknown array element type {etype}")
        else:
            raise _Bad(f"{what}: unknown value type {vtype}")
        return None


def _check(buf: mmap.mmap | bytes) -> str | None:
    r = _Reader(buf)
    r.need(4, "the magic")
    if bytes(buf[:4]) != b"GGUF":
        return f"not a GGUF file (starts with {bytes(buf[:4])!r})"
    r.pos = 4
    version = r.u32("the header")
    if version in (0, 1):
        return f"GGUF version {version} is not supported by llama.cpp"
    if version > 3:
        return None if version < 1 << 16 else f"GGUF version field is implausible ({version}): corrupt or big-endian file"
    n_tensors = r.u64("the header")
    n_kv = r.u64("the header")
    # each key/value takes at least 12 bytes, each tensor info at least 24
    r.need(n_kv * 12 + n_tensors * 24, "the key/value and tensor sections")
    alignment = 32
    for i in range(n_kv):
        key = r.string(f"metadata key {i}")
        vtype = r.u32(f"metadata value {key!r}")
        v = r.value(vtype, f"metadata value {key.decode('utf-8', 'replace')!r}")
        if key == b"general.alignment":
            if v is None or v == 0 or v & (v - 1):
                return f"general.alignment must be a power of two (uint32), got {v}"
            alignment = v
    data_end = 0
    for i in range(n_tensors):
        name = r.string(f"tensor info {i}").decode("utf-8", "replace")
        n_dims = r.u32(f"tensor {name!r}")
        if n_dims > _MAX_DIMS:
            return f"tensor {name!r} has {n_dims} dimensions (at most {_MAX_DIMS}): corrupt file"
        n = 1
        for _ in range(n_dims):
            n *= r.u64(f"tensor {name!r}")
        ttype = r.u32(f"tensor {name!r}")
        offset = r.u64(f"tensor {name!r}")
        if offset % alignment:
            return f"tensor {name!r} data offset {offset} is not a multiple of the alignment {alignment}: corrupt file"
        if ttype in GGML_BLOCK:
            blck, tsize = GGML_BLOCK[ttype]
            data_end = max(data_end, offset + (n + blck - 1) // blck * tsize)
        else:  # a type newer than this table: its size is unknown, its start is not
            data_end = max(data_end, offset)
    data_start = (r.pos + alignment - 1) // alignment * alignment
    needed = data_start + data_end
    if needed > r.size:
        return f"GGUF file is truncated: {r.size} bytes, its {n_tensors} tensors need {needed}"
    return None


class NotRegularFileError(OSError):
    """A path exists but is a FIFO, a directory, a device or a socket (``kind``)."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"not a regular file: {kind}")
        self.kind = kind


def file_kind(mode: int) -> str | None:
    """None for a regular file, else what ``mode`` (an ``st_mode``) is."""
    if stat.S_ISREG(mode):
        return None
    for test, what in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return what
    return "an unknown kind of file"


def open_regular(path: str | Path) -> BinaryIO:
    """Open ``path`` for reading, refusing anything but a regular file.

    The file is stat'ed first, so a FIFO or a device is never opened (opening
    a FIFO blocks until a writer comes; opening a device can act on it).  It
    is then opened with O_NONBLOCK and fstat'ed, so a FIFO swapped in between
    the two is refused too instead of blocking.  Raises NotRegularFileError
    ("not a regular file: a FIFO") or the OSError of the stat or open.
    """
    what = file_kind(os.stat(path).st_mode)
    if what is None:
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
        try:
            what = file_kind(os.fstat(fd).st_mode)
            if what is None:
                if hasattr(os, "set_blocking"):
                    os.set_blocking(fd, True)
                return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise NotRegularFileError(what)


def gguf_problem(path: str | Path) -> str | None:
    """One line saying why ``path`` is not a whole GGUF file, or None if it is.

    Something other than a regular file (a FIFO, a directory, ...) is a
    problem too, and is never read.  Raises OSError if the file cannot be
    read (FileNotFoundError if there is none).
    """
    try:
        f = open_regular(path)
    except NotRegularFileError as e:
        return str(e)
    with f:
        size = f.seek(0, 2)
        if size < 4:
            return f"not a GGUF file ({size} bytes)"
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _check(buf)
            except _Bad as e:
                return str(e)
