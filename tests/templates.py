"""Real chat templates (TRL ships them as .jinja files) on a stand-in tokenizer.

The real tokenizers of Llama 3, Gemma, Qwen... cannot be downloaded here, so
each template is paired with the tiny BPE tokenizer plus the template's own
special tokens. The masking code only renders templates and tokenises text, so
this exercises exactly what it does with the real ones.
"""

from __future__ import annotations

from pathlib import Path

import trl
from tiny_model import CHATML_TEMPLATE, build_tokenizer

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"

# name -> (special tokens, bos, end-of-turn/eos, supports a system message)
TEMPLATES: dict[str, tuple[list[str], str | None, str, bool]] = {
    "smollm2": (["<|im_start|>", "<|im_end|>"], None, "<|im_end|>", True),
    "llama3": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", True),
    "llama3_1": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                  "<|python_tag|>"], "<|begin_of_text|>", "<|eot_id|>", True),
    "gemma": (["<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<end_of_turn>", False),
    "gemma3": (["<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<end_of_turn>", True),
    "phi3": (["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"], None, "<|endoftext|>", True),
    "cohere": (["<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>",
                "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>"], "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", True),
    "qwen2_5": (["<|im_start|>", "<|im_end|>", "<|endoftext|>"], None, "<|im_end|>", True),
    "qwen3": (["<|im_start|>", "<|im_end|>", "<|endoftext|>"], None, "<|im_end|>", True),
    "qwen3_instruct_2507": (["<|im_start|>", "<|im_end|>", "<|endoftext|>"], None, "<|im_end|>", True),
    "lfm2": (["<|startoftext|>", "<|im_start|>", "<|im_end|>"], "<|startoftext|>", "<|im_end|>", True),
    # Refused, each for its own reason (see tests): a generation prompt that differs
    # from stored turns, and assistant turns with no end token.
    "deepseekv3": (["<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"],
                   "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", True),
    "glm4moe": (["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>"], None,
                "<|endoftext|>", True),
}
WORKING = [name for name in TEMPLATES if name not in ("deepseekv3", "glm4moe")]

_BASE = None


def stand_in_tokenizer(name: str):
    import copy

    global _BASE
    if _BASE is None:
        _BASE = build_tokenizer()
    specials, bos, eos, _system = TEMPLATES[name]
    tokenizer = copy.deepcopy(_BASE)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    if bos:
        tokenizer.bos_token = bos
    tokenizer.eos_token = eos
    tokenizer.chat_template = CHATML_TEMPLATE if name == "smollm2" else (TRL_TEMPLATES / f"{name}.jinja").read_text()
    return tokenizer
