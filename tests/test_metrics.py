"""Report metrics on a hand-made verdict table, every expected number derived in the comments.

The table (S = strict verdict, L = loose verdict of a check; gate F fails the whole turn):

    d0 replay     r1 gate T  lowercase S1 L1                              -> strict 1, loose 1
                  r2 gate T  lowercase S1 L1, end_with_question S0 L1      -> strict 0, loose 1
                  r3 gate F  lowercase S1 L1, end_with_question S1 L1      -> strict 0, loose 0 (gate)
                  r4 gate T  lowercase S1 L1, end_with_question S1 L1      -> strict 1, loose 1
    d1 simulated  r1 gate T  (no checks)                                   -> unscored
                  r2 gate T  lowercase S1 L1                               -> 1, 1
                  r3 gate T  lowercase S1 L1                               -> 1, 1
                  r4 gate T  lowercase S0 L0                               -> 0, 0
    d2 pressure   r1 gate F  (no checks)                                   -> unscored despite the gate
                  r2 gate T  no_commas S1 L1, max_words_per_sentence S0 L1 -> 0, 1
                  (stops after round 2)

Seen types: lowercase (case), no_commas (punctuation). Held out: end_with_question
(start_end), max_words_per_sentence (length).

Strict matrix            Loose matrix
    d0  1   0   0   1        1   1   0   1
    d1  .   1   1   0        .   1   1   0
    d2  .   0   .   .        .   1   .   .
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

from dialogrl.evaluation.metrics import (
    adherence_matrix,
    auc,
    by_family,
    by_seen,
    by_type,
    by_user_source,
    compare,
    curve,
    drift_slope,
    gate_pass_rate,
    r_k,
    retention,
    ssr,
    summarise,
    survival,
)

N_BOOT = 200
nan = math.nan


def check(type_name: str, family: str, held_out: bool, strict: bool, loose: bool) -> dict:
    return {"type_name": type_name, "family": family, "held_out": held_out, "strict": strict, "loose": loose}


def lower(s: bool, lo: bool) -> dict:
    return check("lowercase", "case", False, s, lo)


def question(s: bool, lo: bool) -> dict:
    return check("end_with_question", "start_end", True, s, lo)


def turn(r: int, gate: bool, *checks: dict) -> dict:
    return {"round": r, "gate_pass": gate, "checks": list(checks)}


def table() -> list[dict]:
    return [
        {
            "dialogue_id": "d0",
            "user_source": "replay",
            "turns": [
                turn(1, True, lower(True, True)),
                turn(2, True, lower(True, True), question(False, True)),
                turn(3, False, lower(True, True), question(True, True)),
                turn(4, True, lower(True, True), question(True, True)),
            ],
        },
        {
            "dialogue_id": "d1",
            "user_source": "simulated",
            "turns": [
                turn(1, True),
                turn(2, True, lower(True, True)),
                turn(3, True, lower(True, True)),
                turn(4, True, lower(False, False)),
            ],
        },
        {
            "dialogue_id": "d2",
            "user_source": "pressure",
            "turns": [
                turn(1, False),
                turn(
                    2,
                    True,
                    check("no_commas", "punctuation", False, True, True),
                    check("max_words_per_sentence", "length", True, False, True),
                ),
            ],
        },
    ]


def perfect(dialogues: list[dict]) -> list[dict]:
    """The same dialogues with every gate and every check passed."""
    out = copy.deepcopy(dialogues)
    for d in out:
        for t in d["turns"]:
            t["gate_pass"] = True
            for c in t["checks"]:
                c["strict"] = c["loose"] = True
    return out


def rule_from_round_2() -> dict:
    """One dialogue whose only rule arrives at round 2 (e.g. a user-set rule), kept at round 2."""
    return {
        "dialogue_id": "x",
        "user_source": "replay",
        "turns": [turn(1, True), turn(2, True, lower(True, True))],
    }


def assert_list_close(got: list, want: list) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None), (got, want)
        if w is not None:
            assert g == pytest.approx(w)


# --------------------------------------------------------------------------- curve and its summaries


def test_adherence_matrix():
    np.testing.assert_array_equal(
        adherence_matrix(table(), "strict"),
        [[1, 0, 0, 1], [nan, 1, 1, 0], [nan, 0, nan, nan]],
    )
    np.testing.assert_array_equal(
        adherence_matrix(table(), "loose"),
        [[1, 1, 0, 1], [nan, 1, 1, 0], [nan, 1, nan, nan]],
    )


def test_curve_means_and_counts():
    # Strict column nanmeans: r1 1/1, r2 (0+1+0)/3, r3 (0+1)/2, r4 (1+0)/2.
    # Loose: r1 1/1, r2 (1+1+1)/3, r3 (0+1)/2, r4 (1+0)/2. Scored per round: 1, 3, 2, 2.
    strict = curve(table(), "strict", n_boot=N_BOOT)
    loose = curve(table(), "loose", n_boot=N_BOOT)
    assert strict["rounds"] == [1, 2, 3, 4]
    assert_list_close(strict["mean"], [1.0, 1 / 3, 0.5, 0.5])
    assert_list_close(loose["mean"], [1.0, 1.0, 0.5, 0.5])
    assert strict["n"] == loose["n"] == [1, 3, 2, 2]


def test_curve_round_with_nothing_scored_is_none():
    # Round 1 has no checks anywhere: None in mean/low/high, 0 scored dialogues.
    dialogues = [rule_from_round_2()]
    c = curve(dialogues, "strict", n_boot=N_BOOT)
    assert c["mean"] == [None, 1.0] and c["low"] == [None, 1.0] and c["high"] == [None, 1.0]
    assert c["n"] == [0, 1]


def test_auc_retention_slope():
    # Strict means A = [1, 1/3, 1/2, 1/2]
    # AUC: trapezoids (1 + 1/3)/2 + (1/3 + 1/2)/2 + (1/2 + 1/2)/2 = 8/12 + 5/12 + 6/12 = 19/12; / (4 - 1) = 19/36.
    # Loose A = [1, 1, 1/2, 1/2]: (1 + 3/4 + 1/2) / 3 = 3/4.
    # Retention: A(4) / A(1) = 1/2 in both modes.
    # Slope: r - 2.5 = [-1.5, -.5, .5, 1.5], A - 7/12 = [5, -3, -1, -1]/12,
    #   Sxy = (-7.5 + 1.5 - .5 - 1.5)/12 = -2/3, Sxx = 5 -> -2/15.
    strict = curve(table(), "strict", n_boot=N_BOOT)["mean"]
    loose = curve(table(), "loose", n_boot=N_BOOT)["mean"]
    assert auc(strict) == pytest.approx(19 / 36)
    assert auc(loose) == pytest.approx(0.75)
    assert retention(strict) == pytest.approx(0.5)
    assert retention(loose) == pytest.approx(0.5)
    assert drift_slope(strict) == pytest.approx(-2 / 15)


def test_auc_retention_slope_edges():
    assert auc([0.7]) == 0.7  # R == 1: A(1)
    # Interior gap interpolated: points (1, 1) and (3, 0) -> area 1 over span 2; trailing None shrinks the span.
    assert auc([1.0, None, 0.0, None]) == pytest.approx(0.5)
    # Leading None: points (2, .5), (3, 1) -> (.5 + 1)/2 over span 1.
    assert auc([None, 0.5, 1.0]) == pytest.approx(0.75)
    assert auc([None, None]) is None
    assert retention([0.0, 0.5]) is None  # A(first) == 0
    assert retention([None, 0.8, None, 0.4]) == pytest.approx(0.5)  # first/last *scored* rounds
    assert drift_slope([None, 0.4]) is None  # one point
    assert drift_slope([1.0, None, 0.0]) == pytest.approx(-0.5)  # (1, 1), (3, 0)


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_interval_contains_mean_and_is_deterministic():
    a = curve(table(), "strict", n_boot=N_BOOT, seed=3)
    b = curve(table(), "strict", n_boot=N_BOOT, seed=3)
    assert a == b
    for m, lo, hi in zip(a["mean"], a["low"], a["high"], strict=True):
        assert lo <= m <= hi
    # Round 1: only d0 is scored (value 1), so every replicate that draws it gives exactly 1.
    assert a["low"][0] == a["high"][0] == 1.0


def test_bootstrap_degenerate_for_identical_dialogues():
    # Five copies of d0: every replicate is the same rows, so low == high == mean == [1, 0, 0, 1].
    dialogues = [dict(table()[0], dialogue_id=f"c{i}") for i in range(5)]
    c = curve(dialogues, "strict", n_boot=N_BOOT, seed=1)
    assert c["mean"] == c["low"] == c["high"] == [1.0, 0.0, 0.0, 1.0]


def test_bootstrap_rejects_bad_settings():
    with pytest.raises(ValueError, match="n_boot"):
        curve(table(), "strict", n_boot=0)
    with pytest.raises(ValueError, match="level"):
        curve(table(), "strict", level=1.0)
    with pytest.raises(ValueError, match="mode"):
        adherence_matrix(table(), "lenient")


# --------------------------------------------------------------------------- per-dialogue runs


def test_survival():
    # S(1): d0 passes r1, d1 and d2 unscored -> 3/3.
    # S(2): d0 fails r2, d2 fails r2, d1 passes -> 1/3.
    # S(3): d1 passes r3; d2 stopped early and stays dead -> 1/3.
    # S(4): d1 fails r4 -> 0.
    assert_list_close(survival(table(), "strict"), [1.0, 1 / 3, 1 / 3, 0.0])
    # Loose: d0 first fails at r3 (gate), d1 at r4, d2 never -> [1, 1, 2/3, 1/3].
    assert_list_close(survival(table(), "loose"), [1.0, 1.0, 2 / 3, 1 / 3])


def test_ssr():
    # Strict scored verdicts: d0 [1,0,0,1] -> 1/4; d1 [1,1,0] -> 2/3; d2 [0] -> 0/1.
    # Mean (3/12 + 8/12 + 0) / 3 = 11/36.
    assert ssr(table(), "strict") == pytest.approx(11 / 36)
    # Loose: d0 [1,1,0,1] -> 2/4; d1 [1,1,0] -> 2/3; d2 [1] -> 1. Mean (1/2 + 2/3 + 1)/3 = 13/18.
    assert ssr(table(), "loose") == pytest.approx(13 / 18)


def test_r_k():
    # Scored turns: d0 4, d1 3, d2 1.
    # k=1: all three; first passes d0 yes, d1 yes, d2 no -> 2/3.
    # k=2: d0 [1,0] no, d1 [1,1] yes -> 1/2.   k=3: d0 no, d1 [1,1,0] no -> 0.   k=4: d0 only, no -> 0.
    assert_list_close(r_k(table(), "strict"), [2 / 3, 0.5, 0.0, 0.0])


def test_r_k_none_when_no_dialogue_has_k_scored_turns():
    # Two rounds, only round 2 scored: one scored turn, so k=2 has nobody.
    dialogues = [rule_from_round_2()]
    assert r_k(dialogues, "strict") == [1.0, None]


def test_gate_pass_rate_counts_unscored_turns():
    # 10 turns (4 + 4 + 2); failures at d0 r3 and d2 r1 (unscored, still counted) -> 8/10.
    assert gate_pass_rate(table()) == pytest.approx(0.8)


# --------------------------------------------------------------------------- breakdowns


def test_by_family_and_type():
    # Check-level, gate failure fails the check.
    # case/lowercase: d0 r1-r4 (r3 gated) + d1 r2-r4 (r4 fails) = 7 checks, 5 pass (strict and loose).
    # start_end/end_with_question: d0 r2 (S0 L1), r3 gated, r4 pass = 3 checks: strict 1/3, loose 2/3.
    # length/max_words_per_sentence: d2 r2 S0 L1 = 1 check.  punctuation/no_commas: d2 r2 pass = 1 check.
    strict = by_family(table(), "strict")
    loose = by_family(table(), "loose")
    assert strict == {
        "case": {"pass_rate": pytest.approx(5 / 7), "checks": 7},
        "length": {"pass_rate": 0.0, "checks": 1},
        "punctuation": {"pass_rate": 1.0, "checks": 1},
        "start_end": {"pass_rate": pytest.approx(1 / 3), "checks": 3},
    }
    assert loose["start_end"]["pass_rate"] == pytest.approx(2 / 3)
    assert loose["length"]["pass_rate"] == 1.0
    types = by_type(table(), "strict")
    assert types["lowercase"]["checks"] == 7 and types["end_with_question"]["checks"] == 3
    assert types["max_words_per_sentence"] == {"pass_rate": 0.0, "checks": 1}


def test_by_seen():
    # Seen = lowercase (7 checks, 5 pass) + no_commas (1, 1) = 8 checks, 6 pass -> 3/4 in both modes.
    # Unseen = end_with_question (3) + max_words_per_sentence (1) = 4 checks:
    #   strict 1 + 0 = 1 -> 1/4; loose 2 + 1 = 3 -> 3/4.
    assert by_seen(table(), "strict") == {
        "seen": {"pass_rate": 0.75, "checks": 8},
        "unseen": {"pass_rate": 0.25, "checks": 4},
    }
    assert by_seen(table(), "loose")["unseen"] == {"pass_rate": 0.75, "checks": 4}
    # A group with no checks is still reported.
    only_seen = [table()[1]]
    assert by_seen(only_seen, "strict")["unseen"] == {"pass_rate": None, "checks": 0}


def test_by_user_source():
    # Scored turns: replay d0 4 (strict pass r1, r4), simulated d1 3 (r2, r3), pressure d2 1 (none).
    # Loose: replay 3/4 (r1, r2, r4), simulated 2/3, pressure 1/1.
    assert by_user_source(table(), "strict") == {
        "pressure": {"adherence": 0.0, "turns": 1},
        "replay": {"adherence": 0.5, "turns": 4},
        "simulated": {"adherence": pytest.approx(2 / 3), "turns": 3},
    }
    loose = by_user_source(table(), "loose")
    assert loose["replay"]["adherence"] == 0.75 and loose["pressure"]["adherence"] == 1.0


# --------------------------------------------------------------------------- comparison


def test_compare_identical_is_zero_and_paired():
    # Same ids both sides -> one draw of ids for both models, so every replicate differs by exactly 0.
    out = compare(table(), table(), n_boot=N_BOOT)
    assert out == {"difference": 0.0, "low": 0.0, "high": 0.0, "paired": True}


def test_compare_sign_and_pairing():
    # Perfect model: strict means [1, 1, 1, 1] -> AUC 1; the table's strict AUC is 19/36.
    good, bad = perfect(table()), table()
    forward = compare(bad, good, n_boot=N_BOOT)
    assert forward["paired"] is True
    assert forward["difference"] == pytest.approx(1 - 19 / 36)
    assert forward["low"] <= forward["difference"] <= forward["high"]
    assert compare(good, bad, n_boot=N_BOOT)["difference"] == pytest.approx(-17 / 36)
    # Paired even when the order differs; unpaired when the ids differ.
    assert compare(bad, list(reversed(good)), n_boot=N_BOOT)["paired"] is True
    renamed = [dict(d, dialogue_id="other-" + d["dialogue_id"]) for d in good]
    unpaired = compare(bad, renamed, n_boot=N_BOOT, seed=5)
    assert unpaired["paired"] is False
    assert unpaired["difference"] == pytest.approx(17 / 36)
    assert unpaired == compare(bad, renamed, n_boot=N_BOOT, seed=5)


# --------------------------------------------------------------------------- report


def test_summarise_schema_and_json():
    s = summarise(table(), n_boot=N_BOOT)
    assert set(s) == {
        "curve", "auc_strict", "auc_loose", "retention", "retention_loose", "drift_slope", "ssr", "r_k",
        "gate_pass_rate", "survival", "by_family", "by_type", "seen", "unseen", "by_user_source",
        "n_dialogues", "rounds", "auc_strict_per_reply_gate", "repeat_rate", "echo_rate", "responsive_rate",
        "least_responsive",
    }  # fmt: skip
    assert json.loads(json.dumps(s, allow_nan=False)) == s
    assert s["auc_strict"] == pytest.approx(19 / 36) and s["auc_loose"] == pytest.approx(0.75)
    assert s["seen"] == {"strict": 0.75, "loose": 0.75, "checks": 8}
    assert s["unseen"] == {"strict": 0.25, "loose": 0.75, "checks": 4}
    assert s["by_user_source"]["replay"] == {"strict": 0.5, "loose": 0.75, "turns": 4}
    assert s["n_dialogues"] == 3 and s["rounds"] == 4


def test_summarise_empty_and_unscored_is_json_safe():
    # No rules in force anywhere: every rate is None, nothing is NaN.
    unscored = [{"dialogue_id": "x", "user_source": "replay", "turns": [turn(1, True), turn(2, False)]}]
    for dialogues in ([], unscored):
        json.dumps(summarise(dialogues, n_boot=N_BOOT), allow_nan=False)
    s = summarise(unscored, n_boot=N_BOOT)
    assert s["auc_strict"] is None and s["ssr"] is None and s["gate_pass_rate"] == 0.5
    assert s["survival"] == [1.0, 1.0]
