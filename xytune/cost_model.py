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

from xytune.devices import Device, DeviceError, fingerprint_mismatches, get_device
from xytune.geometry import ModelGeometry
from xytune.table import CostTable, TableError, read_table


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
    def __init__(self, table: CostTable):
        self.table = table
        self.meta = table.meta
        self.geometry = ModelGeometry.from_dict(self.meta["geometry"])
        self.dtypes: list[str] = list(self.meta.get("sweep", {}).get("dtypes") or sorted(set(table.rows["dtype"])))
        self._curves: dict[tuple, dict[str, _Curve]] = {}
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

    def _build(self) -> None:
        rows = self.table.rows
        best = rows.loc[rows.groupby(["op", "n", "k", "dtype", "primitive", "m"])["median_s"].idxmin()]
        for (op, n, k, dtype, prim), g in best.groupby(["op", "n", "k", "dtype", "primitive"]):
            g = g.sort_values("m")
            curve = _Curve(g["m"].to_numpy(dtype=float), g["median_s"].to_numpy(dtype=float),
                           [json.loads(c) for c in g["config"]])
            self._curves.setdefault((op, int(n), int(k), dtype), {})[prim] = curve

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

    def best_config(self, op: str, target: str, dtype: str) -> dict | None:
        """The one config that does best over every measured shape of ``target`` (None when unmeasured).

        For a primitive whose config is fixed for a whole run (Meta-Attention's tile sizes): the config
        with the least geometric mean of its time over each shape's best time, among configs measured
        on all of the shapes.
        """
        rows = self.table.rows
        rows = rows[(rows["op"] == op) & (rows["target"] == target) & (rows["dtype"] == dtype)]
        if not len(rows):
            return None
        best = rows.groupby("shape")["median_s"].transform("min")
        rows = rows.assign(rel=np.log(rows["median_s"] / best))
        per = rows.groupby("config").agg(rel=("rel", "mean"), shapes=("shape", "nunique"))
        per = per[per["shapes"] == rows["shape"].nunique()]
        if not len(per):
            return None
        return json.loads(per["rel"].idxmin())
