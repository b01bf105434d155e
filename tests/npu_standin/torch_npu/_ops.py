"""The torch_npu ops xytune calls, declared with their upstream schemas and computed on CPU.

Each op is defined in the ``npu`` namespace (as torch_npu registers them, ``torch.ops.npu.*``) with the schema
text of the file and revision cited beside it, and exposed as ``torch_npu.<name>`` through ``python_binding``,
which checks the call the way torch_npu's generated bindings (PyTorch's PythonArgParser) do: an unknown
keyword, a missing argument or one past the positional ones raises TypeError. There is no CPU kernel, so an
op called on CPU tensors fails as on an Ascend host; on NPU tensors ``NPUTensor.__torch_dispatch__`` hands
them here (``run_npu_op``) as CPU tensors.

What the attention op computes follows its documentation (hiascend.com, torch_npu 7.0.0 API reference,
``torch_npu.npu_fused_infer_attention_score``): query in float16/bfloat16 (int8 only with quantisation
scales, not modelled here) and contiguous; layouts BSH, BSND, BNSD; ``num_key_value_heads`` query heads per
K/V head (GQA); ``atten_mask`` True (or 1) = masked out, in shapes (S, KV), (B|1, S, KV) or (B|1, 1, S, KV);
``actual_seq_lengths`` / ``actual_seq_lengths_kv`` per batch; ``scale`` multiplies QK^T. What the stand-in
does not model (quantisation, paged ``block_table``, shared prefixes, sparse modes other than 0, a
``pre_tokens``/``next_tokens`` band) raises NotImplementedError rather than computing something else.
"""

from __future__ import annotations

import functools

import torch

from ._tensor import NPUTensor

# torch_npu/csrc/aten/npu_native_functions.yaml, section custom:, read at Ascend/pytorch commit
# 9ed07bbbd8d92071076a31526a2ebb08ce2c7691 (torch_npu master, 2025)
NPU_FORMAT_CAST = "npu_format_cast(Tensor self, int acl_format, int? customize_dtype=None) -> Tensor"
GET_NPU_FORMAT = "get_npu_format(Tensor self) -> int"
# op_plugin/config/op_plugin_functions.yaml, section custom:, read at Ascend/op-plugin commit
# 0066e6bc19498cd4b17c6fa8737a68d543d5dcbc (all_version v2.1 .. v2.10); the keyword is ``scale``
# (``scale_value`` is npu_incre_flash_attention's / npu_prompt_flash_attention's)
FUSED_INFER_ATTENTION_SCORE = (
    "npu_fused_infer_attention_score(Tensor query, Tensor key, Tensor value, *, Tensor? pse_shift=None, "
    "Tensor? atten_mask=None, SymInt[]? actual_seq_lengths=None, SymInt[]? actual_seq_lengths_kv=None, "
    "Tensor? dequant_scale1=None, Tensor? quant_scale1=None, Tensor? dequant_scale2=None, "
    "Tensor? quant_scale2=None, Tensor? quant_offset2=None, Tensor? antiquant_scale=None, "
    "Tensor? antiquant_offset=None, Tensor? key_antiquant_scale=None, Tensor? key_antiquant_offset=None, "
    "Tensor? value_antiquant_scale=None, Tensor? value_antiquant_offset=None, Tensor? block_table=None, "
    "Tensor? query_padding_size=None, Tensor? kv_padding_size=None, Tensor? key_shared_prefix=None, "
    "Tensor? value_shared_prefix=None, SymInt[]? actual_shared_prefix_len=None, Tensor? query_rope=None, "
    "Tensor? key_rope=None, Tensor? key_rope_antiquant_scale=None, int num_heads=1, float scale=1.0, "
    "int pre_tokens=2147483647, int next_tokens=2147483647, str input_layout=\"BSH\", "
    "int num_key_value_heads=0, int sparse_mode=0, int inner_precise=0, int block_size=0, "
    "int antiquant_mode=0, int key_antiquant_mode=0, int value_antiquant_mode=0, "
    "bool softmax_lse_flag=False) -> (Tensor, Tensor)"
)

# weight-only quantized matmul and int4 packing: the schemas torch_npu 7.x documents and the torchair converters
# quote (op_plugin_functions.yaml, section custom:); y = x @ ((weight + antiquant_offset) * antiquant_scale) + bias
WEIGHT_QUANT_BATCHMATMUL = (
    "npu_weight_quant_batchmatmul(Tensor x, Tensor weight, Tensor antiquant_scale, Tensor? antiquant_offset=None, "
    "Tensor? quant_scale=None, Tensor? quant_offset=None, Tensor? bias=None, int antiquant_group_size=0, "
    "int inner_precise=0) -> Tensor"
)
CONVERT_WEIGHT_TO_INT4PACK = "npu_convert_weight_to_int4pack(Tensor weight, int inner_k_tiles=0) -> Tensor"

_LIB = torch.library.Library("npu", "DEF")
for _schema in (NPU_FORMAT_CAST, GET_NPU_FORMAT, FUSED_INFER_ATTENTION_SCORE, WEIGHT_QUANT_BATCHMATMUL,
                CONVERT_WEIGHT_TO_INT4PACK):
    _LIB.define(_schema)


def python_binding(op: torch._ops.OpOverloadPacket):
    """``op`` as a Python function that rejects a call its schema does not accept with TypeError."""
    schema = op.default._schema
    name = schema.name.split("::")[-1]
    positional = [a.name for a in schema.arguments if not a.kwarg_only]
    known = {a.name for a in schema.arguments}
    required = [a.name for a in schema.arguments if not a.has_default_value()]

    @functools.wraps(op)
    def call(*args, **kwargs):
        if len(args) > len(positional):
            raise TypeError(f"{name}() takes {len(positional)} positional arguments but {len(args)} were given")
        for key in kwargs:
            if key not in known:
                raise TypeError(f"{name}() got an unexpected keyword argument '{key}'")
            if key in positional[:len(args)]:
                raise TypeError(f"{name}() got multiple values for argument '{key}'")
        missing = [a for a in required if a not in kwargs and a not in positional[:len(args)]]
        if missing:
            raise TypeError(f"{name}() missing required argument '{missing[0]}'")
        try:
            return op(*args, **kwargs)
        except RuntimeError as exc:
            if "Expected a value of type" in str(exc):  # a wrong type: the parser says TypeError
                raise TypeError(f"{name}(): {str(exc).splitlines()[0]}") from None
            raise

    return call


def _options(op, kwargs: dict) -> dict:
    """Every keyword-only argument of ``op``: the call's, else the schema default."""
    out = {a.name: a.default_value for a in op._schema.arguments if a.kwarg_only}
    out.update(kwargs)
    return out


def run_npu_op(func, args, kwargs, cpu_args, cpu_kwargs, device: torch.device):
    """One ``npu::`` op on NPU tensors (``args``), computed on their CPU data (``cpu_args``)."""
    name = func._schema.name
    if name == "npu::get_npu_format":
        return args[0].npu_format
    if name == "npu::npu_format_cast":
        acl_format = cpu_args[1] if len(cpu_args) > 1 else cpu_kwargs["acl_format"]
        return NPUTensor(cpu_args[0].clone(), device, npu_format=acl_format)
    if name == "npu::npu_fused_infer_attention_score":
        out, lse = fused_infer_attention_score(*cpu_args, **_options(func, cpu_kwargs))
        return NPUTensor(out, device), NPUTensor(lse, device)
    if name == "npu::npu_convert_weight_to_int4pack":
        return NPUTensor(convert_weight_to_int4pack(*cpu_args, **cpu_kwargs), device)
    if name == "npu::npu_weight_quant_batchmatmul":
        return NPUTensor(weight_quant_batchmatmul(*cpu_args, **cpu_kwargs), device)
    raise NotImplementedError(f"the torch_npu stand-in has no implementation of {name}")


def convert_weight_to_int4pack(weight: torch.Tensor, inner_k_tiles: int = 0) -> torch.Tensor:
    """int32 ``[K, N]`` holding int4 values (-8..7) -> int32 ``[K, N / 8]``, eight values a word (the real
    layout is the NPU's own; only this stand-in's matmul reads it)."""
    if weight.dtype != torch.int32 or weight.dim() != 2:
        raise RuntimeError("npu_convert_weight_to_int4pack: weight must be a 2-D int32 tensor")
    if weight.shape[-1] % 8:
        raise RuntimeError(f"npu_convert_weight_to_int4pack: the last dimension ({weight.shape[-1]}) must be a "
                           "multiple of 8")
    if weight.min() < -8 or weight.max() > 7:
        raise RuntimeError("npu_convert_weight_to_int4pack: values must be int4 (-8..7)")
    nibbles = (weight & 0xF).reshape(weight.shape[0], -1, 8).to(torch.int64)
    words = (nibbles << (4 * torch.arange(8))).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    nibbles = (packed.to(torch.int64)[..., None] >> (4 * torch.arange(8))) & 0xF
    return torch.where(nibbles >= 8, nibbles - 16, nibbles).reshape(packed.shape[0], -1)


def weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None, quant_offset=None,
                             bias=None, antiquant_group_size=0, inner_precise=0) -> torch.Tensor:
    """The documented A16W8 / A16W4 arithmetic with its shape and dtype checks (per-tensor, per-channel and
    per-group scales in x's dtype; output quantisation and int64 scales are not modelled)."""
    if quant_scale is not None or quant_offset is not None or antiquant_scale.dtype == torch.int64:
        raise NotImplementedError("the torch_npu stand-in models float antiquant scales without output quantisation")
    if x.dtype not in (torch.float16, torch.bfloat16) or x.dim() != 2:
        raise RuntimeError(f"npu_weight_quant_batchmatmul: x must be a 2-D float16/bfloat16 tensor, got {x.dtype}")
    if weight.dtype == torch.int8:
        w = weight.to(torch.float32)
    elif weight.dtype == torch.int32:
        w = _unpack_int4(weight).to(torch.float32)
    else:
        raise RuntimeError(f"npu_weight_quant_batchmatmul: weight must be int8 or int32 (int4 pack), got {weight.dtype}")
    k, n = w.shape
    if x.shape[1] != k:
        raise RuntimeError(f"npu_weight_quant_batchmatmul: x is [M, {x.shape[1]}] but weight is [{k}, {n}]")
    if antiquant_scale.dtype != x.dtype:
        raise RuntimeError("npu_weight_quant_batchmatmul: antiquant_scale must have x's dtype")
    if antiquant_offset is not None and (antiquant_offset.shape != antiquant_scale.shape
                                         or antiquant_offset.dtype != antiquant_scale.dtype):
        raise RuntimeError("npu_weight_quant_batchmatmul: antiquant_offset must match antiquant_scale's shape and dtype")
    g = antiquant_group_size
    if g:
        if g % 32 or not 32 <= g <= k - 1:
            raise RuntimeError(f"npu_weight_quant_batchmatmul: antiquant_group_size must be a multiple of 32 in "
                               f"[32, K-1], got {g}")
        if tuple(antiquant_scale.shape) != (-(-k // g), n):
            raise RuntimeError(f"npu_weight_quant_batchmatmul: per-group antiquant_scale must be "
                               f"[{-(-k // g)}, {n}], got {list(antiquant_scale.shape)}")
        expand = lambda t: t.to(torch.float32).repeat_interleave(g, dim=0)[:k]  # noqa: E731
    elif tuple(antiquant_scale.shape) in ((n,), (1, n), (1,), (1, 1)):
        expand = lambda t: t.to(torch.float32).reshape(1, -1)  # noqa: E731
    else:
        raise RuntimeError(f"npu_weight_quant_batchmatmul: antiquant_scale of shape {list(antiquant_scale.shape)} "
                           f"is neither per-tensor, per-channel [{n}] nor per-group")
    if antiquant_offset is not None:
        w = w + expand(antiquant_offset)
    y = x.to(torch.float32) @ (w * expand(antiquant_scale))
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def fused_infer_attention_score(query, key, value, **opts) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention output in the query's layout and dtype, softmax log-sum-exp or a 1-element placeholder)."""
    unmodelled = [k for k, v in opts.items()
                  if v is not None and k not in ("atten_mask", "actual_seq_lengths", "actual_seq_lengths_kv")
                  and isinstance(v, (torch.Tensor, list, tuple))]
    if unmodelled or opts["sparse_mode"] != 0 or opts["pre_tokens"] != 2147483647 \
            or opts["next_tokens"] != 2147483647:
        raise NotImplementedError(f"the torch_npu stand-in models sparse_mode=0 without {unmodelled or 'bands'}")
    if query.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(f"npu_fused_infer_attention_score: query dtype {query.dtype} is not supported "
                           "(float16, bfloat16; int8 with quantisation scales)")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise RuntimeError("npu_fused_infer_attention_score: key and value must have the query's dtype")
    if not (query.is_contiguous() and key.is_contiguous() and value.is_contiguous()):
        raise RuntimeError("npu_fused_infer_attention_score: query, key and value must be contiguous")
    heads = opts["num_heads"]
    kv_heads = opts["num_key_value_heads"] or heads
    layout = opts["input_layout"]
    q, k, v = (_to_bnsd(t, layout, n) for t, n in ((query, heads), (key, kv_heads), (value, kv_heads)))
    B, N, S, D = q.shape
    KV = k.shape[2]
    if N != heads or k.shape[1] != kv_heads or heads % kv_heads or k.shape[0] != B or k.shape[3] != D \
            or v.shape != k.shape:
        raise RuntimeError(f"npu_fused_infer_attention_score: shapes {tuple(query.shape)}, {tuple(key.shape)}, "
                           f"{tuple(value.shape)} do not match num_heads={heads}, num_key_value_heads="
                           f"{opts['num_key_value_heads']}, input_layout={layout}")
    masked = torch.zeros(B, 1, S, KV, dtype=torch.bool)
    if opts["atten_mask"] is not None:
        masked |= _mask_bsskv(opts["atten_mask"], B, S, KV)
    if opts["actual_seq_lengths_kv"] is not None:
        masked |= torch.arange(KV)[None, :] >= _lengths(opts["actual_seq_lengths_kv"], B, KV, "kv")[:, None, None, None]
    rows_used = torch.ones(B, S, dtype=torch.bool)
    if opts["actual_seq_lengths"] is not None:
        rows_used = torch.arange(S)[None, :] < _lengths(opts["actual_seq_lengths"], B, S, "q")[:, None]
    group = heads // kv_heads
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = (q.float() @ k.transpose(-1, -2)) * opts["scale"]
    scores = scores.masked_fill(masked, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # [B, N, S, 1]
    probs = torch.where(torch.isfinite(lse), (scores - lse).exp(), torch.zeros(()))  # a row with no key: 0
    out = (probs @ v) * rows_used[:, None, :, None]
    out = _from_bnsd(out.to(query.dtype), layout)
    return out, (lse if opts["softmax_lse_flag"] else torch.zeros(1))


def _to_bnsd(t: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    if layout == "BNSD":
        return t
    if layout == "BSND":
        return t.transpose(1, 2)
    if layout == "BSH":
        B, S, H = t.shape
        return t.view(B, S, heads, H // heads).transpose(1, 2)
    raise NotImplementedError(f"the torch_npu stand-in models input_layout BSH, BSND and BNSD, not {layout}")


def _from_bnsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BNSD":
        return t.contiguous()
    t = t.transpose(1, 2).contiguous()
    return t.flatten(2) if layout == "BSH" else t


def _mask_bsskv(mask: torch.Tensor, B: int, S: int, KV: int) -> torch.Tensor:
    """The documented mask shapes as bool [B, 1, S, KV]."""
    if mask.dtype not in (torch.bool, torch.int8, torch.uint8):
        raise RuntimeError(f"npu_fused_infer_attention_score: atten_mask dtype {mask.dtype} is not bool/int8/uint8")
    shape = tuple(mask.shape)
    ok = {(S, KV): (1, 1, S, KV), (B, S, KV): (B, 1, S, KV), (1, S, KV): (1, 1, S, KV),
          (B, 1, S, KV): (B, 1, S, KV), (1, 1, S, KV): (1, 1, S, KV)}
    if shape not in ok:
        raise RuntimeError(f"npu_fused_infer_attention_score: atten_mask shape {shape} is none of (S, KV), "
                           f"(B|1, S, KV), (B|1, 1, S, KV) for B={B}, S={S}, KV={KV}")
    return mask.reshape(ok[shape]).bool().expand(B, 1, S, KV)


def _lengths(values, B: int, limit: int, what: str) -> torch.Tensor:
    lengths = torch.tensor(list(values), dtype=torch.long)
    if lengths.numel() != B or (lengths < 0).any() or (lengths > limit).any():
        raise RuntimeError(f"npu_fused_infer_attention_score: actual_seq_lengths{'_kv' if what == 'kv' else ''} "
                           f"{list(values)} must hold {B} lengths within 0..{limit}")
    return lengths
