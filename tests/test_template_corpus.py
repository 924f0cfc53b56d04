"""Every template of tests/data/chat_templates: exact masks, or refused for its stated reason.

The expected mask comes from renderings alone (`expected_reply_texts`): marker
strings in every message, the generation prompt before each reply, and the
first stop token after it. ChatTokenizer's tokens must decode to exactly those
texts, the prompt before each turn must tokenise as the generation prompt does,
and no system, user or tool text may carry loss.
"""

from __future__ import annotations

import re

import pytest
from templates import CORPUS, TRL_SET, corpus, expected_reply_texts, stand_in_chat
from test_tool_dialogues import TOOL_OUTPUT, weather_row

from dialogrl.data.chat_tokens import TemplateError
from dialogrl.data.records import normalise_row

TEMPLATES = corpus()
# Hermes 3 and Command-R+ tool-use templates iterate over `tools`: plain chat passes an empty list.
PLAIN_TOOLS = {"hermes3_tool_use": [], "command_r_plus_tool_use": []}


def marker_conversation(system: bool) -> list[dict]:
    messages = [{"role": "system", "content": "SYSMARK be brief."}] if system else []
    for r in range(1, 4):
        messages += [{"role": "user", "content": f"USERMARK{r} how are you?"},
                     {"role": "assistant", "content": f"REPLYMARK{r} fine, thanks."}]
    return messages


def check_exact(chat, messages, tools, stop_tokens) -> list[str]:
    tokenizer = chat.tokenizer
    extra = {"tools": tools} if tools is not None else {}
    result = chat(messages, tools)
    masked = [tokenizer.decode(result.input_ids[a:b]) for a, b in result.assistant_spans()]
    assert masked == expected_reply_texts(tokenizer, messages, stop_tokens, tools)
    assert tokenizer.decode(result.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False, **extra)
    replies = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    for k, (start, _end) in zip(replies, result.assistant_spans(), strict=True):
        prompt = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True, **extra)
        assert result.input_ids[:start] == tokenizer(prompt, add_special_tokens=False)["input_ids"], f"turn {k}"
    for text in masked:
        assert not re.search("SYSMARK|USERMARK|TOOLRESULTMARK", text)
    return masked


def test_corpus_holds_at_least_30_real_families_each_with_its_source():
    assert len(TEMPLATES) >= 30
    trl_texts = {t.text for t in TRL_SET.values()}
    for family, template in TEMPLATES.items():
        assert re.fullmatch(r"github:[\w.-]+/[\w.-]+@[0-9a-f]{40}:\S+", template.source), family
        assert template.text not in trl_texts, f"{family} repeats a template of the TRL set"
        assert (CORPUS / f"{family}.jinja").read_text() == template.text
    assert len({t.text for t in TEMPLATES.values()}) == len(TEMPLATES)


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_template_gives_exact_masks_or_is_refused_for_its_reason(family):
    template = TEMPLATES[family]
    chat = stand_in_chat(template)
    messages = marker_conversation(template.system)
    tools = PLAIN_TOOLS.get(family)
    if template.refused:
        with pytest.raises(TemplateError, match=template.refused):
            chat(messages, tools)
        return
    masked = check_exact(chat, messages, tools, template.stop_tokens)
    assert [text.count(f"REPLYMARK{r}") for r, text in enumerate(masked, start=1)] == [1, 1, 1]


@pytest.mark.parametrize("family", sorted(f for f, t in TEMPLATES.items() if t.tools))
def test_tool_calls_are_trained_and_tool_results_are_not(family):
    template = TEMPLATES[family]
    chat = stand_in_chat(template)
    record = normalise_row(weather_row())
    if template.refused_tools:
        with pytest.raises(TemplateError, match=template.refused_tools):
            chat(record.messages, record.tools)
        return
    call, answer = check_exact(chat, record.messages, record.tools, template.stop_tokens)
    assert "get_weather" in call and "Paris" in call
    assert "21 degrees" in answer
    result = chat(record.messages, record.tools)
    context = chat.tokenizer.decode([t for t, m in zip(result.input_ids, result.assistant_mask, strict=True) if not m])
    assert "TOOLRESULTMARK" in context and TOOL_OUTPUT not in call + answer
