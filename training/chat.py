"""`dialogrl chat`: a multi-turn conversation with any checkpoint, in its own chat template.

User lines come from the recipe's `script` or from standard input (one line per
turn, so it works piped). Replies come from the rollout engine, one round per
line: each is generated with all earlier exchanges in context, and only the new
turn is run through the model (the cache of the rest is kept).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from dialogrl.data.options import option
from dialogrl.evaluation.rollout import ChatTurns, RolloutEngine
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
    """A conversation that keeps its history; `reply` adds one exchange. Replies come from the generation
    engine the evaluator and PPO use, one round per exchange, with the cache kept between them."""

    model: object
    tokenizer: object
    sampling: SamplingConfig
    turns: ChatTurns

    @classmethod
    def start(cls, model, tokenizer, sampling: SamplingConfig, system_prompt: str | None = None) -> ChatSession:
        engine = RolloutEngine(model, tokenizer, sampling, batch_size=1)
        return cls(model=model, tokenizer=tokenizer, sampling=sampling, turns=engine.open_chat(system_prompt))

    @property
    def messages(self) -> list[dict[str, str]]:
        return self.turns.messages

    @property
    def last_prompt_ids(self) -> list[int]:
        return self.turns.prompt_ids()

    def reply(self, user_text: str) -> str:
        import torch

        torch.manual_seed(self.sampling.seed + len(self.messages))
        return self.turns.say(user_text)


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
