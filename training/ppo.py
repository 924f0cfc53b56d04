"""`dialogrl ppo --config RECIPE`: PPO with multi-turn rollouts, a user that answers, and turn-level credit."""

from __future__ import annotations

import json
from pathlib import Path

from dialogrl.evaluation.evaluate import dialogue_specs
from dialogrl.evaluation.scenarios import Scenario, ScenarioConfig, build_scenarios
from dialogrl.training.config import dump_recipe
from dialogrl.training.launch_backend import engage_launch_backend, unsharded_loading
from dialogrl.training.ppo_config import PPORecipe
from dialogrl.training.ppo_trainer import (
    STATE_FILENAME,
    ActorCritic,
    PPOTrainer,
    enable_activation_checkpointing,
    summarise_history,
)
from dialogrl.training.run_lifecycle import (
    Run,
    distributed_backend,
    run_summary,
    start_run,
    write_run_outputs,
)
from dialogrl.training.trainer_setup import (
    adapter_on_whole_base,
    fit_to_tokenizer,
    holds_shards,
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
    from dialogrl.evaluation.rollout import RolloutEngine
    from dialogrl.evaluation.sampling import SamplingConfig

    base = reference if reference is not None else policy
    # `reply` seeds on a forked RNG, so the policy's own sampling stream is left alone.
    generate = RolloutEngine(base, tokenizer, SamplingConfig(max_new_tokens=48, temperature=0.8,
                                                             seed=recipe.episodes.seed), batch_size=1).reply

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
        with unsharded_loading():  # never trained, so never handed to DeepSpeed: each process holds it whole
            reference = fit_to_tokenizer(load_causal_lm(recipe.model, resolved), tokenizer, added_pad)
        reference = reference.eval().requires_grad_(False)

    def scorer_config(path: str) -> ModelConfig:
        return ModelConfig(name_or_path=path, dtype=recipe.model.dtype,
                           attn_implementation=recipe.model.attn_implementation)

    reward_model = reward_chat = None
    if recipe.reward.model and recipe.reward.rm_weight:
        # The reward model reads the dialogue with its own tokenizer and template: it may differ from the policy's.
        reward_tokenizer, reward_chat, rm_resolved, rm_added = load_training_tokenizer(scorer_config(recipe.reward.model))
        with unsharded_loading():
            reward_model = load_scorer(scorer_config(recipe.reward.model), rm_resolved, trained_head=True)
        reward_model = fit_to_tokenizer(reward_model, reward_tokenizer, rm_added).eval().requires_grad_(False)
    critic = None
    if recipe.ppo.uses_critic:
        critic_source = recipe.critic_from or recipe.reward.model or recipe.model.name_or_path
        critic = load_scorer(scorer_config(critic_source), seed=recipe.ppo.seed)
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


def configure_deepspeed(accelerator, recipe: PPORecipe) -> None:
    """Under DeepSpeed, what the engine needs to step as PPO does: one optimizer step per minibatch
    (`accelerator.backward` runs the engine's backward and step, so no accumulation inside it), gradients
    clipped at `ppo.max_grad_norm` (the engine clips, on one norm over every trained parameter: policy and
    critic together), and a micro-batch size, which `prepare` demands when it is given no dataloader (PPO's
    batches come from its rollouts; the engine uses the number for its bookkeeping only)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    config = plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = 1
    config["gradient_accumulation_steps"] = 1
    config["gradient_clipping"] = recipe.ppo.max_grad_norm


def build(recipe: PPORecipe, *, rule_score_fn: RuleScoreFn | None = None, log=print) -> tuple[PPOTrainer, Run]:
    """The trainer and its run (output directory checked, resume target found, config.yaml saved);
    `rule_score_fn` replaces the gated rule score (tests)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    run = start_run(recipe, "ppo", STATE_FILENAME)
    trackers = [t for t in run.report_to if t != "none"]
    flags = precision_flags(recipe.precision)
    cpu = engage_launch_backend()
    accelerator = Accelerator(cpu=cpu, log_with=trackers or None, project_dir=str(run.output_dir),
                              mixed_precision="bf16" if flags["bf16"] else "no")
    set_seed(recipe.ppo.seed)
    policy, reference, critic, reward_model, reward_chat, tokenizer = load_models(recipe)
    if recipe.ppo.gradient_checkpointing:
        for model in (policy, critic):
            if model is not None:
                enable_activation_checkpointing(model)
    actor_critic = ActorCritic(policy, critic)
    groups = [
        {"name": "policy", "params": [p for p in policy.parameters() if p.requires_grad], "lr": recipe.ppo.learning_rate},
    ]
    if critic is not None:
        groups.append({"name": "critic", "params": list(critic.parameters()), "lr": recipe.ppo.critic_learning_rate})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    configure_deepspeed(accelerator, recipe)
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
    return trainer, run


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


def train(trainer: PPOTrainer, run: Run, log=print) -> dict:
    recipe = trainer.recipe
    accelerator = trainer.accelerator
    if run.resume_from:
        trainer.load_checkpoint(run.resume_from)
        log(f"resumed from {run.resume_from} at update {trainer.update_index}")
    metrics_path = run.output_dir / METRICS_FILENAME
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
            trainer.save_checkpoint(run.output_dir, recipe.ppo.save_total_limit)
    summary = finish(trainer, run)
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


def finish(trainer: PPOTrainer, run: Run) -> dict:
    """The final policy, then (main process) the run outputs every stage writes, and the curves."""
    recipe = trainer.recipe
    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()
    history = summarise_history(trainer.history)
    summary = run_summary(run, global_step=trainer.update_index, max_steps=recipe.ppo.updates,
                          backend=distributed_backend(accelerator, trainer.model),
                          world_size=accelerator.num_processes, tokens_seen=history.pop("tokens_seen", None),
                          train_seconds=history.pop("train_seconds", None), metrics=history,
                          data=episodes_summary(recipe, trainer))
    # Every process takes part: ZeRO-3 and FSDP gather the whole weights here (the main process receives them).
    weights = accelerator.get_state_dict(trainer.model)
    if accelerator.is_main_process:
        policy = trainer.unwrapped.policy
        policy.save_pretrained(str(run.output_dir), state_dict={
            name.removeprefix("policy."): tensor for name, tensor in weights.items() if name.startswith("policy.")})
        if recipe.lora.enabled and recipe.lora.merge and holds_shards(policy):
            policy = adapter_on_whole_base(run, policy, trainer.tokenizer)
        write_run_outputs(run, summary, model=policy, tokenizer=trainer.tokenizer,
                          description=describe_run(recipe, summary), data_section=data_section(summary["data"]),
                          extra_card=first_and_last_table(trainer.history))
        plot_curves(trainer.history, run.output_dir / "ppo_curves.png")
    # The other ranks wait for the main process's writes: a rank that tears its gloo group down while its
    # peer is still busy can abort ("terminate called without an active exception") and fail the launch.
    accelerator.wait_for_everyone()
    return summary


def episodes_summary(recipe: PPORecipe, trainer: PPOTrainer) -> dict:
    """What the run trained on: the episodes it played (`data` of run_summary.json)."""
    e, o = recipe.episodes, recipe.ppo
    return {"episodes": int(sum(h.get("rollout/episodes", 0) for h in trainer.history)), "rounds": e.rounds,
            "user_source": e.user_source, "scenario_split": "train", "constraints": [e.min_constraints, e.max_constraints],
            "user_rule_fraction": e.user_rule_fraction, "episodes_per_update": o.episodes_per_update,
            "group_size": None if o.uses_critic else o.group_size}


def describe_run(recipe: PPORecipe, summary: dict) -> str:
    o, r = recipe.ppo, recipe.reward
    group = "" if o.uses_critic else f" (group size {o.group_size}, baseline {o.group_baseline})"
    responsiveness = r.responsiveness_weight if recipe.responsiveness.enabled else 0
    reward_model = f"reward model {r.model} x {r.rm_weight}, " if r.model and r.rm_weight else ""
    m = summary["metrics"]
    return (f"A step is one PPO update: rollouts, then {o.epochs} epoch(s) of minibatches; advantages "
            f"`{o.advantage}`{group}, KL in the {'loss' if o.kl_in_loss else 'reward'} (beta {o.kl_beta}). Turn "
            f"score: {reward_model}gated rule score x {r.rule_weight}, responsiveness x {responsiveness}. "
            f"{m.get('seconds_per_update', 0):.1f} s per update, "
            f"{100 * (m.get('generation_share') or 0):.0f}% of it generating. Curves: `ppo_curves.png`; every "
            f"update: `{METRICS_FILENAME}`.")


def data_section(data: dict) -> str:
    group = f", {data['group_size']} copies or siblings per group" if data["group_size"] else ""
    return (f"{data['episodes']} episodes of up to {data['rounds']} rounds ({data['user_source']} user turns), "
            f"{data['episodes_per_update']} per update and process{group}; scenarios from the catalogue's "
            f"{data['scenario_split']} split, {data['constraints'][0]}-{data['constraints'][1]} rules each, "
            f"a share {data['user_rule_fraction']} of them stated by the user.")


def first_and_last_table(history: list[dict]) -> str:
    if not history:
        return ""
    first, last = history[0], history[-1]
    rows = "\n".join(f"| {k} | {first[k]:.4g} | {last[k]:.4g} |" for k in sorted(first)
                     if k in last and not k.startswith("time/") and isinstance(first[k], (int, float)))
    return f"""
## First and last update
| metric | first update | last update |
|---|---|---|
{rows}
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
    trainer, run = build(recipe, log=log)
    return train(trainer, run, log=log)
