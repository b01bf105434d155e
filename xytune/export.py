"""`xytune export`: a cost table's answer to "how do I set vLLM / vllm-ascend", as the config file they read.

People who profile an accelerator mostly serve with vLLM or vllm-ascend, and what they ask those projects again
and again is how to set the token budget, the batch limit and the CUDA-graph / ACL-graph capture sizes. The table
answers from measurements; this module turns it (and, optionally, settings chosen elsewhere) into

- ``vllm serve --config FILE.yaml``: a YAML of ``vllm serve``'s long option names (vLLM docs
  docs/configuration/serve_args.md, "Configuration file"; vllm/utils/argparse_utils.py ``load_config_file``
  turns each key into ``--key value``). Options whose value is a JSON object (``compilation-config``,
  ``speculative-config``, ``additional-config``) are written as JSON strings: vLLM's config reader passes a
  string through as the option's value, while only recent versions also take nested YAML mappings.
- the same settings as ``LLM(...)`` keyword arguments in JSON, with the table rows behind them in a sidecar.

Every field carries the table rows it came from (target, M, primitive, median), so a reader can check it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from xytune.profiler.cost_model import CostModel, CostModelError
from xytune.runtime.engine.scheduler import POLICIES
from xytune.runtime.engine.speculative import SpeculativeConfig

FORMATS = ("vllm", "vllm-ascend", "json")
# where the option names written below were read (see tests/test_export.py for the accepted-key lists)
VLLM_VERSION = "v0.13.0"  # vllm/config/scheduler.py, vllm/config/compilation.py, vllm/config/speculative.py
VLLM_ASCEND_VERSION = "v0.23.0"  # docs/source/user_guide/configuration/additional_config.md, vllm_ascend/envs.py
PAD_WASTE = 0.10  # padding a batch up to its capture size may cost at most this much more than the batch itself
NPU_GEMM = "npu.matmul"  # the primitive timed with ND and FRACTAL_NZ weights (xytune/profiler/primitives.py)
# vllm-ascend's weight_nz_mode (VLLM_ASCEND_ENABLE_NZ in vllm_ascend/envs.py): 0 no NZ, 1 NZ for quantized
# weights only (its default), 2 NZ wherever it can; the table times float weights, so it decides 0 or 2
NZ_OFF, NZ_ON = 0, 2


class ExportError(ValueError):
    """A table or settings file export cannot use; the message is one user-facing sentence."""


@dataclass(frozen=True)
class TuneSettings:
    """Serving settings chosen elsewhere, handed to export with ``--from-tune FILE``: a JSON object with these
    fields, written by a user (and later by ``xytune tune --json``). ``why`` is free-form (text, or any JSON
    value) and is carried into the output as a comment."""

    policy: str
    max_num_batched_tokens: int
    max_num_seqs: int
    long_prefill_token_threshold: int | None = None
    num_speculative_tokens: int | None = None
    align: int | None = None  # xytune's xy policy only: chunk alignment
    tbt_slo_ms: float | None = None  # xytune's xy policy only: its own step-time target
    why: object = ""
    evidence: object = None  # what `xytune tune` simulated (every candidate's figures); not exported

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ExportError(f"policy must be one of {', '.join(POLICIES)}, not {self.policy!r}.")
        for name in ("max_num_batched_tokens", "max_num_seqs", "long_prefill_token_threshold",
                     "num_speculative_tokens", "align"):
            value = getattr(self, name)
            optional = name in ("long_prefill_token_threshold", "num_speculative_tokens", "align")
            if (value is None and not optional) or (value is not None and (type(value) is not int or value < 1)):
                raise ExportError(f"{name} must be a positive integer, not {value!r}.")
        if self.tbt_slo_ms is not None and (type(self.tbt_slo_ms) not in (int, float) or not self.tbt_slo_ms > 0):
            raise ExportError(f"tbt_slo_ms must be a positive number, not {self.tbt_slo_ms!r}.")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ExportError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                              f"max_num_seqs ({self.max_num_seqs}), as vLLM requires.")

    @property
    def why_text(self) -> str:
        return self.why if isinstance(self.why, str) else json.dumps(self.why)

    @classmethod
    def read(cls, path: str | Path) -> "TuneSettings":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise ExportError(f"cannot read the settings file {path}: {exc.strerror or exc}.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ExportError(f"{path} is not JSON: {exc}.") from None
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or not {"policy", "max_num_batched_tokens", "max_num_seqs"} <= data.keys():
            raise ExportError(f"{path} must be a JSON object with at least policy, max_num_batched_tokens and "
                              "max_num_seqs.")
        unknown = sorted(set(data) - known)
        if unknown:
            raise ExportError(f"{path} has unknown fields {', '.join(unknown)} (known: {', '.join(sorted(known))}).")
        try:
            return cls(**data)
        except ExportError as exc:
            raise ExportError(f"{path}: {exc}") from None


@dataclass(frozen=True)
class Source:
    """One table row a setting was read from."""

    target: str
    m: int
    primitive: str
    median_s: float
    config: str = ""  # set where the row's config matters (the ND / NZ weight layout)

    def __str__(self) -> str:
        config = f" {self.config}" if self.config else ""
        return f"{self.target} {self.primitive}{config} {_seconds(self.median_s)}"


def _seconds(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} us"


@dataclass(frozen=True)
class Setting:
    value: object
    why: str
    sources: tuple[Source, ...] = ()


@dataclass
class Plan:
    """What export writes: each setting with its reason and rows, and where the limits came from."""

    table: str
    device: str
    dtype: str
    origin: str  # where max_num_seqs and max_num_batched_tokens came from, in words
    settings: dict[str, Setting] = field(default_factory=dict)


def _step_rows(cm: CostModel, m: int, dtype: str, num_logits: int | None = None) -> tuple[Source, ...]:
    """The measured rows behind ``predict_step(m, num_logits)`` (every token sampled when not given): per GEMM,
    the winning primitive's rows at the buckets around its M."""
    rows = []
    for g in cm.geometry.gemms():
        shape = {"m": min(m, num_logits or m) if g.name == "lm_head" else m, "n": g.n, "k": g.k}
        primitive = cm.predict("gemm", shape, dtype).primitive
        curve = cm.curves("gemm", g.n, g.k, dtype)[primitive]
        for bucket in cm.neighbours("gemm", shape, dtype, primitive):
            rows.append(Source(g.name, bucket, primitive, float(curve.seconds[list(curve.ms).index(bucket)])))
    return tuple(rows)


def _step_s(cm: CostModel, m: int, dtype: str, max_logits: int | None = None) -> float:
    return cm.predict_step(m, num_logits=min(m, max_logits or m), dtype=dtype)


def _gemm_rows(cm: CostModel, dtype: str):
    rows = cm.table.rows
    return rows[(rows["op"] == "gemm") & (rows["dtype"] == dtype)]


def _measured_ms(cm: CostModel, dtype: str) -> list[int]:
    """The M buckets every GEMM of the model was measured at (lm_head stops at the sweep's max_seqs)."""
    per_target = [set(g["m"].astype(int)) for _, g in _gemm_rows(cm, dtype).groupby("target")]
    return sorted(set.intersection(*per_target)) if per_target else []


def capture_sizes(cm: CostModel, dtype: str, max_num_seqs: int, pad_waste: float = PAD_WASTE) -> list[int]:
    """CUDA / ACL graph capture sizes from the table: the batch sizes just before the step's cost jumps.

    A captured graph replays at fixed size, so a batch of ``b`` sequences runs padded to the next capture size
    ``s >= b`` and costs ``step(s)``. Walking up from ``b = 1``, the next size is the largest measured M (or
    ``max_num_seqs``) whose decode step costs at most ``1 + pad_waste`` times ``step(b)``; the walk resumes at
    ``s + 1``. Where GEMM tiles or waves make the cost a staircase, that is the last M of a flat stretch, just
    before the jump (a tile boundary), so padding into it is free; where the cost ramps, it bounds what
    padding wastes. Sizes run up to ``max_num_seqs`` (vLLM runs larger batches without a graph).
    """
    costs = {b: _step_s(cm, b, dtype) for b in range(1, max_num_seqs + 1)}
    candidates = sorted({m for m in _measured_ms(cm, dtype) if m <= max_num_seqs} | {max_num_seqs})
    sizes, b = [], 1
    while b <= max_num_seqs:
        above = [s for s in candidates if s >= b]
        cheap = [s for s in above if costs[s] <= (1 + pad_waste) * costs[b]]
        size = max(cheap) if cheap else above[0]
        sizes.append(size)
        b = size + 1
    return sizes


def limits_from_table(cm: CostModel, dtype: str, slo_tpot_ms: float) -> tuple[Setting, Setting]:
    """``max_num_seqs``: the largest measured decode batch whose step fits the TPOT SLO; ``max_num_batched_tokens``:
    the largest measured M whose step (sampling at most ``max_num_seqs`` tokens) fits it.

    The table times the GEMM stack only (attention, norms and per-step overheads come on top), so both are upper
    bounds: the SLO is what a step may take at most."""
    slo_s = slo_tpot_ms / 1e3
    ms = _measured_ms(cm, dtype)
    if not ms:
        raise ExportError(f"the table has no {dtype} GEMM rows measured for every GEMM of the model.")
    seqs = [m for m in ms if _step_s(cm, m, dtype) <= slo_s]
    if not seqs:
        raise ExportError(f"no step fits --slo-tpot-ms {slo_tpot_ms:g}: the table's smallest step (M={ms[0]}) "
                          f"takes {_seconds(_step_s(cm, ms[0], dtype))} in its GEMMs alone.")
    max_seqs = seqs[-1]
    all_ms = sorted(set(_gemm_rows(cm, dtype)["m"].astype(int)))
    tokens = max(m for m in all_ms if m >= max_seqs and _step_s(cm, m, dtype, max_seqs) <= slo_s)
    why = f"the largest measured M whose GEMM step fits --slo-tpot-ms {slo_tpot_ms:g}"
    seqs_why = (f"{why} as a decode batch ({_seconds(_step_s(cm, max_seqs, dtype))}"
                f"{'; lm_head was measured no further' if max_seqs == ms[-1] else ''})")
    tokens_why = f"{why} with {max_seqs} sampled tokens ({_seconds(_step_s(cm, tokens, dtype, max_seqs))})"
    return (Setting(max_seqs, seqs_why, _step_rows(cm, max_seqs, dtype)),
            Setting(tokens, tokens_why, _step_rows(cm, tokens, dtype, max_seqs)))


def nz_choice(cm: CostModel, dtype: str) -> Setting | None:
    """vllm-ascend's weight NZ switch: on when ``npu.matmul`` with FRACTAL_NZ weights beats ND weights at most
    (target, M) pairs of the table; None for a table without such rows (not an NPU table)."""
    rows = _gemm_rows(cm, dtype)
    rows = rows[rows["primitive"] == NPU_GEMM]
    layout = rows["config"].map(lambda c: json.loads(c).get("weight_format"))
    per = rows.assign(layout=layout).pivot_table(index=["target", "m"], columns="layout", values="median_s",
                                                 aggfunc="min")
    if not {"ND", "NZ"} <= set(per.columns):
        return None
    per = per.dropna(subset=["ND", "NZ"])
    if not len(per):
        return None
    wins = int((per["NZ"] < per["ND"]).sum())
    on = wins * 2 > len(per)
    sources = []
    for target, g in per.groupby(level="target"):
        for (_, m), r in g.iloc[[0, -1]].iterrows():  # each GEMM's smallest and largest M
            sources += [Source(target, int(m), NPU_GEMM, float(r[x]), f"weight_format={x}") for x in ("NZ", "ND")]
    why = (f"npu.matmul with NZ weights is faster than ND at {wins} of {len(per)} (GEMM, M) pairs: "
           f"{'on (2: NZ wherever possible)' if on else 'off (0)'}")
    return Setting(NZ_ON if on else NZ_OFF, why, tuple(dict.fromkeys(sources)))


def plan_export(cm: CostModel, table: str, dtype: str, tune: TuneSettings | None = None,
                slo_tpot_ms: float = 100.0) -> Plan:
    """Every setting export writes, each with why and the rows it came from."""
    if dtype not in cm.dtypes:
        raise ExportError(f"the table has no {dtype} rows (it has {', '.join(cm.dtypes)}).")
    fp = cm.meta.get("fingerprint", {})
    origin = (f"the --from-tune settings{': ' + tune.why_text if tune.why else ''}" if tune
              else f"the table and --slo-tpot-ms {slo_tpot_ms:g} (no --from-tune given)")
    plan = Plan(table, f"{fp.get('device_name')} ({fp.get('backend')})", dtype, origin)
    try:
        if tune is None:
            seqs, tokens = limits_from_table(cm, dtype, slo_tpot_ms)
        else:
            seqs_s = _step_s(cm, tune.max_num_seqs, dtype)
            tokens_s = _step_s(cm, tune.max_num_batched_tokens, dtype, tune.max_num_seqs)
            seqs = Setting(tune.max_num_seqs, f"from --from-tune (the table predicts {_seconds(seqs_s)} for the "
                           "GEMMs of a full decode batch)", _step_rows(cm, tune.max_num_seqs, dtype))
            tokens = Setting(tune.max_num_batched_tokens, f"from --from-tune (the table predicts {_seconds(tokens_s)} "
                             "for the GEMMs of a full step)",
                             _step_rows(cm, tune.max_num_batched_tokens, dtype, tune.max_num_seqs))
        sizes = capture_sizes(cm, dtype, seqs.value)
        plan.settings["max_num_seqs"] = seqs
        plan.settings["max_num_batched_tokens"] = tokens
        plan.settings["cudagraph_capture_sizes"] = Setting(
            sizes, f"the last batch sizes before the decode step's cost jumps (padding costs at most "
                   f"{PAD_WASTE:.0%} more), up to max_num_seqs",
            tuple(s for size in sizes for s in _step_rows(cm, size, dtype)))
    except CostModelError as exc:
        raise ExportError(str(exc)) from None
    if tune is not None:
        chunked = tune.policy != "prefill-first"
        note = {"xy": "xytune's xy policy (steps sized to the SLO) has no vLLM equivalent; chunked prefill within "
                      "the token budget is the nearest",
                "chunked": "the chunked policy is vLLM's chunked prefill",
                "prefill-first": "prefill-first runs whole prompts in their own steps: chunked prefill off"}
        plan.settings["enable_chunked_prefill"] = Setting(chunked, f"from --from-tune policy {tune.policy}: "
                                                          + note[tune.policy])
        if tune.long_prefill_token_threshold is not None:
            plan.settings["long_prefill_token_threshold"] = Setting(tune.long_prefill_token_threshold,
                                                                    "from --from-tune")
        if tune.num_speculative_tokens is not None:
            lookup = SpeculativeConfig(num_speculative_tokens=tune.num_speculative_tokens)
            plan.settings["speculative_config"] = Setting(
                {"method": lookup.method, "num_speculative_tokens": lookup.num_speculative_tokens,
                 "prompt_lookup_max": lookup.prompt_lookup_max, "prompt_lookup_min": lookup.prompt_lookup_min},
                "from --from-tune: n-gram (prompt lookup) drafts, as xytune's engine proposes them")
    nz = nz_choice(cm, dtype)
    if nz is not None:
        plan.settings["weight_nz_mode"] = nz
    return plan


def engine_kwargs(plan: Plan, ascend: bool) -> dict:
    """The plan as vLLM engine arguments (underscore names, nested configs as dicts), what ``LLM(...)`` takes."""
    s = plan.settings
    out = {name: s[name].value for name in ("max_num_batched_tokens", "max_num_seqs", "enable_chunked_prefill",
                                              "long_prefill_token_threshold", "speculative_config") if name in s}
    out["compilation_config"] = {"cudagraph_capture_sizes": s["cudagraph_capture_sizes"].value}
    if ascend and "weight_nz_mode" in s:
        out["additional_config"] = {"weight_nz_mode": s["weight_nz_mode"].value}
    return out


def _comment(setting: Setting, width: int = 116) -> list[str]:
    """``# why``, then the rows it came from, one group of lines per M."""
    lines = [f"# {setting.why}"]
    if setting.sources:
        lines.append("# from the rows (target primitive median) at")
    line = ""
    for i, source in enumerate(setting.sources):
        if i == 0 or source.m != setting.sources[i - 1].m:
            if line:
                lines.append(line.rstrip(";"))
            line = f"#   M={source.m}:"
        elif len(line) + len(str(source)) + 2 > width:
            lines.append(line)
            line = "#     "
        line += f" {source};"
    if line:
        lines.append(line.rstrip(";"))
    return lines


def render_yaml(plan: Plan, ascend: bool) -> str:
    """The ``vllm serve --config`` YAML, each option under the comment that says where it came from."""
    kwargs = engine_kwargs(plan, ascend)
    server = f"vllm-ascend {VLLM_ASCEND_VERSION} on vLLM" if ascend else "vLLM"
    lines = [f"# written by xytune export from {plan.table}",
             f"# device {plan.device}, {plan.dtype} costs; option names as {server} {VLLM_VERSION} reads them",
             f"# max-num-seqs and max-num-batched-tokens from {plan.origin}",
             "# run: vllm serve MODEL --config THIS_FILE", ""]
    nested = {"compilation_config": "cudagraph_capture_sizes", "additional_config": "weight_nz_mode"}
    for name, value in kwargs.items():
        setting = plan.settings[nested.get(name, name)]
        text = json.dumps(value)  # a YAML scalar or flow list as it stands; an object as a quoted string
        lines += [*_comment(setting), f"{name.replace('_', '-')}: " + (f"'{text}'" if isinstance(value, dict)
                                                                       else text), ""]
    if ascend and "weight_nz_mode" not in plan.settings:
        lines += ["# weight_nz_mode: not set: the table has no npu.matmul ND/NZ rows (not an NPU table), so "
                  "vllm-ascend keeps its default", ""]
    return "\n".join(lines)


def sidecar(plan: Plan) -> dict:
    """Why each setting and the rows it came from, for ``--format json`` (JSON has no comments)."""
    return {"table": plan.table, "device": plan.device, "dtype": plan.dtype, "origin": plan.origin,
            "vllm_version": VLLM_VERSION,
            "settings": {name: {"value": s.value, "why": s.why, "rows": [asdict(r) for r in s.sources]}
                         for name, s in plan.settings.items()}}


def sidecar_path(output: Path) -> Path:
    return output.with_name(output.stem + ".sources.json")


def write_export(plan: Plan, fmt: str, output: Path) -> list[Path]:
    """Write ``output`` in ``fmt`` (and the sidecar for json); the paths written."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}.")
    output.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        output.write_text(json.dumps(engine_kwargs(plan, ascend=True), indent=1) + "\n")
        side = sidecar_path(output)
        side.write_text(json.dumps(sidecar(plan), indent=1) + "\n")
        return [output, side]
    output.write_text(render_yaml(plan, ascend=fmt == "vllm-ascend"))
    return [output]
