"""Tensors on ``npu:N`` that compute on CPU.

An ``NPUTensor`` is a wrapper subclass (``torch.Tensor._make_wrapper_subclass``, the technique of PyTorch's
``test/test_privateuseone_python_backend.py`` and albanD's subclass_zoo ``new_device.py``) that reports device
``npu:N`` and an ACL storage format, and holds a CPU tensor. Its ``__torch_dispatch__`` unwraps the arguments,
runs the op on CPU and wraps the results back on the same device, so ``tensor.device``, ``.npu()``, ``.cpu()``
and device mismatches behave as on an Ascend host. Ops with no tensor argument (``torch.empty(...,
device="npu")`` and the copies that ``.to("npu")`` makes) reach the PrivateUse1 kernels registered below.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_map

ACL_FORMAT_ND = 2  # aclFormat in CANN's acl/acl_base.h: ND = 2, FRACTAL_NZ = 29

aten = torch.ops.aten

# Ops that may mix CPU and NPU tensors, as on a real device: copies between the two, and indexing with CPU
# index tensors (which torch moves to the device itself). Any other op refuses a CPU tensor of one or more
# dimensions beside an NPU one, with torch's own message.
CROSS_DEVICE_OPS = {aten.copy_.default, aten._to_copy.default, aten._copy_from.default, aten.index.Tensor,
                    aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


def normalize_device(device) -> torch.device:
    """``npu`` -> ``npu:<current>``: a tensor made on the bare device name lives on the current device."""
    from . import npu  # the device module knows the current device

    device = torch.device(device)
    if device.type == "npu" and device.index is None:
        return torch.device("npu", npu.current_device())
    return device


class NPUTensor(torch.Tensor):
    """A tensor on ``npu:N`` whose data is the CPU tensor ``cpu_data``, in the ACL format ``npu_format``."""

    cpu_data: torch.Tensor
    npu_format: int

    @staticmethod
    def __new__(cls, data: torch.Tensor, device: torch.device, npu_format: int = ACL_FORMAT_ND):
        # an inference tensor exactly when its data is one: a view made under inference_mode of a tensor made
        # outside it is a normal tensor, whose version counter autograd's view tracking then sets
        with torch.inference_mode(data.is_inference()):
            out = torch.Tensor._make_wrapper_subclass(cls, data.shape, strides=data.stride(),
                                                      storage_offset=data.storage_offset(), dtype=data.dtype,
                                                      layout=data.layout, device=device)
        out.cpu_data = data
        out.npu_format = npu_format
        return out

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self) -> str:
        return f"NPUTensor(device={self.device}, npu_format={self.npu_format}, {self.cpu_data!r})"

    def tolist(self):
        """torch refuses ``tolist`` on subclasses; a real NPU tensor copies to the host and answers."""
        return self.cpu_data.tolist()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        from ._ops import run_npu_op  # the npu:: ops' CPU implementations

        kwargs = kwargs or {}
        leaves, _ = tree_flatten((args, kwargs))
        device = _result_device(func, leaves, kwargs)
        cpu_args, cpu_kwargs = tree_map(_unwrap, (args, kwargs))
        if "device" in cpu_kwargs and cpu_kwargs["device"] is not None:
            cpu_kwargs["device"] = torch.device("cpu")
        if func.namespace == "npu":
            return run_npu_op(func, args, kwargs, cpu_args, cpu_kwargs, device)
        out = func(*cpu_args, **cpu_kwargs)
        originals = {id(_unwrap(t)): t for t in leaves if isinstance(t, torch.Tensor)}
        return tree_map(lambda o: _rewrap(o, originals, device), out)


def _unwrap(x):
    return x.cpu_data if isinstance(x, NPUTensor) else x


def _result_device(func, leaves, kwargs) -> torch.device:
    """Where the op's results live: its ``device=`` argument, else the one NPU its tensors are on."""
    devices = {t.device for t in leaves if isinstance(t, NPUTensor)}
    if len(devices) > 1:
        a, b = sorted(map(str, devices))[:2]
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                           f"{a} and {b}!")
    device = next(iter(devices))
    if func not in CROSS_DEVICE_OPS and any(isinstance(t, torch.Tensor) and not isinstance(t, NPUTensor)
                                            and t.dim() > 0 for t in leaves):
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                           f"{device} and cpu! ({func})")
    if kwargs.get("device") is not None:
        return normalize_device(kwargs["device"])
    return device


def _rewrap(out, originals: dict, device: torch.device):
    """A CPU result as the caller sees it: the caller's own tensor for in-place and out= ops, else a new one
    on ``device`` (or the CPU tensor itself when the op asked for CPU)."""
    if not isinstance(out, torch.Tensor):
        return out
    if id(out) in originals:
        mine = originals[id(out)]
        if isinstance(mine, NPUTensor) and (mine.shape != out.shape or mine.stride() != out.stride()):
            raise RuntimeError("the torch_npu stand-in cannot resize an npu tensor in place; allocate the "
                               "result with its final shape")
        return mine
    return NPUTensor(out, device) if device.type == "npu" else out


# -- PrivateUse1 kernels: ops that reach the backend with no NPU tensor argument to dispatch on --

def _empty(size, *, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    data = torch.empty(size, dtype=dtype, memory_format=memory_format or torch.contiguous_format)
    return NPUTensor(data, normalize_device(device))


def _empty_strided(size, stride, *, dtype=None, layout=None, device=None, pin_memory=None):
    return NPUTensor(torch.empty_strided(size, stride, dtype=dtype), normalize_device(device))


def _copy_from(src, dst, non_blocking=False):
    _unwrap(dst).copy_(_unwrap(src))
    return dst


_ATEN = torch.library.Library("aten", "IMPL")
_ATEN.impl("empty.memory_format", _empty, "PrivateUse1")
_ATEN.impl("empty_strided", _empty_strided, "PrivateUse1")
_ATEN.impl("_copy_from", _copy_from, "PrivateUse1")
