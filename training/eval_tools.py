"""`dialogrl eval score FILE` and `dialogrl eval validate-scorer`: the evaluator's verdict outside a played run.

Both take the eval recipe's `gate`, `responsiveness` and `bootstrap_samples` settings
(from `--config RECIPE` or the defaults, with key=value overrides), so a transcript
file is judged exactly as `dialogrl eval` would judge the same dialogues.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dialogrl.evaluation.run import build_scorer
from dialogrl.training.config import recipe_to_dict, save_recipe
from dialogrl.training.eval_stage import EvalRecipe, scorer_loader


def score_main(recipe: EvalRecipe, source: str, output_dir: str, log=print) -> dict[str, Any]:
    from dialogrl.data.sources import DataError
    from dialogrl.evaluation.transcript_eval import read_transcripts, score_transcripts

    if not Path(source).is_file():
        raise ValueError(f"{source}: no such file; give a JSONL file of transcripts (see `dialogrl eval score -h`)")
    try:  # read (and reject bad rows) before the scorer model loads
        transcripts, load_report = read_transcripts(source, output_dir, log=log)
    except DataError as err:
        raise ValueError(str(err)) from None
    save_recipe(recipe, output_dir)
    scorer = build_scorer(recipe.responsiveness, scorer_loader(recipe, recipe.model))
    config = {key: value for key, value in recipe_to_dict(recipe).items()
              if key in ("gate", "responsiveness", "bootstrap_samples")}
    config["scenarios"] = {"user_source": "transcript", "source": str(source)}
    return score_transcripts(transcripts, load_report, output_dir, config, recipe.gate, scorer,
                             seed=recipe.scenarios.seed, bootstrap_samples=recipe.bootstrap_samples)


def validate_main(recipe: EvalRecipe, dialogues: int, output_dir: str, log=print) -> dict[str, Any]:
    from dialogrl.data.corpora import load_chitchat
    from dialogrl.evaluation.scorer_validation import human_repeat_echo_rates, validate

    if not recipe.responsiveness.enabled:
        raise ValueError("responsiveness.enabled is false: there is no scorer to validate")
    scorer = build_scorer(recipe.responsiveness, scorer_loader(recipe, recipe.model))
    corpus = load_chitchat("eval")
    log(f"scoring {dialogues} human replies of the corpus eval split, true vs swapped, with "
        f"{recipe.responsiveness.scorer} ({recipe.responsiveness.context_messages} context messages, "
        f"{recipe.responsiveness.negatives} contrast contexts)")
    result = validate(scorer, corpus, n=dialogues, seed=recipe.responsiveness.seed)
    result["human_repeat_echo"] = human_repeat_echo_rates(corpus, (0.6, 0.7, 0.8, 0.9, 1.0))
    result["config"] = recipe_to_dict(recipe)["responsiveness"]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "validation.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
