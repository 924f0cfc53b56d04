"""`dialogrl chat`: a multi-turn conversation with any checkpoint, in its own chat template.

User lines come from the recipe's `script` or from standard input (one line per
turn, so it works piped); the whole history goes back into the template every
turn, so each reply is generated with all earlier exchanges in context.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from dialogrl.data.options import option
from dialogrl.evaluation.sampling import SamplingConfig
from dialogrl.training.config import register_recipe, save_recipe
from dialogrl.training.models import ModelConfig, load_causal_lm, load_tokenizer, resolve_model


@register_recipe("chat")
@dataclass
class ChatRecipe:
    model: ModelConfig = option(default_factory=ModelConfig, help="The model to talk to.")
    sampling: SamplingConfig = option(default_factory=SamplingConfig, help="How replies are decoded.")
    system_prompt: str | None = option(None, help="System message placed before the first user turn; null for none.")
    script: list[str] = option(
        default_factory=list, help="User turns to play in order; when empty, user lines are read from standard input."
    )
    output_dir: str | None = option(
        None, help="If set, the transcript (transcript.jsonl) and the resolved recipe (config.yaml) are written here."
    )


@dataclass
class ChatSession:
    """A conversation that keeps its history; `reply` adds one exchange."""

    model: object
    tokenizer: object
    sampling: SamplingConfig
    messages: list[dict[str, str]] = field(default_factory=list)
    last_prompt_ids: list[int] = field(default_factory=list)

    @classmethod
    def start(cls, model, tokenizer, sampling: SamplingConfig, system_prompt: str | None = None) -> ChatSession:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return cls(model=model, tokenizer=tokenizer, sampling=sampling, messages=messages)

    def reply(self, user_text: str) -> str:
        import torch

        self.messages.append({"role": "user", "content": user_text})
        encoded = self.tokenizer.apply_chat_template(
            self.messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        encoded = {k: v.to(self.model.device) for k, v in encoded.items()}
        self.last_prompt_ids = encoded["input_ids"][0].tolist()
        torch.manual_seed(self.sampling.seed + len(self.messages))
        with torch.inference_mode():
            output = self.model.generate(**encoded, **self.sampling.generate_kwargs(self.tokenizer, self.model))
        new_tokens = output[0, encoded["input_ids"].shape[1] :]
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": text})
        return text


def user_lines(recipe: ChatRecipe, stdin: TextIO):
    if recipe.script:
        yield from recipe.script
        return
    interactive = stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = stdin.readline()
        if not line:
            return
        line = line.rstrip("\n")
        if line.strip():
            yield line


def main(recipe: ChatRecipe, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> ChatSession:
    resolved = resolve_model(recipe.model.name_or_path, revision=recipe.model.revision)
    tokenizer = load_tokenizer(recipe.model, resolved)
    model = load_causal_lm(recipe.model, resolved).eval()
    session = ChatSession.start(model, tokenizer, recipe.sampling, recipe.system_prompt)
    print(f"model: {recipe.model.name_or_path} ({resolved.location})", file=sys.stderr)
    if recipe.system_prompt:
        print(f"system: {recipe.system_prompt}", file=stdout)
    for text in user_lines(recipe, stdin):
        if recipe.script or not stdin.isatty():
            print(f"user: {text}", file=stdout)
        print(f"assistant: {session.reply(text)}", file=stdout, flush=True)
    if recipe.output_dir:
        out = Path(recipe.output_dir)
        save_recipe(recipe, out)
        with (out / "transcript.jsonl").open("w") as handle:
            handle.write(json.dumps({"messages": session.messages}, ensure_ascii=False) + "\n")
        print(f"transcript: {out / 'transcript.jsonl'}", file=sys.stderr)
    return session
