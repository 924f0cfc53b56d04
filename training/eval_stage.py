"""`dialogrl eval --config RECIPE --model M [--model M2 ...] --output-dir DIR`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dialogrl.data.options import option
from dialogrl.evaluation.evaluate import EvalConfig
from dialogrl.evaluation.run import Candidate, parse_candidate, run_eval
from dialogrl.training import output_lock
from dialogrl.training.config import recipe_to_dict, register_recipe, save_recipe
from dialogrl.training.models import ModelConfig, load_causal_lm, load_tokenizer, resolve_model
from dialogrl.training.run_lifecycle import StageError


@register_recipe("eval")
@dataclass
class EvalRecipe(EvalConfig):
    models: list[str] = option(
        default_factory=lambda: ["packaged:smollm2-135m-instruct"],
        help="Models to compare: a reference, optionally with @repeat_rules or @split_softmax "
        "(e.g. packaged:smollm2-135m-instruct@split_softmax). --model on the command line replaces this list.",
    )
    model: ModelConfig = option(
        default_factory=ModelConfig, help="Loading options (dtype, attention, trust_remote_code) for every model; "
        "its name_or_path is ignored in favour of `models`."
    )
    output_dir: str = option("outputs/eval", help="Where report.json, report.md, the plots and dialogues.jsonl go.")


def candidates(recipe: EvalRecipe) -> list[Candidate]:
    out = []
    for entry in recipe.models:
        reference, intervention = parse_candidate(entry)
        resolved = resolve_model(reference, revision=recipe.model.revision)  # fail early, before any model loads
        options = ModelConfig(**{**vars(recipe.model), "name_or_path": reference})
        # Split-softmax rewrites attention weights, so it needs a kernel that computes them (eager).
        if intervention == "split_softmax":
            options.attn_implementation = "eager"

        def load(options=options, resolved=resolved):
            return load_causal_lm(options, resolved).eval(), load_tokenizer(options, resolved)

        out.append(Candidate(entry, reference, intervention, load))
    return out


def scorer_loader(config: EvalConfig, loading: ModelConfig):
    """Loads the fixed responsiveness scorer named by `responsiveness.scorer` (resolved now, so a bad
    reference fails before any model plays); None when responsiveness is off."""
    if not config.responsiveness.enabled:
        return None
    reference = config.responsiveness.scorer
    resolved = resolve_model(reference, revision=loading.revision)
    options = ModelConfig(**{**vars(loading), "name_or_path": reference, "attn_implementation": "sdpa"})

    def load():
        return load_causal_lm(options, resolved).eval(), load_tokenizer(options, resolved)

    return load


def main(recipe: EvalRecipe, log=print) -> dict:
    try:
        output_lock.acquire(Path(recipe.output_dir))  # two evals into one directory would mix their reports
    except output_lock.OutputDirInUse as err:
        raise StageError(str(err)) from None
    save_recipe(recipe, recipe.output_dir)
    report = run_eval(recipe, candidates(recipe), recipe.output_dir, recipe_to_dict(recipe), log=log,
                      load_scorer=scorer_loader(recipe, recipe.model))
    output_lock.release(Path(recipe.output_dir))
    return report
