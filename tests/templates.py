"""Real chat templates on a stand-in tokenizer.

The real tokenizers of Llama 3, Gemma, Qwen... cannot be downloaded here, so
each template is paired with the tiny BPE tokenizer plus the template's own
special tokens and the model's stop tokens (its eos token and the eos ids of
its generation config). The masking code only renders templates and tokenises
text, so this exercises exactly what it does with the real ones.

Two sets: the templates TRL ships (`chat_templates/*.jinja` inside the
installed trl), and `tests/data/chat_templates/`: templates copied byte for
byte from public repositories, each with its source in `manifest.json`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import trl
from tiny_model import CHATML_TEMPLATE, build_tokenizer

from dialogrl.data.chat_tokens import ChatTokenizer

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
CORPUS = Path(__file__).parent / "data" / "chat_templates"


@dataclass(frozen=True)
class Template:
    family: str
    text: str
    special_tokens: list[str]
    bos: str | None
    stop_tokens: list[str]  # eos first
    system: bool = True  # renders a system message
    tools: bool = False  # renders tools=, tool_calls and tool messages
    source: str = ""
    model: str = ""
    tokenizer_style: str = "bpe"  # the real tokenizer's kind: "bpe" (byte-level) or "sentencepiece"
    refused: str | None = None  # why ChatTokenizer refuses it (a phrase of its error), None when it must work
    refused_tools: str | None = None  # the same for a dialogue with tool calls
    refusal_reason: str = ""  # what the template does that makes it unusable, in words
    notes: str = ""


def _trl(family, specials, bos, stops, system=True, refused=None) -> Template:
    text = CHATML_TEMPLATE if family == "smollm2" else (TRL_TEMPLATES / f"{family}.jinja").read_text()
    source = "tests/tiny_model.py" if family == "smollm2" else f"trl/chat_templates/{family}.jinja"
    return Template(family, text, specials, bos, stops, system, source=source, refused=refused)


_LLAMA3 = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"]
_QWEN = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
TRL_SET: dict[str, Template] = {t.family: t for t in [
    _trl("smollm2", ["<|im_start|>", "<|im_end|>"], None, ["<|im_end|>"]),
    _trl("llama3", _LLAMA3, "<|begin_of_text|>", ["<|eot_id|>", "<|end_of_text|>"]),
    _trl("llama3_1", _LLAMA3 + ["<|eom_id|>", "<|python_tag|>"], "<|begin_of_text|>",
         ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"]),
    _trl("gemma", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", ["<end_of_turn>", "<eos>"],
         system=False),
    _trl("gemma3", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", ["<end_of_turn>", "<eos>"]),
    _trl("phi3", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"], None,
         ["<|endoftext|>", "<|end|>"]),
    _trl("cohere", ["<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>",
                    "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>"], "<BOS_TOKEN>", ["<|END_OF_TURN_TOKEN|>"]),
    _trl("qwen2_5", _QWEN, None, ["<|im_end|>", "<|endoftext|>"]),
    _trl("qwen3", _QWEN, None, ["<|im_end|>", "<|endoftext|>"]),
    _trl("qwen3_instruct_2507", _QWEN, None, ["<|im_end|>", "<|endoftext|>"]),
    _trl("lfm2", ["<|startoftext|>", "<|im_start|>", "<|im_end|>"], "<|startoftext|>", ["<|im_end|>"]),
    # Refused, each for its own reason: a generation prompt that differs from the stored
    # turns, and assistant turns that no stop token ends.
    _trl("deepseekv3", ["<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"],
         "<｜begin▁of▁sentence｜>", ["<｜end▁of▁sentence｜>"], refused="rewrites earlier turns"),
    _trl("glm4moe", ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>"], None,
         ["<|endoftext|>"], refused="not followed by a stop token"),
]}
# Kept for the tests written against the TRL set.
TEMPLATES = {name: (t.special_tokens, t.bos, t.stop_tokens, t.system) for name, t in TRL_SET.items()}
WORKING = [name for name, t in TRL_SET.items() if t.refused is None]


def corpus() -> dict[str, Template]:
    """The templates of tests/data/chat_templates, by family."""
    manifest = CORPUS / "manifest.json"
    if not manifest.exists():
        return {}
    out = {}
    for entry in json.loads(manifest.read_text()):
        known = {k: entry[k] for k in ("special_tokens", "bos", "stop_tokens", "system", "tools", "source", "model",
                                       "tokenizer_style", "refused", "refused_tools", "refusal_reason", "notes")
                 if k in entry}
        out[entry["family"]] = Template(entry["family"], (CORPUS / f"{entry['family']}.jinja").read_text(), **known)
    return out


_BASE = None


def stand_in(template: Template):
    """The tiny BPE tokenizer given this template, its special tokens, bos and eos."""
    global _BASE
    if _BASE is None:
        _BASE = build_tokenizer()
    tokenizer = copy.deepcopy(_BASE)
    specials = list(dict.fromkeys(template.special_tokens + template.stop_tokens + ([template.bos] if template.bos else [])))
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    if template.bos:
        tokenizer.bos_token = template.bos
    tokenizer.eos_token = template.stop_tokens[0]
    tokenizer.chat_template = template.text
    return tokenizer


def stand_in_tokenizer(name: str):
    return stand_in(TRL_SET[name])


def stand_in_chat(template: Template) -> ChatTokenizer:
    return ChatTokenizer(stand_in(template), stop_tokens=template.stop_tokens)


def expected_reply_texts(tokenizer, messages, stop_tokens, tools=None) -> list[str]:
    """The text each assistant turn must be trained on, from renderings alone (independent of ChatTokenizer).

    Turn k's text starts where the template's generation prompt for messages[:k] ends
    and runs to the end of the first stop token after the reply's content.
    """
    extra = {"tools": tools} if tools is not None else {}
    text = tokenizer.apply_chat_template(messages, tokenize=False, **extra)
    out = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True, **extra)
        assert text.startswith(prompt), f"turn {k}: the conversation does not start with its generation prompt"
        content = (message.get("content") or "").strip()
        after = text.index(content, len(prompt)) + len(content) if content else len(prompt)
        ends = [text.index(s, after) + len(s) for s in stop_tokens if s in text[after:]]
        out.append(text[len(prompt):min(ends)])
    return out


def span_texts(tokenizer, input_ids, spans) -> list[str]:
    """The text of each token span as it reads inside the whole sequence.

    Decoding a slice alone would drop a SentencePiece word-start space at its start,
    so each span's text is the decoded prefix up to its end minus the prefix up to its start.
    """
    return [tokenizer.decode(input_ids[:b])[len(tokenizer.decode(input_ids[:a])):] for a, b in spans]
