"""Speculative decoding without a draft model: n-gram (prompt lookup) drafts, verified as a token tree.

A decoding request whose last few tokens also occur earlier in its own context
is likely to continue as it did there (summaries, edits, code, quoted text).
Each such earlier continuation is a draft; several different ones form a tree
(a trie of draft tokens). The verify step runs the pending token and every
tree node in one pass with a tree mask, then walks the tree:

- greedy: follow the child whose token is the argmax; output equals plain greedy.
- sampling: the drafts are deterministic (probability one), so the exact rule
  for several candidates is: accept child ``x`` with probability ``p(x)``; on
  rejection zero ``p(x)``, renormalise and try the next child; when none is
  accepted, draw from what is left of ``p``. Every emitted token is then
  distributed exactly as plain sampling would draw it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .sampling import SamplingParams, filter_logits

METHODS = ("ngram",)


@dataclass
class SpeculativeConfig:
    """``--speculative ngram --num-speculative-tokens K`` (vLLM's names for prompt lookup)."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    max_branches: int = 2  # distinct continuations kept in the tree

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}, not {self.method!r}.")
        if self.num_speculative_tokens < 1:
            raise ValueError("num_speculative_tokens must be at least 1.")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("need 1 <= prompt_lookup_min <= prompt_lookup_max.")
        if self.max_branches < 1:
            raise ValueError("max_branches must be at least 1.")


@dataclass
class Draft:
    """Draft nodes of one verify step; node ``i`` is row ``i + 1`` (row 0 is the pending token).

    ``parents[i]`` is the row of node ``i``'s parent, always a smaller row.
    """

    tokens: list[int]
    parents: list[int]
    depths: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.depths:
            depth = [0]
            for p in self.parents:
                depth.append(depth[p] + 1)
            self.depths = depth[1:]

    def __len__(self) -> int:
        return len(self.tokens)

    def truncated(self, n: int) -> "Draft | None":
        """The first ``n`` nodes (parents come before children, so this is still a tree)."""
        if n <= 0:
            return None
        return Draft(self.tokens[:n], self.parents[:n], self.depths[:n])

    def row_parents(self) -> list[int]:
        """Parent row of every row of the verify step, -1 for the pending token."""
        return [-1] + self.parents

    def children(self, row: int) -> list[int]:
        return [i + 1 for i, p in enumerate(self.parents) if p == row]


def _continuations(context: np.ndarray, cfg: SpeculativeConfig, budget: int) -> list[list[int]]:
    """Distinct continuations after earlier matches of the context's longest matching suffix, newest first."""
    n_ctx = len(context)
    for n in range(min(cfg.prompt_lookup_max, n_ctx - 1), cfg.prompt_lookup_min - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(context[:-1], n)  # ends before the suffix itself
        hits = np.flatnonzero((windows == context[-n:]).all(axis=1))[::-1]
        found: list[list[int]] = []
        for start in hits:
            cont = context[start + n: start + n + budget].tolist()
            if cont and cont not in found and not any(f[: len(cont)] == cont for f in found):
                found.append(cont)
                if len(found) == cfg.max_branches:
                    break
        if found:
            return found
    return []


def propose_ngram(token_ids: list[int], cfg: SpeculativeConfig, budget: int) -> Draft | None:
    """A draft tree of at most ``budget`` nodes from the request's own context, or None."""
    budget = min(budget, cfg.num_speculative_tokens)
    if budget < 1 or len(token_ids) < cfg.prompt_lookup_min + 1:
        return None
    conts = _continuations(np.asarray(token_ids, dtype=np.int64), cfg, budget)
    if not conts:
        return None
    share = budget // len(conts)
    lengths = [budget - share * (len(conts) - 1)] + [share] * (len(conts) - 1)
    tokens, parents, trie = [], [], {}  # trie: (parent row, token) -> row
    for cont, length in zip(conts, lengths):
        row = 0
        for tok in cont[:length]:
            child = trie.get((row, tok))
            if child is None:
                if len(tokens) == budget:
                    break
                tokens.append(tok)
                parents.append(row)
                child = trie[(row, tok)] = len(tokens)
            row = child
    return Draft(tokens, parents)


@dataclass
class VerifyResult:
    tokens: list[int]  # emitted: the accepted draft tokens, then one token of the model's own
    path: list[int]  # rows of the accepted draft nodes, in depth order


def verify(logits: torch.Tensor, draft: Draft, params: SamplingParams, generator: torch.Generator | None,
           banned: list[list[int]]) -> VerifyResult:
    """Walk the draft tree with the target model's float32 ``logits [1 + len(draft), vocab]``.

    ``banned[k]`` lists token ids barred as the ``k``-th emitted token (min_tokens).
    """
    row, out, path = 0, [], []
    while True:
        z = logits[row].clone()
        ban = banned[len(out)] if len(out) < len(banned) else []
        if ban:
            z[ban] = float("-inf")
        children = draft.children(row)
        by_token = {draft.tokens[c - 1]: c for c in children}
        if params.greedy:
            tok = int(z.argmax())
            out.append(tok)
            if tok not in by_token:
                return VerifyResult(out, path)
            row = by_token[tok]
            path.append(row)
            continue
        probs = filter_logits(z, params.temperature, params.top_k, params.top_p, params.min_p).softmax(-1)
        accepted = None
        for tok, child in by_token.items():
            mass = float(probs.sum())
            if mass <= 0:
                break
            u = float(torch.rand((), generator=generator, device=probs.device))
            if u * mass < float(probs[tok]):
                accepted = (tok, child)
                break
            probs[tok] = 0.0
        if accepted is None:
            out.append(int(torch.multinomial(probs / probs.sum(), 1, generator=generator).item()))
            return VerifyResult(out, path)
        out.append(accepted[0])
        row = accepted[1]
        path.append(row)
