"""Sampling settings shared by every place that generates replies (chat, rollouts, evaluation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dialogrl.data.options import option


@dataclass
class SamplingConfig:
    max_new_tokens: int = option(128, minimum=1, help="Longest reply, in tokens; a reply cut here has no end-of-turn token.")
    temperature: float = option(0.0, help="0 decodes greedily (deterministic); above 0 samples at this temperature.")
    top_p: float = option(1.0, help="Nucleus sampling mass (1.0 = off); used only when temperature > 0.")
    top_k: int = option(0, help="Keep only the k most likely tokens (0 = off); used only when temperature > 0.")
    repetition_penalty: float = option(1.0, help="Penalty on tokens already in the context (1.0 = off).")
    seed: int = option(0, help="Seed for sampling, so a run with temperature > 0 can be repeated.")

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    def generate_kwargs(self, tokenizer, model=None) -> dict[str, Any]:
        """Keyword arguments for `model.generate`.

        Decoding stops at any end token the tokenizer or the model's generation
        config names (Llama 3 has two: end of turn and end of text).
        """
        stop_ids = [tokenizer.eos_token_id]
        model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        stop_ids += model_eos if isinstance(model_eos, list) else [model_eos]
        stop_ids = list(dict.fromkeys(i for i in stop_ids if i is not None))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "pad_token_id": pad,
            "eos_token_id": stop_ids,
        }
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs
