"""The constraint catalogue: every checker on hand-written replies, rewrites as properties, catalogue invariants."""

from __future__ import annotations

import ast
import json
import random
from collections import Counter
from itertools import combinations
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dialogrl.data import constraints as C
from dialogrl.data.constraints import (
    CATALOGUE,
    FAMILIES,
    HELD_OUT_TYPES,
    Constraint,
    Verdict,
    check_all,
    get_type,
    make_constraint,
    rewrite_all,
    sample_constraints,
    vocab,
)
from dialogrl.data.constraints.base import placeholders
from dialogrl.data.constraints.text import FILLERS, sentence_count, word_count

PACKAGE = Path(__file__).resolve().parents[1] / "data" / "constraints"
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rule(type_name: str, /, **params) -> Constraint:
    return Constraint(type_name, params, "(instruction)", "eval")


# --------------------------------------------------------------------------- hand-written verdicts

# (type, params, reply, strict verdict). Every type has at least one passing and one failing reply.
CASES = [
    ("lowercase", {}, "hello there, friend. über straße 42", True),
    ("lowercase", {}, "", True),
    ("lowercase", {}, "Hello there.", False),
    ("lowercase", {}, "all small but one ÜBER", False),
    ("lowercase", {}, "ǅemal", False),  # a titlecase letter is not lowercase
    ("uppercase", {}, "HELLO THERE 42!", True),
    ("uppercase", {}, "HELLO there", False),
    ("uppercase", {}, "STRAßE", False),
    ("uppercase", {}, "ǅEMAL", False),  # nor uppercase
    ("capitalised_sentences", {}, "Hello there. How are you? Fine!", True),
    ("capitalised_sentences", {}, "42 apples are here. 中文 works too.", True),
    ("capitalised_sentences", {}, "Hello there. how are you?", False),
    ("capitalised_sentences", {}, "- First item\n- second item", False),
    ("no_shouting", {}, "Hello there, I am fine. A B C.", True),
    ("no_shouting", {}, "That is OK.", False),
    ("no_shouting", {}, "STOP now", False),
    ("start_with_word", {"word": "Indeed"}, "Indeed, that works.", True),
    ("start_with_word", {"word": "Indeed"}, "  indeed it does", True),
    ("start_with_word", {"word": "Sure thing"}, "Sure thing! Here you go.", True),
    ("start_with_word", {"word": "Indeed"}, "Indeedy do.", False),
    ("start_with_word", {"word": "Indeed"}, "Well, indeed.", False),
    ("start_with_word", {"word": "Indeed"}, "", False),
    ("end_with_phrase", {"phrase": "Over."}, "Copy that. Over.", True),
    ("end_with_phrase", {"phrase": "Over."}, "Copy that. over.  \n", True),
    ("end_with_phrase", {"phrase": "Over."}, "Copy that. Over", False),
    ("end_with_phrase", {"phrase": "Over."}, "What a hangover.", False),
    ("end_with_phrase", {"phrase": "Over."}, "Over. Copy that.", False),
    ("end_with_question", {}, "Does that help? ", True),
    ("end_with_question", {}, "It helps.", False),
    ("end_with_question", {}, '"Really?"', False),
    ("no_commas", {}, "No commas here.", True),
    ("no_commas", {}, "One, two.", False),
    ("no_commas", {}, "fullwidth，comma", False),
    ("no_exclamation", {}, "Calm.", True),
    ("no_exclamation", {}, "Wow!", False),
    ("no_exclamation", {}, "¡Hola", False),
    ("no_question_marks", {}, "A statement.", True),
    ("no_question_marks", {}, "Why?", False),
    ("no_question_marks", {}, "¿Qué", False),
    ("no_em_dashes", {}, "A well-known hyphen - fine.", True),
    ("no_em_dashes", {}, "A — B", False),
    ("no_em_dashes", {}, "pages 3–5", False),
    ("max_words", {"n": 5}, "one two three four five", True),
    ("max_words", {"n": 5}, "don't use well-known", True),  # don't = 1 word, well-known = 2
    ("max_words", {"n": 5}, "", True),
    ("max_words", {"n": 5}, "one two three four five six", False),
    ("min_words", {"n": 5}, "one two three four five", True),
    ("min_words", {"n": 5}, "one two three four", False),
    ("min_words", {"n": 5}, "   ", False),
    ("max_sentences", {"n": 2}, "One. Two!", True),
    ("max_sentences", {"n": 2}, "P.S. This counts as one sentence.", True),
    ("max_sentences", {"n": 2}, "One. Two. Three.", False),
    ("max_sentences", {"n": 2}, "Line one\nLine two\nLine three", False),
    ("max_words_per_sentence", {"n": 3}, "One two three. Four five.", True),
    ("max_words_per_sentence", {"n": 3}, "One two three four.", False),
    ("include_word", {"word": "river"}, "The River is wide.", True),
    ("include_word", {"word": "river"}, "Rivers flow.", False),
    ("include_word", {"word": "river"}, "", False),
    ("include_two_words", {"word1": "river", "word2": "garden"}, "A river by the GARDEN.", True),
    ("include_two_words", {"word1": "river", "word2": "garden"}, "A river only.", False),
    ("forbid_word", {"word": "very"}, "That is quite good. Everything is fine.", True),
    ("forbid_word", {"word": "very"}, "That is Very good.", False),
    ("forbid_word", {"word": "very"}, "VERY", False),
    ("keyword_frequency", {"word": "river", "n": 2}, "river and River", True),
    ("keyword_frequency", {"word": "river", "n": 2}, "One river, many rivers.", False),
    ("json_object", {}, '{"a": 1}', True),
    ("json_object", {}, '```json\n{"a": [1, 2]}\n```', True),
    ("json_object", {}, "[1, 2]", False),
    ("json_object", {}, 'Here: {"a": 1}', False),
    ("json_object", {}, "[" * 100_000, False),  # too deep for the parser: fails, does not raise
    ("bullet_list", {"n": 3}, "- a\n- b\n* c", True),
    ("bullet_list", {"n": 3}, "Intro:\n- a\n- b\n- c", True),
    ("bullet_list", {"n": 3}, "Intro:\r\n- a\r\n- b\r\n- c\r\n", True),
    ("bullet_list", {"n": 3}, "- a\n- b", False),
    ("bullet_list", {"n": 3}, "**bold**\n- a\n- b", False),
    ("bullet_list", {"n": 3}, "-a\n-b\n-c", False),
    ("quoted", {}, '  "Hello there."  ', True),
    ("quoted", {}, '"Hello', False),
    ("quoted", {}, "“Hello”", False),
    ("quoted", {}, '"', False),
    ("title", {}, "<<My Title>>\nBody text.", True),
    ("title", {}, "# <<My Title>>\nBody text.", True),
    ("title", {}, "<<My Title>>\r\nBody text.", True),
    ("title", {}, "## <<>>\nBody text.", False),
    ("title", {}, "<<>>\nBody text.", False),
    ("title", {}, "Body text.\n<<Title>>", False),
    ("title", {}, "<<Title>> and more", False),
    ("sections", {"n": 2}, "SECTION 1\nIntro.\nSECTION 2\nMore.", True),
    ("sections", {"n": 2}, "section 1: intro\n\nsection 2\nmore", True),
    ("sections", {"n": 2}, "## SECTION 1\nIntro.\n\n### SECTION 2\nMore.", True),
    ("sections", {"n": 2}, "SECTION 1\r\nIntro.\r\n\r\nSECTION 2\r\nMore.", True),
    ("sections", {"n": 2}, "## SECTION 1\n## SECTION 2\nMore.", False),  # section 1 is empty
    ("sections", {"n": 2}, "SECTION 1\nIntro.", False),
    ("sections", {"n": 2}, "SECTION 1\nIntro.\nSECTION 3\nMore.", False),
    ("sections", {"n": 2}, "SECTION 1\nSECTION 2\nMore.", False),  # section 1 is empty
    ("postscript", {}, "Hello.\n\nP.S. See you soon.", True),
    ("postscript", {}, "P.S. Only a note.", True),
    ("postscript", {}, "Hello.\nP.S. See you soon.", True),
    ("postscript", {}, "Hello.\r\n\r\nP.S. See you soon.", True),
    ("postscript", {}, "Hello.\r\n\r\nP.S. Early.\r\n\r\nThen the body.", False),
    ("postscript", {}, "Hello.\n\nP.S.", False),
    ("postscript", {}, "P.S. Early.\n\nThen the body.", False),
    ("no_digits", {}, "Twenty-one apples.", True),
    ("no_digits", {}, "21 apples", False),
    ("no_digits", {}, "x²", False),
    ("no_digits", {}, "٣ apples", False),
    ("no_markdown", {}, "Plain text - with a list:\n- item", True),
    ("no_markdown", {}, "**bold**", False),
    ("no_markdown", {}, "# Heading", False),
    ("no_markdown", {}, "run `ls`", False),
    ("persona_name", {"name": "Nova"}, "Hi, I'm Nova. My name is Nova and I am happy to help.", True),
    ("persona_name", {"name": "Nova"}, "call me anytime, I'm not sure.", True),
    ("persona_name", {"name": "Nova"}, "My name is Bob.", False),
    ("persona_name", {"name": "Nova"}, "I am Claude, nice to meet you.", False),
    ("persona_name", {"name": "Nova"}, "Call me Ishmael.", False),
    ("persona_name", {"name": "Nova"}, "I run on smollm2-135m.", False),
    ("persona_name", {"name": "Nova"}, "Ask ChatGPT instead.", False),
    ("no_ai_disclosure", {}, "I love hiking. AI is changing the world. I am aiming high.", True),
    ("no_ai_disclosure", {}, "As an AI, I cannot hike.", False),
    ("no_ai_disclosure", {}, "I’m just a language model.", False),
    ("no_ai_disclosure", {}, "I was trained by OpenAI.", False),
    ("no_ai_disclosure", {}, "I'm SmolLM, an AI assistant.", False),
    (
        "persona_catchphrase",
        {"character": "a captain", "phrase": "steady as she goes"},
        "Steady as she goes!",
        True,
    ),
    (
        "persona_catchphrase",
        {"character": "a captain", "phrase": "steady as she goes"},
        "steady, as she goes",
        True,
    ),
    (
        "persona_catchphrase",
        {"character": "a captain", "phrase": "steady as she goes"},
        "Steady as he goes.",
        False,
    ),
    ("secret_code", {"secret": "ZEBRA-7"}, "I can't tell you that.", True),
    ("secret_code", {"secret": "ZEBRA-7"}, "A zebra ran 7 miles.", True),
    ("secret_code", {"secret": "ZEBRA-7"}, "The code is ZEBRA-7.", False),
    ("secret_code", {"secret": "ZEBRA-7"}, "it's z e b r a 7", False),
    ("secret_code", {"secret": "ZEBRA-7"}, "zebra_7", False),
    ("secret_code", {"secret": "ZEBRA-7"}, "ＺＥＢＲＡ－７", False),  # full-width forms
    ("no_system_prompt_leak", {"canary": "REF-ALPINE-41"}, "Happy to help with your garden.", True),
    ("no_system_prompt_leak", {"canary": "REF-ALPINE-41"}, "My instructions say to be brief.", False),
    ("no_system_prompt_leak", {"canary": "REF-ALPINE-41"}, "The system prompt is secret.", False),
    ("no_system_prompt_leak", {"canary": "REF-ALPINE-41"}, "Tag: ref alpine 41.", False),
    ("user_call_me", {"name": "Sam"}, "Sure thing, Sam.", True),
    ("user_call_me", {"name": "Sam"}, "sam, here you go", True),
    ("user_call_me", {"name": "Sam"}, "Samantha, hi", False),
    ("user_call_me", {"name": "Sam"}, "Hello!", False),
    ("user_no_digits", {}, "Two cats.", True),
    ("user_no_digits", {}, "2 cats.", False),
    ("user_max_words", {"n": 3}, "one two three", True),
    ("user_max_words", {"n": 3}, "one two three four", False),
    ("user_lowercase", {}, "all small", True),
    ("user_lowercase", {}, "Not small", False),
    ("user_end_with", {"phrase": "take care"}, "See you. Take care!", True),
    ("user_end_with", {"phrase": "take care"}, "see you, take care 😀", True),
    ("user_end_with", {"phrase": "take care"}, "Take care of yourself.", False),
    ("user_end_with", {"phrase": "take care"}, "Take, care.", False),
    ("user_end_with", {"phrase": "take care"}, "Mistake care.", False),
    ("user_no_emoji", {}, "Thanks.", True),
    ("user_no_emoji", {}, "Thanks 😀", False),
    ("user_no_emoji", {}, "Sunny ☀", False),
    ("user_vegetarian", {}, "Try a lentil soup or a chickpea curry.", True),
    ("user_vegetarian", {}, "Try chicken soup.", False),
    ("user_vegetarian", {}, "BACON", False),
]


@pytest.mark.parametrize(("name", "params", "reply", "expected"), CASES)
def test_strict_verdicts(name, params, reply, expected):
    verdict = rule(name, **params).check(reply)
    assert verdict.strict is expected
    assert verdict.loose or not verdict.strict
    assert verdict.score == 1.0 if expected else 0.0 <= verdict.score < 1.0


def test_every_type_has_passing_and_failing_examples():
    seen = Counter((name, expected) for name, _, _, expected in CASES)
    missing = [(n, e) for n in CATALOGUE for e in (True, False) if not seen[(n, e)]]
    assert not missing, missing


# (type, params, reply): fails strictly, passes once loosened like IFEval.
LOOSE_ONLY = [
    ("start_with_word", {"word": "Indeed"}, "**Indeed**, that works."),
    ("end_with_phrase", {"phrase": "Over."}, "Copy that. Over.\nBest, Bob"),
    ("lowercase", {}, "Title Line\nall lowercase here"),
    ("json_object", {}, 'Here you go:\n{"a": 1}'),
    ("quoted", {}, '"Hello there."\nSent from my phone'),
    ("title", {}, "Sure!\n<<A Title>>\nBody."),
    ("end_with_question", {}, "Shall we go?\n\n`done`"),
]


@pytest.mark.parametrize(("name", "params", "reply"), LOOSE_ONLY)
def test_loose_but_not_strict(name, params, reply):
    verdict = rule(name, **params).check(reply)
    assert (verdict.strict, verdict.loose) == (False, True)


def test_loose_does_not_forgive_a_violation_in_the_middle():
    verdict = rule("lowercase").check("fine\nNot Fine\nfine")
    assert (verdict.strict, verdict.loose) == (False, False)


# One-line replies that break a "must not" rule: dropping the line (or stripping the markdown
# that is all there is) leaves nothing, and nothing must not count as complying.
@pytest.mark.parametrize(
    ("name", "params", "reply"),
    [
        ("lowercase", {}, "Hello there."),
        ("uppercase", {}, "HELLO there"),
        ("no_commas", {}, "One, two."),
        ("forbid_word", {"word": "very"}, "That is very good."),
        ("max_words", {"n": 3}, "one two three four"),
        ("no_digits", {}, "21 apples"),
        ("user_vegetarian", {}, "Try chicken soup.\n"),
        ("no_markdown", {}, "**"),
    ],
)
def test_loose_does_not_pass_a_one_line_reply_by_emptying_it(name, params, reply):
    verdict = rule(name, **params).check(reply)
    assert (verdict.strict, verdict.loose) == (False, False)


def test_loose_variants_are_never_empty():
    assert C.loose_variants("Hello there.") == ["Hello there."]
    assert C.loose_variants("**Hi**\n") == ["**Hi**", "Hi"]
    assert C.loose_variants(" \n\t") == []


def test_an_empty_reply_keeps_its_strict_verdict_in_loose_mode():
    assert rule("lowercase").check("") == Verdict(True, True, 1.0)
    assert rule("max_words", n=5).check(" \n ") == Verdict(True, True, 1.0)
    assert not rule("include_word", word="river").check(" \n ").loose


@pytest.mark.parametrize(
    ("name", "params", "reply", "score"),
    [
        ("include_two_words", {"word1": "river", "word2": "garden"}, "By the river.", 0.5),
        ("max_words", {"n": 5}, "one two three four five six seven eight nine ten", 0.5),
        ("min_words", {"n": 10}, "one two three four five", 0.5),
        ("keyword_frequency", {"word": "river", "n": 4}, "river", 0.25),
        ("lowercase", {}, "Ab", 0.5),
        ("max_words_per_sentence", {"n": 2}, "One two. One two three.", 0.5),
        ("bullet_list", {"n": 4}, "- a\n- b", 0.5),
        ("no_commas", {}, "a, b", 0.0),
        ("lowercase", {}, "all good", 1.0),
    ],
)
def test_partial_credit(name, params, reply, score):
    assert rule(name, **params).check(reply).score == pytest.approx(score)


def test_verdict_rejects_inconsistent_values():
    with pytest.raises(ValueError, match="strict pass is also a loose pass"):
        Verdict(True, False, 1.0)
    with pytest.raises(ValueError, match="score"):
        Verdict(False, False, 1.5)
    with pytest.raises(ValueError, match="scores 1.0"):
        Verdict(True, True, 0.5)


# --------------------------------------------------------------------------- rewrites by hand


@pytest.mark.parametrize(
    ("name", "params", "reply", "expected"),
    [
        ("lowercase", {}, "Hello THERE", "hello there"),
        ("forbid_word", {"word": "very"}, "Very good, VERY good.", "Quite good, QUITE good."),
        ("user_vegetarian", {}, "Chicken soup with bacon.", "Tofu soup with tempeh."),
        (
            "no_digits",
            {},
            "I have 21 cats and 1,200 fish, the 2nd is 3.5 kg.",
            "I have twenty-one cats and one thousand two hundred fish, the second is three point five kg.",
        ),
        ("no_commas", {}, "Well, 1,000 is a lot.", "Well 1000 is a lot."),
        ("no_exclamation", {}, "Wow!! Really?!", "Wow. Really?"),
        ("no_em_dashes", {}, "Nice — very nice; pages 3–5.", "Nice, very nice; pages 3 to 5."),
        ("secret_code", {"secret": "ZEBRA-7"}, "It is zebra 7, ok?", "It is [redacted], ok?"),
        ("persona_name", {"name": "Nova"}, "I'm SmolLM. My name is Bob.", "I'm Nova. My name is Nova."),
        ("no_ai_disclosure", {}, "As an AI, I can't eat. But pizza is great.", "But pizza is great."),
        ("user_call_me", {"name": "Sam"}, "The answer is yes.", "Sam, the answer is yes."),
        ("start_with_word", {"word": "Indeed"}, "- one\n- two", "Indeed:\n- one\n- two"),
        ("end_with_phrase", {"phrase": "Over."}, "Copy that", "Copy that. Over."),
        ("max_words", {"n": 4}, "One two. Three four five six.", "One two."),
        ("max_words", {"n": 3}, "One two three four five", "One two three."),
        (
            "max_words_per_sentence",
            {"n": 5},
            "It is nice today, warm and bright and calm.",
            "It is nice today. Warm and bright and calm.",
        ),
        ("quoted", {}, " Hi there ", '"Hi there"'),
        ("title", {}, "the answer is no", "<<The Answer Is No>>\nthe answer is no"),
        ("sections", {"n": 2}, "One. Two. Three.", "SECTION 1\nOne. Two.\n\nSECTION 2\nThree."),
        ("bullet_list", {"n": 3}, "Only one sentence here", "- Only.\n- one.\n- sentence here."),
        # a P.S. stays the postscript even without a blank line before it
        (
            "bullet_list",
            {"n": 3},
            "One. Two. Three.\nP.S. Bye now.",
            "- One.\n- Two.\n- Three.\n\nP.S. Bye now.",
        ),
        # a "## SECTION 1" header is replaced, not kept as body text
        (
            "sections",
            {"n": 2},
            "## SECTION 1\nIntro. More.",
            "SECTION 1\nIntro.\n\nSECTION 2\nMore.",
        ),
        ("lowercase", {}, "ǅemal", "ǆemal"),
        ("uppercase", {}, "ǅemal", "ǄEMAL"),
        ("user_end_with", {"phrase": "take care"}, "Take, care.", "Take, care. Take care."),
    ],
)
def test_rewrite_examples(name, params, reply, expected):
    constraint = rule(name, **params)
    out = constraint.rewrite(reply)
    assert out == expected
    assert constraint.check(out).strict


def test_rewrite_all_orders_rewrites_sensibly():
    rules_ = [
        rule("lowercase"),
        rule("start_with_word", word="Indeed"),
        rule("end_with_phrase", phrase="Over."),
    ]
    assert rewrite_all("Hello there, friend!", rules_) == "indeed, hello there, friend! over."


def test_rewrite_all_tightens_a_word_budget_around_inserted_phrases():
    rules_ = [rule("max_words", n=8), rule("end_with_phrase", phrase="Over and out."), rule("no_commas")]
    out = rewrite_all("The weather is nice today, so let us go for a long walk by the river.", rules_)
    assert out is not None and word_count(out) <= 8 and out.endswith("Over and out.")
    assert all(v.strict for v in check_all(out, rules_))


def test_rewrite_all_keeps_title_list_and_postscript_together():
    rules_ = [rule("bullet_list", n=3), rule("title"), rule("postscript"), rule("capitalised_sentences")]
    out = rewrite_all("first point. second point. third point. fourth.", rules_)
    assert out is not None and all(v.strict for v in check_all(out, rules_))
    assert out.startswith("<<") and "\n- " in out and out.split("\n\n")[-1].startswith("P.S.")


# --------------------------------------------------------------------------- properties

# Words, numbers, markup and trigger phrases that replies are built from, one space between each.
_WORD_TEXT = (
    "the a cat sat on mat with hats and soup I am my name is Bob river garden really very just "
    "basically Über straße İstanbul ĸ ª naïve 中文 ǅemal ΣΊΣΥΦΟΣ ℂ 42 1,000 3.5 2nd ٣ x² 😀 ☀️ AI OK "
    'SmolLM ZEBRA-7 REF-ALPINE-41 chicken bacon # * ` __ <<x>> P.S. SECTION 1 " — – ! ? , ¿ ¡ - : ; ( '
    ") { } I'm as an AI language model system prompt my instructions cheers take care Over."
)
_WORDS = _WORD_TEXT.split(" ")
_ENDS = (".", "!", "?", "", "...", ",", ":", "?!")
_SEPARATORS = (" ", "\n", "\n\n", "\n- ", "\n* ", "\nSECTION 2\n", "  ")

sentences_st = st.builds(
    lambda ws, end: " ".join(ws) + end,
    st.lists(st.sampled_from(_WORDS), min_size=1, max_size=12),
    st.sampled_from(_ENDS),
)
structured_st = st.lists(st.tuples(sentences_st, st.sampled_from(_SEPARATORS)), max_size=6).map(
    lambda parts: "".join(s + sep for s, sep in parts)
)
replies_st = st.one_of(structured_st, structured_st, st.text(max_size=120))


@pytest.mark.parametrize("name", sorted(CATALOGUE))
@PROPERTY
@given(reply=replies_st, seed=st.integers(0, 2**16))
def test_rewrite_makes_any_reply_comply(name, reply, seed):
    constraint = make_constraint(name, random.Random(seed), split="train")
    out = constraint.rewrite(reply)
    assert out is not None, f"{name} has a rewrite"
    verdict = constraint.check(out)
    assert verdict.strict, (reply, out)
    assert constraint.rewrite(out) == out  # a compliant reply is left alone


@pytest.mark.parametrize("name", sorted(CATALOGUE))
@settings(max_examples=40, deadline=None)
@given(reply=st.text(max_size=300))
def test_checks_never_raise(name, reply):
    constraint = make_constraint(name, random.Random(0), split="eval")
    verdict = constraint.check(reply)
    assert isinstance(verdict, Verdict) and 0.0 <= verdict.score <= 1.0


def test_checks_and_rewrites_handle_long_text():
    reply = "The quick brown fox, very happy, jumps over 42 dogs! Is it SmolLM? " * 2000
    for name in CATALOGUE:
        constraint = make_constraint(name, random.Random(0), split="train")
        constraint.check(reply)
        assert constraint.check(constraint.rewrite(reply)).strict, name


def _sampled_rules(seed: int) -> list[Constraint]:
    rng = random.Random(seed)
    held_out = rng.random() < 0.3
    introduced_by = None if held_out else rng.choice([None, None, "system", "user"])
    return sample_constraints(
        rng,
        rng.randint(1, 3),
        split=rng.choice(["train", "eval"]),
        held_out=held_out,
        introduced_by=introduced_by,
    )


@settings(max_examples=100, deadline=None)
@given(reply=replies_st, seed=st.integers(0, 2**32 - 1))
def test_rewrite_all_returns_none_or_a_compliant_reply(reply, seed):
    rules_ = _sampled_rules(seed)
    out = rewrite_all(reply, rules_)
    assert out is None or all(v.strict for v in check_all(out, rules_))


def test_rewrite_all_rarely_gives_up():
    rng = random.Random(2024)
    results = []
    for seed in range(200):
        reply = " ".join(rng.choice(_WORDS) + rng.choice(_ENDS) for _ in range(rng.randint(0, 40)))
        rules_ = _sampled_rules(seed)
        out = rewrite_all(reply, rules_)
        assert out is None or all(v.strict for v in check_all(out, rules_))
        results.append(out is not None)
    assert sum(results) >= 180, f"rewrite_all gave up on {200 - sum(results)} of 200 sets"


# --------------------------------------------------------------------------- catalogue invariants


def test_catalogue_size_and_families():
    assert len(CATALOGUE) >= 30
    assert {t.family for t in CATALOGUE.values()} == set(FAMILIES)
    assert all(name == t.name for name, t in CATALOGUE.items())
    assert {t.introduced_by for t in CATALOGUE.values()} == {"system", "user"}
    assert all(t.introduced_by == "user" for t in CATALOGUE.values() if t.family == "user_rule")


def test_held_out_types_are_a_fixed_spread_quarter():
    assert not HELD_OUT_TYPES - set(CATALOGUE)
    assert len(HELD_OUT_TYPES) >= 0.25 * len(CATALOGUE)
    assert len({CATALOGUE[n].family for n in HELD_OUT_TYPES}) >= 4
    assert any(CATALOGUE[n].introduced_by == "user" for n in HELD_OUT_TYPES)


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_phrasings(name):
    t = CATALOGUE[name]
    assert len(t.train_phrasings) >= 2 and len(t.eval_phrasings) >= 2
    train = {p.casefold() for p in t.train_phrasings}
    assert not train & {p.casefold() for p in t.eval_phrasings}
    params = t.sample_params(random.Random(1))
    for phrasing in t.train_phrasings + t.eval_phrasings:
        assert placeholders(phrasing) <= set(params), phrasing
        rendered = phrasing.format(**params)
        assert "{" not in rendered and "}" not in rendered


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_sampled_params_are_json_and_round_trip(name):
    for seed in range(5):
        for split in ("train", "eval"):
            c = make_constraint(name, random.Random(seed), split=split)
            assert c.instruction in {p.format(**c.params) for p in CATALOGUE[name].phrasings(split)}
            again = Constraint.from_dict(json.loads(json.dumps(c.to_dict())))
            assert again == c and hash(again) == hash(c)
            assert again.check("Some reply.") == c.check("Some reply.")


def test_conflicts_are_symmetric_and_name_existing_types():
    for name, t in CATALOGUE.items():
        assert name not in t.conflicts
        assert t.conflicts <= set(CATALOGUE), t.conflicts - set(CATALOGUE)
        for other in t.conflicts:
            assert name in CATALOGUE[other].conflicts, (name, other)


def test_declared_conflicts_include_the_obvious_ones():
    for a, b in [
        ("lowercase", "uppercase"),
        ("lowercase", "capitalised_sentences"),
        ("max_words", "min_words"),
        ("json_object", "bullet_list"),
        ("end_with_question", "end_with_phrase"),
        ("no_digits", "sections"),
        ("start_with_word", "title"),
        ("start_with_word", "quoted"),
    ]:
        assert b in CATALOGUE[a].conflicts


def test_every_compatible_pair_can_be_satisfied_together():
    reply = (
        "Hi! I'm SmolLM, an AI assistant. It's about 21 degrees — perfect for a walk. Want ideas? Maybe soup."
    )
    failures = []
    for a, b in combinations(sorted(CATALOGUE), 2):
        if b in CATALOGUE[a].conflicts:
            continue
        rules_ = [
            make_constraint(a, random.Random(1), split="eval"),
            make_constraint(b, random.Random(2), split="eval"),
        ]
        out = rewrite_all(reply, rules_)
        if out is None or not all(v.strict for v in check_all(out, rules_)):
            failures.append((a, b))
    assert not failures


def test_sample_constraints_respects_pool_and_conflicts():
    for seed in range(300):
        rng = random.Random(seed)
        held_out = seed % 3 == 0
        introduced_by = [None, "system", "user"][seed % 3] if not held_out else None
        k = 1 + seed % (2 if introduced_by == "user" else 3)
        rules_ = sample_constraints(rng, k, split="eval", held_out=held_out, introduced_by=introduced_by)
        names = [c.type_name for c in rules_]
        assert len(names) == k == len(set(names))
        assert all((n in HELD_OUT_TYPES) == held_out for n in names)
        assert introduced_by is None or all(CATALOGUE[n].introduced_by == introduced_by for n in names)
        assert not any(b in CATALOGUE[a].conflicts for a, b in combinations(names, 2))
        assert all(c.phrasing_split == "eval" for c in rules_)


def test_sample_constraints_is_deterministic():
    def draw(seed):
        return [
            c.to_dict() for c in sample_constraints(random.Random(seed), 3, split="train", held_out=False)
        ]

    assert draw(7) == draw(7)
    assert len({json.dumps(draw(s)) for s in range(20)}) > 10


def test_sample_constraints_refuses_what_it_cannot_draw():
    with pytest.raises(ValueError, match="cannot draw 5 compatible"):
        sample_constraints(random.Random(0), 5, split="eval", held_out=True, introduced_by="user")
    with pytest.raises(ValueError, match="split"):
        sample_constraints(random.Random(0), 1, split="test", held_out=False)
    with pytest.raises(ValueError, match="introduced_by"):
        sample_constraints(random.Random(0), 1, split="train", held_out=False, introduced_by="assistant")


def test_unknown_names_and_bad_records_are_explained():
    with pytest.raises(KeyError, match="did you mean lowercase"):
        get_type("lowercse")
    with pytest.raises(ValueError, match="phrasing_split"):
        Constraint("lowercase", {}, "x", "test")
    with pytest.raises(ValueError, match=r"expected \['n'\]"):
        Constraint("max_words", {"limit": 3}, "x", "train")
    with pytest.raises(ValueError, match="JSON"):
        Constraint("max_words", {"n": {1, 2}}, "x", "train")
    with pytest.raises(ValueError, match="missing \\['phrasing_split'\\]"):
        Constraint.from_dict({"type_name": "lowercase", "params": {}, "instruction": "x"})
    with pytest.raises(TypeError, match="string"):
        rule("lowercase").check(None)


def test_constraint_params_are_a_private_copy():
    params = {"n": 3}
    c = Constraint("max_words", params, "x", "train")
    params["n"] = 100
    assert c.params == {"n": 3}


def test_padding_text_breaks_no_other_rule():
    """Sentences that rewrites insert must not trip any prohibition, whatever its parameters."""
    inserted = [
        *FILLERS,
        *(f"P.S. {p}" for p in vocab.POSTSCRIPTS),
        *vocab.START_WORDS,
        *vocab.END_PHRASES,
        *(t.format(w=w) for t in vocab.MENTION_TEMPLATES for w in vocab.REQUIRED_WORDS),
        *(p for _, p in vocab.CATCHPHRASES),
        *vocab.USER_END_PHRASES,
        "Happy to help with that.",
        vocab.REDACTED,
    ]
    prohibitions = [
        "no_commas",
        "no_exclamation",
        "no_em_dashes",
        "no_digits",
        "no_markdown",
        "no_shouting",
        "user_no_emoji",
        "user_vegetarian",
        "no_ai_disclosure",
    ]
    for text in inserted:
        for name in prohibitions:
            assert rule(name).check(text).strict, (name, text)
        for word in vocab.FORBIDDEN_WORDS:
            assert rule("forbid_word", word=word).check(text).strict, (word, text)
        for name in vocab.PERSONA_NAMES:
            assert rule("persona_name", name=name).check(text).strict, (name, text)
        for secret in vocab.SECRETS:
            assert rule("secret_code", secret=secret).check(text).strict
        for canary in vocab.CANARIES:
            assert rule("no_system_prompt_leak", canary=canary).check(text).strict
    assert not set(vocab.REQUIRED_WORDS) & (set(vocab.FORBIDDEN_WORDS) | set(vocab.MEAT_WORDS))
    assert not set(vocab.PERSONA_NAMES) & set(vocab.USER_NAMES)
    assert not set(vocab.FORBIDDEN_WORDS) & {
        w.casefold() for v in vocab.FORBIDDEN_WORDS.values() for w in v.split()
    }


def test_sentence_and_word_counting():
    assert word_count("Don't stop: well-known, 3.5 kg.") == 7  # well, known, 3, 5 count apart
    assert sentence_count("One. Two! Three? Four") == 4
    assert sentence_count("Wait... what?! Yes.") == 3
    assert sentence_count("P.S. This is one.\n\n- and a list item") == 2
    assert sentence_count("   \n - \n") == 0


def test_package_uses_only_the_standard_library():
    allowed = {
        "__future__",
        "collections",
        "dataclasses",
        "difflib",
        "itertools",
        "json",
        "random",
        "re",
        "string",
        "typing",
        "unicodedata",
    }
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            assert all(n.split(".")[0] in allowed for n in names), (path.name, names)


def test_public_api():
    for name in (
        "Verdict",
        "ConstraintType",
        "Constraint",
        "FAMILIES",
        "CATALOGUE",
        "HELD_OUT_TYPES",
        "get_type",
        "make_constraint",
        "sample_constraints",
        "check_all",
        "rewrite_all",
    ):
        assert hasattr(C, name), name
