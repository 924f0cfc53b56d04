"""`dialogrl data build --config RECIPE`: build the training sets (see dialogrl.data.build)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dialogrl.data.build import CACHE_DIR, CachedReplies, DataBuildConfig, build_all
from dialogrl.data.fingerprint import fingerprint, new_output_id, write_fingerprint
from dialogrl.data.on_policy import Verdict
from dialogrl.data.options import option
from dialogrl.evaluation.gate import GateConfig
from dialogrl.evaluation.responsiveness import ResponsivenessConfig
from dialogrl.evaluation.sampling import SamplingConfig
from dialogrl.training import output_lock
from dialogrl.training.config import recipe_to_dict, register_recipe, save_recipe
from dialogrl.training.models import ModelConfig, load_causal_lm, load_tokenizer, resolve_model
from dialogrl.training.run_lifecycle import StageError


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
    gate: GateConfig = option(default_factory=GateConfig, help="The quality gate policy samples must pass "
                              "(sft.reply_source: policy); the evaluator's defaults.")
    responsiveness: ResponsivenessConfig = option(
        default_factory=ResponsivenessConfig, help="The responsiveness part of the gate for policy samples; the "
        "evaluator's defaults and scorer.")


def _verdict(turn: dict) -> Verdict:
    broken = tuple(c["type_name"] for c in turn["checks"] if not c["strict"])
    passed = turn["gate_pass"] if turn["adherent"] is None else turn["adherent"]
    reason = None if passed else (turn["gate_reason"] if not turn["gate_pass"] else "rules")
    return Verdict(passed, turn["gate_pass"], broken, reason, turn["responsiveness"])


def _policy_sampling(recipe: DataRecipe, resolved, tokenizer):
    """The sampler (the rollout engine, cached on disk) and the evaluator's verdict, for rejection sampling."""
    from dialogrl.evaluation.rollout import RolloutEngine
    from dialogrl.evaluation.run import build_scorer
    from dialogrl.evaluation.verdicts import judge_replies
    from dialogrl.training.eval_stage import scorer_loader

    model = load_causal_lm(recipe.model, resolved).eval()
    # The model's identity, not only its name: a retrained checkpoint at the same path writes other replies.
    resolved_recipe = recipe_to_dict(recipe)
    model_key = fingerprint({"model": resolved_recipe["model"], "sampling": resolved_recipe["sampling"]}).digest
    engine = RolloutEngine(model, tokenizer, recipe.sampling, batch_size=recipe.generation_batch_size)
    sample = CachedReplies(engine.reply, Path(recipe.output_dir) / CACHE_DIR / "policy_samples.jsonl", model_key)
    scorer = build_scorer(recipe.responsiveness, scorer_loader(recipe, recipe.model))

    def judge(candidates):
        # The scorer costs a forward pass per panel context for every reply; a reply that already breaks a rule
        # or fails the rest of the gate fails whatever it scores, so only the others are scored.
        turns = judge_replies(candidates, recipe.gate, None)
        if scorer is not None:
            open_ = [i for i, turn in enumerate(turns) if _verdict(turn).passed]
            for i, turn in zip(open_, judge_replies([candidates[i] for i in open_], recipe.gate, scorer),
                               strict=True):
                turns[i] = turn
        return [_verdict(turn) for turn in turns]

    return sample, judge


def main(recipe: DataRecipe, log=print) -> dict:
    """Build the sets. A build into a directory that holds another one replaces it whole (the manifest goes
    last); the manifest records the recipe's fingerprint and a new output id, which later stages' fingerprints
    name."""
    try:
        output_lock.acquire(Path(recipe.output_dir))
    except output_lock.OutputDirInUse as err:
        raise StageError(str(err)) from None
    current = fingerprint(recipe_to_dict(recipe))
    resolved = resolve_model(recipe.model.name_or_path, revision=recipe.model.revision)
    tokenizer = load_tokenizer(recipe.model, resolved)
    sample = judge = None
    if recipe.sft.reply_source == "policy":
        sample, judge = _policy_sampling(recipe, resolved, tokenizer)
    save_recipe(recipe, recipe.output_dir)
    write_fingerprint(Path(recipe.output_dir), current)
    record = {"fingerprint": current.digest, "output_id": new_output_id()}
    manifest = build_all(recipe, tokenizer=tokenizer, sample=sample, judge=judge, log=log, record=record)
    if isinstance(sample, CachedReplies):
        manifest["policy_reply_cache"] = {"hits": sample.hits, "generated": sample.misses}
        path = Path(recipe.output_dir) / "manifest.json"
        path.with_suffix(".tmp").write_text(json.dumps(manifest, indent=2) + "\n")
        path.with_suffix(".tmp").replace(path)
    output_lock.release(Path(recipe.output_dir))
    return manifest
