"""The engine: one step = schedule, build the flat batch, run the model once, sample, retire.

Continuous batching: every step mixes decode tokens and prefill chunks of
many requests into one flat token batch with per-token positions; requests
join and leave between steps.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

from xytune.profiler.host_memory import keep_freed_memory

from ..model.attention import AttentionPaths
from ..model.llama import LlamaModel
from ..model.tokenizer import OutputText, Tokenizer
from .model_runner import ModelRunner, ModelRunnerOutput
from .sampling import SamplingParams, make_generator, text_token_ids
from .scheduler import Request, Scheduler, SchedulerConfig, SchedulerOutput, Status
from .speculative import SpeculativeConfig
from .step_predictor import AttentionRequests, decode_terms

log = logging.getLogger("xytune.engine")


class RequestError(ValueError):
    """A request the engine cannot take (too long, empty); one user-facing sentence."""


@dataclass
class CompletionOutput:
    """One generated sequence of a request: ``RequestOutput.outputs[i]``, as vLLM scripts read it."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list | None = None  # per token of token_ids (SamplingParams.logprobs): (logprob, [(id, logprob)])

    @property
    def cumulative_logprob(self) -> float | None:
        """Sum of the sampled tokens' logprobs (vLLM's field); None unless logprobs were asked for."""
        return None if self.logprobs is None else float(sum(lp for lp, _ in self.logprobs))


@dataclass
class RequestOutput:
    """A request's result in vLLM's shape (``out.outputs[0].text``); ``metrics`` are xytune's timings."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list | None = None  # per prompt token (SamplingParams.prompt_logprobs), None for the first
    metrics: dict = field(default_factory=dict)


@dataclass
class StepOutput:
    updated: list[Request]  # requests that got new tokens in the step
    finished: list[Request]  # requests that finished in it (also among ``updated`` unless aborted)


@dataclass
class StepStats:
    num_tokens: int
    num_prefill_tokens: int
    num_decode_tokens: int
    seconds: float
    predicted_seconds: float | None = None
    num_verify_tokens: int = 0
    num_logit_rows: int = 0
    attention_pairs: float = 0.0  # the step predictor's features, kept for fitting whole steps
    decode_tiles: float = 0.0  # the decodes' split key tiles and the keys their tiles span (decode_terms)
    decode_keys: float = 0.0
    planned_requests: int = 0  # requests the attention planned afresh, or ran one by one (AttentionRequests)
    looped_requests: int = 0


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
                 enable_prefix_caching: bool = False, speculative: SpeculativeConfig | None = None,
                 attention_paths: AttentionPaths | None = None):
        """``attention_paths``: the model's attention path per step (``AttentionPaths``), so the step predictor
        counts the requests a step handles one by one (``AttentionRequests``)."""
        keep_freed_memory()
        self.model, self.tokenizer = model, tokenizer
        self.kv = model.new_kv_cache(num_blocks, block_size, enable_prefix_caching)
        self.predictor = predictor  # StepPredictor: step latency from the cost table, calibrated online
        self.max_model_len = min(model.config.max_position_embeddings, self.kv.capacity_tokens)
        self.scheduler = Scheduler(scheduler_config or SchedulerConfig(), self.kv, predictor, speculative,
                                   self.max_model_len, attention=AttentionRequests(attention_paths))
        self.spec = SpecStats()
        eos = set(model.config.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = eos
        self.runner = ModelRunner(model, self.kv, eos)
        self._ids = itertools.count()
        self.requests: dict[str, Request] = {}
        self.step_stats: list[StepStats] = []

    # -- requests ------------------------------------------------------------

    def add_request(self, prompt_ids: list[int], params: SamplingParams, prompt: str | None = None,
                    request_id: str | None = None, arrival: float | None = None) -> Request:
        """Queue a request; ``arrival`` (a ``time.perf_counter`` time): when it arrived, if before now."""
        self.validate_prompt(prompt_ids, params)
        rid = request_id or f"req-{next(self._ids)}"
        req = Request(rid, list(prompt_ids), params, prompt=prompt,
                      generator=make_generator(params, self.model.device))
        if arrival is not None:
            req.arrival = arrival
        if params.detokenize:
            req.text = OutputText(self.tokenizer, params.skip_special_tokens, tuple(params.stop),
                                  params.include_stop_str_in_output)
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

    def step(self) -> StepOutput:
        """Run one model step: the requests that got tokens in it and those that finished (no longer tracked)."""
        work = self.scheduler.schedule()
        if not work.scheduled:
            return StepOutput([], [])
        start = time.perf_counter()
        num_decode, num_verify = work.num_decode_tokens, work.num_verify_tokens  # before the step advances them
        host = self.scheduler.attention.count(tuple(r.request_id for r, _ in work.scheduled),
                                             all(n == 1 for _, n in work.scheduled))
        try:
            out = self.runner.execute(work)
        except Exception:  # noqa: BLE001 - one request's failure must not take the others (or the engine) down
            result = self._step_each_alone(work)
        else:
            result = self._update_from_output(work.scheduled, out)
            self._record_step(out, time.perf_counter() - start, num_decode, num_verify, *host)
        for req in result.finished:
            self.requests.pop(req.request_id, None)
        return result

    def _step_each_alone(self, work: SchedulerOutput) -> StepOutput:
        """A step failed: run its requests one at a time, so the one that fails is failed alone.

        The failed step wrote nothing but K/V rows that the retries write again, and advanced no request.
        A request that fails on its own finishes with reason ``error`` (``req.error`` says why); the others
        advance as the whole step would have advanced them. Too rare to time: the step predictor skips it.
        """
        updated, finished = [], []
        for req, n in work.scheduled:
            try:
                out = self.runner.execute(SchedulerOutput([(req, n)]))
            except Exception as exc:  # noqa: BLE001
                log.exception("request %s failed in the engine", req.request_id)
                req.draft, req.error = None, f"{type(exc).__name__}: {exc}"
                self.scheduler.finish(req, "error")
                updated.append(req)
                finished.append(req)
                continue
            alone = self._update_from_output([(req, n)], out)
            updated += alone.updated
            finished += alone.finished
        return StepOutput(updated, finished)

    def _update_from_output(self, scheduled: list[tuple[Request, int]], out: ModelRunnerOutput) -> StepOutput:
        """Advance every scheduled request by what the step computed and emitted; retire the finished."""
        for req, n in scheduled:
            if req.draft is None:
                req.num_computed += n
        for req, lp in out.output_logprobs:
            req.output_logprobs.append(lp)
        for req, lps in out.prompt_logprobs:
            req.prompt_logprobs.extend(lps)
        new_tokens = [(req, [tok]) for req, tok in out.sampled]
        for req, result in out.verified:
            req.num_computed += 1 + len(result.path)
            self.spec.proposed += len(req.draft)
            self.spec.accepted += len(result.path)
            self.spec.verify_steps += 1
            self.spec.emitted += len(result.tokens)
            new_tokens.append((req, result.tokens))
        finished, updated, now = [], [], time.perf_counter()
        for req, toks in new_tokens:
            req.first_token_time = req.first_token_time or now
            reason = None
            for tok in toks:
                req.output_ids.append(tok)
                if reason := self._finish_reason(req, tok):
                    break
            self._advance_text(req, reason)
            self.scheduler.blocks.cache_computed_blocks(req)
            if reason:
                self.scheduler.finish(req, reason)
                finished.append(req)
            updated.append(req)
        got_tokens = {id(r) for r in updated}
        for req, _ in scheduled:  # prefill chunks that sampled nothing (the others were registered above)
            if id(req) not in got_tokens:
                self.scheduler.blocks.cache_computed_blocks(req)
            req.draft = None
        return StepOutput(updated, finished)

    def _record_step(self, out: ModelRunnerOutput, seconds: float, num_decode: int, num_verify: int,
                     planned: int, looped: int) -> None:
        """Step statistics, and the step predictor's observation of what this step really took."""
        predicted, tiles, keys = None, 0.0, 0.0
        if self.predictor is not None:
            tiles, keys = decode_terms(out.decode_keys, self.predictor.tile_kv, padded=not looped)
            predicted = self.predictor.observe(out.num_tokens, out.num_logit_rows, seconds, out.attention_pairs,
                                               out.decode_keys, planned, looped)
        self.step_stats.append(StepStats(out.num_tokens, out.num_tokens - num_decode - num_verify, num_decode,
                                         seconds, predicted, num_verify, out.num_logit_rows, out.attention_pairs,
                                         tiles, keys, planned, looped))

    def _finish_reason(self, req: Request, tok: int) -> str | None:
        p = req.params
        n_out = len(req.output_ids)
        if n_out >= p.min_tokens and ((tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids):
            return "stop"
        if p.stop and req.text.add(req.output_ids, may_stop=n_out >= p.min_tokens):  # token by token: the
            return "stop"  # tokens after the one that completes a stop string are not kept
        if n_out >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _advance_text(self, req: Request, reason: str | None) -> None:
        """The request's text after its new tokens (with stop strings ``_finish_reason`` has decoded them)."""
        text = req.text
        if text is None or text.stopped:
            return
        if reason is not None:
            text.finish(text_token_ids(req.output_ids, reason, req.params, self.eos_ids))
        elif not req.params.stop:
            text.add(req.output_ids)

    # -- results ------------------------------------------------------------

    def output(self, req: Request) -> RequestOutput:
        ids = req.output_ids
        text = req.text.shown if req.text is not None else ""
        end = req.finish_time or time.perf_counter()
        completion = CompletionOutput(0, text, list(ids), req.finish_reason,
                                      list(req.output_logprobs) if req.params.logprobs is not None else None)
        metrics = {"ttft_s": (req.first_token_time - req.arrival) if req.first_token_time else None,
                   "latency_s": end - req.arrival, "num_preemptions": req.num_preemptions}
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, [completion],
                             req.status is Status.FINISHED,
                             list(req.prompt_logprobs) if req.params.prompt_logprobs is not None else None, metrics)
