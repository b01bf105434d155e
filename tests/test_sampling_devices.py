"""Sampling on an accelerator's logits, checked without one: every tensor the sampler makes must sit on the logits'
device. On ``meta`` logits (shapes only) under a mode that refuses mixed devices as CUDA does, a CPU index or
bias fails here the way it fails on a GPU or NPU."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from xytune.runtime.engine.sampling import SamplingParams, adjust_logits, top_logprobs

VOCAB = 40
RESHAPING = {  # every option of adjust_logits that builds a tensor next to the logits
    "allowed_token_ids": SamplingParams(allowed_token_ids=[1, 3, 7, 9]),
    "logit_bias": SamplingParams(logit_bias={3: 2.5, 7: -4.0}),
    "repetition_penalty": SamplingParams(repetition_penalty=1.7),
    "frequency_and_presence": SamplingParams(frequency_penalty=0.6, presence_penalty=0.3),
    "bad_words_ids": SamplingParams(bad_words_ids=[[5], [1, 9], [3, 8]]),  # bans 5 and 9, not 8
    "all_at_once": SamplingParams(allowed_token_ids=[1, 3, 7, 9, 12], logit_bias={3: 2.5}, repetition_penalty=1.7,
                                  frequency_penalty=0.6, presence_penalty=0.3, bad_words_ids=[[1, 12]]),
}
PROMPT_IDS, OUTPUT_IDS = [2, 3, 11], [7, 3, 7, 1]


class SameDeviceOnly(TorchDispatchMode):
    """CUDA's rule on any device: one op may not mix tensors of two devices, except a 0-dim CPU scalar
    (stricter for indexing, where CUDA copies a CPU index over). The meta device alone lets ``meta -= cpu_vector``
    and ``gather`` with a CPU index through; a GPU does not. A copy of a meta tensor to the host (``.tolist()``)
    gives zeros, so the host-side code after it runs too."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {t.device for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0}
        if len(devices) > 1:
            raise RuntimeError(f"Expected all tensors to be on the same device, {func} got {sorted(map(str, devices))}")
        source, target = (args[0] if args else None), kwargs.get("device")
        if func is torch.ops.aten._to_copy.default and source.device.type == "meta" and target is not None:
            return torch.zeros(source.shape, dtype=kwargs.get("dtype") or source.dtype, device=target)
        return func(*args, **kwargs)


def test_the_checker_refuses_what_a_gpu_refuses():
    """The mode is strict where meta alone is not: without it these two mixes pass on meta."""
    logits = torch.empty(VOCAB, device="meta")
    with SameDeviceOnly(), pytest.raises(RuntimeError, match="same device"):
        logits -= torch.ones(VOCAB)
    with SameDeviceOnly(), pytest.raises(RuntimeError, match="same device"):
        logits[None].gather(1, torch.tensor([[3]]))


@pytest.mark.parametrize("name", RESHAPING)
def test_adjust_logits_builds_its_tensors_on_the_logits_device(name):
    logits = torch.empty(VOCAB, device="meta")
    with SameDeviceOnly():
        out = adjust_logits(logits, RESHAPING[name], PROMPT_IDS, OUTPUT_IDS)
    assert out.shape == (VOCAB,) and out.device.type == "meta"


def test_top_logprobs_gathers_on_the_logits_device():
    logits = torch.empty(3, VOCAB, device="meta")
    with SameDeviceOnly():
        out = top_logprobs(logits, [4, 0, 39], [2, 0, 5])
    assert [len(alts) for _, alts in out] == [2, 0, 5]


def _reference_adjust(row: list[float], params: SamplingParams) -> list[float]:
    """vLLM's order, one token at a time in Python: allowed, bad words, bias, repetition, frequency + presence."""
    z = list(row)
    if params.allowed_token_ids:
        z = [v if t in params.allowed_token_ids else float("-inf") for t, v in enumerate(z)]
    for seq in params.bad_words_ids:
        if OUTPUT_IDS[len(OUTPUT_IDS) - len(seq) + 1:] == seq[:-1]:
            z[seq[-1]] = float("-inf")
    for t, b in params.logit_bias.items():
        z[t] += b
    if params.repetition_penalty != 1.0:
        for t in set(PROMPT_IDS) | set(OUTPUT_IDS):
            z[t] = z[t] / params.repetition_penalty if z[t] > 0 else z[t] * params.repetition_penalty
    for t in set(OUTPUT_IDS):
        z[t] -= params.frequency_penalty * OUTPUT_IDS.count(t) + params.presence_penalty
    return z


@pytest.mark.parametrize("name", RESHAPING)
def test_adjust_logits_values_on_cpu(name):
    row = torch.randn(VOCAB, generator=torch.Generator().manual_seed(7))
    out = adjust_logits(row.clone(), RESHAPING[name], PROMPT_IDS, OUTPUT_IDS)
    assert out.tolist() == pytest.approx(_reference_adjust(row.tolist(), RESHAPING[name]), rel=1e-6)


def test_top_logprobs_values_on_cpu():
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(3))
    ref = torch.log_softmax(logits, -1)
    (lp0, alts0), (lp1, alts1) = top_logprobs(logits, [5, 17], [3, 0])
    assert lp0 == pytest.approx(float(ref[0, 5])) and lp1 == pytest.approx(float(ref[1, 17]))
    best = ref[0].topk(3)
    assert alts0 == [(i, pytest.approx(v)) for i, v in zip(best.indices.tolist(), best.values.tolist())]
    assert alts1 == []
