"""Chat-template tokenisation with assistant masks, for any template.

This is the one tokeniser every stage uses. Given a tokenizer and a
conversation it returns `input_ids`, an `assistant_mask` and a `turn_index` per
token (0 for the system part, r for the tokens of round r: the r-th user turn,
the reply to it and any tool calls and results in between).

The mask covers, for every assistant turn, exactly what the model must produce
when it is asked to generate that turn: everything the template renders after
the generation prompt (leading whitespace, scaffolding such as an empty
`<think></think>`, gpt-oss's `<|channel|>final<|message|>` or Command-A's
`<|START_RESPONSE|>`, tool calls), up to and including the first *stop token*
after the reply. Tool results, user and system text stay 0.

Stop tokens are what generation stops on: the tokenizer's `eos_token` plus the
`eos_token_id` entries of the model's `generation_config.json`
(`generation_stop_tokens`), so a turn of Command-A ends at
`<|END_OF_TURN_TOKEN|>`, not at the `<|END_RESPONSE|>` before it.

Why not TRL's `assistant_only_loss`: it needs `{% generation %}` tags in the
template and only swaps in a tagged copy for templates it ships byte for byte;
SmolLM2's ChatML is refused. Here the template is only *rendered*, never
parsed, so any template works, provided it keeps two promises that are checked
for every conversation:

1. History is stable: the text before assistant turn k inside the whole
   conversation starts with exactly what the template renders as the
   generation prompt for the first k messages. A template that rewrites earlier
   turns (e.g. drops old reasoning) breaks it, and is refused with a message,
   because a model trained on one context would be asked to act in another.
2. Each assistant turn ends with a stop token, so the model learns to stop.

Tokens: the text between turns is tokenised the way the tokenizer tokenises
text after a special token (a turn always ends with one), and each reply the
way the whole text tokenises it after its generation prompt. So a mask never
splits a token, the prompt tokens equal those of the generation prompt at
inference, and SentencePiece tokenizers get no extra word-start marker at a
border (`[/INST]Hi` stays `[/INST]Hi`). One exception, kept on purpose: where
a reply starts with whitespace that would merge with the end of the generation
prompt into one token (`assistant\n` + `\nHi`), the reply's first token starts
where the prompt ends, as it does when the model generates it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Message = dict[str, Any]
Tools = list[dict[str, Any]] | None


class TemplateError(ValueError):
    """A chat template that cannot be used for per-turn masking, or a conversation it cannot render."""


@dataclass
class TokenizedConversation:
    """One conversation as token ids, all lists of the same length T.

    input_ids:      [T] token ids of the whole rendered conversation
    assistant_mask: [T] 1 where the token belongs to an assistant turn (what the model generates, to its stop token)
    turn_index:     [T] 0 for system/preamble tokens, r for tokens of round r (user turn r and what follows it)
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


def generation_stop_tokens(tokenizer, generation_config: Any = None) -> list[str]:
    """The strings generation stops on: the tokenizer's eos token and the generation config's eos ids."""
    ids = getattr(generation_config, "eos_token_id", None)
    ids = ids if isinstance(ids, list) else [ids]
    strings = [tokenizer.eos_token] + [tokenizer.convert_ids_to_tokens(i) for i in ids if i is not None]
    return list(dict.fromkeys(s for s in strings if s))


def _render(tokenizer, messages: Sequence[Message], tools: Tools, *, generation_prompt: bool) -> str:
    extra = {"tools": tools} if tools is not None else {}
    try:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt, **extra
        )
    except Exception as err:  # jinja raise_exception(...) and template bugs surface as various types
        raise TemplateError(f"the chat template cannot render this conversation: {err}") from None


def _text_of(message: Message) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


class ChatTokenizer:
    """Tokenises conversations with a tokenizer's own chat template; see the module docstring.

    `stop_tokens` default to `generation_stop_tokens(tokenizer)` (the eos token); pass the
    model's generation config through `generation_stop_tokens` to add its end-of-turn tokens.
    """

    def __init__(self, tokenizer, stop_tokens: Sequence[str] | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.special_tokens = special_token_strings(tokenizer)
        self.stop_tokens = list(stop_tokens) if stop_tokens else generation_stop_tokens(tokenizer)
        not_special = [s for s in self.stop_tokens if s not in self.special_tokens]
        if not self.stop_tokens or not_special:
            raise TemplateError(
                f"stop tokens {not_special or self.stop_tokens} are not special tokens of the tokenizer, so the end "
                "of a turn cannot be found; give the tokenizer an eos_token that ends an assistant turn"
            )
        self._stop_pattern = re.compile("|".join(re.escape(s) for s in sorted(self.stop_tokens, key=len, reverse=True)))
        self._special_pattern = re.compile("|".join(re.escape(s) for s in self.special_tokens))
        # Text after a special token is tokenised with one in front, so the tokenizer treats the
        # border as it does inside the whole text (SentencePiece adds no word-start marker there
        # unless it does so after every special token).
        self._anchor = self.stop_tokens[0]
        self._anchor_ids = tokenizer(self._anchor, add_special_tokens=False)["input_ids"]

    # ---------------------------------------------------------------- spans in text

    def assistant_char_spans(self, messages: Sequence[Message], tools: Tools = None
                             ) -> tuple[str, list[tuple[int, int]], list[int]]:
        """The rendered text, the [start, end) character span of every assistant turn, and message ends.

        `message_ends[i]` is the character offset where message i's share of the
        text ends (the next message's template text starts there).
        """
        text = _render(self.tokenizer, messages, tools, generation_prompt=False)
        spans = []
        message_ends = []
        for k, message in enumerate(messages):
            if message["role"] == "assistant":
                start, _content_end, end = self.locate_reply(messages, k, text, tools)
                spans.append((start, end))
                message_ends.append(end)
            else:
                floor = message_ends[-1] if message_ends else 0
                message_ends.append(self._content_end(message, text, floor))
        return text, spans, message_ends

    def message_end(self, messages: Sequence[Message], k: int, text: str, tools: Tools = None) -> int:
        """Where message k's share of `text` ends (as `assistant_char_spans` counts it); `text` renders
        `messages`, or a conversation that continues them."""
        if messages[k]["role"] == "assistant":
            return self.locate_reply(messages, k, text, tools)[2]
        floor = self.message_end(messages, k - 1, text, tools) if k > 0 else 0
        return self._content_end(messages[k], text, floor)

    def locate_reply(self, messages: Sequence[Message], k: int, text: str, tools: Tools = None
                     ) -> tuple[int, int, int]:
        """Where assistant message k sits in `text` (a rendering of messages that include it).

        Returns (start: the end of its generation prompt, content end, end of its stop
        token) as character offsets. Rollouts use it to append only what follows a
        reply to a cached prefix.
        """
        prompt = _render(self.tokenizer, messages[:k], tools, generation_prompt=True)
        if not text.startswith(prompt):
            where = _first_difference(prompt, text)
            raise TemplateError(
                f"the chat template renders turn {k} (assistant) in a context that differs from its generation "
                f"prompt (first difference at character {where}: prompt has {prompt[where:where + 40]!r}, "
                f"conversation has {text[where:where + 40]!r}). It rewrites earlier turns, so a model trained "
                "on whole conversations would see contexts it never sees when it generates. Train on one "
                "assistant turn per example, or use a template that keeps history unchanged."
            )
        start = len(prompt)
        content = _text_of(messages[k])
        # Templates trim or lstrip the content; the rest of it must be there as written.
        candidates = [c for c in dict.fromkeys((content, content.strip())) if c]
        found = min(((c, text.find(c, start)) for c in candidates if text.find(c, start) >= 0),
                    key=lambda hit: hit[1], default=None)
        if candidates and found is None:
            raise TemplateError(
                f"the chat template changes the content of assistant turn {k} beyond surrounding whitespace, "
                "so its tokens cannot be located"
            )
        after = found[1] + len(found[0]) if found else start
        stop = self._stop_pattern.search(text, after)
        if stop is None or self._later_content_before(messages, k, text[after:stop.start()]):
            raise TemplateError(
                f"assistant turn {k} is not followed by a stop token ({', '.join(self.stop_tokens)}) before the next "
                "message, so a model trained on it would not learn where to stop; name the token that ends a turn "
                "in the recipe (model.stop_tokens) or in the model's generation_config.json (eos_token_id)"
            )
        missing = [call["function"]["name"] for call in messages[k].get("tool_calls") or []
                   if call["function"]["name"] not in text[start:stop.start()]]
        if missing:
            raise TemplateError(
                f"the chat template does not render the tool call(s) {missing} of assistant turn {k}, so the model "
                "would be trained to answer with nothing; use a template that renders tool_calls"
            )
        content_end = text.rfind(found[0], start, stop.start()) + len(found[0]) if found else start
        return start, content_end, stop.end()

    def _later_content_before(self, messages: Sequence[Message], k: int, gap: str) -> bool:
        """Whether the next message's content lies between reply k and the stop token found for it.

        Special tokens are taken out of the gap first, so a user turn such as ">" does not match
        inside `<|END_RESPONSE|>`.
        """
        later = next((_text_of(m).strip() for m in messages[k + 1:] if _text_of(m).strip()), "")
        return bool(later) and later in self._special_pattern.sub("", gap)

    @staticmethod
    def _content_end(message: Message, text: str, floor: int) -> int:
        content = _text_of(message).strip()
        position = text.find(content, floor) if content else -1
        if position < 0:
            # Templates that fold the system prompt into the first user turn (Gemma) or drop it.
            return floor
        return position + len(content)

    # ---------------------------------------------------------------- tokens

    def __call__(self, messages: Sequence[Message], tools: Tools = None) -> TokenizedConversation:
        return self.tokenize_many([messages], [tools])[0]

    def tokenize_many(self, conversations: Sequence[Sequence[Message]], tools: Sequence[Tools] | None = None
                      ) -> list[TokenizedConversation]:
        """Tokenise a batch; the tokenizer is called once for all pieces of all conversations.

        `tools[i]` is the tool list conversation i's template renders (None for none).
        """
        tools = list(tools) if tools is not None else [None] * len(conversations)
        plans, pieces = [], []
        for messages, row_tools in zip(conversations, tools, strict=True):
            text, spans, message_ends = self.assistant_char_spans(messages, row_tools)
            # Alternating (context, reply) segments; every context after the first follows a stop token.
            borders = [0] + [b for span in spans for b in span] + [len(text)]
            segments = []
            for i, (left, right) in enumerate(zip(borders, borders[1:], strict=False)):
                if i % 2 == 0:
                    segments.append(("context", left, right, self._add(pieces, text[left:right], left > 0)))
                else:
                    context_left = borders[i - 1]
                    combined = self._add(pieces, text[context_left:right], context_left > 0)
                    segments.append(("reply", left, right, (combined, text[left:right])))
            plans.append((segments, message_ends, _rounds(messages)))
        encoded = self._encode(pieces)
        return [self._assemble(segments, encoded, message_ends, rounds) for segments, message_ends, rounds in plans]

    def _add(self, pieces: list[str], piece: str, after_special: bool) -> tuple[int, int]:
        """Queue a piece for the batch; returns (its index, characters of anchor put in front)."""
        pieces.append(self._anchor + piece if after_special else piece)
        return len(pieces) - 1, len(self._anchor) if after_special else 0

    def _encode(self, pieces: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        if not pieces:
            return []
        try:
            encoded = self.tokenizer(pieces, add_special_tokens=False, return_offsets_mapping=True)
            offsets = encoded["offset_mapping"]
        except NotImplementedError:  # slow tokenizers have no offsets: each piece takes the round it starts in
            encoded = self.tokenizer(pieces, add_special_tokens=False)
            offsets = [[(0, 0)] * len(ids) for ids in encoded["input_ids"]]
        return list(zip(encoded["input_ids"], offsets, strict=True))

    def _tokens(self, encoded, entry: tuple[int, int]) -> tuple[list[int], list[int]]:
        """Ids and character starts (relative to the piece) of a queued piece, its anchor removed."""
        index, anchor_chars = entry
        ids, offsets = encoded[index]
        if anchor_chars:
            if ids[:len(self._anchor_ids)] != self._anchor_ids:
                raise TemplateError(f"the tokenizer does not keep the special token {self._anchor!r} whole")
            ids, offsets = ids[len(self._anchor_ids):], offsets[len(self._anchor_ids):]
        return list(ids), [max(0, start - anchor_chars) for start, _end in offsets]

    def _assemble(self, segments, encoded, message_ends, rounds) -> TokenizedConversation:
        ids: list[int] = []
        mask: list[int] = []
        starts: list[int] = []
        context_ids: list[int] = []
        context_left = 0
        for kind, left, _right, entry in segments:
            if kind == "context":
                piece_ids, piece_starts = self._tokens(encoded, entry)
                piece_starts = [left + s for s in piece_starts]
                context_ids, context_left = piece_ids, left
            else:
                combined_ids, combined_starts = self._tokens(encoded, entry[0])
                if combined_ids[:len(context_ids)] == context_ids:
                    piece_ids = combined_ids[len(context_ids):]
                    piece_starts = [context_left + s for s in combined_starts[len(context_ids):]]
                else:  # a token of the whole text would straddle the border: split it there, as generation does
                    piece_ids, piece_starts = self._tokens(self._encode([self._anchor + entry[1]]), (0, len(self._anchor)))
                    piece_starts = [left + s for s in piece_starts]
            ids.extend(piece_ids)
            mask.extend([int(kind == "reply")] * len(piece_ids))
            starts.extend(piece_starts)
        turns = [_round_at(s, message_ends, rounds) for s in starts]
        return TokenizedConversation(ids, mask, turns)


def _rounds(messages: Sequence[Message]) -> list[int]:
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
