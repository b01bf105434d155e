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

from xytune.runtime.attention import AttentionBatch
from xytune.runtime.model import LlamaModel
from xytune.runtime.sampling import SamplingParams, make_generator, sample
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


@dataclass
class StepStats:
    num_tokens: int
    num_prefill_tokens: int
    num_decode_tokens: int
    seconds: float
    predicted_seconds: float | None = None


class Engine:
    def __init__(self, model: LlamaModel, tokenizer: Tokenizer, num_blocks: int, block_size: int = 16,
                 scheduler_config: SchedulerConfig | None = None, predictor=None):
        self.model, self.tokenizer = model, tokenizer
        self.kv = model.new_kv_cache(num_blocks, block_size)
        self.predictor = predictor  # StepPredictor: step latency from the cost table, calibrated online
        self.scheduler = Scheduler(scheduler_config or SchedulerConfig(), self.kv, predictor)
        self.max_model_len = min(model.config.max_position_embeddings, self.kv.capacity_tokens)
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
        self.validate_prompt(prompt_ids)
        rid = request_id or f"req-{next(self._ids)}"
        req = Request(rid, list(prompt_ids), params, prompt=prompt,
                      generator=make_generator(params, self.model.device))
        self.requests[rid] = req
        self.scheduler.add(req)
        return req

    def validate_prompt(self, prompt_ids: list[int]) -> None:
        """Raise ``RequestError`` for a prompt this engine cannot run."""
        if not prompt_ids:
            raise RequestError("The prompt is empty.")
        if len(prompt_ids) >= self.max_model_len:
            raise RequestError(f"The prompt has {len(prompt_ids)} tokens; this engine's context holds "
                               f"{self.max_model_len} (prompt plus at least one new token).")
        bad = [t for t in prompt_ids if not 0 <= t < self.model.config.vocab_size]
        if bad:
            raise RequestError(f"Token id {bad[0]} is outside the vocabulary (0..{self.model.config.vocab_size - 1}).")

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
        self.sampled: list[Request] = []  # requests that got a new token in this step
        if not scheduled:
            return []
        start = time.perf_counter()
        ids, positions, chunks, sample_rows, sampled_reqs = [], [], [], [], []
        row = 0
        for req, n in scheduled:
            ids.extend(req.all_ids[req.num_computed: req.num_computed + n])
            positions.extend(range(req.num_computed, req.num_computed + n))
            chunks.append((req.blocks, req.num_computed, n))
            row += n
            if req.num_computed + n == req.num_tokens:
                sample_rows.append(row - 1)
                sampled_reqs.append(req)
        device = self.model.device
        batch = AttentionBatch.build(self.kv.block_size, chunks, device)
        logits = self.model.forward(torch.tensor(ids, device=device), torch.tensor(positions, device=device),
                                    batch, self.kv, torch.tensor(sample_rows, dtype=torch.long, device=device))
        for req, n in scheduled:
            req.num_computed += n
        finished = []
        self.sampled = sampled_reqs
        if sampled_reqs:
            banned = [self._banned(r) for r in sampled_reqs]
            tokens = sample(logits, [r.params for r in sampled_reqs], [r.generator for r in sampled_reqs], banned)
            now = time.perf_counter()
            for req, tok in zip(sampled_reqs, tokens):
                req.first_token_time = req.first_token_time or now
                req.output_ids.append(tok)
                reason = self._finish_reason(req, tok)
                if reason:
                    self.scheduler.finish(req, reason)
                    finished.append(req)
        decode = sum(1 for _, n in scheduled if n == 1)
        seconds = time.perf_counter() - start
        predicted = None
        if self.predictor is not None:
            predicted = self.predictor.predict(len(ids), len(sample_rows))
            self.predictor.observe(len(ids), len(sample_rows), seconds)
        self.step_stats.append(StepStats(len(ids), len(ids) - decode, decode, seconds, predicted))
        return finished

    def _banned(self, req: Request) -> list[int]:
        """Stop tokens are banned until ``min_tokens`` are out (vLLM semantics)."""
        p = req.params
        if len(req.output_ids) >= p.min_tokens:
            return []
        return list(p.stop_token_ids) + ([] if p.ignore_eos else sorted(self.eos_ids))

    def _finish_reason(self, req: Request, tok: int) -> str | None:
        p = req.params
        n_out = len(req.output_ids)
        if n_out >= p.min_tokens:
            if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
                return "stop"
            if p.stop:
                text = self.tokenizer.decode(req.output_ids)
                hits = [text.find(s) for s in p.stop if s in text]
                if hits:
                    req.text = text[: min(hits)]
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
        text = req.text if req.text is not None else self.tokenizer.decode(text_ids)
        end = req.finish_time or time.perf_counter()
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, text, list(ids), req.finish_reason, {
            "ttft_s": (req.first_token_time - req.arrival) if req.first_token_time else None,
            "latency_s": end - req.arrival, "num_preemptions": req.num_preemptions,
        })

    def run_to_completion(self, reqs: list[Request]) -> list[RequestOutput]:
        while any(r.status is not Status.FINISHED for r in reqs):
            self.step()
        for r in reqs:
            self.requests.pop(r.request_id, None)
        return [self.output(r) for r in reqs]
