"""The ablation report: per row and metric, mean ± sample std over seeds and the paired
difference to the baseline with its 95 % t interval and verdict; Markdown, JSON and a plot.

Everything is computed from the finished runs' own metrics files (read from the DVC
experiments), so `pipeline ablate --report PLAN` re-renders it without training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from any2seg.errors import PipelineError
from pipeline.ablation.plan import assign
from pipeline.ablation.run import baseline_rev, check_finished, finished_runs, teacher_info
from pipeline.ablation.setup import Setup
from pipeline.ablation.stats import mean_std, paired

CONFIDENCE = 0.95


def metric_value(data: Any, key: str) -> float:
    """`key` of a metrics file's JSON: a top-level key (`mIoU`, `rgb-depth`), else a dotted
    path; in a list of rows (CodeAlign's one row per translator) a part picks the row whose
    `pair` or `name` it is, and `mean` averages the rest of the path over all rows. NaN
    when the file has no such value."""
    if isinstance(data, dict) and key in data:
        value = data[key]
        return float(value) if isinstance(value, int | float) and \
            not isinstance(value, bool) else math.nan
    part, dot, rest = key.partition(".")
    if not dot:
        return math.nan
    if isinstance(data, dict):
        return metric_value(data.get(part), rest)
    if isinstance(data, list):
        if part == "mean":
            values = [metric_value(row, rest) for row in data]
            return sum(values) / len(values) if values else math.nan
        row = next((r for r in data if isinstance(r, dict) and
                    part in (r.get("pair"), r.get("name"))), None)
        return metric_value(row, rest)
    return math.nan


def _value(run: dict[str, Any], stem: str, key: str) -> float:
    return metric_value(run["metrics"].get(stem), key)


def summarise(setup: Setup, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The report's numbers: for each row and metric the per-seed values, mean, std, n and
    (not for the baseline) the paired difference over the seeds both rows finished."""
    base = setup.plan.baseline
    by_row: dict[str, dict[int, dict[str, Any]]] = {}
    for run in runs.values():
        by_row.setdefault(run["row"], {})[run["seed"]] = run
    rows = []
    for row, overrides in setup.rows.items():
        mine = by_row.get(row, {})
        entry: dict[str, Any] = {"row": row, "overrides": overrides,
                                 "seeds": sorted(mine), "metrics": {}}
        for stem, key in setup.metrics:
            name = f"{stem}.{key}"
            values = [_value(mine[s], stem, key) for s in sorted(mine)]
            mean, std = mean_std(values)
            m: dict[str, Any] = {"values": values, "n": len(values), "mean": mean, "std": std}
            if row != base:
                shared = sorted(set(mine) & set(by_row.get(base, {})))
                d = paired([_value(mine[s], stem, key) for s in shared],
                           [_value(by_row[base][s], stem, key) for s in shared], CONFIDENCE)
                m["diff"] = {"n": d.n, "mean": d.mean, "std": d.std, "low": d.low,
                             "high": d.high, "confidence": CONFIDENCE, "verdict": d.verdict}
            ref = reference(setup, row, name)
            if ref:
                m["reference"] = ref
            entry["metrics"][name] = m
        rows.append(entry)
    plan_file = Path(setup.plan.path).resolve()
    if plan_file.is_relative_to(setup.root):  # a report names files as the repository does
        plan_file = plan_file.relative_to(setup.root)
    return {"plan": setup.plan.name, "plan_file": str(plan_file),
            "description": setup.plan.description, "baseline": base,
            "target": setup.plan.target, "seed_key": setup.plan.seed,
            "commit": setup.baseline_rev, "seeds": setup.seeds, "extra_overrides": setup.extra,
            "metrics": [f"{s}.{k}" for s, k in setup.metrics], "rows": rows,
            "every_row": setup.common, "reference": reference_note(setup),
            "runs": {name: {k: r[k] for k in ("row", "seed", "commit")}
                     for name, r in runs.items()}}


def reference(setup: Setup, row: str, metric: str) -> dict[str, float]:
    """The paper's figure for (row, metric) where these runs are the paper's setting:
    {"mean": published value} and/or {"diff": published change to the baseline}."""
    if not setup.paper_setting:
        return {}
    ref = setup.plan.reference
    out = {}
    if metric in (ref.get("values") or {}).get(row, {}):
        out["mean"] = float(ref["values"][row][metric])
    if metric in (ref.get("diffs") or {}).get(row, {}):
        out["diff"] = float(ref["diffs"][row][metric])
    return out


def reference_note(setup: Setup) -> str:
    """Why the report shows, or does not show, the paper's figures."""
    if not setup.plan.reference:
        return "the plan carries no published figures"
    if setup.recipe is None:
        return (f"not shown: the plan has no recipe for {_pipeline(setup)} (the paper's "
                f"setting is {', '.join(setup.plan.recipes) or 'not given'})")
    off = setup.off_recipe()
    if off:
        more = f" and {len(off) - 3} more" if len(off) > 3 else ""
        return f"not shown: not the paper's setting ({'; '.join(off[:3])}{more})"
    return f"{setup.plan.reference['source']} (published, not measured here)"


def _pipeline(setup: Setup) -> str:
    path = setup.pipeline.resolve()
    return str(path.relative_to(setup.root)) if path.is_relative_to(setup.root) else str(path)


def _num(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{x:.2f}"


def _cell(m: dict[str, Any]) -> str:
    if not m["n"]:
        return "not run"
    spread = f" ± {_num(m['std'])}" if m["n"] > 1 else ""
    return f"{_num(m['mean'])}{spread} (n={m['n']})"


def _diff_cell(d: dict[str, Any]) -> str:
    if not d["n"]:
        return "–"
    if d["n"] < 2:
        return f"{d['mean']:+.2f}, n=1: no interval, {d['verdict']}"
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] {d['verdict']}"


def _ref_cell(ref: dict[str, float]) -> str:
    parts = ([f"{ref['mean']:.2f}"] if "mean" in ref else []) + \
        ([f"Δ {ref['diff']:+.2f}"] if "diff" in ref else [])
    return ", ".join(parts) or "–"


def markdown(summary: dict[str, Any], context: dict[str, Any]) -> str:
    base = summary["baseline"]
    lines = [f"# Ablation `{summary['plan']}`: {summary['description']}", "",
             f"- commit `{summary['commit']}`, plan `{summary['plan_file']}`, baseline row "
             f"`{base}` (the unchanged params)",
             f"- seeds: {summary['seed_key']} = {', '.join(map(str, summary['seeds']))} (the "
             "same seed gives every row the same initial weights and batch order)",
             (f"- teacher cache `{context['teacher']['store']}`, teacher fingerprint sha256 "
              f"`{context['teacher']['teacher_fingerprint_sha256']}`, dataset fingerprint "
              f"`{context['teacher']['dataset_fingerprint']}`" if context["teacher"] else
              f"- teacher cache: not read by `{summary['target']}`"),
             f"- evaluation: {context['protocol']}",
             "- every row: " + (", ".join(f"`{k}={v}`" for k, v in
                                          {**summary["every_row"],
                                           **summary["extra_overrides"]}.items())
                                or "params.yaml"),
             f"- paper (reference values): {summary['reference']}",
             f"- cells: mean ± sample std over seeds (n seeds); Δ: the paired difference to "
             f"`{base}` seed by seed, its {int(100 * CONFIDENCE)} % paired-t interval, and "
             "`better` / `worse` when the whole interval is above / below 0, else "
             "`inside the noise`", ""]
    refs = any("reference" in m for r in summary["rows"] for m in r["metrics"].values())
    for metric in summary["metrics"]:
        head = "| row | overrides | value | Δ to baseline [95 % CI] |"
        lines += [f"## {metric}", "", head + (" paper (reference) |" if refs else ""),
                  "|---|---|---:|---|" + ("---:|" if refs else "")]
        for r in summary["rows"]:
            m = r["metrics"][metric]
            over = ", ".join(f"`{k}={v}`" for k, v in r["overrides"].items()) or "(baseline)"
            diff = _diff_cell(m["diff"]) if "diff" in m else "baseline"
            line = f"| {r['row']} | {over} | {_cell(m)} | {diff} |"
            if refs:
                line += f" {_ref_cell(m.get('reference') or {})} |"
            lines.append(line)
        lines.append("")
    lines += ["Runs (DVC experiments; `dvc exp apply NAME` restores one): " +
              ", ".join(f"`{n}`" for n in summary["runs"]), ""]
    return "\n".join(lines)


def figure(summary: dict[str, Any]) -> Any:
    """One panel per metric: each row's paired difference to the baseline with its 95 %
    interval (a point alone where one seed gives none) and verdict, around a zero line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = summary["metrics"]
    rows = [r for r in summary["rows"] if r["row"] != summary["baseline"]]
    colour = {"better": "#2e8b57", "worse": "#c0392b"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics) + 1.2,
                                                        0.55 * len(rows) + 1.8),
                             squeeze=False, sharey=True)
    for ax, metric in zip(axes[0], metrics, strict=True):
        ax.axvline(0.0, color="#555555", lw=1)
        for y, r in enumerate(rows):
            d = r["metrics"][metric].get("diff") or {}
            if not d.get("n"):
                continue
            low, high = d["low"], d["high"]
            err = [[d["mean"] - low], [high - d["mean"]]] if math.isfinite(low) else None
            ax.errorbar(d["mean"], y, xerr=err, fmt="o", capsize=4,
                        color=colour.get(d["verdict"], "#3a7bd5"))
            ax.annotate(d["verdict"], (d["mean"], y), textcoords="offset points",
                        xytext=(0, 7), ha="center", fontsize=7)
        ax.set_yticks(range(len(rows)), [r["row"] for r in rows], fontsize=8)
        ax.set_ylim(-0.7, len(rows) - 0.3)
        ax.invert_yaxis()
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel(f"Δ to baseline {summary['baseline']!r}", fontsize=8)
    fig.suptitle(f"{summary['plan']}: paired difference to the baseline "
                 f"{summary['baseline']!r}, {int(100 * CONFIDENCE)} % interval over "
                 f"{len(summary['seeds'])} seed" + "s" * (len(summary["seeds"]) != 1),
                 fontsize=10)
    fig.tight_layout()
    return fig


def plot(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = figure(summary)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(summary: dict[str, Any], context: dict[str, Any], out: Path) -> list[Path]:
    """report.md, report.json and plot.png under `out` (ablations/<plan>/)."""
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    md.write_text(markdown(summary, context))
    js = out / "report.json"
    js.write_text(json.dumps({**summary, **context}, indent=2, allow_nan=True) + "\n")
    return [md, js, plot(summary, out / "plot.png")]


def collect(setup: Setup) -> dict[str, dict[str, Any]]:
    """Each finished run's metrics files, read from the experiment through DVC:
    {name: {"row", "seed", "commit", "metrics": {stem: {...}}}}."""
    import dvc.api

    if not setup.baseline_rev:
        setup.baseline_rev = baseline_rev(setup.root)
    done = finished_runs(setup.root, setup.baseline_rev)
    check_finished(setup, done)
    out = {}
    for row, seed in setup.runs():
        name = setup.run_name(row, seed)
        if name not in done:
            continue
        files = {stem: json.loads(dvc.api.read(path, repo=str(setup.root), rev=done[name]))
                 for stem, path in setup.metric_files.items()
                 if stem in {s for s, _ in setup.metrics}}
        out[name] = {"row": row, "seed": seed, "commit": done[name], "metrics": files}
    return out


def protocol(setup: Setup) -> str:
    """The evaluation every run used: for `evaluate`, its params group with the -S
    overrides; for another target, the stage's command."""
    import copy

    if setup.target != "evaluate":
        return f"stage `{setup.target}`: `{setup.dag.stages[setup.target].cmd}`"
    params = copy.deepcopy(setup.params)
    for key, value in setup.extra.items():
        assign(params, key, value)
    ev = params.get("eval") or {}
    shown = ", ".join(f"{k}={ev[k]}" for k in ("split", "setting", "protocol", "mode",
                                                 "missing", "limit") if k in ev)
    return (f"`pipeline evaluate` of each run's best.pt ({shown}; null protocol / missing: "
            "the dataset's default, see metrics/report.md of any run)")


def report(setup: Setup) -> list[Path]:
    """Render ablations/<plan>/report.{md,json} and plot.png from the finished runs."""
    runs = collect(setup)
    if not runs:
        raise PipelineError(f"no finished run of plan {setup.plan.name!r} on commit "
                            f"{setup.baseline_rev[:7]}; run `pipeline ablate "
                            f"{setup.plan.name}` first")
    context = {"teacher": teacher_info(setup), "protocol": protocol(setup)}
    return write(summarise(setup, runs), context, setup.out)
