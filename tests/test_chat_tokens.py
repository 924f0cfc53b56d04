"""The template-agnostic assistant mask, on real chat templates, with property tests."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from templates import TEMPLATES, TRL_SET, WORKING, expected_reply_texts, span_texts, stand_in_chat

from dialogrl.data.chat_tokens import ChatTokenizer, TemplateError

_TOKENIZERS: dict[str, ChatTokenizer] = {}


def chat_tokenizer(name: str) -> ChatTokenizer:
    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = stand_in_chat(TRL_SET[name])
    return _TOKENIZERS[name]


words = st.text(alphabet="abcdefghij klmnopqrstuvwxyzABC,.!?'é中\n0123456789", min_size=1, max_size=40).filter(
    lambda s: s.strip()
)


@st.composite
def conversations(draw, with_system: bool = True):
    rounds = draw(st.integers(min_value=1, max_value=5))
    messages = []
    if with_system and draw(st.booleans()):
        messages.append({"role": "system", "content": draw(words)})
    for _ in range(rounds):
        messages.append({"role": "user", "content": draw(words)})
        messages.append({"role": "assistant", "content": draw(words)})
    return messages


def masked_texts(tokenizer, result):
    return [tokenizer.decode(result.input_ids[a:b]) for a, b in result.assistant_spans()]


@pytest.mark.parametrize("name", WORKING)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_masked_tokens_are_exactly_what_the_model_generates_for_each_turn(name, data):
    template = TRL_SET[name]
    chat = chat_tokenizer(name)
    messages = data.draw(conversations(with_system=template.system))
    result = chat(messages)
    assert masked_texts(chat.tokenizer, result) == expected_reply_texts(chat.tokenizer, messages, template.stop_tokens)
    # The whole sequence is exactly the template's rendering, tokenised.
    assert chat.tokenizer.decode(result.input_ids) == chat.tokenizer.apply_chat_template(messages, tokenize=False)
    assert len(result.input_ids) == len(result.assistant_mask) == len(result.turn_index)
    # What the model saw before each turn is what it is given when asked to generate it; the one
    # exception is a reply whose leading whitespace would merge with the prompt's last token.
    replies = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    for k, (start, _end) in zip(replies, result.assistant_spans(), strict=True):
        prompt = chat.tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        if not any(messages[j]["content"][:1].isspace() for j in replies if j < k):
            assert result.input_ids[:start] == chat.tokenizer(prompt, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", WORKING)
def test_turn_index_follows_rounds(name):
    chat = chat_tokenizer(name)
    messages = [{"role": "user", "content": f"question {r}"} if i % 2 == 0 else {"role": "assistant",
                "content": f"answer {r}"} for r in range(1, 4) for i in range(2)]
    if TEMPLATES[name][3]:
        messages.insert(0, {"role": "system", "content": "Always be kind."})
    result = chat(messages)
    spans = result.assistant_spans()
    for round_number, (start, end) in enumerate(spans, start=1):
        assert set(result.turn_index[start:end]) == {round_number}
    assert result.turn_index == sorted(result.turn_index), "turn index never goes back"
    # The r-th user turn's content carries index r.
    for r in range(1, 4):
        tokens = [t for t, i in zip(result.input_ids, result.turn_index, strict=True) if i == r]
        assert f"question {r}" in chat.tokenizer.decode(tokens)


def test_prompt_tokens_equal_the_generation_prompt_tokens():
    """What the model saw before turn k in training is what it sees when asked to generate turn k."""
    chat = chat_tokenizer("smollm2")
    messages = [
        {"role": "system", "content": "Reply in lowercase."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "hi!"},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "fine, thanks."},
    ]
    result = chat(messages)
    second_start = result.assistant_spans()[1][0]
    prompt = chat.tokenizer.apply_chat_template(messages[:4], tokenize=False, add_generation_prompt=True)
    assert result.input_ids[:second_start] == chat.tokenizer(prompt, add_special_tokens=False)["input_ids"]


def test_user_and_system_tokens_are_never_masked():
    chat = chat_tokenizer("llama3")
    messages = [{"role": "system", "content": "SYSTEMTEXT"}, {"role": "user", "content": "USERTEXT"},
                {"role": "assistant", "content": "REPLYTEXT"}]
    result = chat(messages)
    unmasked = chat.tokenizer.decode([t for t, m in zip(result.input_ids, result.assistant_mask, strict=True) if not m])
    masked = chat.tokenizer.decode([t for t, m in zip(result.input_ids, result.assistant_mask, strict=True) if m])
    assert "SYSTEMTEXT" in unmasked and "USERTEXT" in unmasked and "REPLYTEXT" not in unmasked
    assert masked == "REPLYTEXT<|eot_id|>"


def test_reply_text_that_also_appears_in_the_template_is_located_correctly():
    chat = chat_tokenizer("smollm2")
    messages = [{"role": "user", "content": "assistant"}, {"role": "assistant", "content": "assistant"},
                {"role": "user", "content": "im_start"}, {"role": "assistant", "content": "user"}]
    texts = masked_texts(chat.tokenizer, chat(messages))
    assert texts == ["assistant<|im_end|>", "user<|im_end|>"]


def test_template_that_changes_the_generation_context_is_refused():
    chat = chat_tokenizer("deepseekv3")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(TemplateError, match="rewrites earlier turns"):
        chat(messages)


def test_template_without_end_token_after_replies_is_refused():
    chat = chat_tokenizer("glm4moe")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(TemplateError, match="not followed by a stop token"):
        chat(messages)


def test_template_that_refuses_a_system_message_says_so():
    chat = chat_tokenizer("gemma")
    with pytest.raises(TemplateError, match="System role not supported"):
        chat([{"role": "system", "content": "x"}, {"role": "user", "content": "hi"},
              {"role": "assistant", "content": "hello"}])


def test_batch_equals_one_at_a_time():
    chat = chat_tokenizer("qwen2_5")
    batch = [
        [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "yo " * i + "."}]
        for i in range(1, 6)
    ]
    assert chat.tokenize_many(batch) == [chat(messages) for messages in batch]


# --------------------------------------------------------------------------- exact masks


@pytest.mark.parametrize("reply", ["\nstarts with a newline", "  two spaces", " one space\n"])
def test_leading_and_trailing_whitespace_of_a_reply_is_trained(reply):
    """ChatML keeps the content as written, so its whitespace is part of what the model must generate."""
    chat = chat_tokenizer("smollm2")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply},
                {"role": "user", "content": "and?"}, {"role": "assistant", "content": reply}]
    assert masked_texts(chat.tokenizer, chat(messages)) == [reply + "<|im_end|>"] * 2


def test_stop_tokens_come_from_the_generation_config():
    """Phi-3's eos is <|endoftext|>, its turns end with <|end|>, which generation_config.json lists."""
    from types import SimpleNamespace

    from dialogrl.data.chat_tokens import generation_stop_tokens

    tokenizer = chat_tokenizer("phi3").tokenizer
    config = SimpleNamespace(eos_token_id=[tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.eos_token_id])
    assert generation_stop_tokens(tokenizer, config) == ["<|endoftext|>", "<|end|>"]
    assert generation_stop_tokens(tokenizer) == ["<|endoftext|>"]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]
    with_config = ChatTokenizer(tokenizer, generation_stop_tokens(tokenizer, config))
    assert masked_texts(tokenizer, with_config(messages)) == ["hello<|end|>", "ciao<|end|>"]
    # Without it, the first turn has no stop token before the next user turn: refused, not guessed.
    with pytest.raises(TemplateError, match=r"not followed by a stop token \(<\|endoftext\|>\)"):
        ChatTokenizer(tokenizer)(messages)


def test_a_message_without_content_is_a_clear_error_not_a_crash():
    chat = chat_tokenizer("qwen2_5")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]
    with pytest.raises(TemplateError, match="cannot render this conversation"):
        chat(messages)


# --------------------------------------------------------------------------- SentencePiece


SENTENCEPIECE_CASES = [  # (tokenizer style, template family): how each real model loads
    ("gemma", "gemma3"),
    ("llama_legacy", "llama2"),
    ("llama_legacy", "mistral_v0_1"),
    ("llama", "mistral_v0_3"),
]


@pytest.mark.parametrize(("style", "family"), SENTENCEPIECE_CASES)
def test_sentencepiece_prompt_tokens_equal_inference_tokens(style, family):
    """No word-start marker is added at a border: the tokens decode to the rendered text, turn by turn."""
    from sentencepiece_tokenizers import sentencepiece_tokenizer
    from templates import corpus

    template = TRL_SET.get(family) or corpus().get(family)
    if template is None:
        pytest.fail(f"template {family} is missing from tests/data/chat_templates")
    tokenizer = sentencepiece_tokenizer(style, template.text, [t for t in template.special_tokens
                                                             if t not in ("<s>", "</s>", "<unk>")])
    stops = [s if s not in ("<eos>",) else tokenizer.eos_token for s in template.stop_tokens]
    stops = [s for s in dict.fromkeys(stops) if s in tokenizer.all_special_tokens] or [tokenizer.eos_token]
    chat = ChatTokenizer(tokenizer, stops)
    messages = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "Hi, how are you?"},
                {"role": "user", "content": "fine thanks"}, {"role": "assistant", "content": "good to hear"},
                {"role": "user", "content": "what about you"}, {"role": "assistant", "content": "warm tea"}]
    result = chat(messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if style != "llama_legacy":  # legacy Llama puts a word-start marker after every special token, by design
        assert tokenizer.decode(result.input_ids) == text
    assert span_texts(tokenizer, result.input_ids, result.assistant_spans()) == expected_reply_texts(
        tokenizer, messages, stops)
    for k, (start, _end) in zip((1, 3, 5), result.assistant_spans(), strict=True):
        prompt = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        assert result.input_ids[:start] == tokenizer(prompt, add_special_tokens=False)["input_ids"], k
    # The whole text tokenised at once agrees too: no border changed a token.
    assert result.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- real templates' end and scaffolding


def _corpus_masks(family, messages=None, tools=None):
    from templates import corpus

    template = corpus()[family]
    chat = stand_in_chat(template)
    messages = messages or [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi there."},
                            {"role": "user", "content": "bye"}, {"role": "assistant", "content": "See you."}]
    return masked_texts(chat.tokenizer, chat(messages, tools))


def test_a_turn_ends_at_the_model_stop_token_not_at_the_first_special_token():
    """Command-A closes a reply with <|END_RESPONSE|> and stops generating at <|END_OF_TURN_TOKEN|>."""
    masks = _corpus_masks("command_a")
    assert all(m.endswith("<|END_RESPONSE|><|END_OF_TURN_TOKEN|>") for m in masks), masks


@pytest.mark.parametrize(("family", "scaffold"), [
    ("llama2", " Hi there. </s>"),  # `[/INST] ` + content + ` </s>`: the space is the model's to write
    ("command_a", "<|START_RESPONSE|>Hi there."),
    ("kimi_k2_thinking", "<think></think>Hi there."),
])
def test_text_the_template_writes_after_the_generation_prompt_is_trained(family, scaffold):
    assert _corpus_masks(family)[0].startswith(scaffold)


def test_gpt_oss_tool_call_trains_its_channel_header():
    from test_tool_dialogues import weather_row

    from dialogrl.data.records import normalise_row

    record = normalise_row(weather_row())
    call, answer = _corpus_masks("gpt_oss", record.messages, record.tools)
    assert call == ' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>'
    assert answer.startswith("<|channel|>final<|message|>Yes: 21 degrees")


def test_a_token_that_would_straddle_the_start_of_a_reply_is_split_there():
    """With no pre-tokeniser, BPE merges across the prompt/reply border ('\\n' + '\\n...'); the mask still
    starts exactly at the reply, and the prompt keeps the tokens it has at generation time."""
    from tiny_model import CHATML_TEMPLATE, SPECIAL_TOKENS, corpus_lines
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    lines = [f"assistant\n\n{line}\n\n" for line in corpus_lines(300)]
    backend.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=1500, special_tokens=SPECIAL_TOKENS,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                           show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\n\nhow are you"},
                {"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    whole = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    border = text.index("\n\nhow")
    assert any(a < border < b for a, b in whole["offset_mapping"]), "the probe needs a straddling token"
    chat = ChatTokenizer(tokenizer)
    result = chat(messages)
    assert span_texts(tokenizer, result.input_ids, result.assistant_spans()) == expected_reply_texts(
        tokenizer, messages, ["<|im_end|>"])
    start = result.assistant_spans()[0][0]
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert result.input_ids[:start] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(result.input_ids) == text


@pytest.mark.parametrize("next_user", [">", "END", "RESPONSE|"])
def test_a_user_turn_that_reads_like_template_text_does_not_hide_the_stop_token(next_user):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi there."},
                {"role": "user", "content": next_user}, {"role": "assistant", "content": "See you."}]
    masks = _corpus_masks("command_a", messages)
    assert masks == ["<|START_RESPONSE|>Hi there.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>",
                     "<|START_RESPONSE|>See you.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"]
