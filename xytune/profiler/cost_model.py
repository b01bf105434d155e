"""CostModel: the runtime's view of a cost table.

It answers three questions online, cheaply: which primitive and config to
run for a shape (``best``), how long it will take (``predict``, piecewise
linear in M between measured buckets, flagged when it extrapolates), and how
long a whole step of the model's GEMM stack takes (``predict_step``), which
the scheduler uses to fill a step up to its latency SLO.
"""

from __future__ import annotations

import bisect
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xytune.profiler.calibrate import TUNING_DEFAULTS
from xytune.profiler.devices import Device, DeviceError, fingerprint_mismatches, get_device
from xytune.profiler.geometry import ModelGeometry
from xytune.profiler.primitives import weight_format_of
from xytune.profiler.table import CostTable, TableError, read_table


class CostModelError(ValueError):
    """A query the table cannot answer, or a table that does not fit this device."""


@dataclass(frozen=True)
class Prediction:
    seconds: float
    primitive: str
    config: dict
    extrapolated: bool  # M outside the measured buckets


@dataclass
class _Curve:
    """Best-config latency of one primitive over M for one (op, fixed dims, dtype)."""

    ms: np.ndarray
    seconds: np.ndarray
    configs: list[dict]

    def at(self, m: float) -> tuple[float, bool]:
        ms, ys = self.ms, self.seconds
        if len(ms) == 1:
            return float(ys[0] * max(m, 1) / ms[0]) if m > ms[0] else float(ys[0]), m != ms[0]
        if m < ms[0]:
            return float(ys[0]), True
        if m > ms[-1]:
            slope = max((ys[-1] - ys[-2]) / (ms[-1] - ms[-2]), 0.0)
            return float(ys[-1] + slope * (m - ms[-1])), True
        return float(np.interp(m, ms, ys)), False

    def config_for(self, m: float) -> dict:
        """The config measured at the smallest bucket >= m (its tiles cover m)."""
        i = min(bisect.bisect_left(self.ms.tolist(), m), len(self.ms) - 1)
        return self.configs[i]


class CostModel:
    def __init__(self, table: CostTable, formats: tuple[str, ...] | None = None):
        """``formats``: the GEMM weight formats whose rows count (None: all). A server answers with the formats it
        loaded: a table that also timed int8 weights must not make a float server's steps look int8-fast."""
        if formats is not None:
            rows = table.rows
            keep = (rows["op"] != "gemm") | rows["primitive"].map(weight_format_of).isin(formats)
            table = CostTable(rows[keep].reset_index(drop=True), table.meta)
        self.table = table
        self.meta = table.meta
        self.geometry = ModelGeometry.from_dict(self.meta["geometry"])
        self.dtypes: list[str] = list(self.meta.get("sweep", {}).get("dtypes") or sorted(set(table.rows["dtype"])))
        self._curves: dict[tuple, dict[str, _Curve]] = {}
        self._warned: set[str] = set()
        self._build()

    @classmethod
    def load(cls, path: str | Path, device: Device | str | None = None, allow_mismatch: bool = False) -> "CostModel":
        """Read a table and check it describes ``device`` (the table's own backend when not given)."""
        try:
            table = read_table(path)
        except TableError as exc:
            raise CostModelError(str(exc)) from None
        if not len(table.rows):
            raise CostModelError(f"{path} holds no measurements.")
        fp = table.meta.get("fingerprint", {})
        try:
            if device is None:
                device = get_device(fp.get("backend", "cpu"))
            elif isinstance(device, str):
                device = get_device(device)
            current = device.fingerprint()
        except DeviceError as exc:
            if not allow_mismatch:
                raise CostModelError(f"{path} was profiled on {fp.get('device_name')} ({fp.get('backend')}), "
                                     f"which is not usable here: {exc}") from None
            current = {}
        fatal, soft = fingerprint_mismatches(fp, current)
        if fatal and not allow_mismatch:
            raise CostModelError(
                f"{path} was profiled on a different device ({'; '.join(fatal)}); "
                "re-profile here or pass allow_mismatch=True / --allow-mismatch."
            )
        if soft or fatal:
            warnings.warn(f"{path}: fingerprint differs ({'; '.join(fatal + soft)})", stacklevel=2)
        if not table.complete:
            warnings.warn(f"{path} is a partial table (the sweep did not finish)", stacklevel=2)
        return cls(table)

    def for_formats(self, formats: tuple[str, ...]) -> "CostModel":
        """The same table with only the GEMM rows of these weight formats (``weight_format_of``)."""
        return CostModel(self.table, tuple(formats))

    def _build(self) -> None:
        rows = self.table.rows
        best = rows.loc[rows.groupby(["op", "n", "k", "dtype", "primitive", "m"])["median_s"].idxmin()]
        for (op, n, k, dtype, prim), g in best.groupby(["op", "n", "k", "dtype", "primitive"]):
            g = g.sort_values("m")
            curve = _Curve(g["m"].to_numpy(dtype=float), g["median_s"].to_numpy(dtype=float),
                           [json.loads(c) for c in g["config"]])
            self._curves.setdefault((op, int(n), int(k), dtype), {})[prim] = curve

    def curves(self, op: str, n: int, k: int, dtype: str) -> dict[str, _Curve]:
        """Per primitive, its best-config latency over M for one (op, n, k, dtype); empty when unmeasured."""
        return dict(self._curves.get((op, int(n), int(k), dtype), {}))

    def best_config_at(self, op: str, n: int, k: int, dtype: str, primitive: str, m: int) -> dict | None:
        """The config ``primitive`` was measured best with at the bucket covering ``m`` (None: unmeasured)."""
        curve = self.curves(op, n, k, dtype).get(primitive)
        return curve.config_for(m) if curve is not None else None

    def tuning(self, name: str, dtype: str) -> float:
        """A measured machine constant (see xytune/profiler/calibrate.py) for ``dtype``.

        A table that lacks it (schema v1, or a sweep that could not measure it) gets the documented
        default, with one warning per constant.
        """
        value = self.meta.get("tuning", {}).get(dtype, {}).get(name)
        if value is not None:
            return float(value)
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(f"the cost table has no measured {name} for {dtype}; using the default "
                          f"{TUNING_DEFAULTS[name]:g} (re-profile to measure it)", stacklevel=2)
        return TUNING_DEFAULTS[name]

    def _candidates(self, op: str, shape: dict, dtype: str | None) -> tuple[dict[str, _Curve], float]:
        dtype = dtype or self.dtypes[0]
        m = shape.get("m")
        if m is None or m < 1:
            raise CostModelError(f"shape needs a token count m >= 1, got {shape!r}.")
        key = (op, int(shape.get("n", -1)), int(shape.get("k", -1)), dtype)
        curves = self._curves.get(key)
        if not curves:
            raise CostModelError(f"the table has no {op} rows for n={key[1]} k={key[2]} {dtype}.")
        return curves, float(m)

    def predict(self, op: str, shape: dict, dtype: str | None = None, primitive: str | None = None) -> Prediction:
        """Latency of the best primitive (or of ``primitive``) for ``shape``."""
        curves, m = self._candidates(op, shape, dtype)
        if primitive is not None:
            if primitive not in curves:
                raise CostModelError(f"the table has no rows for primitive {primitive!r} at {shape!r}.")
            curves = {primitive: curves[primitive]}
        scored = [(c.at(m), name) for name, c in curves.items()]
        (seconds, extrapolated), name = min(scored)
        return Prediction(seconds, name, curves[name].config_for(m), extrapolated)

    def neighbours(self, op: str, shape: dict, dtype: str | None, primitive: str) -> list[int]:
        """The measured buckets of ``primitive`` that bracket ``shape['m']`` (one at the edges)."""
        curves, m = self._candidates(op, shape, dtype)
        ms = curves[primitive].ms.tolist()
        i = bisect.bisect_left(ms, m)
        if i < len(ms) and ms[i] == m:
            return [int(m)]
        return [int(x) for x in ms[max(i - 1, 0): i + 1]]

    def best(self, op: str, shape: dict, dtype: str | None = None) -> tuple[str, dict]:
        """(primitive, config) predicted fastest for ``shape``."""
        p = self.predict(op, shape, dtype)
        return p.primitive, p.config

    def fastest_dtype(self, ms: tuple[int, ...] = (1, 16, 128, 512)) -> str:
        """The table's dtype whose whole GEMM stack is fastest, by the geometric mean over decode-sized to
        prefill-sized steps (what ``--dtype auto`` serves in)."""
        def score(dtype: str) -> float:
            return float(np.mean([np.log(self.predict_step(m, num_logits=min(m, 16), dtype=dtype)) for m in ms]))

        usable = [d for d in self.dtypes if self._curves_for_dtype(d)]
        if not usable:
            raise CostModelError("the cost table has no GEMM rows.")
        return min(usable, key=score)

    def _curves_for_dtype(self, dtype: str) -> bool:
        gemms = self.geometry.gemms()
        return all(("gemm", g.n, g.k, dtype) in self._curves for g in gemms)

    def attention_ratios(self, target: str, dtype: str, num_layers: int) -> dict[int, float]:
        """For an attention target (``attention.decode_plain``, ``attention.decode`` or ``attention.prefill``),
        per request count it was measured at (ascending), the per-request SDPA loop's time over Meta-Attention's:
        below 1 the loop was faster for that many requests. Meta-Attention's time per layer is its best config's
        plus its plan's cost spread over the step's ``num_layers`` (one plan serves every layer); shapes of the
        same count are pooled by the geometric mean of their ratios. The loop pays a call per request and
        Meta-Attention a plan per step, so the faster one changes with the count (``AttentionPaths``). Empty for
        a table without both (older, or another backend)."""
        rows = self.table.rows
        rows = rows[(rows["op"] == "attention") & (rows["target"] == target) & (rows["dtype"] == dtype)]
        per = rows.groupby(["shape", "primitive"])["median_s"].min().unstack()
        meta_cols = [c for c in per.columns if c.startswith("meta.attention")]
        if not meta_cols or "torch.sdpa_loop" not in per or "meta.plan" not in per:
            return {}
        meta = per[meta_cols].min(axis=1) + per["meta.plan"] / max(num_layers, 1)
        ratio = (per["torch.sdpa_loop"] / meta).dropna()
        requests = [json.loads(shape)["m"] for shape in ratio.index]
        per_count = np.log(ratio).groupby(requests).mean()
        return {int(m): float(np.exp(v)) for m, v in sorted(per_count.items())}

    def predict_step(self, num_tokens: int, num_logits: int | None = None, dtype: str | None = None) -> float:
        """Seconds of the model's whole GEMM stack for a step of ``num_tokens`` tokens.

        ``num_logits`` tokens go through lm_head (the sampled ones; all tokens when not given).
        """
        if num_tokens < 1:
            return 0.0
        total = 0.0
        for g in self.geometry.gemms():
            m = num_tokens if g.name != "lm_head" else (num_logits or num_tokens)
            if m < 1:
                continue
            total += g.count * self.predict("gemm", {"m": m, "n": g.n, "k": g.k}, dtype).seconds
        return total

    def engine_steps(self, dtype: str) -> dict | None:
        """The engine-step fit stored with this table for ``dtype`` (``xytune calibrate-steps``), or None.

        ``{"coef": {term: value}, "steps": n, "median_ape": x, ...}``, the terms those of the runtime's step
        predictor: what a whole step took on the machine that made the table, beyond its GEMM rows.
        """
        return (self.meta.get("engine_steps") or {}).get(dtype)

    def attention_seconds_per_pair(self, dtype: str) -> float | None:
        """Seconds one (query, key) pair of one layer's attention takes, the median over the measured shapes
        (each at its fastest primitive and config); None without attention rows for ``dtype``.

        A pair costs ``4 * heads * head_dim`` flops (scores and the weighted sum), which the rows record.
        """
        rows = self.table.rows
        rows = rows[(rows["op"] == "attention") & (rows["dtype"] == dtype) & ~rows["primitive"].eq("meta.plan")
                    & ~rows["target"].eq("attention.decode_plain")]  # timed only to choose the path, tiny batches
        if not len(rows):
            return None
        g = self.geometry
        best = rows.groupby("shape").agg(seconds=("median_s", "min"), flops=("flops", "first"))
        pairs = best["flops"] / (4 * g.heads_per_rank * g.head_dim)
        return float((best["seconds"] / pairs).median())

    def best_config(self, op: str, target: str, dtype: str, primitive: str | None = None) -> dict | None:
        """The one config of ``primitive`` (any, when None) that does best over every measured shape of
        ``target`` (None when unmeasured).

        For a primitive whose config is fixed for a whole run (Meta-Attention's tile sizes): the config
        with the least geometric mean of its time over each shape's best time, among configs measured
        on all of the shapes.
        """
        rows = self.table.rows
        rows = rows[(rows["op"] == op) & (rows["target"] == target) & (rows["dtype"] == dtype)]
        if primitive is not None:
            rows = rows[rows["primitive"] == primitive]
        if not len(rows):
            return None
        best = rows.groupby("shape")["median_s"].transform("min")
        rows = rows.assign(rel=np.log(rows["median_s"] / best))
        per = rows.groupby("config").agg(rel=("rel", "mean"), shapes=("shape", "nunique"))
        per = per[per["shapes"] == rows["shape"].nunique()]
        if not len(per):
            return None
        return json.loads(per["rel"].idxmin())
