"""One Device abstraction over CPU, CUDA and Ascend NPU.

The profiler and the runtime only ever talk to a ``Device``: it resolves a
user's ``--device`` string, synchronises, times a callable the right way for
the backend and describes itself (the fingerprint a cost table is bound to).
A backend that is missing fails with one sentence (``DeviceError``), which the
CLI turns into exit code 2.
"""

from __future__ import annotations

import os
import platform
import re
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import torch

from xytune import __version__


class DeviceError(RuntimeError):
    """A device that cannot be used here; the message is one user-facing sentence."""


@dataclass(frozen=True)
class ChipSpec:
    """Nominal datasheet figures of a named chip (reporting only; peaks are measured)."""

    name: str
    ai_cores: int
    hbm_gb: int
    fp16_tflops: float
    hbm_tb_s: float


# Nominal figures of the Ascend 910B family as published by vendors and
# third-party spec sheets; the profiler measures real peaks and stores those.
ASCEND_SPECS: dict[str, ChipSpec] = {
    "ascend910b1": ChipSpec("Ascend910B1", 24, 64, 414.0, 1.6),
    "ascend910b2": ChipSpec("Ascend910B2", 24, 64, 376.0, 1.6),
    "ascend910b3": ChipSpec("Ascend910B3", 20, 64, 313.0, 1.6),
    "ascend910b4": ChipSpec("Ascend910B4", 20, 32, 280.0, 0.8),
}

_DEVICE_RE = re.compile(r"^(cpu|cuda|npu|ascend910b[1-4]?)(?::(\d+))?$")

# The cold-cache flush before each GPU/NPU sample when the device does not report its L2 size
DEFAULT_FLUSH_BYTES = 256 * 2**20

# Fingerprint keys that must agree for a cost table to describe this device;
# the others (software versions) only produce a warning when they differ.
IDENTITY_KEYS = ("backend", "device_name", "cpu_model", "cpu_caches", "compute_units", "threads", "isa")

# CPU features that decide which kernels exist and which dtype is fast: oneDNN's bf16 paths need AVX-512
# BW/VL/DQ or AVX-NE-CONVERT, native bf16 dot products AVX512_BF16 or AMX; Arm has NEON (asimd), SVE, BF16.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_fp16",
             "avx_vnni", "avx_ne_convert", "amx_tile", "amx_bf16", "amx_int8",
             "asimd", "sve", "sve2", "bf16", "i8mm")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (empty where there is none): the rest repeat them."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def _caches() -> list[tuple[str, str, str]]:
    """CPU 0's caches as the kernel lists them: (level, type, size such as "48K")."""
    base, found = "/sys/devices/system/cpu/cpu0/cache", []
    try:
        for entry in sorted(e for e in os.listdir(base) if e.startswith("index")):
            level, kind, size = (Path(base, entry, name).read_text().strip() for name in ("level", "type", "size"))
            found.append((level, kind, size))
    except OSError:
        pass
    return found


def _cpu_model_name() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_model() -> str | None:
    """The CPU's family and model numbers (x86) or implementer and part (Arm): KVM guests of different Xeon
    generations all call themselves "Intel(R) Xeon(R) Processor" and can report the same ISA flags."""
    info = _cpuinfo()
    names = {"cpu family": "family", "model": "model", "CPU implementer": "implementer", "CPU part": "part"}
    return " ".join(f"{short} {info[key]}" for key, short in names.items() if key in info) or None


def cpu_caches() -> str | None:
    """CPU 0's data and unified caches by level, as the kernel reports them ("L1d 48K L2 2048K L3 491520K")."""
    parts = [f"L{level}{'d' if kind == 'Data' else ''} {size}" for level, kind, size in _caches()
             if kind != "Instruction"]
    return " ".join(parts) or None


def cpu_isa() -> list[str]:
    """The ISA features of ``ISA_FLAGS`` this CPU reports (``flags`` on x86, ``Features`` on Arm), sorted."""
    info = _cpuinfo()
    found = set((info.get("flags") or info.get("Features") or "").split())
    return sorted(set(ISA_FLAGS) & found)


def _size_bytes(text: str) -> int:
    """A sysfs cache size ("48K", "32M") in bytes (0 when it is not one)."""
    text = text.strip().upper()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    try:
        return int(text.rstrip("KMG")) * scale
    except ValueError:
        return 0


def llc_bytes() -> int:
    """Last-level cache size of CPU 0 (32 MiB when the kernel does not say)."""
    sizes = [_size_bytes(size) for _, kind, size in _caches() if kind != "Instruction"]
    return max(sizes, default=0) or 32 * 2**20


def _optional_version(module: str) -> str | None:
    try:
        return version(module)
    except Exception:
        return None


def nvidia_driver_version() -> str | None:
    """The NVIDIA driver's version ("550.54.15") from NVML, which torch.cuda itself imports when pynvml is there
    (torch/cuda/__init__.py, torch 2.13); None without it. torch has no ``torch.cuda.driver_version``, and
    ``torch._C._cuda_getDriverVersion`` (the CUDA driver API level, not the driver) is not declared in torch 2.13's
    torch/_C/__init__.pyi."""
    try:
        import pynvml  # optional (nvidia-ml-py)

        pynvml.nvmlInit()
        try:
            found = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None
    return found.decode() if isinstance(found, bytes) else str(found)


def cann_version() -> str | None:
    """The Ascend CANN toolkit's version ("8.1.RC1"): torch_npu's ``torch_npu.npu.utils.get_cann_version``
    (Ascend/pytorch torch_npu/npu/utils.py; "" before CANN 8.1.RC1), else the ``version=`` line of the toolkit's
    ``<arch>-linux/ascend_toolkit_install.info`` under $ASCEND_TOOLKIT_HOME or $ASCEND_HOME_PATH."""
    try:
        from torch_npu.npu.utils import get_cann_version  # optional: only on Ascend

        found = get_cann_version(module="CANN")
    except Exception:
        found = ""
    if found:
        return found
    home = os.environ.get("ASCEND_TOOLKIT_HOME") or os.environ.get("ASCEND_HOME_PATH")
    if not home:
        return None
    try:
        lines = Path(home, f"{platform.machine()}-linux", "ascend_toolkit_install.info").read_text().splitlines()
    except OSError:
        return None
    return next((line.partition("=")[2].strip() for line in lines if line.startswith("version=")), None)


@dataclass
class Device:
    """A resolved compute device with its own timer and fingerprint."""

    backend: str  # "cpu" | "cuda" | "npu"
    index: int = 0
    chip: ChipSpec | None = None
    threads: int | None = None
    _flush_buffer: torch.Tensor | None = field(default=None, repr=False)

    @property
    def torch_device(self) -> torch.device:
        if self.backend == "cpu":
            return torch.device("cpu")
        return torch.device(self.backend, self.index)

    @property
    def name(self) -> str:
        return "cpu" if self.backend == "cpu" else f"{self.backend}:{self.index}"

    def _module(self):
        return getattr(torch, self.backend)

    def synchronize(self) -> None:
        if self.backend != "cpu":
            self._module().synchronize(self.index)

    def l2_cache_bytes(self) -> int | None:
        """The GPU/NPU L2 size the device reports: ``L2_cache_size`` of torch.cuda's device properties, or of
        torch_npu's (torch_npu/csrc/npu/Module.cpp binds it from ACL_DEVICE_INFO_L2_SIZE; older releases bind
        only name and total_memory). None on CPU or where the device does not say."""
        if self.backend == "cpu":
            return None
        return getattr(self._module().get_device_properties(self.index), "L2_cache_size", None) or None

    def flush_bytes(self) -> int:
        """How much the cold-cache flush overwrites: twice the L2, or ``DEFAULT_FLUSH_BYTES`` when unknown."""
        l2 = self.l2_cache_bytes()
        return 2 * l2 if l2 else DEFAULT_FLUSH_BYTES

    def flush_cache(self) -> None:
        """Overwrite a buffer larger than the GPU/NPU L2 cache so a sample starts cold.

        On CPU, primitives rotate through copies of their weights instead
        (see primitives.weight_copies): that matches serving, where every
        layer's weights pass once per step, better than a flush does.
        """
        if self.backend == "cpu":
            return
        if self._flush_buffer is None:
            self._flush_buffer = torch.empty(self.flush_bytes() // 4, dtype=torch.int32, device=self.torch_device)
        self._flush_buffer.zero_()

    def time_once(self, fn: Callable[[], object]) -> float:
        """Seconds one call of ``fn`` takes (synchronised, host-side clock)."""
        self.synchronize()
        start = time.perf_counter()
        fn()
        self.synchronize()
        return time.perf_counter() - start

    def time_samples(self, fn: Callable[[], object], count: int, cold: bool = True) -> list[float]:
        """Time ``count`` calls of ``fn``: perf_counter on CPU, device events on GPU/NPU; caches flushed first."""
        if self.backend == "cpu":
            out = []
            for _ in range(count):
                start = time.perf_counter()
                fn()
                out.append(time.perf_counter() - start)
            return out
        mod = self._module()
        starts = [mod.Event(enable_timing=True) for _ in range(count)]
        ends = [mod.Event(enable_timing=True) for _ in range(count)]
        with mod.device(self.index):  # an event records on the current device's stream: make it this one
            for s, e in zip(starts, ends):
                if cold:
                    self.flush_cache()
                s.record()
                fn()
                e.record()
        self.synchronize()
        return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]

    def fingerprint(self) -> dict:
        """What a cost table measured on this device is bound to."""
        fp: dict = {
            "backend": self.backend,
            "xytune": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "host_arch": platform.machine(),
        }
        if self.backend == "cpu":
            fp["device_name"] = _cpu_model_name()
            fp["cpu_model"] = cpu_model()
            fp["cpu_caches"] = cpu_caches()
            fp["compute_units"] = os.cpu_count() or 1
            fp["threads"] = self.threads or torch.get_num_threads()
            fp["isa"] = cpu_isa()
            fp["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        elif self.backend == "cuda":
            props = torch.cuda.get_device_properties(self.index)
            fp["device_name"] = props.name
            fp["compute_units"] = props.multi_processor_count
            fp["threads"] = None
            fp["memory_gb"] = round(props.total_memory / 2**30, 1)
            fp["compute_capability"] = f"{props.major}.{props.minor}"
            fp["cuda"] = torch.version.cuda
            fp["triton"] = _optional_version("triton")
            fp["driver"] = nvidia_driver_version()
        else:
            props = torch.npu.get_device_properties(self.index)
            fp["device_name"] = torch.npu.get_device_name(self.index)
            # AI cores as the device reports them (torch_npu's cube_core_num); older torch_npu: the chip's spec
            fp["compute_units"] = getattr(props, "cube_core_num", None) or (self.chip.ai_cores if self.chip else None)
            fp["threads"] = None
            fp["torch_npu"] = _optional_version("torch_npu")
            fp["cann"] = cann_version()
        if self.chip is not None:
            fp["chip_spec"] = self.chip.__dict__
        return fp


def fingerprint_mismatches(table_fp: dict, current_fp: dict) -> tuple[list[str], list[str]]:
    """(fatal identity differences, harmless version differences) between two fingerprints.

    An identity key that one side lacks (a table written before the key existed) is only a soft difference.
    """
    fatal, soft = [], []
    for key in sorted(set(table_fp) | set(current_fp)):
        a, b = table_fp.get(key), current_fp.get(key)
        if a == b:
            continue
        line = f"{key}: table has {a!r}, this device has {b!r}"
        (fatal if key in IDENTITY_KEYS and key in table_fp and key in current_fp else soft).append(line)
    return fatal, soft


def _load_npu():
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except ImportError as exc:
        raise DeviceError(
            "The NPU backend needs torch_npu and the Ascend CANN toolkit, which are not installed "
            "(pip install 'xytune[npu]' on an Ascend host)."
        ) from exc
    if not torch.npu.is_available() or torch.npu.device_count() == 0:
        raise DeviceError("torch_npu is installed but no Ascend NPU is visible on this machine.")


def get_device(spec: str = "cpu", threads: int | None = None) -> Device:
    """Resolve a ``--device`` string (cpu, cuda[:N], npu[:N], ascend910b[1-4][:N])."""
    m = _DEVICE_RE.match(spec.strip().lower())
    if not m:
        raise DeviceError(
            f"Unknown device {spec!r}; use cpu, cuda, cuda:N, npu, npu:N, ascend910b or ascend910b1..b4."
        )
    kind, index = m.group(1), int(m.group(2) or 0)
    if kind == "cpu":
        if threads is not None:
            if threads < 1:
                raise DeviceError(f"--threads must be at least 1, got {threads}.")
            torch.set_num_threads(threads)
        return Device("cpu", threads=torch.get_num_threads())
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda needs a CUDA build of torch and an NVIDIA GPU; neither is usable here.")
        if index >= torch.cuda.device_count():
            raise DeviceError(f"cuda:{index} does not exist; this machine has {torch.cuda.device_count()} GPU(s).")
        return Device("cuda", index)
    _load_npu()
    if index >= torch.npu.device_count():
        raise DeviceError(f"npu:{index} does not exist; this machine has {torch.npu.device_count()} NPU(s).")
    actual = torch.npu.get_device_name(index).replace(" ", "").lower()
    if kind.startswith("ascend") and not actual.startswith(kind):
        raise DeviceError(f"--device {kind} was asked for but npu:{index} is a {actual}.")
    # the chip the device says it is, however it was named: "npu:0" and "ascend910b3" are the same device
    return Device("npu", index, chip=ASCEND_SPECS.get(actual[: len("ascend910b") + 1]))


def cuda_available() -> bool:
    return torch.cuda.is_available()


def npu_available() -> bool:
    try:
        _load_npu()
        return True
    except DeviceError:
        return False


def failure_reason(exc: BaseException) -> str:
    """One line for the table and the terminal: the exception's type and the first line of its message."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line if len(line) <= 240 else line[:237] + "..."
