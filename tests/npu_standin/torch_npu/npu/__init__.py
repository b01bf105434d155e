"""``torch.npu`` of the stand-in: the device-module functions xytune calls, on simulated Ascend devices.

Names and signatures follow torch_npu's ``torch_npu/npu/utils.py`` and ``torch_npu/npu/streams.py``
(Ascend/pytorch master, 2025); device properties mirror ``_NPUDeviceProperties`` as
``torch_npu/csrc/npu/Module.cpp`` binds it at Ascend/pytorch commit b1190f2291cd582936fdf67b0490a87e264fe2da
(name, total_memory, cube_core_num, vector_core_num, L2_cache_size; older releases bind only name and
total_memory). Tests change the simulated machine by setting ``DEVICE_COUNT`` and ``PROPERTIES``.
Kernels run synchronously on CPU, so ``synchronize`` has nothing to wait for and events read the host clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from . import utils  # noqa: F401  (torch_npu.npu.utils, as upstream)


@dataclass(frozen=True)
class _NPUDeviceProperties:
    name: str
    total_memory: int
    cube_core_num: int
    vector_core_num: int
    L2_cache_size: int


DEVICE_COUNT = 2
# an Atlas 800T A2 card as torch_npu reports it; the L2 is kept small so the CPU-backed cache flush is cheap
PROPERTIES = _NPUDeviceProperties("Ascend910B3", 64 * 2**30, 20, 40, 4 * 2**20)
_current = 0


def is_available() -> bool:
    return DEVICE_COUNT > 0


def is_initialized() -> bool:
    return True


def _is_in_bad_fork() -> bool:
    return False


def device_count() -> int:
    return DEVICE_COUNT


def current_device() -> int:
    return _current


def set_device(device) -> None:
    global _current
    _current = _index(device)


def manual_seed_all(seed: int) -> None:
    """torch.manual_seed seeds every backend; CPU-computed kernels use torch's CPU generator."""


def get_device_name(device_name=None) -> str:
    _index(device_name)
    return PROPERTIES.name


def get_device_properties(device_name=None):
    _index(device_name)
    return PROPERTIES


def synchronize(device=None) -> None:
    _index(device)


class device:
    """Context manager that makes ``device`` the current NPU (None: leave it)."""

    def __init__(self, device):
        self.idx = None if device is None else _index(device)
        self.prev = None

    def __enter__(self):
        global _current
        self.prev = _current
        if self.idx is not None:
            _current = self.idx

    def __exit__(self, *exc):
        global _current
        _current = self.prev
        return False


class Event:
    """torch.npu.Event: ``record`` on the current device, ``elapsed_time`` in milliseconds."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self.enable_timing = enable_timing
        self.device = None  # where it was recorded
        self._at = None

    def record(self, stream=None) -> None:
        self.device = torch.device("npu", _current)
        self._at = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end_event: "Event") -> float:
        if not (self.enable_timing and end_event.enable_timing):
            raise RuntimeError("Both events must be created with argument 'enable_timing=True'.")
        if self._at is None or end_event._at is None:
            raise RuntimeError("Both events must be recorded before calculating elapsed time.")
        if self.device != end_event.device:
            raise RuntimeError("Both events must be recorded on the same device.")
        return (end_event._at - self._at) * 1e3


def _index(device) -> int:
    """The device index of an int, ``"npu:N"`` or torch.device (None: the current one); refuses one past the
    last device."""
    if device is None:
        return _current
    if isinstance(device, int):
        idx = device
    else:
        device = torch.device(device)
        if device.type != "npu":
            raise ValueError(f"Expected a npu device, but got: {device}")
        idx = _current if device.index is None else device.index
    if not 0 <= idx < DEVICE_COUNT:
        raise RuntimeError(f"Invalid device argument {idx}: the machine has {DEVICE_COUNT} NPU(s)")
    return idx
