"""The model runner: a scheduled step in, sampled tokens out.

It flattens the step's requests into one token batch (decode tokens, prefill
chunks and verify trees side by side, each with its positions and key slots),
runs the model once, samples the rows that end a request's known tokens,
verifies draft trees (moving accepted K/V rows into place) and scores prompt
logprobs. It changes no request's state: the engine applies its output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.attention import AttentionBatch
from ..model.llama import LlamaModel
from .kv_cache import KVCache
from .sampling import adjust_logits, banned_tokens, sample, top_logprobs
from .scheduler import Request, SchedulerOutput
from .speculative import VerifyResult, verify
from .step_predictor import attention_pairs


@dataclass
class StepInputs:
    """One step's flat batch and where each request's logits rows sit in it."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    chunks: list[tuple] = field(default_factory=list)  # (block table, tokens before, tokens[, tree parents])
    logit_rows: list[int] = field(default_factory=list)  # rows of the batch whose logits are computed
    sampled: list[tuple[Request, int]] = field(default_factory=list)  # (request, its logits row)
    verify: list[tuple[Request, int]] = field(default_factory=list)  # (request, its first logits row)
    prompt_rows: list[tuple[Request, int, int, int]] = field(default_factory=list)  # (req, row, first, end pos)

    @classmethod
    def build(cls, scheduled: list[tuple[Request, int]]) -> "StepInputs":
        step, row = cls(), 0
        for req, n in scheduled:
            if req.draft is not None:
                step._add_verify(req, n, row)
            else:
                step._add_chunk(req, n, row)
            row += n
        return step

    def _add_verify(self, req: Request, n: int, row: int) -> None:
        """The pending token and the draft tree, one chunk whose rows all get logits."""
        nc = req.num_computed
        self.ids.append(req.all_ids[nc])
        self.ids.extend(req.draft.tokens)
        self.positions.append(nc)
        self.positions.extend(nc + d for d in req.draft.depths)
        self.chunks.append((req.blocks, nc, n, req.draft.row_parents()))
        self.verify.append((req, len(self.logit_rows)))
        self.logit_rows.extend(range(row, row + n))

    def _add_chunk(self, req: Request, n: int, row: int) -> None:
        """A decode token or a prefill chunk; its last row is sampled when it completes the known tokens."""
        nc = req.num_computed
        self.ids.extend(req.all_ids[nc: nc + n])
        self.positions.extend(range(nc, nc + n))
        self.chunks.append((req.blocks, nc, n))
        if req.params.prompt_logprobs is not None:
            # positions before the prompt's last predict a prompt token; each is recorded once (a request
            # recomputed after preemption runs them again)
            lo, end = max(nc, len(req.prompt_logprobs) - 1), min(nc + n, len(req.prompt_ids) - 1)
            if lo < end:
                self.prompt_rows.append((req, len(self.logit_rows), lo, end))
                self.logit_rows.extend(range(row + lo - nc, row + end - nc))
        if nc + n == req.num_tokens:
            self.sampled.append((req, len(self.logit_rows)))
            self.logit_rows.append(row + n - 1)


@dataclass
class ModelRunnerOutput:
    sampled: list[tuple[Request, int]]  # one new token per request whose known tokens were all computed
    verified: list[tuple[Request, VerifyResult]]  # draft trees: what each accepted and emitted
    output_logprobs: list[tuple[Request, tuple]]  # per sampled request that asked for logprobs
    prompt_logprobs: list[tuple[Request, list]]  # per request whose prompt positions were scored
    num_tokens: int
    num_logit_rows: int
    attention_pairs: float  # (query, key) pairs the step attended: the step predictor's attention term
    decode_keys: list[int]  # keys each single-token request attended (the predictor counts their tiles)


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVCache, eos_ids: set[int]):
        self.model, self.kv, self.eos_ids = model, kv, eos_ids

    @torch.inference_mode()
    def execute(self, work: SchedulerOutput) -> ModelRunnerOutput:
        scheduled = work.scheduled
        step = StepInputs.build(scheduled)
        device = self.model.device
        batch = AttentionBatch.build(self.kv.block_size, step.chunks, device,
                                     request_ids=tuple(r.request_id for r, _ in scheduled))
        logits = self.model.forward(torch.tensor(step.ids, device=device),
                                    torch.tensor(step.positions, device=device), batch, self.kv,
                                    torch.tensor(step.logit_rows, dtype=torch.long, device=device))
        sampled, output_logprobs = self._sample(step.sampled, logits)
        prompt_logprobs = [(req, top_logprobs(logits[first: first + end - lo], req.prompt_ids[lo + 1: end + 1],
                                              [req.params.prompt_logprobs] * (end - lo)))
                           for req, first, lo, end in step.prompt_rows]
        verified = [(req, self._verify(req, logits[first: first + len(req.draft) + 1])) for req, first in step.verify]
        return ModelRunnerOutput(sampled, verified, output_logprobs, prompt_logprobs, len(step.ids),
                                 len(step.logit_rows), attention_pairs([(c[1], c[2]) for c in step.chunks]),
                                 [c[1] + 1 for c in step.chunks if c[2] == 1])

    def _sample(self, rows: list[tuple[Request, int]], logits: torch.Tensor):
        """One token per request (penalties and logit edits applied), and the top logprobs asked for."""
        if not rows:
            return [], []
        reqs = [r for r, _ in rows]
        index = [i for _, i in rows]
        # every logits row is sampled (a decode step): edit them in place rather than copy them all
        z = logits if index == list(range(len(logits))) else logits[torch.tensor(index, device=logits.device)]
        raw = {i: z[i].clone() for i, r in enumerate(reqs) if r.params.logprobs is not None}
        for i, r in enumerate(reqs):
            if r.params.reshapes_logits:
                adjust_logits(z[i], r.params, r.prompt_ids, r.output_ids)
        banned = [banned_tokens(r.params, len(r.output_ids), self.eos_ids) for r in reqs]
        tokens = sample(z, [r.params for r in reqs], [r.generator for r in reqs], banned)
        output_logprobs = []
        if raw:
            lps = top_logprobs(torch.stack(list(raw.values())), [tokens[i] for i in raw],
                               [reqs[i].params.logprobs for i in raw])
            output_logprobs = [(reqs[i], lp) for i, lp in zip(raw, lps)]
        return list(zip(reqs, tokens)), output_logprobs

    def _verify(self, req: Request, logits: torch.Tensor) -> VerifyResult:
        """Accept what the draft tree got right and move the accepted rows' K/V to the positions they stand
        for (a side branch won); the engine advances the request."""
        draft = req.draft
        banned = [banned_tokens(req.params, len(req.output_ids) + k, self.eos_ids) for k in range(len(draft) + 1)]
        result = verify(logits, draft, req.params, req.generator, banned)
        base = req.num_computed
        moves = [(base + row, base + depth) for depth, row in enumerate(result.path, start=1) if row != depth]
        if moves:
            src = self.kv.slots(req.blocks, 0, base + len(draft) + 1)
            frm = src[[a for a, _ in moves]]
            to = src[[b for _, b in moves]]
            for k, v in zip(self.kv.k, self.kv.v):
                k.index_copy_(1, to, k.index_select(1, frm))
                v.index_copy_(1, to, v.index_select(1, frm))
        return result
