"""`dialogrl data build --config RECIPE`: build the training sets (see dialogrl.data.build)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dialogrl.data.build import CachedReplies, DataBuildConfig, build_all
from dialogrl.data.options import option
from dialogrl.evaluation.sampling import SamplingConfig
from dialogrl.training.config import dump_recipe, register_recipe, save_recipe
from dialogrl.training.models import ModelConfig, load_causal_lm, load_tokenizer, resolve_model


@register_recipe("data")
@dataclass
class DataRecipe(DataBuildConfig):
    model: ModelConfig = option(
        default_factory=ModelConfig,
        help="Model whose chat template measures token lengths, and which writes the replies when "
        "sft.reply_source is policy.",
    )
    sampling: SamplingConfig = option(
        default_factory=lambda: SamplingConfig(max_new_tokens=96, temperature=0.7),
        help="Decoding of policy replies (sft.reply_source: policy).",
    )
    generation_batch_size: int = option(16, help="Conversations per generate call for policy replies.")


def main(recipe: DataRecipe, log=print) -> dict:
    resolved = resolve_model(recipe.model.name_or_path, revision=recipe.model.revision)
    tokenizer = load_tokenizer(recipe.model, resolved)
    reply_fn = None
    if recipe.sft.reply_source == "policy":
        from dialogrl.evaluation.generation import reply_generator

        model = load_causal_lm(recipe.model, resolved).eval()
        model_key = json.dumps({"model": recipe.model.name_or_path, "sampling": dump_recipe(recipe.sampling)})
        reply_fn = CachedReplies(
            reply_generator(model, tokenizer, recipe.sampling, batch_size=recipe.generation_batch_size),
            Path(recipe.output_dir) / "cache" / "policy_replies.jsonl",
            model_key,
        )
    save_recipe(recipe, recipe.output_dir)
    manifest = build_all(recipe, tokenizer=tokenizer, reply_fn=reply_fn, log=log)
    if isinstance(reply_fn, CachedReplies):
        manifest["policy_reply_cache"] = {"hits": reply_fn.hits, "generated": reply_fn.misses}
        (Path(recipe.output_dir) / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
