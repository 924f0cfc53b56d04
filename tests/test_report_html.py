"""report.html on a hand-built evaluation: static checks, then a real headless Chromium.

The data: 3 models x 6 dialogues x 4 rounds. Each turn's outcome comes from
`_outcome(model, dialogue, round)`, a fixed cycle over pass / rule broken / repeat /
echo / unresponsive, so every verdict occurs for every model and the expected
visibility under each filter can be computed here from the same records.

The browser tests load report.html#<filters> with --dump-dom and read the `hidden`
attributes the page's script set: a turn, column or dialogue counts as shown when
neither it nor an ancestor is hidden.
"""

from __future__ import annotations

import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from dialogrl.evaluation.metrics import summarise
from dialogrl.evaluation.report_html import render_html, turn_verdict

CHROMIUM = Path("/usr/bin/chromium")
MODELS = ("base", "sft", "ppo")
ROUNDS = 4
SCRIPT_REPLY = "<script>alert(1)</script> sure, here it is"
# type name, family, held out
TYPES = {"lowercase": ("case", False), "no_commas": ("punctuation", False), "end_with_question": ("start_end", True)}
# dialogue id -> {type: first round it stands}
DIALOGUES = {
    "d0": {"lowercase": 1},
    "d1": {"no_commas": 2},
    "d2": {"lowercase": 1, "end_with_question": 2},
    "d3": {"end_with_question": 1},
    "d4": {"no_commas": 1},
    "d5": {"lowercase": 3},
}
GATE_FAILURES = {3: ("repeat", "repeats round 1 (similarity 0.92)"), 4: ("echo", "echoes the user <b>turn</b>"),
                 5: ("unresponsive", "responsiveness 0.10 below 1.00")}


# --------------------------------------------------------------------------- hand-built evaluation


def _outcome(m: int, d: int, r: int) -> int:
    """0-1 pass, 2 a rule broken, 3-5 a gate failure (see GATE_FAILURES)."""
    return (2 * m + 5 * d + r) % 6


def _turn(m: int, d: int, dialogue_id: str, r: int) -> dict:
    outcome = _outcome(m, d, r)
    standing = [t for t, start in DIALOGUES[dialogue_id].items() if start <= r]
    checks = [{"type_name": t, "family": TYPES[t][0], "held_out": TYPES[t][1],
               "strict": not (outcome == 2 and i == 0), "loose": True, "score": 1.0}
              for i, t in enumerate(standing)]
    gate_pass = outcome < 3
    reason, detail = GATE_FAILURES.get(outcome, (None, None))
    return {"round": r, "gate_pass": gate_pass, "gate_reason": reason, "gate_detail": detail,
            "adherent": (gate_pass and all(c["strict"] for c in checks)) if checks else None,
            "responsive": outcome != 5, "responsiveness": 2.5 - 0.4 * outcome, "checks": checks}


def _record(m: int, d: int, dialogue_id: str) -> dict:
    messages = [{"role": "system", "content": f"Rules for {dialogue_id}: keep them."}]
    for r in range(1, ROUNDS + 1):
        reply = SCRIPT_REPLY if (m, d, r) == (1, 0, 2) else f"{MODELS[m]} reply {r} in {dialogue_id}"
        messages += [{"role": "user", "content": f"user turn {r} of {dialogue_id}"},
                     {"role": "assistant", "content": reply}]
    return {"dialogue_id": dialogue_id, "user_source": "replay",
            "unseen": any(TYPES[t][1] for t in DIALOGUES[dialogue_id]), "messages": messages,
            "constraints": [{"type_name": t, "instruction": f"Obey {t} <always> & forever."}
                            for t in DIALOGUES[dialogue_id]],
            "turns": [_turn(m, d, dialogue_id, r) for r in range(1, ROUNDS + 1)]}


def _results() -> dict[str, dict]:
    return {label: {"model": label, "intervention": None,
                    "records": [_record(m, d, i) for d, i in enumerate(DIALOGUES)]}
            for m, label in enumerate(MODELS)}


def _report(results: dict[str, dict]) -> dict:
    models = {}
    for m, (label, result) in enumerate(results.items()):
        summary = summarise(result["records"], n_boot=50, seed=7)
        models[label] = {"model": label, "intervention": None, **summary,
                         "auc_strict_per_reply_gate": 0.5 + 0.1 * m, "repeat_rate": 0.1, "echo_rate": 0.05,
                         "responsive_rate": 0.9 if m else None,
                         "least_responsive": [{"dialogue_id": "d3", "mean_responsiveness": -0.2},
                                              {"dialogue_id": "d1", "mean_responsiveness": 0.4}]}
    return {"schema_version": 1, "seed": 7, "models": models, "comparisons": [],
            "config": {"scenarios": {"dialogues": len(DIALOGUES), "rounds": ROUNDS, "user_source": "replay"}}}


def _turns():
    """(model, dialogue id, round, verdict) of every turn in the data."""
    for label, result in _results().items():
        for record in result["records"]:
            for turn in record["turns"]:
                yield label, record["dialogue_id"], turn["round"], turn_verdict(turn)


@pytest.fixture(scope="module")
def page() -> str:
    results = _results()
    return render_html(_report(results), results)


# --------------------------------------------------------------------------- static checks


def test_turn_verdict_covers_every_case():
    check = {"type_name": "lowercase", "strict": True}
    assert turn_verdict({"gate_pass": True, "checks": [check], "adherent": True}) == "adherent"
    assert turn_verdict({"gate_pass": True, "checks": [{**check, "strict": False}]}) == "broken"
    assert turn_verdict({"gate_pass": False, "checks": [], "adherent": None}) == "gate"
    assert turn_verdict({"gate_pass": True, "checks": [], "adherent": None}) == "none"


def test_page_fetches_nothing(page):
    assert re.search(r"https?://", page) is None
    assert re.search(r"""(?:src|href)\s*=\s*["']?\s*(?!#)[^"'\s>]""", page) is None, "only #fragment links"
    assert "@import" not in page and "url(" not in page


def test_model_output_is_escaped(page):
    assert "<script>alert(1)" not in page
    assert "<b>turn</b>" not in page and "<always>" not in page
    assert page.count("<script") == 3  # error hook, data, page script
    assert "\\u003cscript\\u003ealert(1)" in page


def test_every_dialogue_id_and_new_field_is_present(page):
    for dialogue_id in DIALOGUES:
        assert f'"id":"{dialogue_id}"' in page
    assert "AUC per-reply gate" in page and "0.700" in page  # ppo's auc_strict_per_reply_gate
    assert 'href="#model=sft&amp;dialogue=d3"' in page


def test_missing_new_fields_and_odd_values_are_tolerated():
    results = _results()
    report = _report(results)
    for m in report["models"].values():
        for key in ("auc_strict_per_reply_gate", "repeat_rate", "echo_rate", "responsive_rate", "least_responsive"):
            del m[key]
    del report["config"]["scenarios"]
    record = results["base"]["records"][0]
    record.pop("constraints")
    record["turns"][0]["responsiveness"] = float("nan")
    record["turns"][1]["gate_reason"] = "some_new_code"
    record["messages"].append({"role": "user", "content": "left unanswered"})
    page = render_html(report, results)
    assert "Least responsive" not in page and "n/a" in page and "some_new_code" in page


def test_page_size_scales_with_the_text():
    """~100 dialogues x 4 models x 8 rounds must stay a file a browser opens quickly."""
    results = {}
    for m in range(4):
        records = []
        for d in range(100):
            record = _record(m % 3, d % 6, list(DIALOGUES)[d % 6])
            record["dialogue_id"] = f"x{d}"
            record["turns"] += [dict(t, round=t["round"] + ROUNDS) for t in record["turns"]]
            record["messages"] += record["messages"][1:]
            for message in record["messages"][1:]:
                message["content"] = message["content"] + " lorem ipsum dolor" * 12
            records.append(record)
        results[f"m{m}"] = {"records": records}
    page = render_html({"models": {}, "seed": 0, "config": {}}, results)
    text = sum(len(msg["content"]) for r in results.values() for rec in r["records"] for msg in rec["messages"])
    assert len(page.encode()) < 2.5 * text


# --------------------------------------------------------------------------- headless Chromium


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.exists():
        # .ci/run installs it; skipping (shown by -ra) rather than failing keeps a machine without apt usable.
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y --no-install-recommends chromium)")
    return CHROMIUM


def _chromium(binary: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [str(binary), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


class _Element:
    def __init__(self, tag: str, attrs: dict, parent: _Element | None):
        self.tag, self.attrs, self.parent, self.text = tag, attrs, parent, []

    @property
    def shown(self) -> bool:
        node = self
        while node is not None:
            if "hidden" in node.attrs:
                return False
            node = node.parent
        return True

    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())


class _Dom(HTMLParser):
    """Just enough of a DOM: every element with its attributes, parent and direct text."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[_Element] = []
        self._open: list[_Element] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        element = _Element(tag, dict(attrs), self._open[-1] if self._open else None)
        self.elements.append(element)
        if tag not in self.VOID:
            self._open.append(element)

    def handle_startendtag(self, tag, attrs):
        self.elements.append(_Element(tag, dict(attrs), self._open[-1] if self._open else None))

    def handle_endtag(self, tag):
        while self._open:
            if self._open.pop().tag == tag:
                break

    def handle_data(self, data):
        if self._open:
            self._open[-1].text.append(data)

    def find(self, css_class: str) -> list[_Element]:
        return [e for e in self.elements if css_class in e.classes()]

    def by_id(self, element_id: str) -> _Element | None:
        return next((e for e in self.elements if e.attrs.get("id") == element_id), None)


def _ancestor(element: _Element, css_class: str) -> _Element:
    node = element.parent
    while css_class not in node.classes():
        node = node.parent
    return node


def _shown_turns(dom: _Dom) -> set[tuple[str, str, int, str]]:
    return {(_ancestor(t, "run").attrs["data-model"], _ancestor(t, "dialogue").attrs["data-id"],
             int(t.attrs["data-round"]), t.attrs["data-verdict"]) for t in dom.find("turn") if t.shown}


@pytest.fixture(scope="module")
def browse(chromium, page, tmp_path_factory):
    """fragment -> the page's DOM after its script ran with those filters."""
    folder = tmp_path_factory.mktemp("report-html")
    (folder / "report.html").write_text(page, encoding="utf-8")
    cache: dict[str, _Dom] = {}

    def load(fragment: str = "") -> _Dom:
        if fragment not in cache:
            url = (folder / "report.html").as_uri() + (f"#{fragment}" if fragment else "")
            out = _chromium(chromium, folder / f"profile-{len(cache)}", "--dump-dom", url).stdout
            dom = _Dom(out)
            assert dom.by_id("js-error") is None, "".join(dom.by_id("js-error").text)
            assert dom.by_id("render-done") is not None, "the page's script did not finish"
            cache[fragment] = dom
        return cache[fragment]

    load.folder = folder
    return load


def test_browser_shows_everything_without_filters(browse):
    dom = browse()
    assert {d.attrs["data-id"] for d in dom.find("dialogue") if d.shown} == set(DIALOGUES)
    assert len([r for r in dom.find("run") if r.shown]) == len(MODELS) * len(DIALOGUES)
    assert _shown_turns(dom) == set(_turns())
    texts = ["".join(e.text) for e in dom.find("text")]
    assert SCRIPT_REPLY in texts  # rendered as text ...
    assert not any("alert(1)" in "".join(s.text) for s in dom.elements if s.tag == "script"
                   and s.attrs.get("id") != "report-data")  # ... and never as a script
    assert dom.by_id("render-done").attrs["data-shown"] == str(len(DIALOGUES))


def test_browser_model_filter(browse):
    dom = browse("model=sft")
    shown = [r for r in dom.find("run") if r.shown]
    assert {r.attrs["data-model"] for r in shown} == {"sft"} and len(shown) == len(DIALOGUES)
    assert all(not s.shown for s in dom.find("strip") if s.attrs["data-model"] != "sft")


def test_browser_verdict_filter(browse):
    dom = browse("verdict=gate")
    expected = {t for t in _turns() if t[3] == "gate"}
    assert expected and _shown_turns(dom) == expected
    gate_texts = "".join("".join(e.text) for e in dom.find("reason"))
    assert "echoes the user <b>turn</b>" in gate_texts


def test_browser_type_filter(browse):
    dom = browse("type=end_with_question")
    assert {d.attrs["data-id"] for d in dom.find("dialogue") if d.shown} == {"d2", "d3"}


def test_browser_combined_filters(browse):
    dom = browse("model=ppo&round=3&verdict=broken")
    expected = {t for t in _turns() if t[0] == "ppo" and t[2] == 3 and t[3] == "broken"}
    assert expected and _shown_turns(dom) == expected
    assert {d.attrs["data-id"] for d in dom.find("dialogue") if d.shown} == {t[1] for t in expected}


def test_browser_round_filter_can_dim_instead_of_hiding(browse):
    hidden = browse("round=2")
    assert {t[2] for t in _shown_turns(hidden)} == {2}
    dimmed = browse("round=2&dim=1")
    assert _shown_turns(dimmed) == set(_turns())
    assert all(("dim" in t.classes()) == (t.attrs["data-round"] != "2") for t in dimmed.find("turn"))


def test_browser_dialogue_link(browse):
    dom = browse("model=sft&dialogue=d3")
    assert [d.attrs["data-id"] for d in dom.find("dialogue") if d.shown] == ["d3"]


def test_browser_screenshot_is_not_blank(browse, chromium):
    shot = browse.folder / "report.png"
    _chromium(chromium, browse.folder / "profile-shot", f"--screenshot={shot}", "--window-size=1280,2000",
              "--hide-scrollbars", (browse.folder / "report.html").as_uri())
    assert shot.stat().st_size > 30_000
    with Image.open(shot) as image:
        assert image.size == (1280, 2000)
        pixels = image.convert("RGB")
        colours = pixels.getcolors(maxcolors=1 << 20)
    # A blank or unstyled page has a handful of colours, nearly all white; the curve, the
    # table and the coloured turns give many colours and a good share of non-white pixels.
    assert len(colours) > 50
    white = next((n for n, rgb in colours if rgb == (255, 255, 255)), 0)
    assert white < 0.95 * 1280 * 2000
