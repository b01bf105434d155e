"""``xytune bench profile``: how long sweeps take and how well the cost model predicts.

One run measures, side by side: the wall time of the ``--quick`` and the
default sweep, then the cost model of each table against fresh timings at M
values that neither sweep measured (absolute percentage error of ``predict``).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from rich.table import Table

from xytune.profiler.cost_model import CostModel
from xytune.profiler.devices import Device
from xytune.profiler.geometry import ModelGeometry
from xytune.profiler.primitives import REGISTRY
from xytune.profiler.sweep import Sweep, SweepSettings, m_buckets
from xytune.profiler.timing import DEFAULT_TIMING, measure


@dataclass
class AccuracyPoint:
    target: str
    m: int
    dtype: str
    primitive: str
    predicted_s: float
    measured_s: float
    drift: float  # fresh / table latency of the neighbouring buckets, timed beside this point

    @property
    def ape(self) -> float:
        return abs(self.predicted_s - self.measured_s) / self.measured_s

    @property
    def drift_corrected_ape(self) -> float:
        """Error once the prediction is rescaled by how much the machine itself drifted since the sweep."""
        return abs(self.predicted_s * self.drift - self.measured_s) / self.measured_s


def off_bucket_ms(buckets: list[int], max_m: int, count: int, seed: int) -> list[int]:
    """``count`` distinct M in [1, max_m] that are not buckets, log-uniformly spread."""
    rng = np.random.default_rng(seed)
    taken, out = set(buckets), []
    while len(out) < count:
        m = int(np.exp(rng.uniform(0, np.log(max_m))))
        if m not in taken:
            taken.add(m)
            out.append(m)
    return sorted(out)


def _fresh(shape: dict, primitive: str, config: dict, dtype: str, device: Device) -> float:
    fn = REGISTRY[primitive].make(shape, config, dtype, device)
    return float(np.median(measure(fn, device, DEFAULT_TIMING)))


def accuracy(model: CostModel, device: Device, geometry: ModelGeometry, ms: list[int], max_seqs: int,
             dtypes: list[str], only: str | None = None) -> list[AccuracyPoint]:
    """Predicted against freshly measured latency of the predicted-best primitive at each M.

    The two table buckets around each M are re-timed right beside it (same
    primitive and config), which separates the model's interpolation error
    from the machine running faster or slower than during the sweep.
    """
    points = []
    for dtype in dtypes:
        for g in geometry.gemms():
            if only is not None and g.name != only:
                continue
            for m in ms:
                if g.name == "lm_head" and m > max_seqs:
                    continue
                shape = {"m": m, "n": g.n, "k": g.k}
                pred = model.predict("gemm", shape, dtype)
                measured = _fresh(shape, pred.primitive, pred.config, dtype, device)
                table_sum = fresh_sum = 0.0
                for nb in model.neighbours("gemm", shape, dtype, pred.primitive):
                    nb_shape = {**shape, "m": nb}
                    nb_pred = model.predict("gemm", nb_shape, dtype, pred.primitive)
                    table_sum += nb_pred.seconds
                    fresh_sum += _fresh(nb_shape, pred.primitive, nb_pred.config, dtype, device)
                drift = fresh_sum / table_sum if table_sum else 1.0
                points.append(AccuracyPoint(g.name, m, dtype, pred.primitive, pred.seconds, measured, drift))
    return points


def run_bench(device: Device, geometry: ModelGeometry, dtypes: list[str], max_tokens: int, num_ms: int,
              seed: int, workdir: Path | None = None) -> dict:
    """Sweep times of the full quick and default sweeps, then the cost model's error on unseen M.

    The accuracy check re-sweeps one GEMM at a time and checks it right
    away, so the fresh timings are taken within a minute of the table they
    are compared with: on a shared VM whose speed drifts by 10-30% over
    minutes this measures the cost model, not the drift. The drift that is
    left is reported too (neighbouring buckets re-timed beside each check).
    """
    workdir = Path(workdir or tempfile.mkdtemp(prefix="xytune-bench-"))
    results: dict = {"device": device.fingerprint(), "model": geometry.name, "dtypes": dtypes, "sweeps": {}}
    settings = {"quick": SweepSettings.quick(dtypes, max_tokens),
                "default": SweepSettings(dtypes=dtypes, buckets=m_buckets(max_tokens))}
    for name, st in settings.items():
        out = workdir / f"{name}.parquet"
        start = time.perf_counter()
        table = Sweep(device, geometry, st, out, overwrite=True).run(progress=False)
        results["sweeps"][name] = {"seconds": time.perf_counter() - start, "rows": len(table.rows),
                                   "buckets": len(st.buckets), "path": str(out)}
    all_buckets = sorted(set(settings["quick"].buckets) | set(settings["default"].buckets))
    ms = off_bucket_ms(all_buckets, max_tokens, num_ms, seed)
    results["accuracy_ms"] = ms
    points: dict[str, list[AccuracyPoint]] = {name: [] for name in settings}
    for g in geometry.gemms():
        for name, st in settings.items():
            out = workdir / f"{name}-{g.name}.parquet"
            one = replace(st, targets=[g.name])
            model = CostModel(Sweep(device, geometry, one, out, overwrite=True).run(progress=False))
            points[name] += accuracy(model, device, geometry, ms, st.max_seqs, dtypes, only=g.name)
    for name, pts in points.items():
        apes = np.array([p.ape for p in pts])
        corrected = np.array([p.drift_corrected_ape for p in pts])
        worst = max(pts, key=lambda p: p.ape)
        results["sweeps"][name]["accuracy"] = {
            "points": len(pts), "median_ape": float(np.median(apes)), "p90_ape": float(np.percentile(apes, 90)),
            "worst_ape": float(apes.max()), "median_drift": float(np.median([p.drift for p in pts])),
            "median_drift_corrected_ape": float(np.median(corrected)),
            "worst_drift_corrected_ape": float(corrected.max()),
            "worst_point": {"target": worst.target, "m": worst.m, "dtype": worst.dtype,
                            "predicted_us": worst.predicted_s * 1e6, "measured_us": worst.measured_s * 1e6},
        }
    return results


def render(results: dict, console) -> None:

    t = Table("sweep", "wall s", "rows", "M buckets", "median APE", "p90 APE", "worst APE", "worst at",
              "machine drift", "median APE drift-corr.", "worst APE drift-corr.",
              title=f"{results['model']} on {results['device']['device_name']} "
                    f"({results['device'].get('threads')} threads), dtypes {','.join(results['dtypes'])}")
    for name, r in results["sweeps"].items():
        a, w = r["accuracy"], r["accuracy"]["worst_point"]
        t.add_row(name, f"{r['seconds']:.1f}", str(r["rows"]), str(r["buckets"]), f"{a['median_ape']:.2%}",
                  f"{a['p90_ape']:.2%}", f"{a['worst_ape']:.2%}", f"{w['target']} M={w['m']} {w['dtype']}",
                  f"{a['median_drift']:.3f}x", f"{a['median_drift_corrected_ape']:.2%}",
                  f"{a['worst_drift_corrected_ape']:.2%}")
    console.print(t)
    console.print(f"accuracy measured at {len(results['accuracy_ms'])} off-bucket M values: {results['accuracy_ms']}")


def dump(results: dict, path: Path) -> None:
    path.write_text(json.dumps(results, indent=2))
