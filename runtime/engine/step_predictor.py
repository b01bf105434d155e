"""StepPredictor: how long will a step take, from the cost table plus a fit to the steps already run.

The cost table knows the weight GEMMs of a step (``CostModel.predict_step``);
attention (which grows with context), norms and per-step overheads it does
not. So a step's latency is modelled as

    seconds = a * table_gemm_seconds(tokens) + b * attention_pairs + c * tokens + e * sampled + d
              + t * decode_key_tiles + k * decode_keys + r * planned_requests + p * [planned_requests > 0]
              + l * looped_requests

with non-negative coefficients fitted (scipy's NNLS, relative error) to the
most recent measured steps and refitted as steps come in. The fit spans
hundreds of steps, so on top of it a prediction is scaled by the median
measured/fitted ratio of the last few steps: a machine whose speed drifts
(a shared VM, thermal limits, a neighbour process) is tracked within a few
steps. Until enough steps are measured, the table figure times a running
measured/table ratio stands in. Every step's prediction and
measurement are kept for reports.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

import numpy as np
from scipy.optimize import nnls

from xytune.profiler.cost_model import CostModel

from ..model.attention import AttentionPaths

MIN_FIT_STEPS = 12
DRIFT_STEPS = 4  # the last steps whose measured/fitted ratio scales the next prediction
# the fitted coefficients, named as a table's engine-step fit stores them (``xytune calibrate-steps``)
STEP_TERMS = ("gemm_table_scale", "attention_s_per_mpair", "token_s_per_k", "logit_s_per_k", "step_s",
              "split_tile_s_per_100", "decode_key_s_per_m", "plan_s_per_k_requests", "loop_s_per_k_requests",
              "plan_step_s")


def attention_pairs(chunks: list[tuple[int, int]]) -> float:
    """(query, key) pairs of a step's attention: ``(context_before, num_tokens)`` per request, causal."""
    return float(sum(n * (before + (n + 1) / 2) for before, n in chunks))


def decode_key_tiles(decode_keys: list[int], tile_kv: int) -> float:
    """Key tiles the step's decodes read beyond each one's first: Meta-Attention's split-KV cuts a decode's keys
    into ``tile_kv`` chunks run side by side and merged by log-sum-exp, so a context past one tile costs a
    chunk and a merge more than its pairs say. Fitted across a serving trace of short prompts (the edits), a
    long-output one and a mixed one, this term (rather than every tile, or none) kept the decode steps of all
    three within 8% on a 2-core Xeon."""
    return float(sum(-(-k // tile_kv) - 1 for k in decode_keys if k > tile_kv))


def decode_terms(decode_keys: Sequence[int], tile_kv: int, padded: bool = True) -> tuple[float, float]:
    """A step's decode terms from the keys each decode attends: its split tiles (``decode_key_tiles``) and the
    keys its tiles span. Meta-Attention runs a decode batch's tiles as one batched GEMM, each tile as wide as
    the batch's longest key range up to ``tile_kv`` (kernels/meta_attention/short.py), so one long request
    widens every short one's tile: the keys computed are tiles x width, not the keys attended (``padded``
    False: a step whose requests run one by one, which computes their own keys). A decode also reads each
    key for one query row where a prefill chunk reuses it across its rows: on a 2-core Xeon a decode key
    cost about 3 us against 0.2-0.5 us per prefill pair (``step_calibration``'s grid), so the decode keys
    get a term beside the pairs."""
    if not decode_keys:
        return 0.0, 0.0
    if not padded:
        return decode_key_tiles(decode_keys, tile_kv), float(sum(decode_keys))
    width = min(tile_kv, -(-max(decode_keys) // 16) * 16)
    return decode_key_tiles(decode_keys, tile_kv), float(width * sum(-(-k // width) for k in decode_keys))


class AttentionRequests:
    """The requests a step's attention handles one by one on the host, which its pairs do not count.

    The engine runs a step's attention on Meta-Attention or, where the table measured it faster for the
    step's class (decode-only or with a prefill chunk) and request count, as one SDPA call per request
    (``AttentionPaths``). A loop step pays a call per request and layer: on a 2-core Xeon in bf16 (whose table
    loops steps with prefill) a step with 25 decodes beside a chunk took 96 ms where the fit without this term
    said 74. A Meta-Attention step plans every request, unless it decodes exactly the requests of the
    decode-only step before, whose plan it advances by one key each (``make_meta_attention``). Engine and
    simulator both count with this."""

    def __init__(self, paths: AttentionPaths | None = None):
        """``paths``: the model's (default: Meta-Attention for every step)."""
        self.paths = paths or AttentionPaths()
        self.previous: tuple | None = None  # the last decode-only Meta-Attention step's requests

    def would_count(self, num_requests: int, decode_only: bool) -> tuple[int, int]:
        """``count`` for a step being sized (nothing remembered): a Meta-Attention step as if planned afresh."""
        looped = self.paths.path(decode_only, num_requests) == "loop"
        return (0, num_requests) if looped else (num_requests, 0)

    def count(self, request_ids: tuple, decode_only: bool) -> tuple[int, int]:
        """(requests planned afresh, requests run one call each) of this step."""
        if self.paths.path(decode_only, len(request_ids)) == "loop":
            self.previous = None
            return 0, len(request_ids)
        reused = decode_only and request_ids == self.previous
        self.previous = request_ids if decode_only else None
        return (0 if reused else len(request_ids)), 0


class StepPredictor:
    def __init__(self, cost_model: CostModel, dtype: str, alpha: float = 0.2, history: int = 4096,
                 fit_window: int = 256, refit_every: int = 8, tile_kv: int = 256):
        """``tile_kv``: Meta-Attention's key tile (what ``decode_key_tiles`` counts in)."""
        if dtype not in cost_model.dtypes:
            raise ValueError(f"the cost table has no {dtype} rows (it has {', '.join(cost_model.dtypes)}); "
                             "profile this dtype or serve in one it has.")
        self.cost_model, self.dtype, self.alpha, self.tile_kv = cost_model, dtype, alpha, tile_kv
        self.scale = 1.0  # measured / table, a running ratio (the fallback and a health figure)
        self.calibrated = False
        self.coef: np.ndarray | None = None  # fitted, one per STEP_TERMS
        # the speed probe's reading right after the fit, per step kind (``step_calibration.machine_speed``)
        self.probe_at_fit: dict[str, float] | None = None
        self.refit_every = refit_every
        self._table_cache: dict[tuple[int, int], float] = {}
        self._fit_rows: deque[tuple[np.ndarray, float]] = deque(maxlen=fit_window)
        self.records: deque[tuple[int, float, float]] = deque(maxlen=history)  # (tokens, predicted, actual)
        self._drift: deque[float] = deque(maxlen=DRIFT_STEPS)  # measured / fitted of the last steps
        self.drift = 1.0  # their median

    @classmethod
    def from_table(cls, cost_model: CostModel, dtype: str, **kwargs) -> "StepPredictor":
        """A predictor that starts from the table's engine-step fit when it has one for ``dtype`` (so the xy
        policy sizes its first steps from what whole steps took on that machine), else from the GEMM rows
        alone; either way it refits to the steps it sees."""
        return cls.from_fit(cost_model, dtype, cost_model.engine_steps(dtype), **kwargs)

    @classmethod
    def from_fit(cls, cost_model: CostModel, dtype: str, fit: dict | None, **kwargs) -> "StepPredictor":
        """A predictor that starts from ``fit`` (an engine-step fit as ``calibrate_engine_steps`` makes it), or
        from the GEMM rows alone when None."""
        if fit is not None and "tile_kv" in fit:
            kwargs["tile_kv"] = int(fit["tile_kv"])  # the tiles the fit counted in
        predictor = cls(cost_model, dtype, **kwargs)
        if fit is not None:
            predictor.coef = np.array([float(fit["coef"].get(t, 0.0)) for t in STEP_TERMS])
            if fit.get("probe_at_fit"):
                predictor.probe_at_fit = {kind: float(r) for kind, r in fit["probe_at_fit"].items()}
        return predictor

    def fit(self, rows: list[tuple[np.ndarray, float]]) -> np.ndarray:
        """Non-negative least squares on relative error over ``(features, seconds)`` rows: each step counts
        alike, long or short. Sets and returns the coefficients."""
        X = np.stack([f for f, _ in rows])
        y = np.array([a for _, a in rows])
        try:
            coef, _ = nnls(X / y[:, None], np.ones_like(y), maxiter=50 * X.shape[1])
        except RuntimeError:  # no convergence (steps that are exact multiples of one another): keep the last fit
            return self.coef
        if coef.any():
            self.coef = coef
        return self.coef

    def table_seconds(self, num_tokens: int, num_logits: int) -> float:
        key = (num_tokens, max(num_logits, 1))
        if key not in self._table_cache:
            self._table_cache[key] = self.cost_model.predict_step(num_tokens, num_logits=key[1], dtype=self.dtype)
        return self._table_cache[key]

    def features(self, num_tokens: int, num_logits: int, attn_pairs: float, decode_tiles: float = 0.0,
                 decode_keys: float = 0.0, planned: int = 0, looped: int = 0) -> np.ndarray:
        """Table GEMM seconds, attention pairs, tokens (norms, rotary...), sampled rows (sampling, per-request
        host work), one (per-step overhead), the decodes' split tiles and keys (``decode_terms``), the
        requests the attention plans afresh or runs one by one (``AttentionRequests``), and whether it plans
        at all.

        A plan costs much the same for 4 requests as for 48. On a 2-core Xeon (family 6 model 167) in bf16,
        with a per-request plan term alone, steps mixing a fresh chunk with 1-7 decodes ran 8-30% above the fit
        and those with 32-63 decodes 4-10% below it (beside the same run's decode-only steps, three serving
        traces); with a term per planning step as well, 3-16% above and 0-7% below (docs/benchmarks.md,
        eleventh round)."""
        return np.array([self.table_seconds(num_tokens, num_logits), attn_pairs * 1e-6, num_tokens * 1e-3,
                         num_logits * 1e-3, 1.0, decode_tiles * 1e-2, decode_keys * 1e-6, planned * 1e-3,
                         looped * 1e-3, 1.0 if planned else 0.0])

    def _features(self, num_tokens: int, num_logits: int, attn_pairs: float, decode_keys: Sequence[int],
                  planned: int, looped: int):
        terms = decode_terms(decode_keys, self.tile_kv, padded=not looped)
        return self.features(num_tokens, num_logits, attn_pairs, *terms, planned, looped)

    def predict(self, num_tokens: int, num_logits: int, attn_pairs: float = 0.0,
                decode_keys: Sequence[int] = (), planned: int = 0, looped: int = 0) -> float:
        """Seconds a step takes: ``attn_pairs`` its (query, key) pairs, ``decode_keys`` the keys each of its
        single-token rows attends, ``planned`` and ``looped`` its requests planned afresh or run one by one."""
        if num_tokens < 1:
            return 0.0
        return self._predict(self._features(num_tokens, num_logits, attn_pairs, decode_keys, planned, looped))

    def _predict(self, f: np.ndarray) -> float:
        if self.coef is None:
            return self.scale * f[0]
        return float(f @ self.coef) * self.drift

    def observe(self, num_tokens: int, num_logits: int, actual_s: float, attn_pairs: float = 0.0,
                decode_keys: Sequence[int] = (), planned: int = 0, looped: int = 0) -> float:
        """Record a finished step and learn from it; returns what ``predict`` said of it before this."""
        if num_tokens < 1:
            return 0.0
        f = self._features(num_tokens, num_logits, attn_pairs, decode_keys, planned, looped)
        predicted = self._predict(f)
        if actual_s <= 0:
            return predicted
        self.records.append((num_tokens, predicted, actual_s))
        if f[0] > 0:
            ratio = actual_s / f[0]
            self.scale = ratio if not self.calibrated else (1 - self.alpha) * self.scale + self.alpha * ratio
            self.calibrated = True
        self._fit_rows.append((f, actual_s))
        if self.coef is not None and (fitted := float(f @ self.coef)) > 0:
            self._drift.append(actual_s / fitted)
            self.drift = float(np.median(self._drift))
        if len(self._fit_rows) >= MIN_FIT_STEPS and len(self.records) % self.refit_every == 0:
            self._refit()
        return predicted

    def _refit(self) -> None:
        self.fit(list(self._fit_rows))

    def error_summary(self, skip: int = 5) -> dict:
        """Median and p90 absolute percentage error of the predictions (the first ``skip`` steps warm up)."""
        recs = list(self.records)[skip:]
        if not recs:
            return {"steps": 0, "median_ape": None, "p90_ape": None}
        ape = np.array([abs(p - a) / a for _, p, a in recs if a > 0])
        return {"steps": len(recs), "median_ape": float(np.median(ape)), "p90_ape": float(np.percentile(ape, 90))}
