"""Batched one-turn reply generation with Hugging Face `generate` (policy replies, simulated users).

Conversations are rendered with the model's own template (generation prompt
on), left-padded into one batch, and decoded up to the end-of-turn token.
"""

from __future__ import annotations

from collections.abc import Callable

from dialogrl.evaluation.sampling import SamplingConfig


def reply_generator(model, tokenizer, sampling: SamplingConfig, *, batch_size: int = 8) -> Callable[
        [list[list[dict[str, str]]]], list[str]]:
    import torch

    def generate(conversations: list[list[dict[str, str]]]) -> list[str]:
        replies: list[str] = []
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start: start + batch_size]
            texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chunk]
            encoded = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left",
                                return_tensors="pt").to(model.device)
            # Seeded on a forked RNG: the same conversations get the same replies, and the caller's own
            # sampling stream (a policy being evaluated or trained alongside a simulated user) is left as it was.
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=devices), torch.inference_mode():
                torch.manual_seed(sampling.seed + start)
                output = model.generate(**encoded, **sampling.generate_kwargs(tokenizer, model))
            new_tokens = output[:, encoded["input_ids"].shape[1]:]
            replies += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        return replies

    return generate
