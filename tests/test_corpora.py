"""The chitchat corpus: turns merged per speaker, and a split no builder can cross."""

from __future__ import annotations

from dialogrl.data.corpora import _raw_chitchat, _turns, chitchat_stats, load_chitchat, split_of


def test_split_is_deterministic_disjoint_and_about_ten_percent():
    train = {d.conversation_id for d in load_chitchat("train")}
    evaluation = {d.conversation_id for d in load_chitchat("eval")}
    assert not train & evaluation
    stats = chitchat_stats()
    assert stats["conversations"] == 7168
    assert 0.08 < stats["eval"] / stats["conversations"] < 0.12
    assert split_of("07edb12-6b91-4138-b11e-02421888d699") == split_of("07edb12-6b91-4138-b11e-02421888d699")


def test_consecutive_messages_of_one_speaker_become_one_turn():
    raw = _raw_chitchat()
    conversation_id = next(cid for cid, c in raw.items() if len(c["messages"]) >= 4 and len(c["messages"][0]) > 1)
    groups = raw[conversation_id]["messages"]
    turns = _turns(groups)
    assert turns[0] == " ".join(" ".join(m["text"].split()) for m in groups[0])
    assert len(turns) == len(groups)


def test_dialogues_alternate_and_messages_are_valid():
    from dialogrl.data.records import check_conversation

    dialogues = load_chitchat("train", min_rounds=4)
    assert len(dialogues) > 2000
    for dialogue in dialogues[:200]:
        messages = dialogue.messages()
        assert check_conversation(messages) == []
        assert [m["content"] for m in messages[0::2]] == list(dialogue.user_turns[: dialogue.rounds])


def test_empty_group_ends_the_dialogue_instead_of_breaking_alternation():
    groups = [[{"text": "hi"}], [{"text": "hello"}], [{"text": "  "}], [{"text": "late"}]]
    assert _turns(groups) == ("hi", "hello")
