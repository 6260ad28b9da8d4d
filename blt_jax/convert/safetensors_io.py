"""Read and write `.safetensors` files with numpy only (no torch, no safetensors package).

Format: an 8-byte little-endian header length `n`, then `n` bytes of JSON mapping each tensor name to
`{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the end of the header), then the raw
little-endian buffer. An optional `"__metadata__"` entry holds string pairs.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Dict, Mapping, Optional, Union

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


def read_safetensors(path: PathLike, mmap: bool = True) -> Dict[str, np.ndarray]:
  """All tensors of `path` as numpy arrays (read-only views into a memory map unless `mmap=False`)."""
  path = os.fspath(path)
  size = os.path.getsize(path)
  if size < 8:
    raise SafetensorsError(f"{path}: truncated safetensors file ({size} bytes, the header length alone is 8)")
  with open(path, "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > min(_MAX_HEADER, size - 8):
      raise SafetensorsError(f"{path}: corrupt or truncated safetensors file (header length {header_len} but the "
                             f"file has {size} bytes)")
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
  if mmap and buffer_len:
    buffer = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(buffer_len,))
  else:
    buffer = np.fromfile(path, dtype=np.uint8, offset=start)
  out = {}
  for name, info in header.items():
    try:
      dtype_name, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise SafetensorsError(f"{path}: corrupt safetensors header entry for {name!r}: {info!r}") from None
    if dtype_name not in DTYPES:
      raise SafetensorsError(f"{path}: tensor {name!r} has dtype {dtype_name!r}, which is not supported "
                             f"(supported: {', '.join(DTYPES)})")
    dtype = DTYPES[dtype_name]
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if not 0 <= begin <= end or end - begin != nbytes:
      raise SafetensorsError(f"{path}: corrupt safetensors header: tensor {name!r} of {dtype_name}{list(shape)} "
                             f"needs {nbytes} bytes but has data_offsets [{begin}, {end}]")
    if end > buffer_len:
      raise SafetensorsError(f"{path}: truncated safetensors file: tensor {name!r} ends at byte {start + end} "
                             f"but the file has {size} bytes")
    out[name] = np.asarray(buffer[begin:end]).view(dtype).reshape(shape)
  return out


def write_safetensors(path: PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Optional[Mapping[str, str]] = None) -> None:
  """Writes `tensors` (numpy arrays of a dtype in `DTYPES`) to `path`."""
  header = {}
  arrays = []
  offset = 0
  for name in sorted(tensors):
    array = np.asarray(tensors[name])
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    if dtype not in _NAMES:
      raise SafetensorsError(f"cannot write tensor {name!r} of dtype {array.dtype} to {os.fspath(path)}")
    array = array.astype(dtype, copy=False)  # tobytes() below writes C order
    header[name] = {"dtype": _NAMES[dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    arrays.append(array)
    offset += array.nbytes
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  raw += b" " * (-len(raw) % 8)  # the format pads the header so the buffer starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for array in arrays:
      f.write(array.tobytes())
