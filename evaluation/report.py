"""Evaluation outputs: report.json, report.md, report.html, adherence.png, survival.png, dialogues.jsonl.

report.json holds only what the seed and config determine (no timings, no
dates), so the same seed and config give a byte-identical file. Its schema:

  schema_version, config (the resolved recipe), seed, versions
  models: {label: {model, intervention, n_dialogues, rounds,
                   curve: {strict: {rounds, mean, low, high, n}, loose: {...}},
                   auc_strict, auc_loose, retention, retention_loose, drift_slope,
                   ssr, r_k, gate_pass_rate, auc_strict_per_reply_gate, repeat_rate,
                   echo_rate, responsive_rate, least_responsive, survival, by_family,
                   by_type, seen, unseen, by_user_source}}
                   probe_curve (only with scenarios.probe_rounds)}
  comparisons: [{a, b, mode, difference, low, high, paired}]   (AUC of b minus AUC of a)

See `metrics.py` for the definition of every number.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

from dialogrl.data.atomic_outputs import publish, staging_dir
from dialogrl.evaluation.report_html import render_html

# 2: the dialogue-aware gate (repeat, echo, responsiveness) decides `adherent`.
SCHEMA_VERSION = 2
REPORT_FILENAME = "report.json"  # published last: a directory with it holds a complete report set


def versions() -> dict[str, str]:
    out = {}
    for package in ("dialogrl", "torch", "transformers", "trl"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def build_report(results: dict[str, dict[str, Any]], config: dict[str, Any], seed: int, n_boot: int) -> dict:
    """`results[label] = {"model", "intervention", "records"}` -> the report.json content."""
    from dialogrl.evaluation import metrics

    models = {}
    for label, result in results.items():
        summary = metrics.summarise(result["records"], n_boot=n_boot, seed=seed)
        models[label] = {"model": result["model"], "intervention": result["intervention"], **summary}
        probes = [{"dialogue_id": r["dialogue_id"], "user_source": "probe", "turns": r["probes"]}
                  for r in result["records"] if r.get("probes")]
        if probes:
            models[label]["probe_curve"] = metrics.curve(probes, "strict", n_boot=n_boot, seed=seed)
    labels = list(results)
    comparisons = []
    for other in labels[1:]:
        diff = metrics.compare(results[labels[0]]["records"], results[other]["records"], mode="strict",
                               n_boot=n_boot, seed=seed)
        comparisons.append({"a": labels[0], "b": other, "mode": "strict", **diff})
    return {"schema_version": SCHEMA_VERSION, "config": config, "seed": seed, "versions": versions(),
            "models": models, "comparisons": comparisons}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _least_responsive_section(report: dict, results: dict[str, dict[str, Any]]) -> list[str]:
    """The 3 least responsive dialogues per model, with every user turn and reply and its verdict."""
    lines = ["", "## Least responsive dialogues (lowest mean responsiveness, per model)", ""]
    for label, m in report["models"].items():
        by_id = {r["dialogue_id"]: r for r in results.get(label, {}).get("records", [])}
        for entry in m.get("least_responsive", []):
            record = by_id.get(entry["dialogue_id"])
            if record is None:
                continue
            lines.append(f"### {label}: {entry['dialogue_id']} (mean PMI {entry['mean_responsiveness']:.2f} nats)")
            lines.append("")
            turns = {t["round"]: t for t in record["turns"]}
            r = 0
            for message in record["messages"]:
                if message["role"] == "user":
                    lines.append(f"- user: {_one_line(message['content'])}")
                elif message["role"] == "assistant":
                    r += 1
                    turn = turns.get(r, {})
                    verdict = ("gate: " + str(turn.get("gate_reason"))) if not turn.get("gate_pass", True) else (
                        "adherent" if turn.get("adherent") else "no rule yet" if turn.get("adherent") is None
                        else "rule broken")
                    lines.append(f"- **reply {r}** ({verdict}; PMI {_fmt(turn.get('responsiveness'), 2)}): "
                                 f"{_one_line(message['content'])}")
            lines.append("")
    return lines


def _one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def markdown(report: dict, speeds: dict[str, dict[str, float]] | None = None,
             results: dict[str, dict[str, Any]] | None = None) -> str:
    models = report["models"]
    cfg = report["config"]
    scen = cfg.get("scenarios", {})
    lines = [
        "# Multi-round adherence report",
        "",
        f"{scen.get('dialogues')} dialogues x {scen.get('rounds')} rounds per model, user turns: "
        f"{scen.get('user_source')}, seed {report['seed']}. A reply is adherent when it passes the dialogue-aware "
        "gate (well-formed, not a repeat of an earlier reply, not an echo of the user's turn, responsive to it under "
        "the fixed scorer) and keeps every rule standing at that round. Intervals are 95% bootstrap intervals over "
        "dialogues.",
        "",
        "| model | AUC strict | AUC loose | A(1) | A(R) | retention | drift/round | SSR | gate pass | seen | unseen |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, m in models.items():
        means = [x for x in m["curve"]["strict"]["mean"] if x is not None]
        first, last = (means[0], means[-1]) if means else (None, None)
        lines.append(
            f"| {label} | {_fmt(m['auc_strict'])} | {_fmt(m['auc_loose'])} | {_fmt(first)} | {_fmt(last)} | "
            f"{_fmt(m['retention'])} | {_fmt(m['drift_slope'])} | {_fmt(m['ssr'])} | {_fmt(m['gate_pass_rate'])} | "
            f"{_fmt(m['seen']['strict'])} | {_fmt(m['unseen']['strict'])} |"
        )
    lines += ["", "## What the dialogue-aware gate changed", "",
              "Old AUC: strict AUC under the per-reply gate alone (before repeats, echoes and responsiveness "
              "counted). Rates are shares of all replies; responsive is over the replies the scorer judged.", "",
              "| model | AUC strict | old AUC | repeat | echo | responsive | gate pass |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, m in models.items():
        lines.append(f"| {label} | {_fmt(m['auc_strict'])} | {_fmt(m.get('auc_strict_per_reply_gate'))} | "
                     f"{_fmt(m.get('repeat_rate'))} | {_fmt(m.get('echo_rate'))} | {_fmt(m.get('responsive_rate'))} | "
                     f"{_fmt(m['gate_pass_rate'])} |")
    lines += ["", "## Adherence by round (strict, with 95% interval)", ""]
    rounds = max(len(m["curve"]["strict"]["rounds"]) for m in models.values())
    lines.append("| model | " + " | ".join(f"r{r}" for r in range(1, rounds + 1)) + " |")
    lines.append("| --- |" + " --- |" * rounds)
    for label, m in models.items():
        c = m["curve"]["strict"]
        cells = [f"{_fmt(mu, 2)} [{_fmt(lo, 2)}, {_fmt(hi, 2)}]" if mu is not None else "n/a"
                 for mu, lo, hi in zip(c["mean"], c["low"], c["high"], strict=True)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    probed = {label: m["probe_curve"] for label, m in models.items() if "probe_curve" in m}
    if probed:
        lines += ["", "## Probes (forked history, fixed question; strict adherence of the answer)", ""]
        for label, c in probed.items():
            cells = [f"round {r}: {_fmt(mu, 2)} [{_fmt(lo, 2)}, {_fmt(hi, 2)}]"
                     for r, mu, lo, hi in zip(c["rounds"], c["mean"], c["low"], c["high"], strict=True)
                     if mu is not None]
            lines.append(f"- {label}: " + "; ".join(cells))
    lines += ["", "## SysBench-style session scores (strict)", "",
              "R_k: share of dialogues whose first k scored turns all pass.", "",
              "| model | " + " | ".join(f"R_{k}" for k in range(1, rounds + 1)) + " |",
              "| --- |" + " --- |" * rounds]
    for label, m in models.items():
        lines.append(f"| {label} | " + " | ".join(_fmt(v, 2) for v in m["r_k"]) + " |")
    lines += ["", "## By constraint family (check-level pass rate, strict)", ""]
    families = sorted({f for m in models.values() for f in m["by_family"]})
    lines.append("| model | " + " | ".join(families) + " |")
    lines.append("| --- |" + " --- |" * len(families))
    for label, m in models.items():
        lines.append(f"| {label} | " + " | ".join(
            _fmt(m["by_family"].get(f, {}).get("strict"), 2) for f in families) + " |")
    lines += ["", "## By user source (turn-level adherence, strict)", ""]
    for label, m in models.items():
        parts = [f"{src}: {_fmt(v.get('strict'), 2)} ({v.get('turns')} turns)"
                 for src, v in sorted(m["by_user_source"].items())]
        lines.append(f"- {label}: " + "; ".join(parts))
    if report["comparisons"]:
        lines += ["", "## Differences in strict AUC", ""]
        for c in report["comparisons"]:
            lines.append(f"- {c['b']} minus {c['a']}: {_fmt(c['difference'])} "
                         f"[{_fmt(c['low'])}, {_fmt(c['high'])}] ({'paired' if c['paired'] else 'unpaired'})")
    if speeds:
        lines += ["", "## Speed (not part of report.json)", ""]
        for label, s in speeds.items():
            rate = s["generated_tokens"] / max(s["seconds"], 1e-9)
            lines.append(f"- {label}: {s['generated_tokens']} tokens in {s['seconds']:.0f} s ({rate:.1f} tokens/s)")
    if results:
        lines += _least_responsive_section(report, results)
    lines += ["", "Trade-off: an intervention that raises adherence while lowering the gate pass rate is buying "
              "rule-keeping with reply quality; read the two columns together.", ""]
    return "\n".join(lines)


def _axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.2))


def _finish(fig, ax, path: Path, ylabel: str, title: str) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_adherence(report: dict, path: Path) -> None:
    fig, ax = _axes()
    for label, m in report["models"].items():
        c = m["curve"]["strict"]
        points = [(r, mu, lo, hi) for r, mu, lo, hi in zip(c["rounds"], c["mean"], c["low"], c["high"], strict=True)
                  if mu is not None]
        if not points:
            continue
        rounds, mean, low, high = map(list, zip(*points, strict=True))
        line, = ax.plot(rounds, mean, marker="o", label=f"{label} (AUC {m['auc_strict']:.2f})")
        ax.fill_between(rounds, low, high, color=line.get_color(), alpha=0.15)
    _finish(fig, ax, path, "strict adherence (gate passed, all standing rules kept)",
            "System-prompt adherence by round (95% bootstrap band)")


def plot_survival(report: dict, path: Path) -> None:
    fig, ax = _axes()
    for label, m in report["models"].items():
        survival = m["survival"]
        ax.step(range(1, len(survival) + 1), survival, where="post", marker="o", label=label)
    _finish(fig, ax, path, "share of dialogues with no violation yet", "First-violation survival (strict)")


def write_outputs(report: dict, results: dict[str, dict[str, Any]], output_dir: str | Path,
                  speeds: dict[str, dict[str, float]] | None = None) -> Path:
    """The report set, published whole: report.json (what reruns and the pipeline read) goes last."""
    output_dir = Path(output_dir)
    staging = staging_dir(output_dir)
    (staging / REPORT_FILENAME).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    (staging / "report.md").write_text(markdown(report, speeds, results))
    (staging / "report.html").write_text(render_html(report, results), encoding="utf-8")
    plot_adherence(report, staging / "adherence.png")
    plot_survival(report, staging / "survival.png")
    with (staging / "dialogues.jsonl").open("w", encoding="utf-8") as handle:
        for label, result in results.items():
            for record in result["records"]:
                handle.write(json.dumps({"model": label, **record}, ensure_ascii=False) + "\n")
    publish(staging, output_dir, REPORT_FILENAME)
    return output_dir
