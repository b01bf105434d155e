"""StepPredictor: how long will a step of N tokens take, from the cost table, calibrated online.

The cost table knows the weight GEMMs of a step (``CostModel.predict_step``);
attention, norms and launch overheads it does not. The predictor scales the
table's figure by the running ratio of measured to predicted step time, so the
scheduler's token budget tracks the machine it actually runs on (and a VM whose
speed drifts). Every step's prediction and measurement are kept for reports.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from xytune.cost_model import CostModel


class StepPredictor:
    def __init__(self, cost_model: CostModel, dtype: str, alpha: float = 0.2, history: int = 4096):
        if dtype not in cost_model.dtypes:
            raise ValueError(f"the cost table has no {dtype} rows (it has {', '.join(cost_model.dtypes)}); "
                             "profile this dtype or serve in one it has.")
        self.cost_model, self.dtype, self.alpha = cost_model, dtype, alpha
        self.scale = 1.0
        self.calibrated = False
        self.records: deque[tuple[int, float, float]] = deque(maxlen=history)  # (tokens, predicted, actual)

    def table_seconds(self, num_tokens: int, num_logits: int) -> float:
        return self.cost_model.predict_step(num_tokens, num_logits=max(num_logits, 1), dtype=self.dtype)

    def predict(self, num_tokens: int, num_logits: int) -> float:
        return self.scale * self.table_seconds(num_tokens, num_logits)

    def observe(self, num_tokens: int, num_logits: int, actual_s: float) -> None:
        """Record a finished step and move the calibration towards it."""
        raw = self.table_seconds(num_tokens, num_logits)
        self.records.append((num_tokens, self.scale * raw, actual_s))
        if raw > 0:
            ratio = actual_s / raw
            self.scale = ratio if not self.calibrated else (1 - self.alpha) * self.scale + self.alpha * ratio
            self.calibrated = True

    def error_summary(self, skip: int = 5) -> dict:
        """Median and p90 absolute percentage error of the predictions (the first ``skip`` steps warm up)."""
        recs = list(self.records)[skip:]
        if not recs:
            return {"steps": 0, "median_ape": None, "p90_ape": None}
        ape = np.array([abs(p - a) / a for _, p, a in recs if a > 0])
        return {"steps": len(recs), "median_ape": float(np.median(ape)), "p90_ape": float(np.percentile(ape, 90))}
