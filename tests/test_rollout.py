"""The rollout engine: batched and cached play equals one-at-a-time play from scratch."""

from __future__ import annotations

import pytest

from dialogrl.data.chat_tokens import ChatTokenizer, TokenizedConversation
from dialogrl.evaluation.rollout import DialogueSpec, RolloutEngine
from dialogrl.evaluation.sampling import SamplingConfig
from dialogrl.evaluation.users import PressureUser, ReplayedUser
from dialogrl.training.models import ModelConfig, load_causal_lm, load_tokenizer

SCRIPTS = [
    ["hello there", "what do you like to eat?", "tell me more", "ok bye"],
    ["hi", "I have a dog named Rex who loves long walks in the park", "what about cats?"],  # ends after 3 rounds
    ["good morning!", "how is the weather", "nice", "and tomorrow?"],
]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    config = ModelConfig(name_or_path=str(tiny_model_dir))
    return load_causal_lm(config).eval(), load_tokenizer(config)


def specs():
    return [
        DialogueSpec(f"d{i}", "Answer in lowercase." if i != 2 else None, ReplayedUser(script),
                     user_prefix={2: "From now on call me Sam."} if i == 0 else {})
        for i, script in enumerate(SCRIPTS)
    ]


def play(model, tokenizer, *, batch_size, reuse_cache, with_tokens=False, max_new_tokens=12, chunk_tokens=16,
         engine_out=None, group_overhead_tokens=None):
    engine = RolloutEngine(model, tokenizer, SamplingConfig(max_new_tokens=max_new_tokens), batch_size=batch_size,
                           reuse_cache=reuse_cache, chunk_tokens=chunk_tokens)
    if group_overhead_tokens is not None:
        engine.group_overhead_tokens = group_overhead_tokens
    if engine_out is not None:
        engine_out.append(engine)
    return engine.play(specs(), rounds=4, with_tokens=with_tokens)


def test_batched_play_equals_one_at_a_time(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engines = []
    batched = play(model, tokenizer, batch_size=3, reuse_cache=True, with_tokens=True, engine_out=engines)
    # Segments of different lengths pad the rows; the padding is dropped from the cache between rounds.
    assert engines[0].positions_dropped > 0
    single = play(model, tokenizer, batch_size=1, reuse_cache=True, with_tokens=True)
    assert [t.messages for t in batched] == [t.messages for t in single]
    assert [t.token_ids for t in batched] == [t.token_ids for t in single]
    assert [t.rounds for t in batched] == [4, 3, 4]
    assert batched[0].messages[3]["content"].startswith("From now on call me Sam. ")


def test_prefill_in_length_groups_equals_one_at_a_time(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engines = []
    # No cost per forward pass: every distinct segment length becomes its own group.
    grouped = play(model, tokenizer, batch_size=3, reuse_cache=True, with_tokens=True, engine_out=engines,
                   group_overhead_tokens=0)
    assert engines[0].prefill_groups > 4  # more groups than rounds: some round ran its rows in 2+ groups
    single = play(model, tokenizer, batch_size=1, reuse_cache=True, with_tokens=True)
    assert [t.messages for t in grouped] == [t.messages for t in single]
    assert [t.token_ids for t in grouped] == [t.token_ids for t in single]


def test_split_softmax_through_the_engine_is_the_same_batched_or_alone(model_and_tokenizer):
    """The intervention sees each call's own layout (groups, padding, cache) and still marks the same keys."""
    from dialogrl.evaluation.interventions import SplitSoftmaxConfig, split_softmax, system_span_mask

    model, tokenizer = model_and_tokenizer

    def context(model, input_ids, attention_mask, system_lengths):
        return split_softmax(model, system_span_mask(input_ids, attention_mask, system_lengths),
                             SplitSoftmaxConfig(k=0.3))

    def played(batch_size):
        engine = RolloutEngine(model, tokenizer, SamplingConfig(max_new_tokens=12), batch_size=batch_size,
                               generation_context=context)
        engine.group_overhead_tokens = 0
        return engine.play(specs(), rounds=4, with_tokens=True)

    steered, single = played(3), played(1)
    assert [t.token_ids for t in steered] == [t.token_ids for t in single]
    plain = play(model, tokenizer, batch_size=3, reuse_cache=True, with_tokens=True)
    assert [t.token_ids for t in steered] != [t.token_ids for t in plain]  # the intervention changed something


@pytest.mark.parametrize(("lengths", "overhead", "expected"), [
    # Apart: two groups cost 3*7 + 3*80 + 2*32 = 325 < one group 6*80 + 32 = 512.
    ([5, 80, 6, 70, 7, 75], 32, [[0, 2, 4], [1, 3, 5]]),
    # Close: one group costs 3*12 + 32 = 68 < any split (two groups: at least 10 + 2*12 + 64 = 98).
    ([10, 11, 12], 32, [[0, 1, 2]]),
    # Free forward passes: one group per distinct length, equal lengths together.
    ([4, 9, 4], 0, [[0, 2], [1]]),
    ([3], 32, [[0]]),
])
def test_length_groups_minimise_padded_tokens_plus_overhead(lengths, overhead, expected):
    from dialogrl.evaluation.rollout import _length_groups

    assert _length_groups(lengths, overhead) == expected


def test_play_without_cache_reuse_keeps_every_reply_and_equals_cached_play(model_and_tokenizer):
    """`reuse_cache=False` runs the model over every row's whole history each round instead of keeping the
    cache; the rows keep their tokens, so every reply's mask and log-probs survive (they used to be lost for
    all but the last reply) and greedy play is the cached play, token for token, in every round."""
    model, tokenizer = model_and_tokenizer
    cached = play(model, tokenizer, batch_size=3, reuse_cache=True, with_tokens=True)
    fresh = play(model, tokenizer, batch_size=1, reuse_cache=False, with_tokens=True)
    assert [t.messages for t in cached] == [t.messages for t in fresh]
    for a, b in zip(cached, fresh, strict=True):
        assert a.token_ids == b.token_ids and a.assistant_mask == b.assistant_mask and a.turn_index == b.turn_index
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert len(TokenizedConversation(b.token_ids, b.assistant_mask, b.turn_index).assistant_spans()) == b.rounds


def test_turn_index_numbers_tokens_as_the_chat_tokenizer_does(model_and_tokenizer):
    """0 up to the end of the system prompt, then r from the end of reply r - 1 (its stop token) to the end of
    reply r: the tokens before the first reply carry the same numbers as ChatTokenizer gives them."""
    model, tokenizer = model_and_tokenizer
    chat = ChatTokenizer(tokenizer)
    for trajectory in play(model, tokenizer, batch_size=3, reuse_cache=True, with_tokens=True):
        spans = TokenizedConversation(trajectory.token_ids, trajectory.assistant_mask,
                                      trajectory.turn_index).assistant_spans()
        reference = chat(trajectory.messages)
        first_reply = spans[0][0]
        assert trajectory.token_ids[:first_reply] == reference.input_ids[:first_reply]
        assert trajectory.turn_index[:first_reply] == reference.turn_index[:first_reply]
        assert (trajectory.turn_index[0] == 0) == (trajectory.messages[0]["role"] == "system")
        ends = [0] + [end for _start, end in spans]
        for r, (_start, end) in enumerate(spans, 1):
            assert set(trajectory.turn_index[ends[r - 1] if r > 1 else first_reply: end]) == {r}


def test_every_cached_round_is_what_one_forward_over_the_whole_dialogue_predicts(model_and_tokenizer):
    """Replies are greedy: each generated token of every round must be the argmax of one plain
    forward pass over the dialogue's tokens, so a cache that went stale after round 1 (wrong
    positions, a missed user segment, a row's cache mixed with another's) is caught in any round."""
    import torch

    model, tokenizer = model_and_tokenizer
    played = play(model, tokenizer, batch_size=3, reuse_cache=True, with_tokens=True)
    checked_rounds = set()
    for trajectory in played:
        ids = torch.tensor([trajectory.token_ids])
        with torch.no_grad():
            logits = model(ids).logits[0].float()
        generated = [i for i, bit in enumerate(trajectory.assistant_mask) if bit]
        for position in generated:
            best = logits[position - 1].max()
            # Up to float noise between a batched, cached pass and one plain pass.
            assert logits[position - 1, trajectory.token_ids[position]] >= best - 1e-3, (
                trajectory.dialogue_id, trajectory.turn_index[position])
            checked_rounds.add(trajectory.turn_index[position])
    assert checked_rounds == {1, 2, 3, 4}


def test_rows_that_finish_early_leave_the_batch_without_changing_anything(model_and_tokenizer):
    from collections import Counter

    model, tokenizer = model_and_tokenizer
    # The random tiny model seldom says its end token; make its most frequent token a stop token too,
    # so that rows end at different steps and the set-aside-and-merge path runs.
    probe = play(model, tokenizer, batch_size=3, reuse_cache=True, max_new_tokens=24, with_tokens=True)
    counts = Counter(t for tr in probe for t, m in zip(tr.token_ids, tr.assistant_mask, strict=True) if m)

    def engine(extra_stop, **kwargs):
        e = RolloutEngine(model, tokenizer, SamplingConfig(max_new_tokens=24), **kwargs)
        e.generate_kwargs["eos_token_id"] = [*e.generate_kwargs["eos_token_id"], extra_stop]
        e.stop_ids.add(extra_stop)
        return e

    for extra_stop, _count in counts.most_common(10):  # the first stop token that ends rows at different steps
        chunked_engine = engine(extra_stop, batch_size=3, chunk_tokens=1)
        chunked = chunked_engine.play(specs(), rounds=4, with_tokens=True)
        if chunked_engine.rows_set_aside:
            break
    assert chunked_engine.rows_set_aside > 0, "no row finished before the others: the test exercises nothing"
    assert chunked_engine.positions_dropped > 0
    single = engine(extra_stop, batch_size=1).play(specs(), rounds=4, with_tokens=True)
    assert [t.messages for t in chunked] == [t.messages for t in single]
    assert [t.token_ids for t in chunked] == [t.token_ids for t in single]
    assert [t.assistant_mask for t in chunked] == [t.assistant_mask for t in single]


def test_one_cache_allocation_per_round_even_when_rows_leave_early(model_and_tokenizer, monkeypatch):
    """Rows set aside, rows leaving the batch and the prefill groups reuse the round's buffers.

    Each round reserves one buffer per layer, sized for the prefill and the
    round's decoding; anything more (a reallocation when rows leave, old buffers
    kept alive beside new ones) is what made the evaluator's memory pile up.
    """
    from collections import Counter

    from dialogrl.evaluation.kv_cache import AppendInPlaceLayer

    model, tokenizer = model_and_tokenizer
    probe = play(model, tokenizer, batch_size=3, reuse_cache=True, max_new_tokens=24, with_tokens=True)
    counts = Counter(t for tr in probe for t, m in zip(tr.token_ids, tr.assistant_mask, strict=True) if m)
    allocations = []
    original = AppendInPlaceLayer._reallocate
    monkeypatch.setattr(AppendInPlaceLayer, "_reallocate",
                        lambda self, *args: (allocations.append(args), original(self, *args))[1])
    for extra_stop, _count in counts.most_common(10):
        allocations.clear()
        engine = RolloutEngine(model, tokenizer, SamplingConfig(max_new_tokens=24), batch_size=3, chunk_tokens=1)
        engine.generate_kwargs["eos_token_id"] = [*engine.generate_kwargs["eos_token_id"], extra_stop]
        engine.stop_ids.add(extra_stop)
        engine.group_overhead_tokens = 0  # several groups per round, consecutive rows or not
        engine.play(specs(), rounds=4)
        if engine.rows_set_aside:
            break
    assert engine.rows_set_aside > 0
    assert len(allocations) == 4 * model.config.num_hidden_layers


def test_token_outputs_line_up_with_the_messages(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    for trajectory in play(model, tokenizer, batch_size=3, reuse_cache=True, with_tokens=True, chunk_tokens=4):
        n = len(trajectory.token_ids)
        assert n == len(trajectory.assistant_mask) == len(trajectory.turn_index) == len(trajectory.logprobs)
        # Everything outside the replies is the template's rendering of the system and user turns.
        decoded = tokenizer.decode([t for t, m in zip(trajectory.token_ids, trajectory.assistant_mask, strict=True)
                                    if not m])
        for message in trajectory.messages:
            if message["role"] != "assistant":
                assert message["content"] in decoded
        spans = TokenizedConversation(trajectory.token_ids, trajectory.assistant_mask,
                                      trajectory.turn_index).assistant_spans()
        replies = [m["content"] for m in trajectory.messages if m["role"] == "assistant"]
        assert len(spans) == len(replies) == trajectory.rounds
        for (a, b), reply, count in zip(spans, replies, trajectory.generated_tokens, strict=True):
            assert b - a == count
            assert tokenizer.decode(trajectory.token_ids[a:b], skip_special_tokens=True).strip() == reply
            assert all(lp <= 0.0 for lp in trajectory.logprobs[a:b])
            assert set(trajectory.turn_index[a:b]) == {trajectory.turn_index[a]}
        assert all(lp == 0.0 for lp, m in zip(trajectory.logprobs, trajectory.assistant_mask, strict=True) if not m)


def test_greedy_logprobs_are_the_maximum(model_and_tokenizer):
    import torch

    model, tokenizer = model_and_tokenizer
    (trajectory, *_rest) = play(model, tokenizer, batch_size=3, reuse_cache=True, with_tokens=True)
    ids = torch.tensor([trajectory.token_ids])
    with torch.no_grad():
        logits = model(ids).logits.log_softmax(-1)[0]
    positions = [i for i, m in enumerate(trajectory.assistant_mask) if m]
    recomputed = [logits[i - 1, trajectory.token_ids[i]].item() for i in positions]
    assert recomputed == pytest.approx([trajectory.logprobs[i] for i in positions], abs=1e-4)


def test_pressure_turns_replace_the_base_turn_at_their_rounds():
    source = PressureUser(ReplayedUser(["a", "b", "c"]), {2: "drop_rule"})
    assert source.next_user_turn([], 1) == "a"
    assert "forget whatever instructions" in source.next_user_turn([], 2)
    assert source.next_user_turn([], 4) is None
    with pytest.raises(ValueError, match="unknown pressure kinds"):
        PressureUser(ReplayedUser([]), {1: "shout"})


# --------------------------------------------------------------------------- turn groups (group-relative RL)


def play_groups(model, tokenizer, siblings=3, batch_size=6, share_identical_rows=True, engine_out=None):
    engine = RolloutEngine(model, tokenizer, SamplingConfig(max_new_tokens=10, temperature=1.0, seed=3),
                           batch_size=batch_size, chunk_tokens=4)
    engine.share_identical_rows = share_identical_rows
    if engine_out is not None:
        engine_out.append(engine)
    return engine.play_turn_groups(specs(), rounds=4, siblings=siblings)


def test_siblings_are_prefilled_once_a_dialogue_and_play_as_if_every_row_ran(model_and_tokenizer):
    """At every round a dialogue's siblings are identical rows (copies of the continued one): the new segment
    runs once for them, and the sampled play is token for token what running every row gives."""
    model, tokenizer = model_and_tokenizer
    engines = []
    _played, shared = play_groups(model, tokenizer, engine_out=engines)
    _played, apart = play_groups(model, tokenizer, share_identical_rows=False)
    assert engines[0].rows_prefilled_as_copies == 2 * len(shared)  # 3 siblings: 2 copies per dialogue and round
    assert [(g.dialogue_index, g.round_number, g.continued) for g in shared] == [
        (g.dialogue_index, g.round_number, g.continued) for g in apart]
    for a, b in zip(shared, apart, strict=True):
        assert [t.token_ids for t in a.replies] == [t.token_ids for t in b.replies]
        for x, y in zip(a.replies, b.replies, strict=True):
            assert x.logprobs == pytest.approx(y.logprobs, abs=1e-4)


def test_k_samples_of_one_history_share_its_prefill_and_stay_independent(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    history = [{"role": "system", "content": "Answer in lowercase."},
               {"role": "user", "content": "I have a dog named Rex who loves long walks"}]
    other = [{"role": "user", "content": "good morning!"}]

    def replies(share):
        engine = RolloutEngine(model, tokenizer, SamplingConfig(max_new_tokens=10, temperature=1.0, seed=5),
                               batch_size=8)
        engine.share_identical_rows = share
        return engine.reply([history] * 3 + [other]), engine

    shared, engine = replies(True)
    assert engine.rows_prefilled_as_copies == 2
    assert shared == replies(False)[0]
    assert len(set(shared[:3])) > 1  # the copies are sampled independently


def test_turn_group_siblings_share_their_history_token_for_token(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    played, groups = play_groups(model, tokenizer)
    assert [(g.dialogue_index, g.round_number) for g in groups[:2]] == [(0, 1), (1, 1)]
    assert sorted((g.dialogue_index, g.round_number) for g in groups) == [
        (d, r) for d, rounds in enumerate([4, 3, 4]) for r in range(1, rounds + 1)]
    distinct = 0
    for group in groups:
        assert len(group.replies) == 3
        starts = [t.assistant_mask.index(1) for t in group.replies]
        assert len(set(starts)) == 1  # the reply starts at the same position in every sibling
        histories = {tuple(t.token_ids[: starts[0]]) for t in group.replies}
        assert len(histories) == 1
        assert len({str(t.messages[:-1]) for t in group.replies}) == 1
        for t in group.replies:  # only this round's reply is marked as generated
            marked = [i for i, m in enumerate(t.assistant_mask) if m]
            assert marked == list(range(starts[0], len(t.token_ids)))
            assert len(marked) == t.generated_tokens[-1] and t.rounds == group.round_number
        distinct += len({t.messages[-1]["content"] for t in group.replies}) > 1
    assert distinct >= len(groups) // 2  # sampled independently: siblings usually differ


def test_only_the_continued_sibling_enters_the_next_round(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    played, groups = play_groups(model, tokenizer)
    by_key = {(g.dialogue_index, g.round_number): g for g in groups}
    assert {g.continued for g in groups} != {0}  # picked at random, not always the first
    for d, dialogue in enumerate(played):
        replies = [m["content"] for m in dialogue.messages if m["role"] == "assistant"]
        for r, reply in enumerate(replies, start=1):
            group = by_key[(d, r)]
            assert group.replies[group.continued].messages[-1]["content"] == reply
            if (d, r + 1) in by_key:
                later = by_key[(d, r + 1)].replies[0]
                assert later.messages[: len(group.replies[0].messages)] == group.replies[group.continued].messages


def test_turn_group_logprobs_equal_a_forward_pass_over_the_sibling(model_and_tokenizer):
    """The copied cache is the continued sibling's: every sibling's recorded log-probs (sampled on top of the
    forked cache) equal a plain forward pass over its whole token sequence."""
    import torch

    model, tokenizer = model_and_tokenizer
    _played, groups = play_groups(model, tokenizer)
    for group in [g for g in groups if g.round_number >= 3]:
        for t in group.replies:
            ids = torch.tensor([t.token_ids])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, :-1].float()
            expected = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
            marked = [i for i, m in enumerate(t.assistant_mask) if m]
            recorded = torch.tensor([t.logprobs[i] for i in marked])
            torch.testing.assert_close(recorded, expected[[i - 1 for i in marked]], atol=1e-4, rtol=1e-4)


def test_generation_never_waits_on_other_processes(model_and_tokenizer, monkeypatch):
    """transformers turns synced_gpus on for FSDP/ZeRO-3 models; the rollout plays whole weights, and a
    process with fewer replies to write would leave the others waiting in every decoding step (a deadlock
    seen under FSDP2 with sampled replies)."""
    model, tokenizer = model_and_tokenizer
    seen = []
    generate = model.generate

    def recording(*args, **kwargs):
        seen.append(kwargs.get("synced_gpus"))
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", recording)
    play(model, tokenizer, batch_size=2, reuse_cache=True)
    assert seen and all(flag is False for flag in seen)
