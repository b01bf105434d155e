"""torch_npu.npu.utils of the stand-in: the CANN version query.

Upstream (Ascend/pytorch ``torch_npu/npu/utils.py``) ``get_cann_version(module="CANN")`` returns the version
string of a CANN component, and an empty string where it cannot tell (CANN older than 8.1.RC1, per the
op-plugin docs ``torch_npu-utils-get_cann_version.md``). Tests set ``CANN_VERSION``.
"""

from __future__ import annotations

CANN_VERSION = "8.1.RC1"


def get_cann_version(module: str = "CANN") -> str:
    return CANN_VERSION if module == "CANN" else ""
