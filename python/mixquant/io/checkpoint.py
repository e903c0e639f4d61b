"""Reading weights straight from safetensors checkpoints, without the model.

A checkpoint is one ``.safetensors`` file or a folder of shards, with or
without the ``model.safetensors.index.json`` that maps tensor names to shard
files. Tensors are read with safetensors' lazy, memory-mapped reader, one run
of rows at a time (:func:`read_rows`); every read opens the file anew, so the
mapped pages of one run are released before the next is read and the memory
held stays near one run, whatever the size of the checkpoint.

The files are input from the user, so nothing is trusted: only regular files
are opened, shard names in an index must be plain file names inside the
folder, and every error of the reader becomes a ``ValueError`` naming the file.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from typing import Dict, List, Tuple, Union

import torch

__all__ = ["TensorInfo", "list_tensors", "read_rows", "read_tensor", "INDEX_NAME"]

INDEX_NAME = "model.safetensors.index.json"
MAX_INDEX_BYTES = 64 * 2**20
MAX_JSON_DEPTH = 64
# safetensors dtype names -> (torch dtype, bytes per element); integer types are kept to name them in errors.
DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint: its name, the file holding it, its shape and safetensors dtype."""

    name: str
    file: str
    shape: Tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES.get(self.dtype, (None, 1))[1]


def _safe_open():
    try:
        from safetensors import safe_open
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise ImportError("reading checkpoints needs the 'safetensors' package: pip install safetensors") from exc
    return safe_open


def _regular_file(path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path!r} does not exist") from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block or never end
        raise ValueError(f"{path!r} is not a regular file")


def _file_tensors(path: str) -> List[TensorInfo]:
    _regular_file(path)
    safe_open = _safe_open()
    try:
        with safe_open(path, framework="pt") as fh:
            out = []
            for name in fh.keys():
                sl = fh.get_slice(name)
                out.append(TensorInfo(name, path, tuple(int(d) for d in sl.get_shape()), str(sl.get_dtype())))
            return out
    except Exception as exc:  # the reader's own errors (bad header, truncated file): one type for the caller
        raise ValueError(f"{path!r} is not a readable safetensors file: {str(exc)[:300]}") from None


def _json_depth(value: object, depth: int = 0) -> int:
    if depth > MAX_JSON_DEPTH:
        return depth
    if isinstance(value, dict):
        return max([_json_depth(v, depth + 1) for v in value.values()], default=depth + 1)
    if isinstance(value, list):
        return max([_json_depth(v, depth + 1) for v in value], default=depth + 1)
    return depth


def _read_index(folder: str) -> Dict[str, str]:
    """The index's tensor name -> shard file name map, validated."""
    path = os.path.join(folder, INDEX_NAME)
    _regular_file(path)
    if os.path.getsize(path) > MAX_INDEX_BYTES:
        raise ValueError(f"{path!r} is larger than any checkpoint index ({MAX_INDEX_BYTES} bytes)")
    with open(path, "rb") as fh:
        raw = fh.read(MAX_INDEX_BYTES + 1)
    try:
        data = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError(f"{path!r}: JSON nested too deeply") from None
    except ValueError as exc:
        raise ValueError(f"{path!r} is not valid JSON: {exc}") from None
    if _json_depth(data) > MAX_JSON_DEPTH:
        raise ValueError(f"{path!r}: JSON nested too deeply")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{path!r} has no 'weight_map' object naming the shard of every tensor")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or os.path.basename(shard) != shard or shard in (".", ".."):
            raise ValueError(f"{path!r}: tensor {name!r} maps to {shard!r}, not a file name in the folder")
    return weight_map


def _natural_key(name: str) -> list:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def list_tensors(path: PathLike) -> List[TensorInfo]:
    """Every tensor of the checkpoint at ``path`` (a file, or a folder of shards), in natural name order.

    A folder with ``model.safetensors.index.json`` must hold exactly the tensors
    the index lists, each in its shard; without an index every ``*.safetensors``
    file of the folder is read, and a name found in two shards is an error.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        tensors = _file_tensors(path)
    else:
        index = os.path.join(path, INDEX_NAME)
        if os.path.lexists(index):
            weight_map = _read_index(path)
            tensors = []
            for shard in sorted(set(weight_map.values())):
                found = _file_tensors(os.path.join(path, shard))
                for t in found:
                    if weight_map.get(t.name) != shard:
                        raise ValueError(f"tensor {t.name!r} of shard {shard!r} is not listed there by {index!r}")
                tensors += found
            missing = set(weight_map) - {t.name for t in tensors}
            if missing:
                name = sorted(missing)[0]
                raise ValueError(f"{index!r} lists tensor {name!r} in {weight_map[name]!r}, which does not hold it")
        else:
            shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not shards:
                raise ValueError(f"folder {path!r} holds no .safetensors file")
            tensors, seen = [], {}
            for shard in shards:
                for t in _file_tensors(os.path.join(path, shard)):
                    if t.name in seen:
                        raise ValueError(f"tensor {t.name!r} is in both {seen[t.name]!r} and {shard!r}")
                    seen[t.name] = shard
                    tensors.append(t)
    return sorted(tensors, key=lambda t: _natural_key(t.name))


def read_rows(info: TensorInfo, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` (along dim 0) of a tensor, as a tensor of its own dtype.

    The file is opened for this read only: when the result is dropped nothing
    of the file stays mapped.
    """
    safe_open = _safe_open()
    try:
        with safe_open(info.file, framework="pt") as fh:
            return fh.get_slice(info.name)[start:stop]
    except Exception as exc:  # noqa: BLE001 - the reader's errors as ValueError
        raise ValueError(f"{info.file!r}: cannot read tensor {info.name!r}: {str(exc)[:300]}") from None


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """The whole tensor (see :func:`read_rows`)."""
    safe_open = _safe_open()
    try:
        with safe_open(info.file, framework="pt") as fh:
            return fh.get_tensor(info.name)
    except Exception as exc:  # noqa: BLE001 - the reader's errors as ValueError
        raise ValueError(f"{info.file!r}: cannot read tensor {info.name!r}: {str(exc)[:300]}") from None
