"""The workloads: seeded state dicts of two shapes, and the same bytes cut into raw parts.

    model    a few large fp32 matrices (half the bytes), many medium fp32/bf16 matrices, a few
             hundred tiny vectors: a model's state dict
    medium   most bytes in 1-8 MiB fp32/bf16 matrices (about 57 of them at 256 MiB), plus the
             same few hundred tiny vectors: where per-tensor costs weigh most

Every contender saves and loads the state dict of ``build_state_dict``; the byte contenders
(the raw ceiling and the transport) move its tensor bytes as ``raw_parts`` instead.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.catalog import DEFAULT_WORKLOAD, MIN_SIZE_MIB, RAW_PART_MIB, WORKLOADS, MiB

HIDDEN = 1024
LARGE_COUNT = 4
LARGE_SHARE = 0.5
MEDIUM_COUNT = 48
MEDIUM_SHARE = 0.45
TINY_COUNT = 300
TINY_NUMELS = (256, 1024, 4096)
# medium: tensor sizes in MiB, taken in this order round after round (mean 4.5 MiB)
MEDIUM_SIZES_MIB = (3, 8, 1, 6, 2, 5, 7, 4)
MEDIUM_MIN_BYTES = 1 * MiB
RAW_PART_SIZE = RAW_PART_MIB * MiB


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one generated tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def _rows(nbytes: float, dtype: torch.dtype) -> int:
    return max(1, round(nbytes / (HIDDEN * torch.empty((), dtype=dtype).element_size())))


def _tiny_specs() -> list[TensorSpec]:
    """The few hundred tiny fp32 and bf16 vectors (norms, biases) of every workload."""
    specs = []
    for i in range(TINY_COUNT):
        dtype = torch.float32 if i % 2 == 0 else torch.bfloat16
        numel = TINY_NUMELS[i % len(TINY_NUMELS)]
        specs.append(TensorSpec(f"model.layers.{i // 6}.norm_{i % 6}.weight", (numel,), dtype))
    return specs


def _model_specs(size_mib: int) -> list[TensorSpec]:
    total = size_mib * MiB
    specs = _tiny_specs()
    for i in range(MEDIUM_COUNT):
        dtype = torch.float32 if i % 3 == 0 else torch.bfloat16
        rows = _rows(total * MEDIUM_SHARE / MEDIUM_COUNT, dtype)
        specs.append(TensorSpec(f"model.layers.{i // 4}.proj_{i % 4}.weight", (rows, HIDDEN), dtype))
    remaining = total - sum(s.nbytes for s in specs)
    large_rows = _rows(max(remaining, 0) / LARGE_COUNT, torch.float32)
    for i in range(LARGE_COUNT):
        specs.append(TensorSpec(f"model.large_{i}.weight", (large_rows, HIDDEN), torch.float32))
    return specs


def _medium_specs(size_mib: int) -> list[TensorSpec]:
    total = size_mib * MiB
    specs = _tiny_specs()
    remaining = total - sum(s.nbytes for s in specs)
    i = 0
    while remaining >= MEDIUM_MIN_BYTES:
        dtype = torch.float32 if i % 3 == 0 else torch.bfloat16
        want = min(MEDIUM_SIZES_MIB[i % len(MEDIUM_SIZES_MIB)] * MiB, remaining)
        if remaining - want < MEDIUM_MIN_BYTES and remaining <= max(MEDIUM_SIZES_MIB) * MiB:
            want = remaining  # the last one takes the rest rather than leave a sliver
        spec = TensorSpec(f"model.layers.{i // 4}.proj_{i % 4}.weight", (_rows(want, dtype), HIDDEN), dtype)
        specs.append(spec)
        remaining -= spec.nbytes
        i += 1
    return specs


def tensor_specs(size_mib: int, workload: str = DEFAULT_WORKLOAD) -> list[TensorSpec]:
    """The tensors of a state dict of about ``size_mib`` MiB in the shape of ``workload``.

    model: a few large fp32 matrices (embeddings, output head) hold half the bytes, many medium
    fp32 and bf16 matrices (projections) most of the rest, and a few hundred tiny fp32 and bf16
    vectors (norms, biases) the remainder.
    medium: the same tiny vectors, and all other bytes in fp32 (every third) and bf16 matrices
    of 1 to 8 MiB (sizes from MEDIUM_SIZES_MIB in turn; the last one takes what is left).
    Its size is at least 8 MiB, so that the 1-8 MiB matrices hold most of the bytes.
    """
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
    if size_mib < MIN_SIZE_MIB[workload]:
        raise ValueError(f"the {workload} workload needs a size of at least {MIN_SIZE_MIB[workload]} MiB")
    return _medium_specs(size_mib) if workload == "medium" else _model_specs(size_mib)


def non_tensor_entries() -> dict[str, Any]:
    """The state dict's non-tensor entries: counters, a string and a small config dict."""
    return {
        "step": 123_456,
        "epoch": 7,
        "run_name": "bench-run-0001",
        "optim_config": {"lr": 3e-4, "betas": (0.9, 0.95), "weight_decay": 0.1, "name": "adamw"},
    }


def build_state_dict(size_mib: int, seed: int, workload: str = DEFAULT_WORKLOAD) -> dict[str, Any]:
    """The benchmark state dict: seeded, so every process builds the same bytes."""
    generator = torch.Generator().manual_seed(seed)
    state_dict: dict[str, Any] = {}
    for spec in tensor_specs(size_mib, workload):
        state_dict[spec.name] = torch.randn(spec.shape, dtype=spec.dtype, generator=generator)
    state_dict.update(non_tensor_entries())
    return state_dict


def workload_info(size_mib: int, workload: str = DEFAULT_WORKLOAD) -> dict[str, Any]:
    """What the generated state dict holds."""
    specs = tensor_specs(size_mib, workload)
    by_dtype: Counter[str] = Counter()
    for s in specs:
        by_dtype[str(s.dtype).removeprefix("torch.")] += s.nbytes
    return {
        "workload": workload,
        "tensors": len(specs),
        "tensors_1_to_8_mib": sum(1 for s in specs if MiB <= s.nbytes <= 8 * MiB),
        "non_tensor_entries": len(non_tensor_entries()),
        "tensor_bytes": sum(s.nbytes for s in specs),
        "bytes_by_dtype": dict(by_dtype),
        "largest_tensor_bytes": max(s.nbytes for s in specs),
    }


def zeroed_like(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A load target: zeroed tensors of the same shapes and dtypes, non-tensors blanked."""

    def blank(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return torch.zeros_like(value)
        if isinstance(value, dict):
            return {k: None for k in value}
        return None

    return {k: blank(v) for k, v in state_dict.items()}


def tensor_bytes(state_dict: dict[str, Any]) -> int:
    """Bytes of tensor data in a state dict: the payload every throughput is computed from."""
    return sum(v.nbytes for v in state_dict.values() if isinstance(v, torch.Tensor))


def assert_same(expected: dict[str, Any], actual: dict[str, Any]) -> None:
    """Raise AssertionError unless ``actual`` equals ``expected`` bit for bit."""
    bad = []
    for key, want in expected.items():
        got = actual.get(key)
        if isinstance(want, torch.Tensor):
            same = (
                isinstance(got, torch.Tensor)
                and got.dtype == want.dtype
                and got.shape == want.shape
                and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
            )
        else:
            same = got == want
        if not same:
            bad.append(key)
    if bad:
        raise AssertionError(f"DATA MISMATCH after load in {len(bad)} entries, e.g. {bad[:5]}")


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes as a flat writable memoryview (a contiguous copy if it is not)."""
    return memoryview(tensor.contiguous().view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]


def raw_parts(state_dict: dict[str, Any], part_size: int = RAW_PART_SIZE) -> list[bytes]:
    """The state dict's tensor bytes, concatenated and cut into parts of ``part_size`` bytes."""
    parts: list[bytes] = []
    chunk = bytearray()
    for value in state_dict.values():
        if not isinstance(value, torch.Tensor):
            continue
        view = byte_view(value)
        while view:
            n = min(len(view), part_size - len(chunk))
            chunk += view[:n]
            view = view[n:]
            if len(chunk) == part_size:
                parts.append(bytes(chunk))
                chunk.clear()
    if chunk:
        parts.append(bytes(chunk))
    return parts


def raw_objects(part_count: int, streams: int) -> list[range]:
    """Which parts go to which of the ``streams`` objects (contiguous runs of part indices)."""
    per_object = -(-part_count // streams)
    return [range(start, min(start + per_object, part_count)) for start in range(0, part_count, per_object)]


def raw_ranges(part_sizes: list[int], streams: int) -> list[tuple[int, int, int, int]]:
    """(object index, first byte in the object, first byte in the target, length) per part."""
    starts = [0]
    for size in part_sizes:
        starts.append(starts[-1] + size)
    ranges = []
    for index, numbers in enumerate(raw_objects(len(part_sizes), streams)):
        for number in numbers:
            ranges.append((index, starts[number] - starts[numbers[0]], starts[number], part_sizes[number]))
    return ranges
