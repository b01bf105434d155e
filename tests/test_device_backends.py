"""Device details that differ by backend, checked without the hardware: the CPU's last-level cache, and the
CUDA timer, flush size and driver with torch.cuda's functions replaced (tests/test_accelerators.py runs them
on a real GPU; tests/test_npu_contract.py runs the NPU side against a torch_npu stand-in)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import xytune.profiler.devices as devices
from xytune.profiler.devices import DEFAULT_FLUSH_BYTES, Device, llc_bytes, nvidia_driver_version


def test_llc_bytes_is_the_largest_data_or_unified_cache(monkeypatch):
    monkeypatch.setattr(devices, "_caches", lambda: [("1", "Data", "48K"), ("1", "Instruction", "64K"),
                                                     ("2", "Unified", "2048K"), ("3", "Unified", "491520K")])
    assert llc_bytes() == 491520 * 1024
    monkeypatch.setattr(devices, "_caches", lambda: [("1", "Instruction", "1M")])
    assert llc_bytes() == 32 * 2**20  # nothing it can use: the documented fallback
    monkeypatch.setattr(devices, "_caches", lambda: [])
    assert llc_bytes() == 32 * 2**20


def test_llc_bytes_reads_this_machines_caches():
    """The cache folder also holds files that are not caches (``uevent``); only index* folders count."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    sizes = [int((d / "size").read_text().strip()[:-1]) * 1024 for d in base.glob("index*")
             if (d / "type").read_text().strip() != "Instruction" and (d / "size").read_text().strip().endswith("K")]
    if not sizes:
        pytest.skip("this kernel lists no CPU caches in sysfs")
    assert llc_bytes() == max(sizes)


class _FakeCuda:
    """torch.cuda's timer functions on a machine with two GPUs, recording where events are recorded."""

    def __init__(self, l2_bytes=None):
        self.current, self.recorded = 0, []
        self.props = SimpleNamespace(name="Fake GPU", multi_processor_count=132, total_memory=80 * 2**30, major=9,
                                     minor=0, **({"L2_cache_size": l2_bytes} if l2_bytes else {}))
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                self.at = None

            def record(self, stream=None):
                fake.recorded.append(fake.current)
                self.at = len(fake.recorded)

            def elapsed_time(self, end):
                return float(end.at - self.at)

        class device:
            def __init__(self, index):
                self.index = index

            def __enter__(self):
                self.prev, fake.current = fake.current, self.index

            def __exit__(self, *exc):
                fake.current = self.prev

        self.Event, self.device = Event, device

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "Event", self.Event)
        monkeypatch.setattr(torch.cuda, "device", self.device)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: self.props)


def test_cuda_events_record_on_the_devices_own_gpu(monkeypatch):
    cuda = _FakeCuda()
    cuda.install(monkeypatch)
    samples = Device("cuda", 1).time_samples(lambda: None, 3, cold=False)
    assert samples == [1e-3] * 3  # one fake millisecond per start-end pair
    assert cuda.recorded == [1] * 6 and cuda.current == 0


def test_flush_is_twice_the_l2_the_gpu_reports(monkeypatch):
    _FakeCuda(l2_bytes=50 * 2**20).install(monkeypatch)
    assert Device("cuda", 0).flush_bytes() == 100 * 2**20
    _FakeCuda().install(monkeypatch)
    assert Device("cuda", 0).flush_bytes() == DEFAULT_FLUSH_BYTES
    assert Device("cpu").l2_cache_bytes() is None


def _fake_pynvml(version):
    calls = []

    def get_version():
        if isinstance(version, Exception):
            raise version
        return version

    module = SimpleNamespace(nvmlInit=lambda: calls.append("init"), nvmlShutdown=lambda: calls.append("shutdown"),
                             nvmlSystemGetDriverVersion=get_version)
    return module, calls


@pytest.mark.parametrize("reported", ["550.54.15", b"550.54.15"])
def test_cuda_driver_comes_from_nvml(monkeypatch, reported):
    module, calls = _fake_pynvml(reported)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    _FakeCuda().install(monkeypatch)
    assert nvidia_driver_version() == "550.54.15"
    assert calls == ["init", "shutdown"]
    assert Device("cuda", 0).fingerprint()["driver"] == "550.54.15"


def test_cuda_driver_is_none_without_nvml(monkeypatch):
    module, calls = _fake_pynvml(RuntimeError("NVML Shared Library Not Found"))
    monkeypatch.setitem(sys.modules, "pynvml", module)
    assert nvidia_driver_version() is None and calls == ["init", "shutdown"]
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: the import fails
    assert nvidia_driver_version() is None
