"""Sampling parameters (vLLM names) and the sampler that turns logits into next tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

SEED_RANGE = (-(2**63), 2**64 - 1)  # torch.Generator.manual_seed's
GREEDY_BELOW = 1e-5  # temperatures below this sample greedily (vLLM's sampling epsilon)


@dataclass
class SamplingParams:
    """How one request decodes; field names and meanings follow vLLM's ``SamplingParams``."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1  # -1 or 0: off
    top_p: float = 1.0
    min_p: float = 0.0  # drop tokens less likely than this fraction of the most likely one (0: off)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False  # the matched stop string stays at the end of the text
    skip_special_tokens: bool = True  # leave special tokens (other than a final EOS) out of the text
    detokenize: bool = True  # vLLM's: False makes no text at all (token ids only; no stop strings then)
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0  # OpenAI: minus this for every token already in the output
    frequency_penalty: float = 0.0  # OpenAI: minus this times the token's count in the output
    repetition_penalty: float = 1.0  # vLLM / CTRL: logits of prompt and output tokens divided (positive) or multiplied
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    allowed_token_ids: list[int] | None = None  # vLLM's: only these tokens may be generated
    bad_words_ids: list[list[int]] = field(default_factory=list)  # token sequences the output may not contain
    logprobs: int | None = None  # the sampled token's log-probability and this many top alternatives
    prompt_logprobs: int | None = None  # every prompt token's (after the first) log-probability, and top ones

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.logit_bias = {int(t): float(b) for t, b in self.logit_bias.items()}
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or positive, got {self.top_k}.")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}.")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty.")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings are matched in the text: they need detokenize=True.")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}.")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}.")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] (what torch.Generator takes), "
                             f"got {self.seed}.")
        if any(not seq for seq in self.bad_words_ids):
            raise ValueError("bad words must not be empty.")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("allowed_token_ids must name at least one token.")
        if any(not -100 <= b <= 100 for b in self.logit_bias.values()):
            raise ValueError("logit_bias values must be in [-100, 100].")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and not 0 <= n <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {n}.")

    @property
    def reshapes_logits(self) -> bool:
        """Do penalties or a bias change the logits? (Such requests decode without speculation: a draft's
        tokens would change the penalties of the positions after them.)"""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.allowed_token_ids or self.bad_words_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW  # 1e-155 is 0 in float32: dividing by it is NaN


MAX_LOGPROBS = 20


def adjust_logits(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                  output_ids: list[int]) -> torch.Tensor:
    """The allowed tokens and bad words, the logit bias, the repetition penalty (over prompt and output
    tokens), then the frequency and presence penalties (over output tokens), in place on one row of float32
    logits (vLLM's order). Every tensor it makes sits on the logits' device: a CPU index or bias beside CUDA
    or NPU logits is a device-mismatch error."""
    device = logits.device
    if params.allowed_token_ids:  # checked against the vocabulary when the request came in
        keep = torch.tensor(params.allowed_token_ids, dtype=torch.long, device=device)
        kept = logits[keep]
        logits.fill_(float("-inf")).index_copy_(0, keep, kept)
    for seq in params.bad_words_ids:  # a bad word's last token is banned where the output ends with the rest
        head = seq[:-1]
        if not head or output_ids[-len(head):] == head:
            logits[seq[-1]] = float("-inf")
    if params.logit_bias:  # token ids were checked against the vocabulary when the request came in
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=device)
        logits.index_add_(0, ids, torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype, device=device))
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=device)
        z = logits[seen]
        logits[seen] = torch.where(z > 0, z / params.repetition_penalty, z * params.repetition_penalty)
    if (params.frequency_penalty or params.presence_penalty) and output_ids:
        # index_add_ rather than bincount: a fixed output size, so no device sync to find the largest id
        ids = torch.tensor(output_ids, dtype=torch.long, device=device)
        counts = torch.zeros_like(logits).index_add_(0, ids, torch.ones(len(output_ids), dtype=logits.dtype,
                                                                          device=device))
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    # an extreme penalty (repetition_penalty 1e-300 or 1e300 are valid) overflows: keep the order, drop the inf
    return logits.nan_to_num_(nan=float("-inf"), posinf=torch.finfo(logits.dtype).max, neginf=float("-inf"))


def top_logprobs(logits: torch.Tensor, tokens: list[int], n: list[int]) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per row: the log-probability of ``tokens[i]`` under the model's own distribution (log-softmax of the
    raw logits, before penalties and temperature, as vLLM reports by default) and the ``n[i]`` most likely
    tokens with theirs."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    k = max(n, default=0)
    top_v, top_i = lp.topk(k, dim=-1) if k else (None, None)
    chosen = lp.gather(1, torch.tensor(tokens, dtype=torch.long, device=lp.device)[:, None])[:, 0].tolist()
    out = []
    for i, c in enumerate(chosen):
        alts = list(zip(top_i[i, : n[i]].tolist(), top_v[i, : n[i]].tolist())) if n[i] else []
        out.append((c, alts))
    return out


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return gen


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                  min_p: float = 0.0) -> torch.Tensor:
    """Temperature, then min-p, top-k and top-p (nucleus) on one row of float32 logits. The most likely token
    survives every filter, so min-p (a probability ratio to it) gives the same result in any order.

    The row is shifted to a maximum of 0 before the temperature divides it (softmax does not change), so a
    tiny temperature sends the others to -inf instead of the maximum to +inf (whose softmax is NaN)."""
    logits = (logits - logits.max()) / temperature
    if min_p > 0:
        logits = logits.masked_fill(logits < logits.max() + math.log(min_p), float("-inf"))
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        drop[..., 0] = False  # even at a top_p that rounds to 0 in float32 (5e-324 is a valid value)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def row_argmax(logits: torch.Tensor) -> list[int]:
    """Index of each row's first maximum. On CPU through numpy, whose vectorised argmax is about 4x torch's
    (0.8 against 3.5 ms for 128 x 49152 float32 logits): that was a greedy batch's largest host cost."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64):
        return logits.numpy().argmax(-1).tolist()
    return logits.argmax(-1).tolist()


def text_token_ids(token_ids: list[int], finish_reason: str | None, params: SamplingParams,
                   eos_ids: set[int]) -> list[int]:
    """The output tokens a completion's text stands for: all but a final EOS or stop token id (vLLM's text)."""
    if finish_reason == "stop" and token_ids and (token_ids[-1] in eos_ids or token_ids[-1] in params.stop_token_ids):
        return token_ids[:-1]
    return token_ids


def banned_tokens(params: SamplingParams, num_output_tokens: int, eos_ids: set[int]) -> list[int]:
    """Stop tokens are banned until ``min_tokens`` are out (vLLM semantics)."""
    if num_output_tokens >= params.min_tokens:
        return []
    return list(params.stop_token_ids) + ([] if params.ignore_eos else sorted(eos_ids))


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           banned: list[list[int]] | None = None) -> list[int]:
    """One next token per row; greedy rows take the argmax, others draw with their own generator."""
    if banned:
        for i, ids in enumerate(banned):
            if ids:
                logits[i, ids] = float("-inf")
    out = row_argmax(logits)
    for i, p in enumerate(params):
        if not p.greedy and not torch.isneginf(logits[i]).all():  # every token banned: the argmax, as greedy
            probs = filter_logits(logits[i], p.temperature, p.top_k, p.top_p, p.min_p).softmax(-1)
            out[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return out
