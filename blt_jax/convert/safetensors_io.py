"""Read and write `.safetensors` files with numpy only (no torch, no safetensors package).

Format: an 8-byte little-endian header length `n`, then `n` bytes of JSON mapping each tensor name to
`{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the end of the header), then the raw
little-endian buffer. An optional `"__metadata__"` entry holds string pairs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple, Union

import ml_dtypes
import numpy as np

PathLike = Union[str, os.PathLike]

# Little-endian numpy dtype of every safetensors dtype name we read.
DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# A header larger than this is a corrupt length field, not a real header (the format caps it at 100 MB).
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
  """A `.safetensors` file is truncated, corrupt or uses a dtype we do not read."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor lives: its file, dtype, shape and byte range (absolute offsets into the file)."""

  path: str
  dtype: np.dtype
  shape: Tuple[int, ...]
  begin: int
  end: int

  @property
  def nbytes(self) -> int:
    return self.end - self.begin


def read_header(path: PathLike) -> Dict[str, TensorInfo]:
  """Every tensor of `path` (name -> TensorInfo), checked against the file's size; no tensor data is read."""
  path = os.fspath(path)
  size = os.path.getsize(path)
  if size < 8:
    raise SafetensorsError(f"{path}: truncated safetensors file ({size} bytes, the header length alone is 8)")
  with open(path, "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > min(_MAX_HEADER, size - 8):
      raise SafetensorsError(
          f"{path}: corrupt or truncated safetensors file (header length {header_len} but the "
          f"file has {size} bytes)"
      )
    raw_header = f.read(header_len)
  try:
    header = json.loads(raw_header.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from None
  if not isinstance(header, dict):
    raise SafetensorsError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
  header.pop("__metadata__", None)

  start = 8 + header_len
  buffer_len = size - start
  out = {}
  for name, info in header.items():
    try:
      dtype_name, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise SafetensorsError(f"{path}: corrupt safetensors header entry for {name!r}: {info!r}") from None
    if dtype_name not in DTYPES:
      raise SafetensorsError(
          f"{path}: tensor {name!r} has dtype {dtype_name!r}, which is not supported "
          f"(supported: {', '.join(DTYPES)})"
      )
    dtype = DTYPES[dtype_name]
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if not 0 <= begin <= end or end - begin != nbytes:
      raise SafetensorsError(
          f"{path}: corrupt safetensors header: tensor {name!r} of {dtype_name}{list(shape)} "
          f"needs {nbytes} bytes but has data_offsets [{begin}, {end}]"
      )
    if end > buffer_len:
      raise SafetensorsError(
          f"{path}: truncated safetensors file: tensor {name!r} ends at byte {start + end} "
          f"but the file has {size} bytes"
      )
    out[name] = TensorInfo(path, dtype, shape, start + begin, start + end)
  return out


def read_tensor(info: TensorInfo, rows: Optional[Tuple[int, int]] = None) -> np.ndarray:
  """One tensor (or rows [start, stop) of its first axis) read into fresh memory: no map of the file stays behind,
  so reading a checkpoint tensor by tensor holds one tensor at a time on top of what the caller keeps."""
  shape = info.shape
  begin = info.begin
  if rows is not None:
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * info.dtype.itemsize
    begin += rows[0] * row_bytes
    shape = (rows[1] - rows[0],) + tuple(shape[1:])
  count = int(np.prod(shape, dtype=np.int64))
  return np.fromfile(info.path, dtype=info.dtype, count=count, offset=begin).reshape(shape)


def read_safetensors(path: PathLike, mmap: bool = True) -> Dict[str, np.ndarray]:
  """All tensors of `path` as numpy arrays (read-only views into a memory map unless `mmap=False`)."""
  infos = read_header(path)
  if not mmap:
    return {name: read_tensor(info) for name, info in infos.items()}
  out = {}
  buffer = None
  for name, info in infos.items():
    if info.nbytes == 0:
      out[name] = np.zeros(info.shape, info.dtype)
      continue
    if buffer is None:
      buffer = np.memmap(info.path, dtype=np.uint8, mode="r")
    out[name] = np.asarray(buffer[info.begin : info.end]).view(info.dtype).reshape(info.shape)
  return out


# A tensor to write: (dtype, shape, chunks) where `chunks()` yields C-ordered arrays of that dtype whose bytes, in
# order, make up the tensor (one array, or row blocks of a large one so it is never held whole in the new dtype).
TensorSpec = Tuple[np.dtype, Tuple[int, ...], Callable[[], Iterable[np.ndarray]]]


def dtype_name(dtype) -> str:
  dtype = np.dtype(dtype)
  dtype = dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype
  if dtype not in _NAMES:
    raise SafetensorsError(f"dtype {dtype} cannot be written to safetensors (supported: {', '.join(DTYPES)})")
  return _NAMES[dtype]


def write_safetensors_streaming(
    path: PathLike, specs: Mapping[str, TensorSpec], metadata: Optional[Mapping[str, str]] = None
) -> int:
  """Writes tensors produced chunk by chunk (see TensorSpec); returns the number of data bytes written."""
  header, offset = {}, 0
  for name in sorted(specs):
    dtype, shape, _ = specs[name]
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {
        "dtype": dtype_name(dtype),
        "shape": [int(d) for d in shape],
        "data_offsets": [offset, offset + nbytes],
    }
    offset += nbytes
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  raw += b" " * (-len(raw) % 8)  # the format pads the header so the buffer starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name in sorted(specs):
      dtype, _, chunks = specs[name]
      written = 0
      for chunk in chunks():
        chunk = np.ascontiguousarray(chunk, dtype=np.dtype(dtype).newbyteorder("<"))
        f.write(memoryview(chunk.reshape(-1).view(np.uint8)))
        written += chunk.nbytes
      begin, end = header[name]["data_offsets"]
      if written != end - begin:
        raise SafetensorsError(f"{os.fspath(path)}: tensor {name!r} produced {written} bytes, expected {end - begin}")
  return offset


def write_safetensors(
    path: PathLike, tensors: Mapping[str, np.ndarray], metadata: Optional[Mapping[str, str]] = None
) -> None:
  """Writes `tensors` (numpy arrays of a dtype in `DTYPES`) to `path`."""
  specs = {}
  for name, array in tensors.items():
    array = np.asarray(array)
    try:
      dtype_name(array.dtype)
    except SafetensorsError:
      raise SafetensorsError(f"cannot write tensor {name!r} of dtype {array.dtype} to {os.fspath(path)}") from None
    specs[name] = (array.dtype, array.shape, lambda a=array: [a])
  write_safetensors_streaming(path, specs, metadata)
