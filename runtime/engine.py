"""The engine: one step = schedule, build the flat batch, run the model once, sample, retire.

Continuous batching: every step mixes decode tokens and prefill chunks of
many requests into one flat token batch with per-token positions; requests
join and leave between steps.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from xytune.runtime.host_memory import keep_freed_memory
from xytune.runtime.attention import AttentionBatch
from xytune.runtime.model import LlamaModel
from xytune.runtime.sampling import SamplingParams, adjust_logits, make_generator, sample, top_logprobs
from xytune.runtime.speculative import SpeculativeConfig, verify
from xytune.runtime.step_predictor import attention_pairs
from xytune.runtime.scheduler import Request, Scheduler, SchedulerConfig, Status
from xytune.runtime.tokenizer import Tokenizer


class RequestError(ValueError):
    """A request the engine cannot take (too long, empty); one user-facing sentence."""


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    metrics: dict = field(default_factory=dict)
    logprobs: list | None = None  # per token of token_ids (SamplingParams.logprobs): (logprob, [(id, logprob)])
    prompt_logprobs: list | None = None  # per prompt token (SamplingParams.prompt_logprobs), None for the first


@dataclass
class StepStats:
    num_tokens: int
    num_prefill_tokens: int
    num_decode_tokens: int
    seconds: float
    predicted_seconds: float | None = None
    num_verify_tokens: int = 0


@dataclass
class SpecStats:
    """Speculative decoding totals: acceptance rate and tokens per verify step."""

    proposed: int = 0
    accepted: int = 0
    verify_steps: int = 0
    emitted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.emitted / self.verify_steps if self.verify_steps else 0.0


def check_prompt(prompt_ids: list[int], max_model_len: int, vocab_size: int,
                 params: SamplingParams | None = None) -> None:
    """Raise ``RequestError`` for a prompt (and sampling parameters) an engine with this context and
    vocabulary cannot run."""
    if not prompt_ids:
        raise RequestError("The prompt is empty.")
    if len(prompt_ids) >= max_model_len:
        raise RequestError(f"The prompt has {len(prompt_ids)} tokens; this engine's context holds "
                           f"{max_model_len} (prompt plus at least one new token).")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"Token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1}).")
    bad = [t for t in (params.logit_bias if params else ()) if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"logit_bias names token id {bad[0]}, outside the vocabulary (0..{vocab_size - 1}).")
    bad = [t for t in ((params.allowed_token_ids or ()) if params else ()) if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"allowed_token_ids names token id {bad[0]}, outside the vocabulary "
                           f"(0..{vocab_size - 1}).")


class Engine:
    def __init__(self, model: LlamaModel, tokenizer: Tokenizer, num_blocks: int, block_size: int = 16,
                 scheduler_config: SchedulerConfig | None = None, predictor=None,
                 enable_prefix_caching: bool = False, speculative: SpeculativeConfig | None = None):
        keep_freed_memory()
        self.model, self.tokenizer = model, tokenizer
        self.kv = model.new_kv_cache(num_blocks, block_size, enable_prefix_caching)
        self.predictor = predictor  # StepPredictor: step latency from the cost table, calibrated online
        self.max_model_len = min(model.config.max_position_embeddings, self.kv.capacity_tokens)
        self.scheduler = Scheduler(scheduler_config or SchedulerConfig(), self.kv, predictor, speculative,
                                   self.max_model_len)
        self.spec = SpecStats()
        eos = set(model.config.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = eos
        self._ids = itertools.count()
        self.requests: dict[str, Request] = {}
        self.step_stats: list[StepStats] = []
        self.sampled: list[Request] = []

    # -- requests ------------------------------------------------------------

    def add_request(self, prompt_ids: list[int], params: SamplingParams, prompt: str | None = None,
                    request_id: str | None = None) -> Request:
        self.validate_prompt(prompt_ids, params)
        rid = request_id or f"req-{next(self._ids)}"
        req = Request(rid, list(prompt_ids), params, prompt=prompt,
                      generator=make_generator(params, self.model.device))
        self.requests[rid] = req
        self.scheduler.add(req)
        return req

    def validate_prompt(self, prompt_ids: list[int], params: SamplingParams | None = None) -> None:
        """Raise ``RequestError`` for a prompt (and sampling parameters) this engine cannot run."""
        check_prompt(prompt_ids, self.max_model_len, self.model.config.vocab_size, params)

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None and req.status is not Status.FINISHED:
            self.scheduler.finish(req, "abort")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # -- one step ------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Run one model step; returns the requests that finished in it."""
        scheduled = self.scheduler.schedule()
        self.sampled: list[Request] = []  # requests that got new tokens in this step
        if not scheduled:
            return []
        start = time.perf_counter()
        ids, positions, chunks, logit_rows = [], [], [], []
        sampled_reqs, verify_reqs = [], []  # (req, first logits row)
        prompt_rows = []  # (req, first logits row, first position, end position): prompt logprobs to record
        row = 0
        for req, n in scheduled:
            nc = req.num_computed
            if req.draft is not None:  # pending token + draft tree, one verify chunk
                ids.append(req.all_ids[nc])
                ids.extend(req.draft.tokens)
                positions.append(nc)
                positions.extend(nc + d for d in req.draft.depths)
                chunks.append((req.blocks, nc, n, req.draft.row_parents()))
                verify_reqs.append((req, len(logit_rows)))
                logit_rows.extend(range(row, row + n))
            else:
                ids.extend(req.all_ids[nc: nc + n])
                positions.extend(range(nc, nc + n))
                chunks.append((req.blocks, nc, n))
                if req.params.prompt_logprobs is not None:
                    # positions before the prompt's last predict a prompt token; each is recorded once (a
                    # request recomputed after preemption runs them again)
                    lo, end = max(nc, len(req.prompt_logprobs) - 1), min(nc + n, len(req.prompt_ids) - 1)
                    if lo < end:
                        prompt_rows.append((req, len(logit_rows), lo, end))
                        logit_rows.extend(range(row + lo - nc, row + end - nc))
                if nc + n == req.num_tokens:
                    sampled_reqs.append((req, len(logit_rows)))
                    logit_rows.append(row + n - 1)
            row += n
        device = self.model.device
        batch = AttentionBatch.build(self.kv.block_size, chunks, device,
                                     request_ids=tuple(r.request_id for r, _ in scheduled))
        logits = self.model.forward(torch.tensor(ids, device=device), torch.tensor(positions, device=device),
                                    batch, self.kv, torch.tensor(logit_rows, dtype=torch.long, device=device))
        num_verify = sum(n for r, n in scheduled if r.draft is not None)
        # a decode token follows an output token; a prompt's last token (say after a prefix-cache hit) is prefill
        decode = sum(1 for r, n in scheduled if n == 1 and r.draft is None and r.output_ids)
        new_tokens: list[tuple[Request, list[int]]] = []
        for req, n in scheduled:
            if req.draft is None:
                req.num_computed += n
        if sampled_reqs:
            reqs = [r for r, _ in sampled_reqs]
            rows = [i for _, i in sampled_reqs]
            # every logits row is sampled (a decode step): edit them in place rather than copy them all
            z = logits if rows == list(range(len(logits))) else logits[torch.tensor(rows, device=logits.device)]
            raw = {i: z[i].clone() for i, r in enumerate(reqs) if r.params.logprobs is not None}
            for i, r in enumerate(reqs):
                if r.params.reshapes_logits:
                    adjust_logits(z[i], r.params, r.prompt_ids, r.output_ids)
            tokens = sample(z, [r.params for r in reqs], [r.generator for r in reqs], [self._banned(r) for r in reqs])
            if raw:
                picked = [tokens[i] for i in raw]
                for i, lp in zip(raw, top_logprobs(torch.stack(list(raw.values())), picked,
                                                   [reqs[i].params.logprobs for i in raw])):
                    reqs[i].output_logprobs.append(lp)
            new_tokens.extend((r, [t]) for r, t in zip(reqs, tokens))
        for req, first, lo, hi in prompt_rows:
            req.prompt_logprobs.extend(top_logprobs(logits[first: first + hi - lo], req.prompt_ids[lo + 1: hi + 1],
                                                    [req.params.prompt_logprobs] * (hi - lo)))
        for req, first in verify_reqs:
            new_tokens.append((req, self._verify(req, logits[first: first + len(req.draft) + 1])))
        finished = []
        now = time.perf_counter()
        for req, toks in new_tokens:
            req.first_token_time = req.first_token_time or now
            reason = None
            for tok in toks:
                req.output_ids.append(tok)
                reason = self._finish_reason(req, tok)
                if reason:
                    break
            self.scheduler.cache_computed_blocks(req)
            if reason:
                self.scheduler.finish(req, reason)
                finished.append(req)
            self.sampled.append(req)
        got_tokens = {id(r) for r in self.sampled}
        for req, n in scheduled:  # prefill chunks that sampled nothing (the others were registered above)
            if id(req) not in got_tokens:
                self.scheduler.cache_computed_blocks(req)
        seconds = time.perf_counter() - start
        predicted = None
        if self.predictor is not None:
            pairs = attention_pairs([(c[1], c[2]) for c in chunks])
            predicted = self.predictor.predict(len(ids), len(logit_rows), pairs)
            self.predictor.observe(len(ids), len(logit_rows), seconds, pairs)
        self.step_stats.append(StepStats(len(ids), len(ids) - decode - num_verify, decode, seconds, predicted,
                                         num_verify))
        for req, _ in scheduled:
            req.draft = None
        return finished

    def _verify(self, req: Request, logits: torch.Tensor) -> list[int]:
        """Accept what the draft tree got right, move its K/V into place; returns the emitted tokens."""
        draft = req.draft
        banned = [self._banned(req, extra=k) for k in range(len(draft) + 1)]
        result = verify(logits, draft, req.params, req.generator, banned)
        base = req.num_computed
        moves = [(base + row, base + depth) for depth, row in enumerate(result.path, start=1) if row != depth]
        if moves:  # a side branch won: its K/V rows go to the positions they stand for
            src = self.kv.slots(req.blocks, 0, base + len(draft) + 1)
            frm = src[[a for a, _ in moves]]
            to = src[[b for _, b in moves]]
            for k, v in zip(self.kv.k, self.kv.v):
                k.index_copy_(1, to, k.index_select(1, frm))
                v.index_copy_(1, to, v.index_select(1, frm))
        req.num_computed = base + 1 + len(result.path)
        self.spec.proposed += len(draft)
        self.spec.accepted += len(result.path)
        self.spec.verify_steps += 1
        self.spec.emitted += len(result.tokens)
        return result.tokens

    def _banned(self, req: Request, extra: int = 0) -> list[int]:
        """Stop tokens are banned until ``min_tokens`` are out (vLLM semantics); ``extra``: tokens still to come."""
        p = req.params
        if len(req.output_ids) + extra >= p.min_tokens:
            return []
        return list(p.stop_token_ids) + ([] if p.ignore_eos else sorted(self.eos_ids))

    def _finish_reason(self, req: Request, tok: int) -> str | None:
        p = req.params
        n_out = len(req.output_ids)
        if n_out >= p.min_tokens:
            if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
                return "stop"
            if p.stop:
                text = self.tokenizer.decode(req.output_ids, p.skip_special_tokens)
                hits = [(text.find(s), len(s)) for s in p.stop if s in text]
                if hits:
                    at, length = min(hits)
                    req.text = text[: at + length] if p.include_stop_str_in_output else text[:at]
                    return "stop"
        if n_out >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None

    # -- whole runs ------------------------------------------------------------

    def output(self, req: Request) -> RequestOutput:
        ids = req.output_ids
        if req.finish_reason == "stop" and ids and (ids[-1] in self.eos_ids or ids[-1] in req.params.stop_token_ids):
            text_ids = ids[:-1]
        else:
            text_ids = ids
        text = req.text if req.text is not None else self.tokenizer.decode(text_ids, req.params.skip_special_tokens)
        end = req.finish_time or time.perf_counter()
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, text, list(ids), req.finish_reason, {
            "ttft_s": (req.first_token_time - req.arrival) if req.first_token_time else None,
            "latency_s": end - req.arrival, "num_preemptions": req.num_preemptions,
        }, list(req.output_logprobs) if req.params.logprobs is not None else None,
            list(req.prompt_logprobs) if req.params.prompt_logprobs is not None else None)

    def run_to_completion(self, reqs: list[Request]) -> list[RequestOutput]:
        while any(r.status is not Status.FINISHED for r in reqs):
            self.step()
        for r in reqs:
            self.requests.pop(r.request_id, None)
        return [self.output(r) for r in reqs]
