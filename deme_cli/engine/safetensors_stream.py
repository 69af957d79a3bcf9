"""Tensor-by-tensor reading and writing of safetensors files, so that merging N models keeps one tensor in flight.

Why not `safetensors.safe_open` for reading: it memory-maps the whole file, and every page a read touches stays
resident (and counts in the process RSS) while the file is open, so reading N models side by side would hold N models
of pages. `TensorFileReader` reads each tensor with one positioned read instead. Why not `save_file` for writing: it
needs every tensor at once. `TensorFileWriter` writes the header first (offsets follow from shapes and dtypes) and then
each tensor's bytes as they come.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length, a JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}} padded with spaces to a multiple
of 8 bytes, then the raw little-endian tensor bytes, offsets relative to the end of the header. The files written here
load with `safetensors.torch.load_file` and diffusers' `from_pretrained`.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from .errors import UsageError

# safetensors dtype name <-> torch dtype name (torch is imported lazily) and bytes per element
_DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
           "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
           "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1)}
_HEADER_LIMIT = 100 * 1024 * 1024  # the safetensors library refuses larger headers too


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives in a file: safetensors dtype name, shape, byte offsets relative to the data start."""
    dtype: str
    shape: tuple
    begin: int
    end: int


def torch_dtype(name: str):
    import torch

    return getattr(torch, _DTYPES[name][0])


def dtype_name(dtype) -> str:
    """The safetensors name of a torch dtype ("F32" for torch.float32)."""
    short = str(dtype).replace("torch.", "")
    for name, (tname, _) in _DTYPES.items():
        if tname == short:
            return name
    raise ValueError(f"dtype {dtype} cannot be stored in safetensors")


def nbytes(dtype: str, shape: Iterable[int]) -> int:
    n = _DTYPES[dtype][1]
    for s in shape:
        n *= int(s)
    return n


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict, int]:
    """(tensors by name, metadata, byte offset of the data section) of a safetensors file, without reading data."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file too short")
            (n,) = struct.unpack("<Q", raw)
            if n > _HEADER_LIMIT:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None) or {}
        infos = {k: TensorInfo(v["dtype"], tuple(int(s) for s in v["shape"]), *map(int, v["data_offsets"]))
                 for k, v in header.items()}
        for k, info in infos.items():
            if info.dtype not in _DTYPES or info.end - info.begin != nbytes(info.dtype, info.shape):
                raise ValueError(f"bad entry '{k}'")
        need = 8 + n + max((info.end for info in infos.values()), default=0)
        if path.stat().st_size < need:            # cut short: found now, not halfway through a merge
            raise ValueError(f"truncated: {path.stat().st_size} bytes where its header needs {need}")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise UsageError(f"'{path}' is not a readable safetensors file ({e}); re-create it") from None
    return infos, meta, 8 + n


class TensorFileReader:
    """Reads tensors one at a time from one or more safetensors files (the shards of one state dict)."""

    def __init__(self, paths: Iterable[Path]):
        self.tensors: dict[str, tuple[int, TensorInfo]] = {}   # name -> (file number, info)
        self._files, self._starts = [], []
        for path in paths:
            infos, _, start = read_header(path)
            num = len(self._files)
            self._files.append(open(path, "rb"))
            self._starts.append(start)
            for k, info in infos.items():
                self.tensors[k] = (num, info)

    def keys(self) -> list[str]:
        return sorted(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name][1]

    def get(self, name: str):
        """The tensor `name` as a fresh CPU tensor (its own memory; nothing stays mapped)."""
        import torch

        num, info = self.tensors[name]
        size = info.end - info.begin
        if size == 0:
            return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        buf = bytearray(size)
        f = self._files[num]
        f.seek(self._starts[num] + info.begin)
        if f.readinto(buf) != size:
            raise UsageError(f"'{f.name}' is truncated (tensor '{name}'); re-create it")
        return torch.frombuffer(buf, dtype=torch_dtype(info.dtype)).reshape(info.shape)

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    def __enter__(self) -> "TensorFileReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorFileWriter:
    """Writes a safetensors file tensor by tensor, in the order of `entries` [(name, dtype name, shape), ...]."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple]], metadata: Optional[dict] = None):
        header, offset = {}, 0
        for name, dtype, shape in entries:
            size = nbytes(dtype, shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        header = {"__metadata__": {"format": "pt", **(metadata or {})}, **header}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self.path = Path(path)
        self._order = [(name, dtype, tuple(shape)) for name, dtype, shape in entries]
        self._next = 0
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor) -> None:
        """Append the next tensor; its name, dtype and shape must be the ones announced in the header."""
        import torch

        if self._next >= len(self._order):
            raise ValueError(f"unexpected tensor '{name}': all {len(self._order)} tensors are written")
        want = self._order[self._next]
        got = (name, dtype_name(tensor.dtype), tuple(tensor.shape))
        if got != want:
            raise ValueError(f"tensor {got} written where the header announces {want}")
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            self._f.write(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's own buffer, no copy
        self._next += 1

    def close(self) -> None:
        if self._f is None:
            return
        f, self._f = self._f, None
        try:
            if self._next != len(self._order):
                raise ValueError(f"'{self.path}': {self._next} of {len(self._order)} tensors written")
            f.flush()
            os.fsync(f.fileno())
        finally:
            f.close()

    def __enter__(self) -> "TensorFileWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        elif self._f is not None:
            self._f.close()
            self._f = None
