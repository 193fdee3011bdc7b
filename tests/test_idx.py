"""The IDX reader: good files parse; corrupt, truncated and foreign files are clear errors."""

import gzip
import struct

import numpy as np
import pytest

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.idx import parse_idx, read_idx, write_idx


def test_round_trip_of_images_and_labels(tmp_path):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    write_idx(images, tmp_path / "images.gz")
    write_idx(labels, tmp_path / "labels.gz")
    np.testing.assert_array_equal(read_idx(tmp_path / "images.gz"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "labels.gz"), labels)


def test_uncompressed_file_is_read_too(tmp_path):
    data = bytes([0, 0, 8, 1]) + struct.pack(">I", 3) + bytes([1, 2, 3])
    (tmp_path / "labels").write_bytes(data)
    assert read_idx(tmp_path / "labels").tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "bad magic number"),
        (b"\x1f\x8b\x08\x00rest", "bad magic number"),
        (bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 1) + b"\0\0\0\0", "element type 0x0d"),
        (bytes([0, 0, 8, 3]) + struct.pack(">I", 2), "header needs 16 bytes"),
        (bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 28, 28) + bytes(1000), "truncated: shape (2, 28, 28) needs 1568"),
        (bytes([0, 0, 8, 1]) + struct.pack(">I", 2) + bytes(5), "3 bytes after the data"),
        # dimensions whose product overflows 64 bits must still be counted exactly
        (
            bytes([0, 0, 8, 3]) + struct.pack(">3I", *[2**32 - 1] * 3) + bytes(3),
            f"needs {(2**32 - 1) ** 3} bytes of data, found 3",
        ),
    ],
)
def test_malformed_content_is_rejected_with_its_reason(data, message):
    with pytest.raises(PipelineError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_idx(data)


def test_truncated_gzip_is_a_clear_error(tmp_path):
    write_idx(np.zeros((10, 28, 28), dtype=np.uint8), tmp_path / "images.gz")
    whole = (tmp_path / "images.gz").read_bytes()
    (tmp_path / "images.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(PipelineError, match="corrupt: not a complete gzip file"):
        read_idx(tmp_path / "images.gz")


def test_gzip_of_a_truncated_idx_is_a_clear_error(tmp_path):
    header = bytes([0, 0, 8, 3]) + struct.pack(">3I", 10, 28, 28)
    (tmp_path / "images.gz").write_bytes(gzip.compress(header + bytes(28 * 28 * 9)))
    with pytest.raises(PipelineError, match="truncated"):
        read_idx(tmp_path / "images.gz")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        read_idx(tmp_path / "absent.gz")


def test_unreadable_path_is_a_clear_error(tmp_path):
    (tmp_path / "images.gz").mkdir()
    with pytest.raises(PipelineError, match=r"images.gz cannot be read \(Is a directory\)"):
        read_idx(tmp_path / "images.gz")
