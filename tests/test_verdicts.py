"""The dialogue-aware verdict: repeats, echoes, responsiveness, and what `adherent` means, on hand-built dialogues."""

from __future__ import annotations

import math

import pytest

from dialogrl.data.constraints import Constraint
from dialogrl.evaluation import metrics
from dialogrl.evaluation.gate import (
    GateConfig,
    check_dialogue_gate,
    cross_turn,
    echo_share,
    repeat_similarity,
)
from dialogrl.evaluation.responsiveness import ResponsivenessConfig, ResponsivenessScorer, context_of
from dialogrl.evaluation.scorer_validation import roc_auc, youden_threshold
from dialogrl.evaluation.verdicts import DialogueToJudge, judge, rule_checks

LOWERCASE = Constraint("lowercase", {}, "write in lowercase", "eval")


def dialogue(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "Be kind. Write in lowercase."}]
    for user, reply in pairs:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return messages


def judged(messages, scorer=None, rules=(LOWERCASE,)):
    (turns,) = judge([DialogueToJudge(messages, lambda r, reply: rule_checks(list(rules), reply))], GateConfig(),
                     scorer)
    return turns


# --------------------------------------------------------------------------- repeat and echo


def test_similarity_measures_on_worked_cases():
    # "I'm" is spelled "i am": 4 shared words of 4 + 5, 2 * 4 / 9.
    assert repeat_similarity("I'm not sure.", "I'm not sure, sorry.") == pytest.approx(8 / 9)
    assert repeat_similarity("Hey there!", "hey there") == 1.0
    assert repeat_similarity("I love hiking in the hills.", "Pizza is my favourite food.") == 0.0
    # "you like pizza" is all of the reply, in the user's order; "yes, I like pizza" shares 2 of 4 words.
    assert echo_share("you like pizza?", "do you like pizza?") == 1.0
    assert echo_share("yes, I like pizza", "do you like pizza?") == 0.5


def test_a_contraction_does_not_hide_an_echo_or_a_repeat():
    assert echo_share("How's it going?", "How is it going?") == 1.0
    assert echo_share("How\u2019s your evening going?", "how is your evening going") == 1.0
    assert repeat_similarity("I don't know, I can't say.", "I do not know. I cannot say.") == 1.0
    assert repeat_similarity("We won't go.", "we will not go") == 1.0
    # An apostrophe that is not a contraction stays one word on both sides.
    assert echo_share("Rock 'n' roll!", "rock 'n' roll") == 1.0


def test_exact_and_near_repeats_fail_the_gate_and_name_the_round():
    turns = judged(dialogue(("hi", "hey there! how are you doing"),
                            ("i'm good, and you?", "hey there! how are you doing"),
                            ("what's your superpower?", "hey there, how are you doing today")))
    assert [t["gate_reason"] for t in turns] == [None, "repeat", "repeat"]
    assert turns[1]["repeat_of"] == 1 and turns[1]["repeat_similarity"] == 1.0
    assert "round 1" in turns[2]["gate_detail"]
    # The per-reply gate alone passes them all: this is the parrot the old verdict rewarded.
    assert all(t["reply_gate_pass"] for t in turns)


def test_an_echo_of_the_user_fails_and_a_real_answer_passes():
    turns = judged(dialogue(("do you like hiking in the mountains?", "do you like hiking in the mountains?"),
                            ("what did you eat today?", "some pasta with tomatoes, it was great")))
    assert turns[0]["gate_reason"] == "echo" and turns[0]["echo"] is True
    assert turns[1]["gate_pass"] is True and turns[1]["adherent"] is True


def test_a_compliant_but_repeated_reply_is_not_adherent():
    turns = judged(dialogue(("hello", "i'm not sure."), ("tell me about your weekend plans", "i'm not sure.")))
    assert all(t["rules_kept"] for t in turns)  # lowercase both times
    assert [t["adherent"] for t in turns] == [True, False]
    records = [{"dialogue_id": "d", "user_source": "replay", "turns": turns}]
    summary = metrics.summarise(records, n_boot=10)
    assert summary["repeat_rate"] == 0.5
    # Under the old per-reply gate both turns counted; now only round 1 does.
    assert summary["auc_strict_per_reply_gate"] == 1.0
    assert summary["auc_strict"] == pytest.approx(0.5)


def test_turns_without_a_standing_rule_are_unscored_but_still_gated():
    turns = judged(dialogue(("hi", "Hello!"), ("hi", "Hello!")), rules=())
    assert [t["adherent"] for t in turns] == [None, None]
    assert [t["gate_pass"] for t in turns] == [True, False]


def test_unresponsive_fails_only_after_the_other_checks():
    relation = cross_turn("sounds great to me", [], "shall we go hiking tomorrow?")
    assert check_dialogue_gate("sounds great to me", relation, False, responsiveness=-0.3).reason == "unresponsive"
    assert check_dialogue_gate("sounds great to me", relation, True).passed
    assert check_dialogue_gate("", relation, True).reason == "empty"


# --------------------------------------------------------------------------- the responsiveness scorer


@pytest.fixture(scope="module")
def tiny_scorer(tiny_model_dir):
    from dialogrl.training.models import ModelConfig, load_causal_lm, load_tokenizer

    options = ModelConfig(name_or_path=str(tiny_model_dir))
    model, tokenizer = load_causal_lm(options).eval(), load_tokenizer(options)
    pool = [[{"role": "user", "content": f"tell me about topic number {i} please"}] for i in range(12)]
    return ResponsivenessScorer(model, tokenizer, ResponsivenessConfig(context_messages=1, negatives=3,
                                                                       batch_tokens=64), pool)


def _unbatched_logp(scorer: ResponsivenessScorer, context, reply) -> float:
    import torch

    ids, n = scorer._encode(context, reply)
    with torch.inference_mode():
        logits = scorer.model(input_ids=torch.tensor([ids])).logits[0].float()
    logps = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
    return float(logps[-n:].sum())


def test_batched_left_padded_log_likelihoods_equal_one_row_at_a_time(tiny_scorer):
    pairs = [([{"role": "user", "content": "hi"}], "hello there"),
             ([{"role": "user", "content": "what is the weather like where you live today?"}], "sunny"),
             ([{"role": "user", "content": "ok"}], "a much longer reply that goes on for quite a few more words")]
    batched = tiny_scorer.log_likelihoods(pairs)
    for (context, reply), value in zip(pairs, batched, strict=True):
        assert value == pytest.approx(_unbatched_logp(tiny_scorer, context, reply), abs=1e-3)


def test_panel_log_likelihoods_on_cached_prefixes_equal_full_passes(tiny_scorer):
    replies = ["a dog", "sunny", "a much longer reply that goes on for quite a few more words", ""]
    cached = tiny_scorer.panel_log_likelihoods(replies)
    assert len(cached) == len(replies) and all(len(row) == len(tiny_scorer.panel) for row in cached)
    for reply, row in zip(replies, cached, strict=True):
        for context, value in zip(tiny_scorer.panel, row, strict=True):
            assert value == pytest.approx(_unbatched_logp(tiny_scorer, context, reply), abs=1e-3)


def test_panel_contexts_of_different_lengths_share_passes_and_equal_full_passes(tiny_scorer):
    # The stacked panel cache is left-padded to its longest context; the padding must never be attended.
    pool = [[{"role": "user", "content": "hi"}],
            [{"role": "user", "content": "tell me everything you know about the long history of the city of rome"}],
            [{"role": "user", "content": "what now?"}, {"role": "assistant", "content": "we wait and see"},
             {"role": "user", "content": "for how long"}]]
    scorer = ResponsivenessScorer(tiny_scorer.model, tiny_scorer.tokenizer,
                                  ResponsivenessConfig(context_messages=3, negatives=3, batch_tokens=40), pool)
    replies = ["a dog", "a much longer reply that goes on for quite a few more words", "ok then"]
    assert len({len(scorer._prompt_ids(context)) for context in pool}) == 3
    for reply, row in zip(replies, scorer.panel_log_likelihoods(replies), strict=True):
        for context, value in zip(pool, row, strict=True):
            assert value == pytest.approx(_unbatched_logp(scorer, context, reply), abs=1e-3)


def test_pmi_is_own_minus_log_mean_over_the_panel_and_order_free(tiny_scorer):
    context = [{"role": "user", "content": "do you have any pets at home?"}]
    assert len(tiny_scorer.panel) == 3 and context not in tiny_scorer.panel
    own, *others = tiny_scorer.log_likelihoods([(context, "a dog"), *((n, "a dog") for n in tiny_scorer.panel)])
    expected = own - math.log(sum(math.exp(x) for x in others) / len(others))
    alone = tiny_scorer.score([(context, "a dog")])[0]
    assert alone == pytest.approx(expected, abs=1e-3)
    other = [{"role": "user", "content": "where were you born?"}]
    in_batch = tiny_scorer.score([(other, "in a city"), (context, "a dog")])[1]
    assert in_batch == pytest.approx(alone, abs=1e-3)


def test_a_panel_context_that_is_the_replys_own_is_left_out_of_its_marginal(tiny_scorer):
    own_context = tiny_scorer.panel[0]
    own, *others = tiny_scorer.log_likelihoods([(n, "a dog") for n in tiny_scorer.panel])
    expected = own - math.log(sum(math.exp(x) for x in others) / len(others))
    assert tiny_scorer.score([(own_context, "a dog")])[0] == pytest.approx(expected, abs=1e-3)


def test_with_show_replies_off_the_scorer_does_not_see_the_repliers_own_earlier_replies(tiny_scorer):
    # A reply copying an earlier reply of its own must not become "predictable" from the copy.
    first = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "i like trains a lot"},
             {"role": "user", "content": "what do you do?"}]
    second = [first[0], {"role": "assistant", "content": "something else entirely"}, first[2]]
    hiding = ResponsivenessScorer(tiny_scorer.model, tiny_scorer.tokenizer,
                                  ResponsivenessConfig(context_messages=3, negatives=3, show_replies=False),
                                  tiny_scorer.panel)
    assert hiding._prompt_ids(first) == hiding._prompt_ids(second)
    shown = hiding.tokenizer.decode(hiding._prompt_ids(first))
    assert "hi\nwhat do you do?" in shown and "trains" not in shown
    assert "trains" in tiny_scorer.tokenizer.decode(tiny_scorer._prompt_ids(first))  # the default shows them


def test_identical_pairs_are_scored_once(tiny_scorer):
    context = [{"role": "user", "content": "what did you do today?"}]
    tiny_scorer.panel_log_likelihoods(["warm up"])  # the panel's prefixes are run once, on first use
    before = tiny_scorer.scored_tokens
    single = tiny_scorer.score([(context, "i went for a walk")])
    cost = tiny_scorer.scored_tokens - before
    before = tiny_scorer.scored_tokens
    repeated = tiny_scorer.score([(context, "i went for a walk")] * 3)
    assert tiny_scorer.scored_tokens - before == cost
    assert repeated == pytest.approx(single * 3, abs=1e-6)


def test_judge_records_responsiveness_and_uses_the_threshold(tiny_scorer):
    messages = dialogue(("do you have any pets?", "yes, a small dog"), ("what is its name?", "his name is rex"))
    turns = judged(messages, tiny_scorer)
    for turn in turns:
        assert isinstance(turn["responsiveness"], float)
        assert turn["responsive"] is (turn["responsiveness"] >= tiny_scorer.config.threshold)
        if turn["responsive"] is False:
            assert turn["gate_reason"] == "unresponsive" and turn["adherent"] is False


def test_context_of_takes_the_last_messages_before_the_reply_without_system():
    messages = dialogue(("a", "b"), ("c", "d"))
    assert context_of(messages, 4, 1) == [{"role": "user", "content": "c"}]
    assert [m["content"] for m in context_of(messages, 4, 3)] == ["a", "b", "c"]
    assert [m["content"] for m in context_of(messages, 2, 3)] == ["a"]


# --------------------------------------------------------------------------- validation statistics


def test_roc_auc_and_youden_threshold_on_worked_cases():
    assert roc_auc([3, 1], [2, 0]) == pytest.approx(0.75)  # 3 of 4 pairs ordered right
    assert roc_auc([1, 1], [1, 1]) == 0.5  # all ties count half
    cut = youden_threshold([3.0, 4.0, 5.0], [0.0, 1.0, 3.5])
    # score >= 2.0 keeps all positives and 1 of 3 negatives (J = 2/3); no cut does better.
    assert cut["threshold"] == pytest.approx(2.0) and cut["j"] == pytest.approx(2 / 3)


def test_human_rates_count_repeats_echoes_and_per_reply_failures():
    from dialogrl.data.corpora import CorpusDialogue
    from dialogrl.evaluation.scorer_validation import human_repeat_echo_rates

    turns = ("do you like pizza", "I love pizza so much",
             "what else do you eat", "I love pizza so much",  # a repeat of round 1
             "say it again", "ok. ok. ok. ok.",  # one sentence four times
             "bye then", "bye then")  # an echo
    rates = human_repeat_echo_rates([CorpusDialogue("c0", "eval", turns)], thresholds=(0.8,))

    assert rates["replies"] == 4
    assert rates["repeat"]["0.8"] == pytest.approx(1 / 3)  # rounds 2-4 have an earlier reply to repeat
    assert rates["echo"]["0.8"] == pytest.approx(1 / 4)
    assert rates["per_reply_gate_failures"] == {"repeated_sentence": 1}
