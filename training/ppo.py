"""`dialogrl ppo --config RECIPE`: PPO with multi-turn rollouts, a user that answers, and turn-level credit."""

from __future__ import annotations

import json
import time
from pathlib import Path

from dialogrl.evaluation.evaluate import dialogue_specs
from dialogrl.evaluation.scenarios import Scenario, ScenarioConfig, build_scenarios
from dialogrl.training.config import dump_recipe, save_recipe
from dialogrl.training.ppo_config import PPORecipe
from dialogrl.training.ppo_trainer import STATE_FILENAME, ActorCritic, PPOTrainer, summarise_history
from dialogrl.training.stage_config import LoraOptions
from dialogrl.training.tracking import setup_tracking
from dialogrl.training.trainer_setup import (
    MERGED_DIRNAME,
    SUMMARY_FILENAME,
    find_resume_checkpoint,
    fit_to_tokenizer,
    load_training_tokenizer,
    lora_config,
    precision_flags,
)
from dialogrl.training.turn_scores import RuleScoreFn, TurnScorer

METRICS_FILENAME = "metrics.jsonl"


def episode_source(recipe: PPORecipe):
    """(update, process, processes) -> that process's scenarios: one fixed list, cut the same way on every run.

    The group modes play each scenario group_size times (or branching group_size ways), so a
    process gets episodes_per_update / group_size of them.
    """
    e, o = recipe.episodes, recipe.ppo
    per_process = o.episodes_per_update if o.uses_critic else o.episodes_per_update // o.group_size
    cache: dict[int, list[Scenario]] = {}

    def episodes(update: int, process: int, processes: int) -> list[Scenario]:
        per_update = per_process * processes
        if processes not in cache:
            config = ScenarioConfig(
                dialogues=per_update * o.updates, rounds=e.rounds, seed=e.seed, user_source=e.user_source,
                unseen_fraction=0.0, min_constraints=e.min_constraints, max_constraints=e.max_constraints,
                user_rule_fraction=e.user_rule_fraction, max_intro_round=e.max_intro_round, pressure=dict(e.pressure))
            cache[processes] = build_scenarios(config, split="train")
        start = update * per_update + process * per_process
        return cache[processes][start: start + per_process]

    return episodes


def _simulated_user(recipe: PPORecipe, policy, reference, tokenizer):
    """The base model plays the user (the frozen reference, or the LoRA policy with its adapter off)."""
    if recipe.episodes.user_source != "simulated":
        return None
    from dialogrl.evaluation.generation import reply_generator
    from dialogrl.evaluation.sampling import SamplingConfig

    base = reference if reference is not None else policy
    # reply_generator seeds on a forked RNG, so the policy's own sampling stream is left alone.
    generate = reply_generator(base, tokenizer, SamplingConfig(max_new_tokens=48, temperature=0.8,
                                                               seed=recipe.episodes.seed), batch_size=1)

    if reference is not None:
        return generate

    def generate_without_adapter(conversations):
        with policy.disable_adapter():
            return generate(conversations)

    return generate_without_adapter


def load_models(recipe: PPORecipe):
    """Policy (+ LoRA), reference, critic (gae only, else None), reward model and the tokenizers."""
    import torch

    from dialogrl.training.models import ModelConfig, load_causal_lm, load_scorer

    tokenizer, _chat, resolved, added_pad = load_training_tokenizer(recipe.model)
    policy = fit_to_tokenizer(load_causal_lm(recipe.model, resolved), tokenizer, added_pad)
    reference = None
    if recipe.lora.enabled:
        from peft import get_peft_model

        policy = get_peft_model(policy, lora_config(recipe.lora, "CAUSAL_LM"))
    else:
        reference = fit_to_tokenizer(load_causal_lm(recipe.model, resolved), tokenizer, added_pad)
        reference = reference.eval().requires_grad_(False)

    def scorer_config(path: str) -> ModelConfig:
        return ModelConfig(name_or_path=path, dtype=recipe.model.dtype,
                           attn_implementation=recipe.model.attn_implementation)

    reward_model = reward_chat = None
    if recipe.reward.model and recipe.reward.rm_weight:
        # The reward model reads the dialogue with its own tokenizer and template: it may differ from the policy's.
        reward_tokenizer, reward_chat, rm_resolved, rm_added = load_training_tokenizer(scorer_config(recipe.reward.model))
        reward_model = fit_to_tokenizer(load_scorer(scorer_config(recipe.reward.model), rm_resolved),
                                        reward_tokenizer, rm_added).eval().requires_grad_(False)
    critic = None
    if recipe.ppo.uses_critic:
        critic_source = recipe.critic_from or recipe.reward.model or recipe.model.name_or_path
        critic = load_scorer(scorer_config(critic_source))
        if critic.get_input_embeddings().num_embeddings < len(tokenizer):
            critic.resize_token_embeddings(len(tokenizer))
        critic.config.pad_token_id = tokenizer.pad_token_id
        if recipe.critic_from is None and not recipe.reward.model:
            torch.nn.init.zeros_(critic.score.weight)  # a fresh head predicts 0 rather than noise
    return policy, reference, critic, reward_model, reward_chat, tokenizer


def responsiveness_scorer(recipe: PPORecipe):
    """The evaluator's fixed scorer, when `responsiveness.enabled`; it scores every reply of every rollout."""
    if not recipe.responsiveness.enabled:
        return None
    from dialogrl.evaluation.run import build_scorer
    from dialogrl.training.eval_stage import scorer_loader

    return build_scorer(recipe.responsiveness, scorer_loader(recipe, recipe.model))


def build(recipe: PPORecipe, *, rule_score_fn: RuleScoreFn | None = None, log=print
          ) -> tuple[PPOTrainer, str | None]:
    """The trainer and the checkpoint to resume from; `rule_score_fn` replaces the gated rule score (tests)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    output_dir = Path(recipe.output_dir)
    resume_from = find_resume_checkpoint(output_dir, recipe.resume, STATE_FILENAME)
    trackers = [t for t in setup_tracking(recipe.tracking, output_dir) if t != "none"]
    flags = precision_flags(recipe.precision)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=trackers or None,
                              project_dir=str(output_dir), mixed_precision="bf16" if flags["bf16"] else "no")
    set_seed(recipe.ppo.seed)
    if accelerator.is_main_process:
        save_recipe(recipe, output_dir)
    policy, reference, critic, reward_model, reward_chat, tokenizer = load_models(recipe)
    actor_critic = ActorCritic(policy, critic)
    groups = [
        {"name": "policy", "params": [p for p in policy.parameters() if p.requires_grad], "lr": recipe.ppo.learning_rate},
    ]
    if critic is not None:
        groups.append({"name": "critic", "params": list(critic.parameters()), "lr": recipe.ppo.critic_learning_rate})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    # One prepare call for everything that trains: DDP, FSDP and DeepSpeed all wrap one module and one optimizer.
    actor_critic, optimizer = accelerator.prepare(actor_critic, optimizer)
    device = accelerator.device
    if reference is not None:
        reference.to(device)
    if reward_model is not None:
        reward_model.to(device)
    unwrapped = accelerator.unwrap_model(actor_critic)
    simulated = _simulated_user(recipe, unwrapped.policy, reference, tokenizer)
    turn_scorer = TurnScorer(recipe, reward_model=reward_model, reward_chat=reward_chat,
                             responsiveness_scorer=responsiveness_scorer(recipe), rule_score=rule_score_fn,
                             batch_size=recipe.ppo.generation_batch_size)
    trainer = PPOTrainer(
        recipe, accelerator, actor_critic, optimizer, tokenizer, reference=reference, turn_scorer=turn_scorer,
        episode_source=episode_source(recipe), spec_builder=lambda scenarios: dialogue_specs(scenarios, "none", simulated),
        log=log,
    )
    if trackers:
        accelerator.init_trackers(recipe.tracking.project, config={"recipe": dump_recipe(recipe)})
    return trainer, resume_from


def format_stats(stats: dict) -> str:
    parts = [f"update {stats['update']}: score {stats['reward/score']:.3f} (rm {stats['reward/rm']:.2f} "
             f"rule {stats['reward/rule']:.2f} resp {stats['reward/responsiveness']:.2f} "
             f"cut {stats['reward/cut_share']:.2f}"]
    if "reward/gate_pass" in stats:
        parts.append(f" gate {stats['reward/gate_pass']:.2f}")
    parts.append(f") kl {stats['kl/episode']:.3f} beta {stats['kl/beta']:.3f} ratio {stats['policy/ratio']:.3f} "
                 f"clipfrac {stats['policy/clipfrac']:.3f}")
    if "loss/value" in stats:
        parts.append(f" vloss {stats['loss/value']:.3f} ev {stats['value/explained_variance']:.2f}")
    parts.append(f" entropy {stats['policy/entropy']:.2f} len {stats['rollout/response_len']:.1f} "
                 f"ended {stats['rollout/ended_properly']:.2f} | rollout {stats['time/rollout']:.1f}s "
                 f"update {stats['time/update']:.1f}s")
    return "".join(parts)


def train(trainer: PPOTrainer, resume_from: str | None, log=print) -> dict:
    recipe = trainer.recipe
    output_dir = Path(recipe.output_dir)
    accelerator = trainer.accelerator
    started = time.perf_counter()
    if resume_from:
        trainer.load_checkpoint(resume_from)
        log(f"resumed from {resume_from} at update {trainer.update_index}")
    metrics_path = output_dir / METRICS_FILENAME
    if accelerator.is_main_process:
        _drop_replayed_metrics(metrics_path, trainer.update_index)
    while trainer.update_index < recipe.ppo.updates:
        stats = trainer.step()
        if accelerator.is_main_process:
            with metrics_path.open("a") as handle:
                handle.write(json.dumps(stats) + "\n")
            log(format_stats(stats))
        accelerator.log(stats, step=trainer.update_index)
        if trainer.update_index % recipe.ppo.save_every == 0 and trainer.update_index < recipe.ppo.updates:
            trainer.save_checkpoint(output_dir, recipe.ppo.save_total_limit)
    summary = finish(trainer, resume_from, time.perf_counter() - started)
    accelerator.end_training()  # last: it also destroys the process group, which finish() still needs
    return summary


def _drop_replayed_metrics(path: Path, last_update: int) -> None:
    """Keep the metrics lines of updates up to `last_update` only: later ones come from a run that stopped
    after its last checkpoint, and this run is about to write them again (one line per update)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["update"] <= last_update:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short when the run was killed
    path.write_text("".join(kept))


def finish(trainer: PPOTrainer, resume_from: str | None, seconds: float) -> dict:
    recipe = trainer.recipe
    output_dir = Path(recipe.output_dir)
    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()
    policy = trainer.unwrapped.policy
    summary = {"stage": "ppo", "status": "complete", "base_model": recipe.model.name_or_path,
               "global_step": trainer.update_index, "max_steps": recipe.ppo.updates, "resumed_from": resume_from,
               "world_size": accelerator.num_processes, "seconds": round(seconds, 1),
               "metrics": summarise_history(trainer.history)}
    if accelerator.is_main_process:
        policy.save_pretrained(str(output_dir))
        trainer.tokenizer.save_pretrained(str(output_dir))
        if recipe.lora.enabled and recipe.lora.merge:
            merged = policy.merge_and_unload()
            merged.save_pretrained(str(output_dir / MERGED_DIRNAME))
            trainer.tokenizer.save_pretrained(str(output_dir / MERGED_DIRNAME))
            save_recipe(recipe, output_dir / MERGED_DIRNAME)
            summary["merged_dir"] = str(output_dir / MERGED_DIRNAME)
        (output_dir / SUMMARY_FILENAME).write_text(json.dumps(summary, indent=2) + "\n")
        (output_dir / "README.md").write_text(model_card(recipe, summary))
        plot_curves(trainer.history, output_dir / "ppo_curves.png")
    return summary


def model_card(recipe: PPORecipe, summary: dict) -> str:
    m = summary["metrics"]
    rows = "\n".join(f"| {k} | {m['first'][k]:.4g} | {m['last'][k]:.4g} |" for k in m.get("first", {})
                     if m["first"][k] is not None and m["last"][k] is not None)
    lora: LoraOptions = recipe.lora
    group = "" if recipe.ppo.uses_critic else f" (group size {recipe.ppo.group_size})"
    responsiveness = recipe.reward.responsiveness_weight if recipe.responsiveness.enabled else 0
    return f"""---
base_model: {recipe.model.name_or_path}
library_name: transformers
tags: [dialogrl, ppo]
---
# {Path(recipe.output_dir).name}

`dialogrl ppo` from **{recipe.model.name_or_path}** ({"LoRA adapter" if lora.enabled else "full weights"}):
{summary['global_step']} updates of {recipe.ppo.episodes_per_update} episodes x {summary['world_size']} process(es),
{recipe.episodes.rounds} rounds each ({recipe.episodes.user_source} user), advantages `{recipe.ppo.advantage}`{group},
reward model {recipe.reward.model} (weight {recipe.reward.rm_weight}), rule weight {recipe.reward.rule_weight},
responsiveness weight {responsiveness}.
{summary['seconds']:.0f} s in all, {m.get('seconds_per_update', 0):.1f} s per update,
{100 * (m.get('generation_share') or 0):.0f}% of it generating. Curves: `ppo_curves.png`; every update: `metrics.jsonl`.

| metric | first update | last update |
|---|---|---|
{rows}

## Recipe
```yaml
{dump_recipe(recipe)}```
"""


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    updates = [h["update"] for h in history]
    panels = [("reward/score", "mean turn score (raw)"), ("reward/rule", "gated rule score"),
              ("kl/episode", "KL to reference per episode"), ("value/explained_variance", "critic explained variance"),
              ("rollout/response_len", "reply tokens")]
    panels = [(key, title) for key, title in panels if key in history[0]]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for axis, (key, title) in zip(axes, panels, strict=True):
        axis.plot(updates, [h[key] for h in history], marker=".")
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("update")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(recipe: PPORecipe, log=print) -> dict:
    trainer, resume_from = build(recipe, log=log)
    return train(trainer, resume_from, log=log)
