"""The ppo stage on the tiny model: step-0 sanity, token layout, learning, 1 vs 2 processes, resume, users, errors."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dialogrl.training import ppo, ppo_math, turn_scores
from dialogrl.training.config import load_recipe
from dialogrl.training.ppo_config import PPORecipe
from dialogrl.training.run_lifecycle import SUMMARY_FILENAME

REPO_ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "dialogrl.training.cli"]
# Keys of metrics.jsonl that are wall-clock times: never reproducible.
UNREPRODUCIBLE = ("time/",)


def silent(*_args) -> None:
    pass


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The tiny model's matrices are a few KB: one thread is fastest, and on a busy 2-core machine a
    2-thread pool makes every op wait for a core (a PPO update then takes ~100x longer)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def ppo_overrides(tiny_model_dir: Path, output_dir: Path) -> list[str]:
    """Rule reward only (no reward model), 4 episodes of 2 rounds, short sampled replies."""
    return [
        f"model.name_or_path={tiny_model_dir}", f"output_dir={output_dir}", "tracking.report_to=none",
        "reward.rm_weight=0", "reward.rule_weight=1", "episodes.rounds=2", "sampling.max_new_tokens=8",
        "sampling.temperature=1.0", "ppo.episodes_per_update=4", "ppo.minibatch_episodes=2",
        "ppo.generation_batch_size=8",
    ]


def ppo_recipe(tiny_model_dir: Path, output_dir: Path, *overrides: str) -> PPORecipe:
    return load_recipe(None, [*ppo_overrides(tiny_model_dir, output_dir), *overrides], expected=PPORecipe)


def each_reply(score):
    """A rule-score function of the trainer's shape from a score of one reply (no gate: the tiny model's
    replies are random tokens, which the gate's known-words check would zero)."""
    return lambda scenario, messages: [score(m["content"]) for m in messages if m["role"] == "assistant"]


@each_reply
def words_score(reply: str) -> float:
    """A rule score that differs between replies (the random model's replies have 1-8 words)."""
    return len(reply.split()) / 8


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / ppo.METRICS_FILENAME).read_text().splitlines()]


def reproducible(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if not k.startswith(UNREPRODUCIBLE)}


def stage_file(tmp_path: Path) -> Path:
    path = tmp_path / "ppo.yaml"
    path.write_text("stage: ppo\n")
    return path


def cli_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


# --------------------------------------------------------------------------- the rule score


def test_rule_score_is_zero_for_repeats_and_echoes_of_a_compliant_reply():
    """The default rule score judges replies in their dialogue: keeping "no commas" by repeating an earlier
    reply or echoing the user earns nothing; a new compliant answer earns 1, a new reply with a comma 0."""
    import random

    from dialogrl.data import constraints as catalogue
    from dialogrl.evaluation.scenarios import Scenario

    no_commas = catalogue.make_constraint("no_commas", random.Random(0), split="eval")
    scenario = Scenario("d#0", ["-"] * 5, [no_commas], [1], unseen=False)
    turns = [
        ("what is your favourite food", "I really love pizza with lots of cheese on top"),
        ("and what do you do for work", "I really love pizza with lots of cheese on top!"),  # near repeat
        ("do you have any pets at home", "do you have any pets at home"),  # echo
        ("where do you live these days", "I live in a small town near the sea"),
        ("do you like it there", "Yes, it is quiet and the people are kind"),  # a comma
    ]
    messages = [{"role": "system", "content": scenario.system_prompt()}]
    for user, reply in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]

    assert turn_scores.rule_scores(scenario, messages) == [1.0, 0.0, 0.0, 1.0, 0.0]


def test_turn_score_counts_rules_only_for_responsive_replies_and_adds_the_responsiveness_term():
    """With the responsiveness scorer on, the gate needs `responsive` too: a compliant reply the (fake) scorer
    finds unresponsive (PMI 0 < threshold 1.51) earns no rule score and responsiveness term 0; a compliant,
    responsive one (PMI 3.0, saturating at the threshold) earns 1 + 0.5 x 1; an anti-responsive one with a
    comma (PMI -5) earns 0 + 0.5 x -1 (the term is clipped at -1). Each part is summed unweighted."""
    import random
    from types import SimpleNamespace

    from dialogrl.data import constraints as catalogue
    from dialogrl.evaluation.responsiveness import ResponsivenessConfig
    from dialogrl.evaluation.rollout import Trajectory
    from dialogrl.evaluation.scenarios import Scenario

    class FakeScorer:
        config = ResponsivenessConfig()

        def score(self, items):
            return [{"pizza": 3.0, "sea": 0.0}.get(reply.split()[-1], -5.0) for _context, reply in items]

    no_commas = catalogue.make_constraint("no_commas", random.Random(0), split="eval")
    scenario = Scenario("d#0", ["-"] * 3, [no_commas], [1], unseen=False)
    messages = [{"role": "system", "content": scenario.system_prompt()}]
    for user, reply in [("what food do you like", "I really love a good pizza"),
                        ("where do you live", "I live in a small town near the sea"),
                        ("do you like it", "Yes, it is quiet and kind")]:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    recipe = SimpleNamespace(reward=SimpleNamespace(rm_weight=0.0, rule_weight=1.0, responsiveness_weight=0.5,
                                                    cut_penalty=1.0), episodes=SimpleNamespace(rounds=3))
    scorer = turn_scores.TurnScorer(recipe, responsiveness_scorer=FakeScorer())
    played = Trajectory("d#0", messages, ended_properly=[True, True, False], generated_tokens=[6, 8, 7])
    scored = scorer([played], [scenario])
    assert scored.scores.tolist() == [[1.5, 0.0, -1.5]]  # the third reply was also cut: -1
    assert scored.parts == {"rm": 0.0, "rule": 1.0, "responsiveness": 0.0, "gate_pass": 1.0, "judged": 3.0,
                            "cut": 1.0, "turns": 3.0}
    last = scorer([played], [scenario], last_turn_only=True)
    assert math.isnan(last.scores[0, 0]) and math.isnan(last.scores[0, 1]) and last.scores[0, 2] == -1.5


# --------------------------------------------------------------------------- step 0


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "reference-copy"])
def test_step_zero_kl_is_zero_and_the_first_ratio_is_one(tiny_model_dir, tmp_path, lora):
    """Before any update the policy is the reference: KL 0 on every generated token (exactly 0 with LoRA,
    whose B matrices start at zero); old log-probs come from a plain forward pass, so the first minibatch
    has ratio 1 and clips nothing."""
    extra = ["lora.enabled=true", "lora.r=4"] if lora else []
    # Temperature 0.7: sampling, old, reference and training log-probs must all divide the logits by it.
    trainer, run = ppo.build(ppo_recipe(tiny_model_dir, tmp_path / "out", "ppo.learning_rate=1e-2",
                                                "sampling.temperature=0.7", *extra),
                                     rule_score_fn=words_score, log=silent)
    assert run.resume_from is None
    assert (trainer.reference is None) == lora  # LoRA: no second copy; otherwise a frozen copy
    trainer.unwrapped.eval()  # as step() does: no dropout (LoRA has some) while measuring ratios
    rollout = trainer.rollout()
    stats = trainer.prepare_batch(rollout) | trainer.kl_stats(rollout)
    mask = rollout.action_mask
    assert int(mask.sum()) == sum(sum(t.generated_tokens) for t in rollout.trajectories) > 0
    sampled = torch.zeros_like(rollout.old_logprobs)  # the engine's log-probs of the sampled tokens, aligned
    for b, trajectory in enumerate(rollout.trajectories):
        sampled[b, : len(trajectory.logprobs) - 1] = torch.tensor(trajectory.logprobs[1:])
    assert torch.allclose(rollout.old_logprobs[mask], sampled[mask], atol=1e-4)  # same distribution as sampled
    if lora:
        assert torch.equal(rollout.old_logprobs[mask], rollout.ref_logprobs[mask])
        assert bool((rollout.kl[mask] == 0).all()) and stats["kl/episode"] == 0.0
    else:
        assert float(rollout.kl[mask].abs().max()) <= 1e-6
        assert stats["kl/episode"] == pytest.approx(0.0, abs=1e-6)
    assert float(rollout.advantages[mask].abs().sum()) > 0  # the scores differ: there is a gradient to follow

    first = trainer._minibatch_step(rollout, torch.tensor([0, 1]), 1)
    assert first["policy/ratio"] == pytest.approx(1.0, abs=1e-6)
    assert first["policy/clipfrac"] == 0.0
    assert first["policy/approx_kl"] == pytest.approx(0.0, abs=1e-6)
    # The step really moved the policy, so the same minibatch now sees a ratio away from 1.
    second = trainer._minibatch_step(rollout, torch.tensor([0, 1]), 1)
    assert second["policy/approx_kl"] > 1e-5


# --------------------------------------------------------------------------- layout


def test_rollout_layout_agrees_with_the_trajectories(tiny_model_dir, tmp_path):
    """action_mask, turn_ids and turn_end describe exactly the generated tokens of each turn; turn rewards land
    on each turn's last generated token; template, system and user tokens are never actions."""
    rounds, max_new = 3, 20
    trainer, _ = ppo.build(ppo_recipe(tiny_model_dir, tmp_path / "out", f"episodes.rounds={rounds}",
                                      f"sampling.max_new_tokens={max_new}", "ppo.episodes_per_update=6",
                                      "ppo.minibatch_episodes=3"), rule_score_fn=words_score, log=silent)
    tokenizer = trainer.tokenizer
    eos = tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(eos) == "<|im_end|>" and tokenizer.pad_token_id != eos

    def favour_end_of_turn(module, inputs, logits):
        # The random tiny model almost never ends a reply by itself; with this bias about half the replies
        # end within the limit and the rest are cut, so both kinds of turn end are in the batch.
        logits = logits.clone()
        logits[..., eos] += 5.0
        return logits

    trainer.unwrapped.policy.get_output_embeddings().register_forward_hook(favour_end_of_turn)
    rollout = trainer.rollout()
    ids, mask, turn_ids, turn_end = rollout.input_ids, rollout.action_mask, rollout.turn_ids, rollout.turn_end
    batch, length = ids.shape
    ended = [e for t in rollout.trajectories for e in t.ended_properly]
    assert len(ended) == batch * rounds and any(ended) and not all(ended)

    assert mask.shape == turn_ids.shape == (batch, length - 1) and turn_end.shape == (batch, rounds)
    assert torch.equal(mask, turn_ids >= 0)  # a generated target belongs to one turn; nothing else to any
    assert bool((turn_ids < rounds).all()) and bool((turn_ids >= -1).all())
    assert not bool(mask[rollout.attention_mask[:, 1:] == 0].any())  # padding is never an action

    scores = torch.arange(1.0, batch * rounds + 1).view(batch, rounds)  # distinct, so each can be traced
    placed = ppo_math.place_turn_rewards(scores, turn_ids)
    assert float(placed.sum()) == float(scores.sum())

    for b, trajectory in enumerate(rollout.trajectories):
        n = len(trajectory.token_ids)
        assert ids[b, :n].tolist() == trajectory.token_ids and int(rollout.attention_mask[b].sum()) == n
        replies = [m["content"] for m in trajectory.messages if m["role"] == "assistant"]
        users = [m["content"] for m in trajectory.messages if m["role"] == "user"]
        assert len(replies) == len(users) == rounds
        expected_placed = torch.zeros(length - 1)
        for k, reply in enumerate(replies):
            positions = (turn_ids[b] == k).nonzero().flatten()
            assert len(positions) == trajectory.generated_tokens[k] > 0
            assert torch.equal(positions, torch.arange(int(positions[0]), int(positions[-1]) + 1))  # one span
            assert tokenizer.decode(ids[b, positions + 1], skip_special_tokens=True).strip() == reply
            end = int(turn_end[b, k])
            assert end - 1 == int(positions[-1]) and bool(mask[b, end - 1])
            expected_placed[end - 1] = scores[b, k]
            if trajectory.ended_properly[k]:
                assert int(ids[b, end]) == eos
            else:
                assert int(ids[b, end]) != eos and trajectory.generated_tokens[k] == max_new
        assert torch.equal(placed[b], expected_placed)  # nothing placed anywhere else

        # The non-generated stretches: the system turn and first user turn, then each later user turn, exactly
        # as the ChatML template writes them (with the template's end token after a reply that was cut).
        generated = torch.cat([torch.zeros(1, dtype=torch.bool), mask[b]])[:n]
        stretches: list[list[int]] = []
        for position in range(n):
            if not generated[position]:
                if position == 0 or generated[position - 1]:
                    stretches.append([])
                stretches[-1].append(int(ids[b, position]))
        assert len(stretches) == rounds
        first_user = next(i for i, m in enumerate(trajectory.messages) if m["role"] == "user")
        assert tokenizer.decode(stretches[0]) == tokenizer.apply_chat_template(
            trajectory.messages[: first_user + 1], tokenize=False, add_generation_prompt=True)
        for k in range(1, rounds):
            closing = "" if trajectory.ended_properly[k - 1] else "<|im_end|>"
            assert tokenizer.decode(stretches[k]) == (
                f"{closing}\n<|im_start|>user\n{users[k]}<|im_end|>\n<|im_start|>assistant\n")


# --------------------------------------------------------------------------- learning


@each_reply
def t_words_share(reply: str) -> float:
    """The toy rule: the share of the reply's words that begin with "t" (about 1 in 10 for the random model).

    A rule on one given word ("ends with X") is too sparse for the tiny model, which spreads its
    probability over ~1000 tokens: no single word comes up more than once in a few hundred samples.
    """
    words = reply.split()
    return sum(word[0].lower() == "t" for word in words) / len(words) if words else 0.0


@pytest.mark.parametrize("advantage", ["gae", "episode_group", "turn_group"])
def test_rule_reward_rises_while_kl_stays_bounded(tiny_model_dir, tmp_path, advantage):
    """24 updates of 32 two-token replies: the mean rule score of the last 5 updates beats the first 5 by more
    than 0.2 (measured, seeds 0-5, gae: 0.07-0.12 -> 0.32-0.97), and the KL to the reference stays below 20 nats
    per episode (measured maximum 5-14). The group modes play 8 scenarios x G = 4 (one round, so turn_group's
    siblings are episode_group's episodes, through the branching engine)."""
    updates, seed = 24, 0
    recipe = ppo_recipe(
        tiny_model_dir, tmp_path / "out", f"ppo.updates={updates}", "episodes.rounds=1", "sampling.max_new_tokens=2",
        "ppo.episodes_per_update=32", "ppo.minibatch_episodes=16", "ppo.generation_batch_size=32",
        "ppo.learning_rate=1.5e-3", "ppo.critic_learning_rate=1e-3", "reward.cut_penalty=0",
        f"ppo.seed={seed}", f"sampling.seed={seed}", f"episodes.seed={seed}", f"ppo.advantage={advantage}",
        "ppo.group_size=4")
    trainer, _ = ppo.build(recipe, rule_score_fn=t_words_share, log=silent)
    history = [trainer.step() for _ in range(updates)]  # train() would also write checkpoints: not needed here
    scores = [h["reward/score"] for h in history]  # no reward model and no cut penalty: the mean rule score
    kls = [h["kl/episode"] for h in history]
    first, last = statistics.mean(scores[:5]), statistics.mean(scores[-5:])
    assert last > first + 0.2, scores
    assert all(math.isfinite(k) for k in kls) and max(kls) < 20.0, kls
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and kls[-1] > 0.1  # the policy did move away from the reference


# --------------------------------------------------------------------------- processes


def save_reward_model(tiny_model_dir: Path, directory: Path) -> Path:
    """The tiny backbone with a seeded random scalar head: untrained, but its scores differ between dialogues,
    so the advantages, losses and gradients compared below are not all zero."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(directory)
    return directory


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_model_dir, tmp_path):
    """2 processes x 2 episodes vs 1 process x 4 episodes, one minibatch holding the whole global batch and
    greedy replies: the same episodes, scores, losses and gradient norms, on the first update and on the
    second (which starts from the weights the first one trained). Every statistic is global (all-reduced),
    explained variance included."""
    reward_model = save_reward_model(tiny_model_dir, tmp_path / "rm")
    common = ["ppo", "--config", str(stage_file(tmp_path)), f"model.name_or_path={tiny_model_dir}",
              f"reward.model={reward_model}", "tracking.report_to=none", "ppo.updates=2", "ppo.epochs=1",
              "episodes.rounds=2", "sampling.max_new_tokens=8", "sampling.temperature=0",
              "ppo.learning_rate=1e-3"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO_ROOT / "recipes" / "accelerate" / "cpu.yaml"), "-m", "dialogrl.training.cli"]
    two = subprocess.run([*launch, *common, "ppo.episodes_per_update=2", "ppo.minibatch_episodes=2",
                          f"output_dir={tmp_path / 'two'}"], capture_output=True, text=True, timeout=600,
                         env=cli_env())
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([*CLI, *common, "ppo.episodes_per_update=4", "ppo.minibatch_episodes=4",
                          f"output_dir={tmp_path / 'one'}"], capture_output=True, text=True, timeout=600,
                         env=cli_env())
    assert one.returncode == 0, one.stderr[-3000:]
    for name, world in (("two", 2), ("one", 1)):
        summary = json.loads((tmp_path / name / SUMMARY_FILENAME).read_text())
        assert summary["world_size"] == world and summary["global_step"] == 2
    lines_two, lines_one = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert [s["update"] for s in lines_two] == [s["update"] for s in lines_one] == [1, 2]  # main process only
    compared = ("reward/score", "kl/episode", "kl/token", "rollout/response_len", "rollout/ended_properly",
                "rollout/episodes", "loss/policy", "loss/value", "policy/ratio", "policy/clipfrac",
                "policy/approx_kl", "policy/entropy", "value/clipfrac", "grad_norm/policy", "grad_norm/critic",
                "value/explained_variance")
    for first_two, first_one in zip(lines_two, lines_one, strict=True):
        assert first_two["rollout/episodes"] == 4
        for key in compared:
            assert first_two[key] == pytest.approx(first_one[key], rel=1e-4, abs=1e-5), key
    assert lines_one[0]["grad_norm/policy"] > 0 and lines_one[0]["loss/value"] > 0
    assert abs(lines_one[1]["kl/episode"]) > 1e-3  # update 2 starts from the trained policy: its step counts too


def test_turn_group_two_processes_match_one_process_on_sampled_replies(tiny_model_dir, tmp_path):
    """turn_group with sampled replies (temperature 1): 2 processes x 2 dialogues vs 1 process x 4 dialogues,
    played one per generation batch. A dialogue's sampling seed counts from its global index, so both runs
    sample the same siblings and pick the same ones to continue: same scores, losses and gradient norms."""
    common = ["ppo", "--config", str(stage_file(tmp_path)), f"model.name_or_path={tiny_model_dir}",
              "reward.rm_weight=0", "reward.rule_weight=1", "tracking.report_to=none", "ppo.updates=1",
              "ppo.epochs=1", "episodes.rounds=2", "sampling.max_new_tokens=6", "sampling.temperature=1.0",
              "ppo.learning_rate=1e-3", "ppo.advantage=turn_group", "ppo.group_size=2",
              "ppo.generation_batch_size=2", "ppo.scale_by_group_std=false", "responsiveness.enabled=false"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO_ROOT / "recipes" / "accelerate" / "cpu.yaml"), "-m", "dialogrl.training.cli"]
    two = subprocess.run([*launch, *common, "ppo.episodes_per_update=4", "ppo.minibatch_episodes=4",
                          f"output_dir={tmp_path / 'two'}"], capture_output=True, text=True, timeout=600, env=cli_env())
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([*CLI, *common, "ppo.episodes_per_update=8", "ppo.minibatch_episodes=8",
                          f"output_dir={tmp_path / 'one'}"], capture_output=True, text=True, timeout=600, env=cli_env())
    assert one.returncode == 0, one.stderr[-3000:]
    (first_two,), (first_one,) = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert first_two["rollout/episodes"] == first_one["rollout/episodes"] == 8
    for key in ("reward/score", "reward/rule", "reward/gate_pass", "kl/episode", "rollout/response_len",
                "rollout/generated_tokens", "loss/policy", "loss/kl", "policy/ratio", "policy/entropy",
                "grad_norm/policy"):
        assert first_two[key] == pytest.approx(first_one[key], rel=1e-4, abs=1e-5), key
    assert first_one["grad_norm/policy"] > 0


# --------------------------------------------------------------------------- resume


def test_resumed_run_repeats_the_uninterrupted_run(tiny_model_dir, tmp_path):
    """A run killed in update 3 resumes from checkpoint-2 and ends exactly as a run never stopped; update 3,
    which the killed run had logged already, is in metrics.jsonl once."""
    settings = ["ppo.updates=4", "ppo.save_every=2", "ppo.learning_rate=1e-3", "ppo.critic_learning_rate=1e-3",
                "sampling.max_new_tokens=6"]
    whole = tmp_path / "whole"
    trainer, run = ppo.build(ppo_recipe(tiny_model_dir, whole, *settings), rule_score_fn=words_score, log=silent)
    ppo.train(trainer, run, log=silent)
    # Checkpoints are written every 2 updates, but not after the last one (the final model is saved instead).
    assert sorted(p.name for p in whole.glob("checkpoint-*")) == ["checkpoint-2"]

    cut = tmp_path / "cut"
    trainer, run = ppo.build(ppo_recipe(tiny_model_dir, cut, *settings), rule_score_fn=words_score, log=silent)

    def killed_in_update_3(message: str) -> None:
        if message.startswith("update 3:"):  # logged after its metrics line, before any further checkpoint
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        ppo.train(trainer, run, log=killed_in_update_3)
    assert [s["update"] for s in metrics(cut)] == [1, 2, 3] and not (cut / SUMMARY_FILENAME).exists()

    lines: list[str] = []
    checkpoint = str(cut / "checkpoint-2")
    trainer, run = ppo.build(ppo_recipe(tiny_model_dir, cut, *settings, "resume=auto"),
                             rule_score_fn=words_score, log=lines.append)
    assert run.resume_from == checkpoint
    summary = ppo.train(trainer, run, log=lines.append)
    assert f"resumed from {checkpoint} at update 2" in lines
    written = json.loads((cut / SUMMARY_FILENAME).read_text())
    assert summary["global_step"] == written["global_step"] == 4 and written["resumed_from"] == checkpoint
    assert written["metrics"]["updates"] == 4  # the history before the checkpoint came back with it

    resumed, uninterrupted = metrics(cut), metrics(whole)
    assert [s["update"] for s in resumed] == [s["update"] for s in uninterrupted] == [1, 2, 3, 4]
    assert abs(uninterrupted[2]["kl/episode"]) > 1e-2  # update 3 starts from trained weights, not the base model
    for again, first in zip(resumed[2:], uninterrupted[2:], strict=True):
        assert reproducible(again) == pytest.approx(reproducible(first), abs=1e-5)


# --------------------------------------------------------------------------- users and errors


def test_simulated_user_answers_the_policy(tiny_model_dir, tmp_path):
    """With user_source=simulated the first user turn is the corpus's opening and later ones are what the base
    model, playing the user, says to the dialogue so far; a one-update run completes."""
    out = tmp_path / "out"
    trainer, run = ppo.build(ppo_recipe(tiny_model_dir, out, "episodes.user_source=simulated", "ppo.updates=1",
                                      "ppo.episodes_per_update=2", "ppo.minibatch_episodes=2"),
                           rule_score_fn=words_score, log=silent)
    trainer.unwrapped.eval()
    rollout = trainer.rollout()
    specs = trainer.spec_builder(rollout.scenarios)
    for trajectory, scenario, spec in zip(rollout.trajectories, rollout.scenarios, specs, strict=True):
        turns = [i for i, m in enumerate(trajectory.messages) if m["role"] == "user"]
        assert len(turns) == 2 and trajectory.rounds == 2
        first, second = (trajectory.messages[i]["content"] for i in turns)
        assert first.endswith(scenario.user_turns[0])  # after any rule the user states at round 1
        prefix = f"{spec.user_prefix[2]} " if 2 in spec.user_prefix else ""
        assert second.startswith(prefix)
        generated = second[len(prefix):]
        assert generated and generated != scenario.user_turns[1] and scenario.user_turns[1] not in second
        rng = torch.get_rng_state()
        assert spec.user.next_user_turn(trajectory.messages[: turns[1]], 2) == generated
        # The user samples from its own seed without resetting the policy's sampling stream.
        assert torch.equal(torch.get_rng_state(), rng)
    summary = ppo.train(trainer, run, log=silent)
    assert summary["status"] == "complete" and summary["global_step"] == 1
    (stats,) = metrics(out)
    assert stats["rollout/episodes"] == 2 and stats["rollout/response_len"] > 0


def test_rule_and_reward_model_weights_both_zero_is_a_recipe_error(tiny_model_dir, tmp_path):
    done = subprocess.run([*CLI, "ppo", "--config", str(stage_file(tmp_path)), f"model.name_or_path={tiny_model_dir}",
                           f"output_dir={tmp_path / 'out'}", "reward.rm_weight=0", "reward.rule_weight=0"],
                          capture_output=True, text=True, timeout=300, env=cli_env())
    assert done.returncode == 2, done.stderr
    assert "nothing scores a turn" in done.stderr and "rule_weight" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written


# --------------------------------------------------------------------------- group-relative advantages


@pytest.mark.parametrize("credit", ["episode", "return_to_go"])
def test_episode_group_advantages_equal_the_hand_worked_ones(tiny_model_dir, tmp_path, credit):
    """episode_group, G = 2, scores unnormalised and no KL in the reward: each row's advantage is one value per
    reply, its (return-to-go) minus its group's mean, worked out here from the rollout's raw turn scores."""
    gamma = 0.5
    trainer, _ = ppo.build(ppo_recipe(tiny_model_dir, tmp_path / "out", "ppo.advantage=episode_group",
                                      "ppo.group_size=2", f"ppo.episode_credit={credit}", "ppo.scale_by_group_std=false",
                                      "reward.normalise=false", "reward.cut_penalty=0", f"ppo.gamma_turn={gamma}"),
                           rule_score_fn=words_score, log=silent)
    assert trainer.unwrapped.critic is None  # no critic is loaded in a group mode...
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["policy"]  # ...nor trained
    trainer.unwrapped.eval()
    rollout = trainer.rollout()
    assert len(rollout.trajectories) == 4 and rollout.group_ids.tolist() == [0, 0, 1, 1]
    assert rollout.scenarios[0] is rollout.scenarios[1] and rollout.scenarios[1] is not rollout.scenarios[2]
    stats = trainer.prepare_batch(rollout)
    assert "value/explained_variance" not in stats and rollout.old_values is None
    s = rollout.raw_scores.tolist()  # [4 rows, 2 turns], words / 8 per reply
    for row in range(4):
        mate = row ^ 1  # the other row of its group
        for turn in range(2):
            if credit == "episode":
                mine, theirs = (s[r][0] + gamma * s[r][1] for r in (row, mate))
            else:
                mine, theirs = (sum(gamma ** (j - turn) * s[r][j] for j in range(turn, 2)) for r in (row, mate))
            expected = mine - (mine + theirs) / 2
            tokens = rollout.action_mask[row] & (rollout.turn_ids[row] == turn)
            assert tokens.any()
            torch.testing.assert_close(rollout.advantages[row][tokens],
                                       torch.full((int(tokens.sum()),), expected), atol=1e-6, rtol=0)
    assert float(rollout.advantages[~rollout.action_mask].abs().max()) == 0.0


def test_turn_group_rows_are_siblings_and_their_advantages_are_relative(tiny_model_dir, tmp_path):
    """turn_group, G = 3, 2 rounds, a budget of 6 episodes = 2 dialogues branching 3 ways: each round of each
    dialogue is a group of 3 rows sharing their history, each row trains on its own reply only, and each
    row's advantage is its score minus the mean of its 2 siblings' (leave-one-out)."""
    trainer, _ = ppo.build(ppo_recipe(tiny_model_dir, tmp_path / "out", "ppo.advantage=turn_group",
                                      "ppo.group_size=3", "ppo.group_baseline=leave_one_out",
                                      "ppo.scale_by_group_std=false", "ppo.episodes_per_update=6",
                                      "ppo.minibatch_episodes=3", "ppo.generation_batch_size=6",
                                      "reward.normalise=false", "reward.cut_penalty=0", "ppo.kl_penalty=loss"),
                           rule_score_fn=words_score, log=silent)
    trainer.unwrapped.eval()
    rollout = trainer.rollout()
    assert len(rollout.trajectories) == 2 * 2 * 3 and rollout.episodes == 6  # dialogues x rounds x siblings
    stats = trainer.prepare_batch(rollout)
    assert stats["rollout/episodes"] == 6
    ids = rollout.group_ids.tolist()
    for group in sorted(set(ids)):
        rows = [r for r, g in enumerate(ids) if g == group]
        assert len(rows) == 3
        first = [int(rollout.action_mask[r].nonzero()[0]) for r in rows]
        assert len(set(first)) == 1  # the reply starts at the same position: one shared history
        assert len({tuple(rollout.input_ids[r, : first[0] + 1].tolist()) for r in rows}) == 1
        turns = {int(t) for r in rows for t in rollout.turn_ids[r][rollout.action_mask[r]]}
        assert len(turns) == 1  # every row of the group trains on that round's reply alone
        (turn,) = turns
        scores = [float(rollout.raw_scores[r, turn]) for r in rows]
        assert sum(not math.isnan(float(x)) for r in rows for x in rollout.raw_scores[r]) == 3
        for r, score in zip(rows, scores, strict=True):
            others = [x for q, x in zip(rows, scores, strict=True) if q != r]
            mine = rollout.advantages[r][rollout.action_mask[r]]
            torch.testing.assert_close(mine, torch.full_like(mine, score - sum(others) / 2), atol=1e-6, rtol=0)
    step = trainer._minibatch_step(rollout, torch.arange(len(rollout.trajectories)), 1)
    assert "loss/value" not in step and step["loss/kl"] == pytest.approx(0.0, abs=1e-9)  # k3 is 0 at step 0


@pytest.mark.parametrize("advantage", ["episode_group", "turn_group"])
def test_group_modes_train_and_save_no_critic(tiny_model_dir, tmp_path, advantage):
    out = tmp_path / "out"
    settings = [f"ppo.advantage={advantage}", "ppo.group_size=2", "ppo.updates=2", "ppo.save_every=1",
                "ppo.learning_rate=1e-3"]
    trainer, run = ppo.build(ppo_recipe(tiny_model_dir, out, *settings), rule_score_fn=words_score, log=silent)
    summary = ppo.train(trainer, run, log=silent)
    assert summary["global_step"] == 2 and summary["metrics"]["generated_tokens"] > 0
    from safetensors.torch import load_file

    (weights,) = (out / "checkpoint-1").glob("model*.safetensors")
    assert not any(name.startswith("critic.") for name in load_file(weights))
    assert all("loss/value" not in line for line in metrics(out))


def test_one_step_per_rollout_takes_old_logprobs_from_the_training_pass(tiny_model_dir, tmp_path, monkeypatch):
    """epochs 1, one minibatch, KL in the loss: the old log-probs come from the training forward (no
    separate pass), and the update, its ratio and its KL statistics equal those of the two-pass path."""
    from dialogrl.training.ppo_config import PPOOptions

    def one_update(output_dir: Path) -> tuple[dict, dict]:
        trainer, _ = ppo.build(ppo_recipe(tiny_model_dir, output_dir, "ppo.advantage=episode_group",
                                          "ppo.group_size=2", "ppo.epochs=1", "ppo.minibatch_episodes=4",
                                          "ppo.kl_penalty=loss", "ppo.learning_rate=1e-2", "lora.enabled=false",
                                          "ppo.updates=2"),
                               rule_score_fn=words_score, log=silent)
        trainer.step()  # update 2 starts away from the reference: its KL is not 0
        calls = []
        forward = trainer._logprobs
        monkeypatch.setattr(trainer, "_logprobs", lambda *a: calls.append(a[0]) or forward(*a))
        stats = reproducible(trainer.step())
        policy_passes = sum(model is trainer.unwrapped.policy for model in calls)
        return stats | {"policy_passes": policy_passes}, {
            name: p.detach().clone() for name, p in trainer.unwrapped.policy.named_parameters()}

    assert ppo_recipe(tiny_model_dir, tmp_path, "ppo.epochs=1", "ppo.minibatch_episodes=4", "ppo.kl_penalty=loss",
                      "ppo.advantage=episode_group", "ppo.group_size=2").ppo.old_logprobs_from_training_pass
    one_pass, one_pass_weights = one_update(tmp_path / "one")
    monkeypatch.setattr(PPOOptions, "old_logprobs_from_training_pass", property(lambda self: False))
    two_pass, two_pass_weights = one_update(tmp_path / "two")
    assert (one_pass.pop("policy_passes"), two_pass.pop("policy_passes")) == (0, 1)
    assert abs(two_pass["kl/episode"]) > 1e-4 and one_pass["policy/ratio"] == pytest.approx(1.0, abs=1e-6)
    assert one_pass.keys() == two_pass.keys()
    for key in one_pass:
        assert one_pass[key] == pytest.approx(two_pass[key], rel=1e-4, abs=1e-6), key
    for name, weight in one_pass_weights.items():
        torch.testing.assert_close(weight, two_pass_weights[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("advantage", ["gae", "turn_group"])
def test_micro_batches_and_checkpointing_take_the_step_of_the_whole_minibatch(tiny_model_dir, tmp_path, monkeypatch,
                                                                           advantage):
    """ppo.micro_batch_tokens=1 runs every row in a pass of its own (gradients accumulated, scoring passes
    split too), ppo.gradient_checkpointing recomputes the layers in the backward pass: the updates'
    statistics and the trained weights are those of one plain pass per minibatch."""
    def two_updates(output_dir: Path, *overrides: str) -> tuple[list[dict], dict, dict]:
        trainer, _ = ppo.build(ppo_recipe(tiny_model_dir, output_dir, f"ppo.advantage={advantage}",
                                          "ppo.group_size=2", "ppo.epochs=2", "ppo.learning_rate=1e-3",
                                          "lora.enabled=false", "ppo.updates=2", *overrides),
                               rule_score_fn=words_score, log=silent)
        initial.update({name: p.detach().clone() for name, p in trainer.unwrapped.policy.named_parameters()})
        counts = {"backward": 0, "recomputed": 0}
        backward = trainer._backward
        monkeypatch.setattr(trainer, "_backward", lambda *a: counts.update(backward=counts["backward"] + 1) or backward(*a))
        # A checkpointed layer runs its forward again in the backward pass: count its MLP's forward calls under
        # grad (module hooks do not fire in the recompute, so the forward itself is wrapped).
        mlp = trainer.unwrapped.policy.model.layers[0].mlp
        mlp_forward = mlp.forward
        monkeypatch.setattr(mlp, "forward", lambda x: counts.update(
            recomputed=counts["recomputed"] + torch.is_grad_enabled()) or mlp_forward(x))
        stats = [reproducible(trainer.step()) for _ in range(2)]
        return stats, {name: p.detach().clone() for name, p in trainer.unwrapped.policy.named_parameters()}, counts

    initial = {}
    whole, whole_weights, whole_counts = two_updates(tmp_path / "whole", "ppo.micro_batch_tokens=1000000")
    # 2 updates x 2 epochs x 2 minibatches; split, one backward per row of each minibatch.
    assert whole_counts["backward"] == 8, whole_counts
    assert abs(whole[1]["kl/episode"]) > 1e-4  # update 2 trains a policy that moved
    for overrides, check in (
        (("ppo.micro_batch_tokens=1",), lambda counts: counts["backward"] >= 16),
        (("ppo.micro_batch_tokens=1000000", "ppo.gradient_checkpointing=true"),
         lambda counts: counts["recomputed"] >= whole_counts["recomputed"] + 8),
    ):
        other, other_weights, counts = two_updates(tmp_path / overrides[-1], *overrides)
        assert check(counts), (overrides, counts, whole_counts)
        for update_whole, update_other in zip(whole, other, strict=True):
            assert update_whole.keys() == update_other.keys()
            for key in update_whole:
                assert update_other[key] == pytest.approx(update_whole[key], rel=1e-4, abs=1e-5), (overrides, key)
        # Adam divides by the root of the squared gradients, so a weight whose gradient is ~0 moves by the
        # rounding of two summation orders: each tensor agrees to 1% of how far training moved it.
        for name, weight in whole_weights.items():
            moved = float((weight - initial[name]).abs().max())
            assert moved > 1e-3 and float((other_weights[name] - weight).abs().max()) < 0.01 * moved, (overrides, name)
