"""The xy policy's step sizing (XY-Serve): how many prefill tokens join a step of decodes.

A step takes the decode tokens first; xy then adds the most prefill tokens whose step the predictor keeps
within the time every decoding request can afford (``step_deadline``), trimmed to where the GEMM table is
efficient, and orders waiting prompts so those that can still meet their TTFT SLO go first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .step_predictor import attention_pairs

if TYPE_CHECKING:  # the scheduler owns this policy; only annotations name its types
    from .scheduler import Request, Scheduler


class XYPolicy:
    """The xy decisions of one scheduler, read from its config, queues and step predictor."""

    def __init__(self, scheduler: Scheduler):
        self.sched = scheduler

    def step_deadline(self, scheduled: list, now: float | None = None, recent_step_s: float | None = None) -> float:
        """Seconds this step may take without pushing any decoding request's TPOT past the SLO.

        The step SLO (``step_slo_s``, the TPOT SLO unless a TBT SLO was given) is an average over a request's
        tokens. A request that has ``n`` tokens, ``E`` seconds after its first, and ``H`` more to come
        (``horizon``) ends at ``(E + S + (H - 1) * s) / (n + H - 1)`` per token if this step takes ``S`` and
        the rest take the recent step time ``s``; the step may take the largest ``S`` that keeps that within
        the SLO for every decoder (at least the SLO itself, at most 8x). With ``s`` at the SLO this is the plain pace rule
        (token ``n + 1`` is due at ``n`` SLOs after the first); fast decode steps leave slack that lets a
        prompt's prefill through in a few large steps instead of starving it in small ones.
        """
        tbt = self.sched.config.step_slo_s
        now = self.sched.clock() if now is None else now
        if recent_step_s is None:
            recent_step_s = self.recent_step_seconds()
        allowed, decoders = [], 0
        for r, _ in scheduled:
            if r.first_token_time is None or not r.output_ids:
                continue
            decoders += 1
            if self.is_lost(r, now):
                continue
            n = len(r.output_ids)
            h = self.horizon(r)
            allowed.append(tbt * (n + h - 1) - (now - r.first_token_time) - (h - 1) * recent_step_s)
        if not allowed:  # nobody decoding: the SLO; only decoders that missed their SLOs: nothing to protect
            return 8 * tbt if decoders else tbt
        deadline = min(max(tbt, min(allowed)), 8 * tbt)
        # a prompt that has waited half its TTFT SLO gets a longer step: the decoders absorb one slow token
        sched = self.sched
        waiting = [r.arrival for r in sched.waiting] + [r.arrival for r in sched.running if r.first_token_time is None]
        if waiting and now - min(waiting) > self.sched.config.ttft_slo_ms / 2e3:
            deadline = max(deadline, 2 * tbt)
        return deadline

    @staticmethod
    def horizon(r: Request, unknown_length: int = 16) -> int:
        """Tokens the request still has to produce, as far as the pace rule may count on them.

        With ``ignore_eos`` and no stop strings or stop tokens it runs to ``max_tokens``, so its TPOT is an
        average over all of them and the slack of the whole remainder is real; otherwise it may stop at any
        token, and only the next ``unknown_length`` are counted.
        """
        remaining = max(1, r.params.max_tokens - len(r.output_ids))
        p = r.params
        if p.ignore_eos and not p.stop and not p.stop_token_ids:
            return remaining
        return min(unknown_length, remaining)

    def is_lost(self, r: Request, now: float) -> bool:
        """Has this decoder already missed its SLOs, whatever the next steps do?

        Its first token came after the TTFT SLO, or more time has passed since its first token than the
        TPOT SLO allows for all of its tokens up to ``max_tokens``, so its TPOT ends over the SLO even if
        every step from now took no time. Pacing steps for such a request only shrinks them for everyone:
        under overload that cuts throughput and makes the next requests late too. It still decodes in
        every step; it just sets no deadline.
        """
        if r.first_token_time - r.arrival > self.sched.config.ttft_slo_ms / 1e3:
            return True
        return now - r.first_token_time > self.sched.config.step_slo_s * max(1, r.params.max_tokens - 1)

    def recent_step_seconds(self) -> float:
        """Median measured time of the last 16 steps (the SLO itself until there are any)."""
        records = list(self.sched.predictor.records)[-16:] if self.sched.predictor is not None else []
        if not records:
            return self.sched.config.step_slo_s
        return float(np.median([actual for _, _, actual in records]))

    def prefill_budget(self, scheduled: list, budget: int) -> int:
        """xy: the most prefill tokens whose step the predictor keeps within the step deadline, nudged to
        efficient M. Where even the decodes alone are predicted over the step SLO, no step size can meet it:
        the step then takes the prefill that maximises throughput (``_throughput_budget``)."""
        busy = sum(n for _, n in scheduled)  # decode and verify tokens, each with a logits row
        decode_pairs = attention_pairs([(r.num_computed, n) for r, n in scheduled])
        decode_keys = [r.num_computed + 1 for r, n in scheduled if n == 1]
        head = next((r for r in sorted(self.sched.running, key=lambda r: r.arrival) if r.remaining > 1), None)
        context = head.num_computed if head is not None else 0  # the next chunk most likely extends this prompt

        def predicted(p: int) -> float:
            pairs = decode_pairs + (attention_pairs([(context, p)]) if p else 0.0)
            host = self.sched.attention.would_count(len(scheduled) + (1 if p else 0), decode_only=not p)
            return self.sched.predictor.predict(busy + p, busy + (1 if p else 0), pairs, decode_keys, *host)

        if predicted(0) > self.sched.config.step_slo_s:
            return self.throughput_budget(busy, budget, predicted)
        slo = self.step_deadline(scheduled)

        lo, hi = 0, budget
        while lo < hi:  # predicted step time grows with tokens: binary search the largest that fits
            mid = (lo + hi + 1) // 2
            if predicted(mid) <= slo:
                lo = mid
            else:
                hi = mid - 1
        lo = self.nudge(busy, lo)
        # Never starve prompts: when the SLO leaves no room, a step still takes one aligned chunk.
        return max(lo, min(budget, self.sched.config.align))

    def throughput_budget(self, busy: int, budget: int, predicted, within: float = 0.01) -> int:
        """The largest prefill (in ``align`` steps, up to ``budget``) whose step is within ``within`` of the
        most tokens per predicted second: on a machine too slow for the SLO, serve as much as it can."""
        align = self.sched.config.align
        sizes = sorted({*range(align, budget + 1, align), budget})
        rate = {p: (busy + p) / max(predicted(p), 1e-12) for p in sizes}
        best = max(rate.values())
        return max(p for p, r in rate.items() if r >= best * (1 - within))

    def nudge(self, busy: int, prefill: int, gain: float = 0.03) -> int:
        """Trim the prefill tokens so the step's token count lands where the GEMM table is more efficient.

        Looks up to two alignment units down for a total M whose table GEMM time per token beats that of
        the SLO-sized step by at least ``gain`` (a step just past a tile boundary pays for a nearly empty
        tile); otherwise keeps the SLO-sized count.
        """
        if prefill <= self.sched.config.align:
            return prefill
        per_token = lambda p: self.sched.predictor.table_seconds(busy + p, 1) / (busy + p)  # noqa: E731
        base = per_token(prefill)
        best, best_cost = prefill, base
        for p in range(prefill - 1, max(self.sched.config.align, prefill - 2 * self.sched.config.align) - 1, -1):
            if (c := per_token(p)) < best_cost:
                best, best_cost = p, c
        return best if best_cost < base * (1 - gain) else prefill

    def slo_order(self, queue: list[Request], now: float | None = None) -> list[Request]:
        """Prompts that can still meet the TTFT SLO first (oldest first), then those that already missed it.

        Under overload, serving a prompt that is already late only makes the next ones late too; it is not
        dropped, it runs as soon as the prompts that can still make it are through.
        """
        now = self.sched.clock() if now is None else now
        limit = self.sched.config.ttft_slo_ms / 1e3
        return sorted(queue, key=lambda r: now - r.arrival > limit)  # stable: FCFS within each half
