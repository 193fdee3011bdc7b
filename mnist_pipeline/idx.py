"""The IDX file format of MNIST: a strict reader that rejects corrupt or truncated files, and a writer."""

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from mnist_pipeline.errors import PipelineError

UINT8 = 0x08  # the only element type MNIST-format files use


def read_idx(path: Path | str) -> np.ndarray:
    """Read a (gzipped, if the name ends in .gz) IDX file of unsigned bytes into an array of its shape."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PipelineError(f"{path} not found") from None
    except OSError as error:
        raise PipelineError(f"{path} cannot be read ({error.strerror or error})") from None
    return parse_idx(gunzip(data, str(path)) if path.suffix == ".gz" else data, str(path))


def gunzip(data: bytes, name: str) -> bytes:
    """The decompressed content of a gzipped file; a damaged or cut one is a PipelineError naming it."""
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
        raise PipelineError(f"{name} is corrupt: not a complete gzip file ({error})") from None


def parse_idx(data: bytes, name: str = "IDX data") -> np.ndarray:
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise PipelineError(f"{name} is not an IDX file: bad magic number {data[:4].hex() or '(empty)'}")
    element_type, ndim = data[2], data[3]
    if element_type != UINT8:
        raise PipelineError(
            f"{name}: element type 0x{element_type:02x} is not supported (expected 0x08, unsigned byte)"
        )
    if ndim == 0:
        raise PipelineError(f"{name}: an IDX file needs at least one dimension")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise PipelineError(f"{name} is truncated: the header needs {header} bytes, the file has {len(data)}")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = math.prod(shape)  # exact: a corrupt header's dimensions can overflow a fixed-width product
    actual = len(data) - header
    if actual < expected:
        raise PipelineError(f"{name} is truncated: shape {shape} needs {expected} bytes of data, found {actual}")
    if actual > expected:
        raise PipelineError(f"{name} is corrupt: {actual - expected} bytes after the data that shape {shape} describes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def write_idx(array: np.ndarray, path: Path | str) -> None:
    """Write a uint8 array as a gzipped IDX file (how tests make synthetic MNIST)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, UINT8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    Path(path).write_bytes(gzip.compress(header + array.tobytes(), mtime=0))
