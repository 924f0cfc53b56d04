"""Turn the evaluator's per-turn verdicts into the numbers a report shows.

Kept apart from the rollout code so a report can be recomputed from saved verdicts
(plain JSON) without a model, and so every number here can be checked by hand.

Input: one dict per dialogue (JSON-friendly)::

    {"dialogue_id": "d0",          # same id across models = same dialogue (paired comparison)
     "user_source": "replay",      # replay | simulated | pressure | ...
     "turns": [                    # one per round, round = 1..R; a dialogue may stop early
        {"round": 1, "gate_pass": True,
         "checks": [               # one per constraint standing at that round; may be empty
            {"type_name": "lowercase", "family": "case", "held_out": False,
             "strict": True, "loose": True}]}]}

Definitions (the report's schema). `mode` is "strict" or "loose" (IFEval's two accuracies).

- Scored turn: a turn with at least one check. A turn with no checks (no rule in force yet)
  is not scored, whatever its gate: there was nothing to adhere to.
- Adherent turn: scored, gate_pass is True, and every check passes in the mode. The gate
  comes first so that degenerate output (empty, looping) cannot score by being trivially
  lowercase or short.
- Adherence matrix [N dialogues, R rounds], R = the largest round seen: 1.0 / 0.0, NaN where
  the turn is unscored or missing (the dialogue stopped early).
- Curve: per round, `mean` = nanmean over dialogues, `n` = scored dialogues, `low`/`high` =
  percentile bootstrap over dialogues (rows resampled with replacement; rounds where a
  replicate drew no scored turn are left out of that round's percentiles). A round with no
  scored turn has None in mean/low/high and 0 in n.
- AUC: trapezoidal area under A(r) divided by the span of rounds, so it lies in [0, 1]; with
  no gaps this is the area over [1, R] / (R - 1). Rounds with None are skipped, i.e. linearly
  interpolated between their scored neighbours; leading or trailing None rounds shrink the
  span instead of being extrapolated (a rule first set at round 2 leaves round 1 unscored,
  and holding A(2) flat over [1, 2] would weight round 2 twice). One scored round: its A.
- Retention: A(last scored round) / A(first scored round); None when A(first) == 0.
- Drift slope: OLS slope of A(r) on r over scored rounds (adherence change per round;
  negative = drift); None with fewer than 2 scored rounds.
- Survival S(r): share of ALL dialogues with no failed scored turn in rounds 1..r (first-
  violation survival). Unscored turns neither kill nor save; a dialogue that stopped early
  keeps its status; a dialogue with no scored turn survives throughout.
- SSR (SysBench): per dialogue, the run of adherent scored turns from the first, stopping at
  the first failure, divided by the dialogue's number of scored turns (SysBench divides by
  its fixed 5 turns); mean over dialogues with at least one scored turn.
- R_k (SysBench), k = 1..R: share of dialogues whose first k scored turns all pass, over
  dialogues with at least k scored turns; None where none qualify.
- Gate pass rate: share of ALL turns (scored or not) whose gate passed. `gate_pass` is the whole
  dialogue-aware gate (see verdicts.py); `reply_gate_pass`, where present, is the per-reply gate
  alone, and `auc_strict_per_reply_gate` is the strict AUC computed with it instead (the verdict
  before repeats, echoes and responsiveness counted), so the change is visible.
- Repeat / echo rate: share of ALL turns flagged as a repeat of an earlier reply / an echo of the
  user's turn (round 1 cannot repeat, so it counts as not a repeat). Responsive rate: share of
  the turns the scorer judged (responsive not None) that it found responsive.
- Breakdowns by family / type / seen-unseen count checks: a check passes only if its turn's
  gate passed and the check passed in the mode. held_out False = seen in training. By user
  source counts scored turns (turn adherence).

Every public function returns plain Python (float, int, None, list, dict): no numpy types,
no NaN, so a report is `json.dumps(..., allow_nan=False)`-safe.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

Dialogue = Mapping[str, Any]
MODES: tuple[str, ...] = ("strict", "loose")


# --------------------------------------------------------------------------- turn level


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _turns(dialogue: Dialogue) -> list[Mapping[str, Any]]:
    """The dialogue's turns ordered by round; rejects what would silently misplace a verdict."""
    turns = sorted(dialogue["turns"], key=lambda t: t["round"])
    rounds = [t["round"] for t in turns]
    if rounds and rounds[0] < 1:
        raise ValueError(f"dialogue {dialogue.get('dialogue_id')!r}: rounds start at 1, got {rounds[0]}")
    if len(set(rounds)) != len(rounds):
        raise ValueError(f"dialogue {dialogue.get('dialogue_id')!r}: repeated round in {rounds}")
    return turns


GATES: tuple[str, ...] = ("gate_pass", "reply_gate_pass")


def _verdict(turn: Mapping[str, Any], mode: str, gate: str = "gate_pass") -> bool | None:
    """True / False for a scored turn, None for a turn with no checks.

    `gate` names the turn field that gates it; records without `reply_gate_pass` (older reports)
    fall back to `gate_pass`.
    """
    checks = turn["checks"]
    if not checks:
        return None
    return bool(turn.get(gate, turn["gate_pass"])) and all(bool(c[mode]) for c in checks)


def _scored_verdicts(dialogue: Dialogue, mode: str) -> list[bool]:
    """Verdicts of the scored turns, in round order (what SysBench's turn index means here)."""
    return [v for v in (_verdict(t, mode) for t in _turns(dialogue)) if v is not None]


def _n_rounds(dialogues: Sequence[Dialogue]) -> int:
    return max((t["round"] for d in dialogues for t in d["turns"]), default=0)


def _share(hits: int, total: int) -> float | None:
    return hits / total if total else None


def _plain(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


# --------------------------------------------------------------------------- adherence curve


def adherence_matrix(dialogues: Sequence[Dialogue], mode: str, gate: str = "gate_pass") -> np.ndarray:
    """[N dialogues, R rounds] of 1.0 (adherent), 0.0 (not), NaN (unscored or missing).

    The only numpy return in the module: it is the working form the curve and the bootstrap
    share, not a report field.
    """
    _check_mode(mode)
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    out = np.full((len(dialogues), _n_rounds(dialogues)), np.nan)
    for i, d in enumerate(dialogues):
        for t in _turns(d):
            v = _verdict(t, mode, gate)
            if v is not None:
                out[i, t["round"] - 1] = float(v)
    return out


def _weighted_means(values: np.ndarray, scored: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per-round means under row weights: [B, N] x [N, R] -> [B, R], NaN where nothing is scored.

    Resampling rows with replacement is the same as weighting each row by how often it was
    drawn, which avoids materialising a [B, N, R] copy. With 0/1 values and integer weights
    the sums are exact, so identical rows give exactly their value (degenerate intervals).
    """
    sums = weights @ values
    counts = weights @ scored
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.where(counts > 0, counts, 1.0), np.nan)


def _resample_weights(rng: np.random.Generator, n_rows: int, n_boot: int) -> np.ndarray:
    """[n_boot, n_rows] draw counts: n_rows rows drawn uniformly with replacement, per replicate."""
    return rng.multinomial(n_rows, np.full(n_rows, 1.0 / n_rows), size=n_boot).astype(float)


def _column_mean(m: np.ndarray) -> list[float | None]:
    """Per-round nanmean of an adherence matrix, None for rounds with nothing scored."""
    scored = (~np.isnan(m)).astype(float)
    return [_plain(x) for x in _weighted_means(np.nan_to_num(m), scored, np.ones((1, m.shape[0])))[0]]


def _validate_bootstrap(n_boot: int, level: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")


def curve(
    dialogues: Sequence[Dialogue], mode: str, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
    gate: str = "gate_pass",
) -> dict[str, list]:
    """Adherence by round with a percentile bootstrap interval over dialogues.

    Dialogues, not turns, are resampled: turns of one dialogue share a system prompt and a
    history, so treating them as independent would make the interval too narrow.
    Returns {"rounds": [1..R], "mean", "low", "high": [float | None], "n": [int]}.
    """
    _validate_bootstrap(n_boot, level)
    m = adherence_matrix(dialogues, mode, gate)
    n_dialogues, n_rounds = m.shape
    scored = (~np.isnan(m)).astype(float)
    values = np.nan_to_num(m)
    n = scored.sum(axis=0).astype(int)
    low = [None] * n_rounds
    high = [None] * n_rounds
    if n_dialogues:
        boot = _weighted_means(
            values, scored, _resample_weights(np.random.default_rng(seed), n_dialogues, n_boot)
        )
        tail = (1 - level) / 2 * 100
        for r in range(n_rounds):
            finite = boot[:, r][np.isfinite(boot[:, r])]
            if n[r] and finite.size:
                low[r], high[r] = (float(q) for q in np.percentile(finite, [tail, 100 - tail]))
    return {
        "rounds": list(range(1, n_rounds + 1)),
        "mean": _column_mean(m),
        "low": low,
        "high": high,
        "n": [int(k) for k in n],
    }


def _points(means: Sequence[float | None]) -> tuple[list[int], list[float]]:
    """(rounds, values) of the scored rounds; means[i] is round i + 1."""
    pairs = [(i + 1, float(a)) for i, a in enumerate(means) if a is not None and not math.isnan(a)]
    return [r for r, _ in pairs], [a for _, a in pairs]


def auc(means: Sequence[float | None]) -> float | None:
    """Normalised trapezoidal area under A(r); see the module docstring for gaps. None if no round is scored.

    Worked: [1, 1/3, 1/2, 1/2] -> (2/3 + 5/12 + 1/2) / 3 = 19/36.
    """
    rounds, values = _points(means)
    if not rounds:
        return None
    if len(rounds) == 1:
        return values[0]
    area = sum((values[i] + values[i + 1]) / 2 * (rounds[i + 1] - rounds[i]) for i in range(len(rounds) - 1))
    return area / (rounds[-1] - rounds[0])


def retention(means: Sequence[float | None]) -> float | None:
    """A(last scored round) / A(first scored round): how much of the opening adherence is left."""
    _, values = _points(means)
    if not values or values[0] == 0:
        return None
    return values[-1] / values[0]


def drift_slope(means: Sequence[float | None]) -> float | None:
    """OLS slope of A(r) on r over scored rounds; unlike retention it uses every round, not two."""
    rounds, values = _points(means)
    if len(rounds) < 2:
        return None
    r = np.asarray(rounds, dtype=float)
    a = np.asarray(values)
    return float(((r - r.mean()) * (a - a.mean())).sum() / ((r - r.mean()) ** 2).sum())


# --------------------------------------------------------------------------- per-dialogue runs


def survival(dialogues: Sequence[Dialogue], mode: str) -> list[float]:
    """S(r), r = 1..R: share of all dialogues with no failed scored turn up to round r."""
    m = adherence_matrix(dialogues, mode)
    if not len(dialogues):
        return []  # no dialogues means no rounds either; avoids numpy's empty-mean warning
    # NaN == 0 is False, so unscored and missing turns never count as a violation.
    failed_by = np.logical_or.accumulate(m == 0.0, axis=1)
    return [float(x) for x in (~failed_by).mean(axis=0)]


def ssr(dialogues: Sequence[Dialogue], mode: str) -> float | None:
    """SysBench's SSR over scored turns; dialogues with no scored turn are left out."""
    _check_mode(mode)
    fractions = []
    for d in dialogues:
        verdicts = _scored_verdicts(d, mode)
        if verdicts:
            run = next((i for i, v in enumerate(verdicts) if not v), len(verdicts))
            fractions.append(run / len(verdicts))
    return float(np.mean(fractions)) if fractions else None


def r_k(dialogues: Sequence[Dialogue], mode: str) -> list[float | None]:
    """SysBench's R_k for k = 1..R, each over the dialogues that have k scored turns."""
    _check_mode(mode)
    sequences = [_scored_verdicts(d, mode) for d in dialogues]
    out: list[float | None] = []
    for k in range(1, _n_rounds(dialogues) + 1):
        eligible = [s for s in sequences if len(s) >= k]
        out.append(_share(sum(all(s[:k]) for s in eligible), len(eligible)))
    return out


def gate_pass_rate(dialogues: Sequence[Dialogue]) -> float | None:
    """Share of all turns, scored or not, whose reply passed the quality gate; None with no turns."""
    gates = [bool(t["gate_pass"]) for d in dialogues for t in d["turns"]]
    return _share(sum(gates), len(gates))


def turn_rate(dialogues: Sequence[Dialogue], key: str) -> float | None:
    """Share of turns whose `key` is True, over the turns that carry a non-None `key`; None if none do."""
    values = [bool(t[key]) for d in dialogues for t in d["turns"] if t.get(key) is not None]
    return _share(sum(values), len(values))


def least_responsive(dialogues: Sequence[Dialogue], k: int = 3) -> list[dict[str, Any]]:
    """The k dialogues with the lowest mean responsiveness (PMI), lowest first; ties by id."""
    means = []
    for d in dialogues:
        values = [float(t["responsiveness"]) for t in d["turns"] if t.get("responsiveness") is not None]
        if values:
            means.append({"dialogue_id": d["dialogue_id"], "mean_responsiveness": sum(values) / len(values)})
    return sorted(means, key=lambda m: (m["mean_responsiveness"], m["dialogue_id"]))[:k]


# --------------------------------------------------------------------------- breakdowns


def _by_check(dialogues: Sequence[Dialogue], mode: str, key: Callable[[Mapping[str, Any]], str]) -> dict:
    _check_mode(mode)
    passed: dict[str, int] = {}
    total: dict[str, int] = {}
    for d in dialogues:
        for t in d["turns"]:
            for c in t["checks"]:
                k = key(c)
                total[k] = total.get(k, 0) + 1
                passed[k] = passed.get(k, 0) + int(bool(t["gate_pass"]) and bool(c[mode]))
    return {k: {"pass_rate": _share(passed[k], total[k]), "checks": total[k]} for k in sorted(total)}


def by_family(dialogues: Sequence[Dialogue], mode: str) -> dict[str, dict]:
    """{family: {"pass_rate", "checks"}} at check level (gate failure fails every check of the turn)."""
    return _by_check(dialogues, mode, lambda c: c["family"])


def by_type(dialogues: Sequence[Dialogue], mode: str) -> dict[str, dict]:
    """{type_name: {"pass_rate", "checks"}} at check level."""
    return _by_check(dialogues, mode, lambda c: c["type_name"])


def by_seen(dialogues: Sequence[Dialogue], mode: str) -> dict[str, dict]:
    """{"seen": ..., "unseen": ...} at check level; both keys always present (pass_rate None if empty)."""
    groups = _by_check(dialogues, mode, lambda c: "unseen" if c["held_out"] else "seen")
    return {g: groups.get(g, {"pass_rate": None, "checks": 0}) for g in ("seen", "unseen")}


def by_user_source(dialogues: Sequence[Dialogue], mode: str) -> dict[str, dict]:
    """{source: {"adherence", "turns"}} over scored turns; "turns" counts scored turns only."""
    _check_mode(mode)
    hits: dict[str, int] = {}
    total: dict[str, int] = {}
    for d in dialogues:
        source = d["user_source"]
        verdicts = _scored_verdicts(d, mode)
        total[source] = total.get(source, 0) + len(verdicts)
        hits[source] = hits.get(source, 0) + sum(verdicts)
    return {s: {"adherence": _share(hits[s], total[s]), "turns": total[s]} for s in sorted(total)}


def _both_modes(strict: dict[str, dict], loose: dict[str, dict], rate: str, count: str) -> dict[str, dict]:
    """Merge one breakdown's strict and loose tables; the counts do not depend on the mode."""
    return {k: {"strict": strict[k][rate], "loose": loose[k][rate], count: strict[k][count]} for k in strict}


# --------------------------------------------------------------------------- report


def summarise(dialogues: Sequence[Dialogue], *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Every number of one model's report, JSON-safe. Single-mode fields are strict (the headline).

    Breakdowns carry both modes side by side: {key: {"strict": rate, "loose": rate, "checks"|"turns": n}}.
    """
    curves = {mode: curve(dialogues, mode, n_boot=n_boot, seed=seed) for mode in MODES}
    seen = _both_modes(by_seen(dialogues, "strict"), by_seen(dialogues, "loose"), "pass_rate", "checks")
    return {
        "curve": curves,
        "auc_strict": auc(curves["strict"]["mean"]),
        "auc_loose": auc(curves["loose"]["mean"]),
        "retention": retention(curves["strict"]["mean"]),
        "retention_loose": retention(curves["loose"]["mean"]),
        "drift_slope": drift_slope(curves["strict"]["mean"]),
        "ssr": ssr(dialogues, "strict"),
        "r_k": r_k(dialogues, "strict"),
        "gate_pass_rate": gate_pass_rate(dialogues),
        "auc_strict_per_reply_gate": auc(
            curve(dialogues, "strict", n_boot=1, seed=seed, gate="reply_gate_pass")["mean"]
        ),
        "repeat_rate": turn_rate(dialogues, "repeat"),
        "echo_rate": turn_rate(dialogues, "echo"),
        "responsive_rate": turn_rate(dialogues, "responsive"),
        "least_responsive": least_responsive(dialogues),
        "survival": survival(dialogues, "strict"),
        "by_family": _both_modes(
            by_family(dialogues, "strict"), by_family(dialogues, "loose"), "pass_rate", "checks"
        ),
        "by_type": _both_modes(
            by_type(dialogues, "strict"), by_type(dialogues, "loose"), "pass_rate", "checks"
        ),
        "seen": seen["seen"],
        "unseen": seen["unseen"],
        "by_user_source": _both_modes(
            by_user_source(dialogues, "strict"), by_user_source(dialogues, "loose"), "adherence", "turns"
        ),
        "n_dialogues": len(dialogues),
        "rounds": _n_rounds(dialogues),
    }


# --------------------------------------------------------------------------- two models


def _boot_aucs(values: np.ndarray, scored: np.ndarray, weights: np.ndarray) -> list[float | None]:
    return [auc([_plain(x) for x in row]) for row in _weighted_means(values, scored, weights)]


def _ids(dialogues: Sequence[Dialogue]) -> list[str]:
    return [d["dialogue_id"] for d in dialogues]


def compare(
    a_dialogues: Sequence[Dialogue],
    b_dialogues: Sequence[Dialogue],
    *,
    mode: str = "strict",
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """AUC(b) - AUC(a) with a percentile bootstrap interval.

    Paired when both sides hold the same dialogue ids, each once: one draw of ids serves
    both models, so dialogue difficulty cancels and the interval is narrower than two
    independent draws. Otherwise each side is resampled on its own.
    Returns {"difference", "low", "high", "paired"}; None where an AUC is undefined.
    """
    _validate_bootstrap(n_boot, level)
    a_ids, b_ids = _ids(a_dialogues), _ids(b_dialogues)
    paired = len(set(a_ids)) == len(a_ids) and len(set(b_ids)) == len(b_ids) and set(a_ids) == set(b_ids)
    if paired:
        # Same row order on both sides, so one weight matrix resamples the same ids for both.
        order = sorted(a_ids)
        b_by_id = {d["dialogue_id"]: d for d in b_dialogues}
        a_by_id = {d["dialogue_id"]: d for d in a_dialogues}
        a_dialogues = [a_by_id[i] for i in order]
        b_dialogues = [b_by_id[i] for i in order]
    a_m, b_m = adherence_matrix(a_dialogues, mode), adherence_matrix(b_dialogues, mode)
    a_auc, b_auc = auc(_column_mean(a_m)), auc(_column_mean(b_m))
    difference = None if a_auc is None or b_auc is None else b_auc - a_auc
    low = high = None
    if difference is not None:
        rng = np.random.default_rng(seed)
        a_w = _resample_weights(rng, a_m.shape[0], n_boot)
        b_w = a_w if paired else _resample_weights(rng, b_m.shape[0], n_boot)
        a_boot = _boot_aucs(np.nan_to_num(a_m), (~np.isnan(a_m)).astype(float), a_w)
        b_boot = _boot_aucs(np.nan_to_num(b_m), (~np.isnan(b_m)).astype(float), b_w)
        diffs = [b - a for a, b in zip(a_boot, b_boot, strict=True) if a is not None and b is not None]
        if diffs:
            tail = (1 - level) / 2 * 100
            low, high = (float(q) for q in np.percentile(diffs, [tail, 100 - tail]))
    return {"difference": difference, "low": low, "high": high, "paired": paired}
