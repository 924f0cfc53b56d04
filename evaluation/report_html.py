"""report.html: one self-contained page to read a multi-round adherence evaluation.

The page shows, top to bottom:

- a header: dialogues x rounds, user source, seed, and what "adherent" means (the reply
  passes the dialogue-aware gate: not a repeat of an earlier reply, not an echo of the
  user, responsive; and it keeps every standing rule strictly);
- the strict adherence curve of every model with its 95% bootstrap band (inline SVG);
- the per-model table (AUC strict, AUC under the old per-reply gate, A(1), A(R),
  retention, gate pass, repeat / echo / responsive rates, seen, unseen), the least
  responsive dialogues, strict pass rate by rule type and the AUC differences;
- every dialogue, one column per model: its messages, each round coloured by verdict
  (adherent green, rule broken red with the failed checks, gate failed amber with the
  gate's reason and detail, no rule standing grey) and the reply's responsiveness.

Filters (model, rule type, round, verdict, dialogue id, dim instead of hide) are read
from and written to the URL fragment, e.g. ``report.html#model=sft&type=lowercase&round=3
&verdict=gate``, so a link reproduces a view and a headless browser can drive them.

Nothing is fetched: CSS and JS are inline, the plot is drawn here from the numbers. The
dialogues are embedded once as JSON (``<`` ``>`` ``&`` escaped so a reply can never close
the script element) and the script builds their DOM with textContent only, so model
output always renders as text.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

VERDICTS: tuple[str, ...] = ("adherent", "broken", "gate", "none")
# Okabe-Ito, minus its yellow (unreadable on white): distinguishable under colour blindness.
PALETTE: tuple[str, ...] = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
LEAST_RESPONSIVE_SHOWN = 5


# --------------------------------------------------------------------------- verdicts


def turn_verdict(turn: Mapping[str, Any]) -> str:
    """One of VERDICTS for a turn record.

    A failed gate wins over "no rule standing": a repeat or an echo is worth seeing even
    before the first rule is set, although metrics.py does not score such a turn.
    `adherent` is recomputed from the checks when a record predates that field.
    """
    if not turn.get("gate_pass", True):
        return "gate"
    checks = turn.get("checks") or []
    adherent = turn.get("adherent", all(c["strict"] for c in checks) if checks else None)
    if adherent is None:
        return "none"
    return "adherent" if adherent else "broken"


def _number(x: Any) -> float | None:
    """A finite float or None: NaN would make the embedded JSON unparseable."""
    if x is None or isinstance(x, bool):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _fmt(x: Any, digits: int = 3) -> str:
    value = _number(x)
    return "n/a" if value is None else f"{value:.{digits}f}"


# --------------------------------------------------------------------------- embedded data


def _rounds_of(messages: Sequence[Mapping[str, str]]) -> tuple[str | None, dict[int, dict[str, str | None]]]:
    """(system prompt, {round: {"user", "reply"}}); assistant message i is round i."""
    system = None
    rounds: dict[int, dict[str, str | None]] = {}
    pending_user: str | None = None
    assistant = 0
    for m in messages:
        if m["role"] == "system":
            system = m["content"]
        elif m["role"] == "user":
            pending_user = m["content"]
        elif m["role"] == "assistant":
            assistant += 1
            rounds[assistant] = {"user": pending_user, "reply": m["content"]}
            pending_user = None
    if pending_user is not None:  # the dialogue ended on a user turn nobody answered
        rounds[assistant + 1] = {"user": pending_user, "reply": None}
    return system, rounds


def _turn_data(number: int, texts: Mapping[str, str | None], turn: Mapping[str, Any] | None) -> dict:
    """One round for the page. Short keys: this dict is repeated for every turn of every model."""
    turn = turn or {}
    checks = turn.get("checks") or []
    return {
        "r": number,
        "u": texts.get("user"),
        "a": texts.get("reply"),
        "v": turn_verdict(turn) if turn else "none",
        "f": [{"t": c["type_name"], "l": bool(c.get("loose"))} for c in checks if not c.get("strict")],
        "c": [c["type_name"] for c in checks],
        "gr": turn.get("gate_reason"),
        "gd": turn.get("gate_detail"),
        "rs": _number(turn.get("responsiveness")),
        "rp": turn.get("responsive"),
    }


def _run_data(record: Mapping[str, Any]) -> dict:
    system, texts = _rounds_of(record.get("messages") or [])
    turns = {t["round"]: t for t in record.get("turns") or []}
    numbers = sorted(set(texts) | set(turns))
    scores = [s for s in (_number(t.get("responsiveness")) for t in turns.values()) if s is not None]
    return {
        "system": system,
        "turns": [_turn_data(n, texts.get(n, {}), turns.get(n)) for n in numbers],
        "types": sorted({c["type_name"] for t in turns.values() for c in t.get("checks") or []}),
        "mean_rs": sum(scores) / len(scores) if scores else None,
    }


def _dialogue_data(results: Mapping[str, Mapping[str, Any]], labels: Sequence[str]) -> list[dict]:
    """Records grouped by dialogue id (first-seen order) so the models sit side by side."""
    dialogues: dict[str, dict] = {}
    for label in labels:
        for record in (results.get(label) or {}).get("records") or []:
            d = dialogues.setdefault(record["dialogue_id"], {
                "id": record["dialogue_id"], "source": record.get("user_source"),
                "unseen": record.get("unseen"), "constraints": [], "runs": {}})
            if not d["constraints"] and record.get("constraints"):
                d["constraints"] = [{"t": c.get("type_name"), "i": c.get("instruction")}
                                    for c in record["constraints"]]
            d["runs"][label] = _run_data(record)
    for d in dialogues.values():
        # Usually every model saw the same system prompt: show it once, not once per column.
        prompts = {run["system"] for run in d["runs"].values()}
        d["system"] = prompts.pop() if len(prompts) == 1 else None
        if d["system"] is not None:
            for run in d["runs"].values():
                run["system"] = None
    return list(dialogues.values())


def _embed(data: Any) -> str:
    """JSON safe inside <script>: no '<' can end the element, whatever the replies say."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# --------------------------------------------------------------------------- server-side parts


def _esc(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _header(report: Mapping[str, Any], labels: Sequence[str]) -> str:
    scen = (report.get("config") or {}).get("scenarios") or {}
    return (
        "<header><h1>Multi-round adherence report</h1>"
        f"<p class=\"lead\">{_esc(scen.get('dialogues', '?'))} dialogues &times; {_esc(scen.get('rounds', '?'))} "
        f"rounds per model &middot; user turns: {_esc(scen.get('user_source', '?'))} &middot; "
        f"seed {_esc(report.get('seed', '?'))} &middot; models: {_esc(', '.join(labels))}</p>"
        "<p>A reply is <b>adherent</b> when it passes the dialogue-aware gate &mdash; it is not a repeat of an "
        "earlier reply, not an echo of the user's turn, and responsive to it (on top of the per-reply checks: "
        "not empty, not looping, real words) &mdash; and keeps every rule standing at that round strictly. "
        "Bands and intervals are 95% bootstrap intervals over dialogues.</p></header>"
    )


def _curve_points(strict: Mapping[str, Any]) -> list[tuple[int, float, float | None, float | None]]:
    return [(r, _number(mu), _number(lo), _number(hi))
            for r, mu, lo, hi in zip(strict["rounds"], strict["mean"], strict["low"], strict["high"], strict=True)
            if _number(mu) is not None]


def _curve_svg(models: Mapping[str, Any], colours: Mapping[str, str]) -> str:
    """Strict A(r) per model with its bootstrap band, drawn as inline SVG."""
    width, height, left, right, top, bottom = 680, 300, 52, 16, 14, 42
    n_rounds = max((len(m["curve"]["strict"]["rounds"]) for m in models.values()), default=1) or 1
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(r: float) -> float:
        return left + (plot_w / 2 if n_rounds == 1 else (r - 1) / (n_rounds - 1) * plot_w)

    def y(v: float) -> float:
        return top + (1 - v) * plot_h

    parts = [f'<svg class="curve" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
             'role="img" aria-label="strict adherence by round">']
    for v in (0, 0.25, 0.5, 0.75, 1):
        parts.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}"/>'
                     f'<text class="tick" x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    step = max(1, math.ceil(n_rounds / 16))  # keep round labels legible on long evaluations
    for r in range(1, n_rounds + 1, step):
        parts.append(f'<text class="tick" x="{x(r):.1f}" y="{height - bottom + 16}" text-anchor="middle">{r}</text>')
    parts.append(f'<text class="axis" x="{left + plot_w / 2:.1f}" y="{height - 6}" text-anchor="middle">round</text>'
                 f'<text class="axis" transform="translate(14 {top + plot_h / 2:.1f}) rotate(-90)" '
                 'text-anchor="middle">strict adherence</text>')
    for label, m in models.items():
        colour, points = colours[label], _curve_points(m["curve"]["strict"])
        band = [(r, lo, hi) for r, _, lo, hi in points if lo is not None and hi is not None]
        if band:
            outline = [f"{x(r):.1f},{y(hi):.1f}" for r, _, hi in band]
            outline += [f"{x(r):.1f},{y(lo):.1f}" for r, lo, _ in reversed(band)]
            parts.append(f'<polygon class="band" fill="{colour}" points="{" ".join(outline)}"/>')
        if points:
            line = " ".join(f"{x(r):.1f},{y(mu):.1f}" for r, mu, _, _ in points)
            parts.append(f'<polyline class="mean" stroke="{colour}" points="{line}"/>')
        for (r, mu, lo, hi), n in zip(points, _scored_counts(m, points), strict=True):
            tip = f"{label}, round {r}: {mu:.2f} [{_fmt(lo, 2)}, {_fmt(hi, 2)}], n={n}"
            parts.append(f'<circle cx="{x(r):.1f}" cy="{y(mu):.1f}" r="3.5" fill="{colour}">'
                         f"<title>{_esc(tip)}</title></circle>")
    parts.append("</svg>")
    legend = "".join(f'<li><span class="swatch" style="background:{colours[label]}"></span>{_esc(label)} '
                     f"(AUC {_fmt(m.get('auc_strict'), 2)})</li>" for label, m in models.items())
    return "".join(parts) + f'<ul class="legend">{legend}</ul>'


def _scored_counts(model: Mapping[str, Any], points: Sequence[tuple]) -> list[Any]:
    strict = model["curve"]["strict"]
    n_by_round = dict(zip(strict["rounds"], strict.get("n") or [], strict=False))
    return [n_by_round.get(p[0], "?") for p in points]


def _first_last(model: Mapping[str, Any]) -> tuple[float | None, float | None]:
    means = [mu for _, mu, _, _ in _curve_points(model["curve"]["strict"])]
    return (means[0], means[-1]) if means else (None, None)


def _share_cell(group: Mapping[str, Any] | None) -> str:
    group = group or {}
    return f"{_fmt(group.get('strict'))} <small>({_esc(group.get('checks', 0))})</small>"


def _model_table(models: Mapping[str, Any]) -> str:
    head = ("model", "AUC strict", "AUC per-reply gate", "A(1)", "A(R)", "retention", "gate pass",
            "repeat", "echo", "responsive", "seen (checks)", "unseen (checks)")
    rows = []
    for label, m in models.items():
        first, last = _first_last(m)
        cells = [_fmt(m.get(k)) for k in ("auc_strict", "auc_strict_per_reply_gate")]
        cells += [_fmt(first), _fmt(last)]
        cells += [_fmt(m.get(k)) for k in ("retention", "gate_pass_rate", "repeat_rate", "echo_rate",
                                           "responsive_rate")]
        cells += [_share_cell(m.get("seen")), _share_cell(m.get("unseen"))]
        rows.append(f"<tr><th>{_esc(label)}</th>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    header = "".join(f"<th>{_esc(h)}</th>" for h in head)
    return (f'<table class="models"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
            '<p class="note">AUC per-reply gate: the same AUC when only the per-reply gate applies (no repeat, '
            "echo or responsiveness check), i.e. the number reported before the dialogue-aware gate. "
            "A(1), A(R): strict adherence at the first and last scored round.</p>")


def _least_responsive(models: Mapping[str, Any]) -> str:
    items = []
    for label, m in models.items():
        worst = (m.get("least_responsive") or [])[:LEAST_RESPONSIVE_SHOWN]
        if not worst:
            continue
        links = ", ".join(
            f'<a href="#{_esc(urlencode({"model": label, "dialogue": w.get("dialogue_id")}))}">'
            f'{_esc(w.get("dialogue_id"))}</a> ({_fmt(w.get("mean_responsiveness"), 2)})' for w in worst)
        items.append(f"<li><b>{_esc(label)}</b>: {links}</li>")
    if not items:
        return ""
    return ("<h3>Least responsive dialogues</h3><p class=\"note\">Mean responsiveness of the replies "
            f"(PMI, nats); a link shows that model's dialogue.</p><ul>{''.join(items)}</ul>")


def _type_table(models: Mapping[str, Any]) -> str:
    types = sorted({t for m in models.values() for t in m.get("by_type") or {}})
    if not types:
        return ""
    header = "".join(f"<th>{_esc(label)}</th>" for label in models)
    rows = "".join(
        f"<tr><th>{_esc(t)}</th>"
        + "".join(f"<td>{_share_cell((m.get('by_type') or {}).get(t))}</td>" for m in models.values())
        + "</tr>" for t in types)
    return ("<h3>By rule type (check-level strict pass rate, checks in brackets)</h3>"
            f'<table class="types"><thead><tr><th>rule type</th>{header}</tr></thead><tbody>{rows}</tbody></table>')


def _comparisons(report: Mapping[str, Any]) -> str:
    items = [f"<li>{_esc(c.get('b'))} minus {_esc(c.get('a'))}: {_fmt(c.get('difference'))} "
             f"[{_fmt(c.get('low'))}, {_fmt(c.get('high'))}] ({'paired' if c.get('paired') else 'unpaired'})</li>"
             for c in report.get("comparisons") or []]
    return f"<h3>Differences in strict AUC</h3><ul>{''.join(items)}</ul>" if items else ""


def _summary(report: Mapping[str, Any], colours: Mapping[str, str]) -> str:
    models = report.get("models") or {}
    if not models:
        return "<section><p>No model summaries in this report.</p></section>"
    return ("<section class=\"summary\"><h2>Adherence by round (strict, 95% bootstrap band)</h2>"
            f"{_curve_svg(models, colours)}<h2>Models</h2>{_model_table(models)}{_least_responsive(models)}"
            f"{_type_table(models)}{_comparisons(report)}</section>")


_FILTERS = """<section class="dialogues"><h2>Dialogues</h2>
<form id="filters" class="filters" onsubmit="return false">
<label>model <select id="f-model"><option value="">all</option></select></label>
<label>rule type <select id="f-type"><option value="">all</option></select></label>
<label>round <select id="f-round"><option value="">all</option></select></label>
<label>verdict <select id="f-verdict"><option value="">all</option>
<option value="adherent">adherent</option><option value="broken">rule broken</option>
<option value="gate">gate failed</option><option value="none">no rule standing</option></select></label>
<label>dialogue <input id="f-dialogue" list="dialogue-ids" size="10" placeholder="any id"></label>
<datalist id="dialogue-ids"></datalist>
<label><input type="checkbox" id="f-dim"> dim other turns, not hide</label>
<span><button type="button" id="expand">expand all</button> <button type="button" id="collapse">collapse all</button></span>
</form>
<p class="key"><span class="k v-adherent">adherent</span><span class="k v-broken">rule broken</span>
<span class="k v-gate">gate failed</span><span class="k v-none">no rule standing</span>
<span id="shown"></span></p>
<noscript><p>The dialogues need JavaScript (inline, nothing is fetched).</p></noscript>
<div id="dialogue-list"></div></section>"""


# --------------------------------------------------------------------------- page


def render_html(report: dict, results: dict[str, dict]) -> str:
    """The whole report.html as one string. `report` is report.json; `results[label]["records"]` the dialogues."""
    models = report.get("models") or {}
    labels = list(models) + [label for label in results if label not in models]
    colours = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}
    dialogues = _dialogue_data(results, labels)
    n_rounds = max((t["r"] for d in dialogues for run in d["runs"].values() for t in run["turns"]), default=0)
    data = {
        "labels": labels,
        "colours": colours,
        "types": sorted({t for d in dialogues for run in d["runs"].values() for t in run["types"]}),
        "rounds": n_rounds,
        "dialogues": dialogues,
    }
    return "".join([
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>Multi-round adherence report</title><style>", _CSS, "</style>",
        # First, so that an error anywhere in the main script is shown on the page (and seen by tests).
        "<script>", _ERROR_HOOK, "</script></head><body>",
        _header(report, labels), _summary(report, colours), _FILTERS,
        '<script type="application/json" id="report-data">', _embed(data), "</script>",
        "<script>", _SCRIPT, "</script></body></html>\n",
    ])


_CSS = """
[hidden]{display:none!important}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;margin:0 auto;
 padding:16px 24px;max-width:1500px;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:22px 0 8px}h3{font-size:15px;margin:16px 0 6px}
.lead{font-size:15px;margin:4px 0}.note{color:#555;font-size:12px;margin:4px 0 10px}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}
thead th{background:#f4f4f6;text-align:center}tbody th{text-align:left;font-weight:600}
small{color:#777}
svg.curve{max-width:100%;height:auto;display:block}
svg .grid{stroke:#e2e2e2}svg .tick{font-size:11px;fill:#555}svg .axis{font-size:12px;fill:#333}
svg .band{fill-opacity:.15;stroke:none}svg .mean{fill:none;stroke-width:2}
.legend{list-style:none;padding:0;margin:4px 0 0 52px;display:flex;flex-wrap:wrap;gap:14px}
.swatch{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:5px;vertical-align:-1px}
.filters{display:flex;flex-wrap:wrap;gap:8px 14px;align-items:center;padding:8px 10px;background:#f4f4f6;
 border-radius:6px;position:sticky;top:0;z-index:2}
.key{display:flex;gap:10px;align-items:center;flex-wrap:wrap;font-size:12px}
.k{padding:1px 8px;border-radius:3px;border-left:4px solid}
#shown{color:#555;margin-left:auto}
details.dialogue{border:1px solid #ddd;border-radius:6px;margin:10px 0;background:#fcfcfd}
details.dialogue>summary{cursor:pointer;padding:6px 10px;display:flex;flex-wrap:wrap;gap:6px 16px;
 align-items:center}
.did{font-weight:700}.meta{color:#555;font-size:12px}
summary .did{min-width:4.5em}summary .meta{min-width:10em}  /* lines the verdict strips up */
.strip{display:inline-flex;align-items:center;gap:2px;font-size:11px;color:#444}
.strip .name{margin-right:3px}
.cell{display:inline-block;width:12px;height:12px;border-radius:2px}
.cell.off{opacity:.18}
.body{padding:0 10px 10px}
.rules{margin:4px 0 8px;padding-left:18px;font-size:12px}
.rules code{background:#eef;padding:0 3px;border-radius:2px}
details.system{font-size:12px;margin:2px 0 6px}details.system pre{white-space:pre-wrap;word-break:break-word;
 background:#f6f6f6;padding:6px;margin:4px 0;max-height:220px;overflow:auto}
.runs{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:10px}
.run{border-top:4px solid #999;padding-top:4px;min-width:0}
.run h4{margin:0 0 4px;font-size:14px}.run h4 .meta{font-weight:400;margin-left:6px}
.turn{border-left:5px solid;border-radius:3px;margin:6px 0;padding:4px 8px}
.turn.dim{opacity:.35}
.msg{margin:2px 0;display:grid;grid-template-columns:64px minmax(0,1fr);gap:6px;align-items:baseline}
.msg .who{font-size:11px;color:#666;text-transform:uppercase;letter-spacing:.04em}
.text{white-space:pre-wrap;word-break:break-word}
.msg.user .text{color:#444}
.msg.assistant .text{background:rgba(255,255,255,.7);padding:2px 4px;border-radius:2px}
.verdict{font-size:12px;margin-top:3px;display:flex;flex-wrap:wrap;gap:2px 10px}
.badge{font-weight:600}.standing{color:#666}
.v-adherent{background:#e9f6ec;border-color:#2e7d32}.cell.v-adherent{background:#2e7d32}
.v-broken{background:#fdecec;border-color:#c62828}.cell.v-broken{background:#c62828}
.v-gate{background:#fff3dc;border-color:#e08a00}.cell.v-gate{background:#e08a00}
.v-none{background:#f1f1f1;border-color:#9e9e9e}.cell.v-none{background:#bdbdbd}
#js-error{background:#c62828;color:#fff;padding:8px;white-space:pre-wrap}
"""

_ERROR_HOOK = """
window.addEventListener("error", function (event) {
  var box = document.getElementById("js-error");
  if (!box) { box = document.createElement("pre"); box.id = "js-error"; document.body.prepend(box); }
  box.textContent += "script error: " + event.message + "\\n";
});
"""

# Builds the dialogues from #report-data with textContent only (never innerHTML: replies are
# model output). Filter state lives in the URL fragment; #render-done marks a finished run.
_SCRIPT = r"""
(() => {
  "use strict";
  const DATA = JSON.parse(document.getElementById("report-data").textContent);
  const VERDICT = {adherent: "adherent", broken: "rule broken", gate: "gate failed", none: "no rule standing"};
  const OPEN_LIMIT = 20;  // open every shown dialogue when no more than this many are shown
  const KEYS = ["model", "type", "round", "verdict", "dialogue"];
  const nodes = [];

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  const fmt = (x, digits) => (x === null || x === undefined) ? "n/a" : Number(x).toFixed(digits);

  function message(role, text) {
    const box = el("div", "msg " + role);
    box.append(el("span", "who", role), el("div", "text", text === null ? "(no reply)" : text));
    return box;
  }

  function verdictLine(turn) {
    const line = el("div", "verdict");
    line.append(el("span", "badge", "round " + turn.r + " \u00b7 " + VERDICT[turn.v]));
    if (turn.v === "gate") {
      line.append(el("span", "reason", (turn.gr || "unknown reason") + (turn.gd ? " \u2014 " + turn.gd : "")));
      if (!turn.c.length) line.append(el("span", "standing", "not scored: no rule standing yet"));
    }
    if (turn.f.length) {
      const failed = turn.f.map(f => f.t + (f.l ? " (loose passes)" : "")).join(", ");
      line.append(el("span", "failed", "failed: " + failed));
    }
    if (turn.rs !== null || turn.rp !== null) {
      const label = turn.rp === null || turn.rp === undefined ? "" : (turn.rp ? " (responsive)" : " (unresponsive)");
      line.append(el("span", "resp", "responsiveness " + fmt(turn.rs, 2) + label));
    }
    if (turn.c.length) line.append(el("span", "standing", "rules: " + turn.c.join(", ")));
    return line;
  }

  function turnNode(turn) {
    const node = el("div", "turn v-" + turn.v);
    node.dataset.round = turn.r;
    node.dataset.verdict = turn.v;
    if (turn.u !== null) node.append(message("user", turn.u));
    node.append(message("assistant", turn.a), verdictLine(turn));
    return node;
  }

  function systemBox(text) {
    const box = el("details", "system");
    box.append(el("summary", "", "system prompt"), el("pre", "", text));
    return box;
  }

  function runNode(label, run) {
    const node = el("div", "run");
    node.dataset.model = label;
    node.style.borderTopColor = DATA.colours[label];
    const title = el("h4", "", label);
    title.append(el("span", "meta", "mean responsiveness " + fmt(run.mean_rs, 2)));
    node.append(title);
    if (run.system !== null) node.append(systemBox(run.system));
    const strip = el("span", "strip");
    strip.dataset.model = label;
    strip.append(el("span", "name", label));
    const turns = run.turns.map(turn => {
      const cell = el("span", "cell v-" + turn.v);
      cell.title = label + ", round " + turn.r + ": " + VERDICT[turn.v];
      strip.append(cell);
      const tn = turnNode(turn);
      node.append(tn);
      return {turn, node: tn, cell};
    });
    return {label, node, strip, turns, types: new Set(run.types)};
  }

  function dialogueNode(d) {
    const node = el("details", "dialogue");
    node.dataset.id = d.id;
    const summary = el("summary");
    summary.append(el("span", "did", d.id),
                   el("span", "meta", (d.source || "?") + (d.unseen ? " \u00b7 unseen rules" : " \u00b7 seen rules")));
    const body = el("div", "body");
    if (d.constraints.length) {
      const rules = el("ul", "rules");
      d.constraints.forEach(c => {
        const item = el("li");
        item.append(el("code", "", c.t), document.createTextNode(" " + (c.i || "")));
        rules.append(item);
      });
      body.append(rules);
    }
    if (d.system !== null) body.append(systemBox(d.system));
    const grid = el("div", "runs");
    const runs = DATA.labels.filter(label => d.runs[label]).map(label => runNode(label, d.runs[label]));
    runs.forEach(run => { summary.append(run.strip); grid.append(run.node); });
    body.append(grid);
    node.append(summary, body);
    return {id: d.id, node, runs};
  }

  function fillSelect(id, values) {
    const select = document.getElementById(id);
    values.forEach(v => { const o = el("option", "", v); o.value = String(v); select.append(o); });
  }

  function controls() { return Object.fromEntries(KEYS.map(k => [k, document.getElementById("f-" + k)])); }

  function readControls() {
    const f = {};
    Object.entries(controls()).forEach(([k, c]) => { f[k] = c.value.trim(); });
    f.dim = document.getElementById("f-dim").checked;
    return f;
  }

  function setControls(params) {
    Object.entries(controls()).forEach(([k, c]) => { c.value = params.get(k) || ""; });
    document.getElementById("f-dim").checked = ["1", "true", "yes"].includes(params.get("dim") || "");
  }

  function writeHash(f) {
    const params = new URLSearchParams();
    KEYS.forEach(k => { if (f[k]) params.set(k, f[k]); });
    if (f.dim) params.set("dim", "1");
    const hash = params.toString();
    try { history.replaceState(null, "", hash ? "#" + hash : location.pathname + location.search); }
    catch (e) { location.hash = hash; }
  }

  // A turn matches the round and verdict filters; a model column is shown when it matches the
  // model and type filters and (if a turn filter is set) has a matching turn; a dialogue when
  // it matches the id filter and shows a column.
  function apply(f) {
    const turnFilter = Boolean(f.round || f.verdict);
    let shownDialogues = 0, shownTurns = 0;
    nodes.forEach(d => {
      let dialogueTurns = 0, anyRun = false;
      d.runs.forEach(run => {
        let matches = 0;
        run.turns.forEach(({turn, node, cell}) => {
          const match = (!f.round || String(turn.r) === f.round) && (!f.verdict || turn.v === f.verdict);
          matches += match ? 1 : 0;
          node.hidden = !match && !f.dim;
          node.classList.toggle("dim", !match && f.dim);
          cell.classList.toggle("off", !match);
        });
        const shown = (!f.model || run.label === f.model) && (!f.type || run.types.has(f.type))
                      && (!turnFilter || matches > 0);
        run.node.hidden = !shown;
        run.strip.hidden = !shown;
        if (shown) { anyRun = true; dialogueTurns += matches; }
      });
      const shown = anyRun && (!f.dialogue || d.id === f.dialogue);
      d.node.hidden = !shown;
      if (shown) { shownDialogues += 1; shownTurns += dialogueTurns; }
    });
    if (shownDialogues <= OPEN_LIMIT) nodes.forEach(d => { if (!d.node.hidden) d.node.open = true; });
    document.getElementById("shown").textContent =
      "showing " + shownDialogues + " of " + nodes.length + " dialogues, " + shownTurns + " turns";
    return shownDialogues;
  }

  function init() {
    fillSelect("f-model", DATA.labels);
    fillSelect("f-type", DATA.types);
    fillSelect("f-round", Array.from({length: DATA.rounds}, (_, i) => i + 1));
    const ids = document.getElementById("dialogue-ids");
    DATA.dialogues.forEach(d => { const o = el("option"); o.value = d.id; ids.append(o); });
    const list = document.getElementById("dialogue-list");
    const fragment = document.createDocumentFragment();
    DATA.dialogues.forEach(d => { const n = dialogueNode(d); nodes.push(n); fragment.append(n.node); });
    list.append(fragment);

    const update = () => { const f = readControls(); writeHash(f); mark(apply(f)); };
    const fromHash = () => { setControls(new URLSearchParams(location.hash.slice(1))); mark(apply(readControls())); };
    document.getElementById("filters").addEventListener("input", update);
    document.getElementById("filters").addEventListener("change", update);
    window.addEventListener("hashchange", fromHash);
    document.getElementById("expand").addEventListener("click", () => nodes.forEach(d => { d.node.open = true; }));
    document.getElementById("collapse").addEventListener("click", () => nodes.forEach(d => { d.node.open = false; }));
    fromHash();
  }

  function mark(shown) {
    let done = document.getElementById("render-done");
    if (!done) { done = el("div"); done.id = "render-done"; done.hidden = true; document.body.append(done); }
    done.dataset.dialogues = nodes.length;
    done.dataset.shown = shown;
  }

  init();
})();
"""
