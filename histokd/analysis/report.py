"""One self-contained HTML page comparing training runs.

``write_report(run_dirs, out_html)`` reads each run directory
(``runs/<name>/{config.yaml, history.csv, metrics.json, plots/*.png,
export/metadata.json}``, any of them may be missing) and writes a single HTML
file with: the configuration keys that differ between runs, a metrics table
(nested metrics flattened with dots, the best value of each row in bold), the
last epoch of each training history, the export metadata, the full
configurations (folded), and every plot embedded as base64, so the page opens
offline and can be mailed as one file.

Example:
    >>> from histokd.analysis.report import write_report
    >>> write_report(["runs/asym", "runs/sym"], "report.html")
    'report.html'
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Sequence

from histokd.errors import DataError

__all__ = ["write_report", "load_run", "flatten"]

_MISSING = object()
_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
_HIGHER_BETTER = ("acc", "auc", "f1", "precision", "recall", "dice", "kappa", "iou")
_LOWER_BETTER = ("loss", "error", "mse", "mae")


def flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    """Flatten nested dicts to ``{"a.b.c": value}`` (lists stay values).

    Example:
        >>> flatten({"probe": {"view_a": {"accuracy": 0.9}}, "epochs": 3})
        {'probe.view_a.accuracy': 0.9, 'epochs': 3}
    """
    out: Dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                out.update(flatten(v, key))
            else:
                out[key] = v
    elif prefix:
        out[prefix] = d
    return out


def _read_yaml(path: Path, notes: List[str]):
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        notes.append(f"{path.name} could not be parsed: {e}")
        return {}
    return data if isinstance(data, dict) else {}


def _read_json(path: Path, notes: List[str]):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        notes.append(f"{path} is not valid JSON: {e}")
        return {}
    return data if isinstance(data, dict) else {"value": data}


def load_run(run_dir) -> Dict[str, Any]:
    """Read what a run directory holds (missing parts are empty and noted).

    Args:
        run_dir: str | Path. ``runs/<name>/``.

    Returns:
        dict with ``name, path, config, metrics, history (DataFrame or None),
        metadata, plots (list of Paths), notes``.
    """
    import pandas as pd

    p = Path(run_dir)
    if not p.is_dir():
        raise DataError(f"run directory {str(p)!r} does not exist; pass folders like runs/<name>/")
    notes: List[str] = []
    run: Dict[str, Any] = {"name": p.resolve().name, "path": p, "notes": notes}
    run["config"] = _read_yaml(p / "config.yaml", notes) if (p / "config.yaml").is_file() else {}
    if not (p / "config.yaml").is_file():
        notes.append("no config.yaml")
    run["metrics"] = _read_json(p / "metrics.json", notes) if (p / "metrics.json").is_file() else {}
    if not (p / "metrics.json").is_file():
        notes.append("no metrics.json")
    meta = p / "export" / "metadata.json"
    run["metadata"] = _read_json(meta, notes) if meta.is_file() else {}
    history = None
    if (p / "history.csv").is_file():
        try:
            history = pd.read_csv(p / "history.csv")
        except (pd.errors.EmptyDataError, pd.errors.ParserError) as e:
            notes.append(f"history.csv could not be read: {e}")
    run["history"] = history
    plots_dir = p / "plots"
    run["plots"] = sorted(
        (f for f in plots_dir.rglob("*") if f.is_file() and f.suffix.lower() in _IMAGE_TYPES),
        key=lambda f: str(f.relative_to(plots_dir)),
    ) if plots_dir.is_dir() else []
    return run


# ---------------------------------------------------------------- formatting
def _fmt(v: Any) -> str:
    if v is _MISSING:
        return '<span class="missing">—</span>'
    if isinstance(v, bool) or v is None:
        return html.escape(str(v))
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return html.escape(str(v))
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.4g}"
        return f"{v:.4f}".rstrip("0").rstrip(".")
    if isinstance(v, (list, tuple)):
        s = json.dumps(v, default=str)
        if len(s) > 160:
            s = s[:157] + "…"
        return f"<code>{html.escape(s)}</code>"
    return html.escape(str(v))


def _same(a: Any, b: Any) -> bool:
    if a is _MISSING or b is _MISSING:
        return a is b
    try:
        return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)
    except TypeError:
        return a == b


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _best_index(key: str, values: Sequence[Any]):
    nums = [(i, v) for i, v in enumerate(values) if _is_number(v)]
    if len(nums) < 2 or len({v for _, v in nums}) < 2:
        return None
    leaf = key.lower().rsplit(".", 1)[-1]
    if any(t in leaf for t in _LOWER_BETTER):
        return min(nums, key=lambda t: t[1])[0]
    if any(t in leaf for t in _HIGHER_BETTER):
        return max(nums, key=lambda t: t[1])[0]
    return None


def _table(rows: List[tuple], names: Sequence[str], first: str, best: bool = False, empty: str = "") -> str:
    if not rows:
        return f'<p class="note">{html.escape(empty)}</p>'
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = []
    for key, values in rows:
        b = _best_index(key, values) if best else None
        cells = "".join(
            f'<td class="{"best" if i == b else ""}">{_fmt(v)}</td>' for i, v in enumerate(values)
        )
        body.append(f"<tr><th class=\"key\">{html.escape(key)}</th>{cells}</tr>")
    return (
        f'<table><thead><tr><th>{html.escape(first)}</th>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _rows(dicts: Sequence[Dict[str, Any]], only_diff: bool = False) -> List[tuple]:
    keys: List[str] = []
    seen = set()
    for d in dicts:
        for k in d:
            if k not in seen:
                seen.add(k)
                keys.append(k)
    rows = []
    for k in keys:
        values = [d.get(k, _MISSING) for d in dicts]
        if only_diff and all(_same(values[0], v) for v in values[1:]):
            continue
        rows.append((k, values))
    return rows


def _last_epoch(history) -> Dict[str, Any]:
    if history is None or history.empty:
        return {}
    last = history.iloc[-1].to_dict()
    out = {"epochs": int(len(history))}
    for k, v in last.items():
        if k == "epoch":
            continue
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            out[str(k)] = v
    return out


def _embed(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"data:{_IMAGE_TYPES[path.suffix.lower()]};base64,{data}"


_CSS = """
body{font-family:-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:24px;color:#1d232b;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:2px solid #dfe3e8;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px} .sub{color:#5b6571;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:6px 0 12px}
th,td{border:1px solid #d5dae0;padding:4px 10px;text-align:right;vertical-align:top}
thead th{background:#eef2f6;text-align:center} th.key{text-align:left;font-weight:500;background:#f8f9fb;font-family:monospace}
td.best{font-weight:700;background:#e3f4e6} .missing{color:#9aa3ad} code{font-size:12px}
.note{color:#5b6571;font-size:13px;font-style:italic}
.plots{display:flex;flex-wrap:wrap;gap:14px} figure{margin:0;border:1px solid #e3e7eb;padding:6px;background:#fafbfc}
figure img{max-width:min(560px,44vw);max-height:480px;display:block} figcaption{font-size:12px;color:#5b6571;margin-top:4px}
details{margin:6px 0} summary{cursor:pointer;font-weight:500} ul.notes{color:#a15c00;font-size:13px}
"""


def write_report(run_dirs: Sequence, out_html, *, title: str = "histokd run comparison") -> str:
    """Write one self-contained HTML page comparing runs.

    Args:
        run_dirs: list of run directories (``runs/<name>/``).
        out_html: str | Path. Output file (parent folders are created).
        title: str. Page title.

    Returns:
        str. The path written.

    Example:
        >>> write_report(["runs/vicreg_asym", "runs/vicreg_sym"], "runs/report.html")
        'runs/report.html'
    """
    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise DataError("write_report needs at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    names = [r["name"] for r in runs]
    if len(set(names)) < len(names):  # same folder name in different parents
        names = [str(Path(r["path"]).resolve().relative_to(Path(r["path"]).resolve().parents[1])) for r in runs]
        if len(set(names)) < len(names):
            names = [f"{n} ({i + 1})" for i, n in enumerate(names)]

    configs = [flatten(r["config"]) for r in runs]
    metrics = [flatten(r["metrics"]) for r in runs]
    lasts = [_last_epoch(r["history"]) for r in runs]
    metas = [flatten(r["metadata"]) for r in runs]

    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="sub">{len(runs)} run(s): {html.escape(", ".join(names))} · generated '
        f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by histokd</p>",
    ]
    notes = [(n, note) for n, r in zip(names, runs) for note in r["notes"]]
    if notes:
        parts.append('<ul class="notes">' + "".join(
            f"<li><b>{html.escape(n)}</b>: {html.escape(t)}</li>" for n, t in notes) + "</ul>")

    parts.append("<h2>Configuration differences</h2>")
    if len(runs) == 1:
        parts.append('<p class="note">One run: nothing to compare; the full configuration is below.</p>')
    else:
        parts.append(_table(_rows(configs, only_diff=True), names, "config key",
                            empty="The configurations are identical."))

    parts.append("<h2>Metrics</h2>")
    parts.append(_table(_rows(metrics), names, "metric", best=True, empty="No metrics.json in these runs."))
    parts.append("<h2>Last training epoch</h2>")
    parts.append(_table(_rows(lasts), names, "history.csv", best=True, empty="No history.csv in these runs."))
    if any(metas):
        parts.append("<h2>Exported model</h2>")
        parts.append(_table(_rows(metas), names, "metadata.json"))

    parts.append("<h2>Plots</h2>")
    for name, r in zip(names, runs):
        parts.append(f"<h3>{html.escape(name)}</h3>")
        if not r["plots"]:
            parts.append('<p class="note">No plots in this run.</p>')
            continue
        figs = []
        root = Path(r["path"]) / "plots"
        for f in r["plots"]:
            cap = html.escape(str(f.relative_to(root)))
            figs.append(f'<figure><img src="{_embed(f)}" alt="{cap}"><figcaption>{cap}</figcaption></figure>')
        parts.append(f'<div class="plots">{"".join(figs)}</div>')

    parts.append("<h2>Full configurations</h2>")
    for name, cfg in zip(names, configs):
        rows = [(k, [v]) for k, v in cfg.items()]
        parts.append(f"<details><summary>{html.escape(name)} ({len(rows)} keys)</summary>"
                     f"{_table(rows, [name], 'config key', empty='No configuration.')}</details>")
    parts.append("</body></html>\n")

    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(parts), encoding="utf-8")
    return str(out_html)
