"""The zero-copy tensor decoder agrees with torch.load on every layout and alignment."""

from __future__ import annotations

import io
import pickle

import pytest
import torch

from dcp_cloud.load.decode import load_tensor

from .test_roundtrip import ALL_DTYPES, _tensor


def _saved(tensor: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shift", [0, 3, 64])
def test_decoded_tensor_equals_torch_load(dtype: torch.dtype, shift: int) -> None:
    tensor = _tensor(dtype, (7, 9), 5)
    data = bytearray(shift) + bytearray(_saved(tensor))
    decoded = load_tensor(memoryview(data)[shift:])
    expected = torch.load(io.BytesIO(_saved(tensor)), weights_only=True)
    assert decoded.dtype == expected.dtype and decoded.shape == expected.shape
    assert torch.equal(decoded.view(torch.uint8), expected.view(torch.uint8))
    assert decoded.data_ptr() % 16 == 0, "decoded storage is misaligned"
    torch.zeros_like(decoded).copy_(decoded)  # a kernel over it must not fault


@pytest.mark.parametrize(
    "tensor",
    [
        torch.tensor(2.5),
        torch.empty(0, 3),
        torch.arange(12.0).reshape(3, 4).t(),
        torch.ones(2, 2, 2).permute(2, 0, 1),
    ],
    ids=["scalar", "empty", "transposed", "permuted"],
)
def test_layouts_survive(tensor: torch.Tensor) -> None:
    decoded = load_tensor(memoryview(_saved(tensor)))
    assert decoded.shape == tensor.shape and decoded.stride() == tensor.stride()
    assert torch.equal(decoded, tensor)


def test_aligned_record_is_not_copied() -> None:
    data = bytearray(_saved(torch.arange(1000, dtype=torch.float64)))
    decoded = load_tensor(memoryview(data))
    base = torch.frombuffer(data, dtype=torch.uint8).data_ptr()
    assert base <= decoded.data_ptr() < base + len(data), "expected the decoder to alias the buffer"


def test_anything_else_falls_back_to_torch_load() -> None:
    decoded = load_tensor(memoryview(_saved(torch.arange(4)[None].expand(3, 4).contiguous())))
    assert torch.equal(decoded, torch.arange(4)[None].expand(3, 4))
    with pytest.raises(pickle.UnpicklingError):
        load_tensor(memoryview(b"not a zip archive"))


def test_archives_saved_without_crc32_are_decoded_in_place() -> None:
    torch.serialization.set_crc32_options(False)
    try:
        data = bytearray(_saved(torch.arange(1000, dtype=torch.float64)))
    finally:
        torch.serialization.set_crc32_options(True)
    decoded = load_tensor(memoryview(data))
    base = torch.frombuffer(data, dtype=torch.uint8).data_ptr()
    assert base <= decoded.data_ptr() < base + len(data), "fell back to torch.load"
    assert torch.equal(decoded, torch.arange(1000, dtype=torch.float64))
