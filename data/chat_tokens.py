"""Chat-template tokenisation with assistant masks, for any template.

This is the one tokeniser every stage uses. Given a tokenizer and a
conversation it returns `input_ids`, an `assistant_mask` (1 on every assistant
turn's content and its end-of-turn token, 0 on system, user and template
tokens) and a `turn_index` per token (0 for the system part, r for the tokens of
round r: the r-th user turn and the reply to it).

Why not TRL's `assistant_only_loss`: it needs `{% generation %}` tags in the
template and only swaps in a tagged copy for templates it ships byte for byte;
SmolLM2's ChatML is refused. Here the template is only *rendered*, never
parsed, so any template works, provided it keeps two promises that are checked
for every conversation:

1. History is stable: the text the model sees before assistant turn k inside
   the whole conversation starts with exactly what the template renders as the
   generation prompt for the first k messages. A template that rewrites earlier
   turns (e.g. drops old reasoning) breaks it, and is refused with a message,
   because a model trained on one context would be asked to act in another.
2. Each assistant turn ends with a special token (`<|im_end|>`, `<|eot_id|>`,
   `<end_of_turn>`...), so the model learns where to stop.

Text is tokenised piece by piece at the borders of assistant spans, so a mask
never splits a token and the prompt tokens equal those of the generation prompt
at inference.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass


class TemplateError(ValueError):
    """A chat template that cannot be used for per-turn masking, or a conversation it cannot render."""


@dataclass
class TokenizedConversation:
    """One conversation as token ids, all lists of the same length T.

    input_ids:      [T] token ids of the whole rendered conversation
    assistant_mask: [T] 1 where the token belongs to an assistant turn (content + end token)
    turn_index:     [T] 0 for system/preamble tokens, r for tokens of round r (user turn r and its reply)
    """

    input_ids: list[int]
    assistant_mask: list[int]
    turn_index: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    def assistant_spans(self) -> list[tuple[int, int]]:
        """[start, end) token ranges of each assistant turn, in order."""
        spans, start = [], None
        for i, bit in enumerate(self.assistant_mask + [0]):
            if bit and start is None:
                start = i
            elif not bit and start is not None:
                spans.append((start, i))
                start = None
        return spans


def special_token_strings(tokenizer) -> list[str]:
    """Every string the tokenizer treats as one special token, longest first."""
    strings = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False):
            strings.add(str(token.content))
    return sorted((s for s in strings if s), key=len, reverse=True)


def _render(tokenizer, messages: Sequence[dict[str, str]], *, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as err:  # jinja raise_exception(...) and template bugs surface as various types
        raise TemplateError(f"the chat template cannot render this conversation: {err}") from None


class ChatTokenizer:
    """Tokenises conversations with a tokenizer's own chat template; see the module docstring."""

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.special_tokens = special_token_strings(tokenizer)
        if not self.special_tokens:
            raise TemplateError("the tokenizer declares no special tokens, so no end-of-turn token can be found")
        self._end_pattern = re.compile(r"\s*(" + "|".join(re.escape(s) for s in self.special_tokens) + ")")

    # ---------------------------------------------------------------- spans in text

    def assistant_char_spans(self, messages: Sequence[dict[str, str]]) -> tuple[str, list[tuple[int, int]], list[int]]:
        """The rendered text, the [start, end) character span of every assistant turn, and message ends.

        `message_ends[i]` is the character offset where message i's share of the
        text ends (the next message's template text starts there).
        """
        text = _render(self.tokenizer, messages, generation_prompt=False)
        spans = []
        message_ends = []
        for k, message in enumerate(messages):
            if message["role"] == "assistant":
                spans.append(self._assistant_span(messages, k, text))
                message_ends.append(spans[-1][1])
            else:
                # Everything up to the end of this message's content belongs to it.
                message_ends.append(self._content_end(messages, k, text, message_ends[-1] if message_ends else 0))
        return text, spans, message_ends

    def _assistant_span(self, messages: Sequence[dict[str, str]], k: int, text: str) -> tuple[int, int]:
        start, _content_end, end = self.locate_reply(messages, k, text)
        return start, end

    def locate_reply(self, messages: Sequence[dict[str, str]], k: int, text: str) -> tuple[int, int, int]:
        """Where assistant message k sits in `text` (a rendering of messages that include it).

        Returns (content start, content end, end of its end-of-turn token) as
        character offsets. Rollouts use it to append only what follows a reply
        to a cached prefix.
        """
        prompt = _render(self.tokenizer, messages[:k], generation_prompt=True)
        if not text.startswith(prompt):
            where = _first_difference(prompt, text)
            raise TemplateError(
                f"the chat template renders turn {k} (assistant) in a context that differs from its generation "
                f"prompt (first difference at character {where}: prompt has {prompt[where:where + 40]!r}, "
                f"conversation has {text[where:where + 40]!r}). It rewrites earlier turns, so a model trained "
                "on whole conversations would see contexts it never sees when it generates. Train on one "
                "assistant turn per example, or use a template that keeps history unchanged."
            )
        content = messages[k]["content"].strip()
        # The content is the first occurrence after the generation prompt that is followed by a
        # special token; text the template inserts in between (an empty <think></think>) stays 0.
        start = text.find(content, len(prompt))
        found_content = start >= 0
        while start >= 0:
            end_token = self._end_pattern.match(text, start + len(content))
            if end_token:
                return start, start + len(content), end_token.end()
            start = text.find(content, start + 1)
        if not found_content:
            raise TemplateError(
                f"the chat template changes the content of assistant turn {k} beyond surrounding whitespace, "
                "so its tokens cannot be located"
            )
        raise TemplateError(
            f"assistant turn {k} is not followed by a special end-of-turn token in the rendered text, so a "
            "model trained on it would not learn where to stop; add the end token to the tokenizer's special tokens"
        )

    def _content_end(self, messages: Sequence[dict[str, str]], k: int, text: str, floor: int) -> int:
        content = messages[k]["content"].strip()
        position = text.find(content, floor)
        if position < 0:
            # Templates that fold the system prompt into the first user turn (Gemma) or drop it.
            return floor
        return position + len(content)

    # ---------------------------------------------------------------- tokens

    def __call__(self, messages: Sequence[dict[str, str]]) -> TokenizedConversation:
        return self.tokenize_many([messages])[0]

    def tokenize_many(self, conversations: Sequence[Sequence[dict[str, str]]]) -> list[TokenizedConversation]:
        """Tokenise a batch; the tokenizer is called once for all pieces of all conversations."""
        plans = []
        pieces: list[str] = []
        for messages in conversations:
            text, spans, message_ends = self.assistant_char_spans(messages)
            rounds = _rounds(messages)
            borders = sorted({0, len(text), *(b for span in spans for b in span)})
            assistant_starts = {start for start, _ in spans}
            segments = []
            for left, right in zip(borders, borders[1:], strict=False):
                segments.append((left, right, left in assistant_starts, len(pieces)))
                pieces.append(text[left:right])
            plans.append((segments, message_ends, rounds))
        if not pieces:
            return []
        try:
            encoded = self.tokenizer(pieces, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:  # slow tokenizers have no offsets: each piece takes the round it starts in
            encoded = self.tokenizer(pieces, add_special_tokens=False)
            encoded["offset_mapping"] = [[(0, 0)] * len(ids) for ids in encoded["input_ids"]]
        results = []
        for segments, message_ends, rounds in plans:
            ids, mask, turns = [], [], []
            for left, _right, is_assistant, piece in segments:
                piece_ids = encoded["input_ids"][piece]
                ids.extend(piece_ids)
                mask.extend([int(is_assistant)] * len(piece_ids))
                for char_start, _char_end in encoded["offset_mapping"][piece]:
                    turns.append(_round_at(left + char_start, message_ends, rounds))
            results.append(TokenizedConversation(ids, mask, turns))
        return results


def _rounds(messages: Sequence[dict[str, str]]) -> list[int]:
    rounds, current = [], 0
    for message in messages:
        if message["role"] == "user":
            current += 1
        rounds.append(0 if message["role"] == "system" else max(current, 1))
    return rounds


def _round_at(position: int, message_ends: list[int], rounds: list[int]) -> int:
    for end, round_number in zip(message_ends, rounds, strict=True):
        if position < end:
            return round_number
    return rounds[-1] if rounds else 0


def _first_difference(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
