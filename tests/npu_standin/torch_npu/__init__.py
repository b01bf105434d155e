"""A stand-in for torch_npu (Ascend's PyTorch adapter) that computes on CPU, for tests only.

Tests put ``tests/npu_standin`` first on PYTHONPATH in a fresh interpreter, so the project's own
``import torch_npu`` finds this package exactly as it would find the real one; nothing else imports it.
Like torch_npu, importing it renames PyTorch's PrivateUse1 backend to "npu", adds the ``.npu()`` tensor
methods, registers ``torch.npu`` (``torch_npu.npu``) and makes tensors on ``npu:N`` work (``_tensor``). The
ops xytune calls carry their upstream schemas (``_ops``), so a call the real op would reject (a wrong keyword,
a float32 query, a tuple read as a tensor) fails here too. torch_npu registers its hooks and device guard in
C++; here they are the Python ones of ``torch._C._acc`` (torch/utils/backend_registration.py,
``_setup_privateuseone_for_python_backend``, torch 2.13).
"""

from __future__ import annotations

import torch

torch.utils.rename_privateuse1_backend("npu")
torch.utils.generate_methods_for_privateuse1_backend()

from . import npu  # noqa: E402  (torch.npu)
from ._ops import python_binding  # noqa: E402  (also defines the npu:: ops)
from ._tensor import NPUTensor  # noqa: E402, F401  (registers the PrivateUse1 kernels)

__version__ = "0.0.0+standin"


class _Hooks(torch._C._acc.PrivateUse1Hooks):
    def is_available(self) -> bool:
        return npu.is_available()

    def has_primary_context(self, dev_id) -> bool:
        return True

    def is_built(self) -> bool:
        return True


class _DeviceGuard(torch._C._acc.DeviceGuard):
    def type_(self):
        return torch._C._autograd.DeviceType.PrivateUse1


torch._register_device_module("npu", npu)
torch._C._acc.register_python_privateuseone_hook(_Hooks())
torch._C._acc.register_python_privateuseone_device_guard(_DeviceGuard())

npu_format_cast = python_binding(torch.ops.npu.npu_format_cast)
get_npu_format = python_binding(torch.ops.npu.get_npu_format)
npu_fused_infer_attention_score = python_binding(torch.ops.npu.npu_fused_infer_attention_score)
npu_weight_quant_batchmatmul = python_binding(torch.ops.npu.npu_weight_quant_batchmatmul)
npu_convert_weight_to_int4pack = python_binding(torch.ops.npu.npu_convert_weight_to_int4pack)
