"""The `ppo` recipe: policy, critic, reward, episodes and the PPO schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dialogrl.data.options import option
from dialogrl.evaluation.responsiveness import ResponsivenessConfig
from dialogrl.evaluation.sampling import SamplingConfig
from dialogrl.training.config import register_recipe
from dialogrl.training.models import ModelConfig
from dialogrl.training.stage_config import LoraOptions
from dialogrl.training.tracking import TrackingConfig


@dataclass
class EpisodeConfig:
    rounds: int = option(4, help="User turns (and replies) per episode; 1 is single-turn PPO on the last turn.")
    user_source: Literal["replay", "simulated"] = option(
        "replay", help="replay: human turns from the corpus's train split; simulated: the policy's base model, "
        "prompted to play the user, answers each reply."
    )
    pressure: dict[int, str] = option(
        default_factory=dict, help="Round -> pressure turn replacing the user's turn: drop_rule, topic_change, long_paste."
    )
    min_constraints: int = option(1, help="Fewest rules per episode (training phrasings, seen types only).")
    max_constraints: int = option(2, help="Most rules per episode.")
    user_rule_fraction: float = option(0.25, help="Share of episodes where the user states one rule in a turn.")
    max_intro_round: int = option(2, help="Latest round at which a user-stated rule is introduced.")
    seed: int = option(0, help="Seed for picking episodes' dialogues and rules.")


@dataclass
class RewardOptions:
    model: str | None = option(
        None, help="Reward model directory (from `dialogrl reward`); null for the rule reward only."
    )
    rm_weight: float = option(1.0, help="Weight of the reward model's score of each turn.")
    rule_weight: float = option(
        0.0, help="Weight of the rule score: the mean score of every rule standing at that turn (0 if the reply "
        "fails the evaluator's dialogue-aware gate: degenerate, a repeat of an earlier reply or an echo of the user)."
    )
    responsiveness_weight: float = option(
        0.5, help="Weight of the responsiveness term, min(PMI, threshold) / threshold clipped below at -1 (1 once a "
        "reply answers its user turn as well as the evaluator asks, negative for a reply likelier after other "
        "turns). Used only when `responsiveness.enabled`; the rule score's gate then also requires `responsive`."
    )
    cut_penalty: float = option(1.0, help="Subtracted from the score of a reply cut by max_new_tokens (no end token).")
    normalise: bool = option(True, help="Normalise turn scores by their running mean and std (over all processes).")
    clip: float = option(5.0, help="Clip normalised scores to +-clip.")

    def __post_init__(self) -> None:
        if min(self.rm_weight, self.rule_weight, self.responsiveness_weight) < 0:
            raise ValueError("reward: rm_weight, rule_weight and responsiveness_weight must be >= 0")


@dataclass
class TurnResponsiveness(ResponsivenessConfig):
    """The evaluator's responsiveness settings, off unless asked for: the scorer is a second model to run."""

    enabled: bool = option(False, help="Score each reply's responsiveness with the fixed scorer (see reward).")


@dataclass
class PPOOptions:
    advantage: Literal["gae", "episode_group", "turn_group"] = option(
        "gae", help="gae: a learned critic and turn-aware GAE. episode_group: every scenario is played group_size "
        "times with the same user script; an episode's advantage is its return minus its group's mean. "
        "turn_group: at every round group_size replies are sampled from the identical history (one forked KV "
        "cache), each reply's advantage is its turn score minus its siblings' mean, the dialogue goes on with "
        "one sibling picked at random, and all of them are trained on. No critic in the group modes."
    )
    group_size: int = option(4, help="G: episodes per scenario (episode_group) or sibling replies per round (turn_group).")
    group_baseline: Literal["mean", "leave_one_out"] = option(
        "mean", help="Group modes: mean = the group's mean, the row itself included (GRPO); leave_one_out = the "
        "mean of the other G-1 rows (RLOO)."
    )
    scale_by_group_std: bool = option(
        True, help="Group modes: divide each advantage by its group's score std (GRPO's default; false is Dr. GRPO)."
    )
    episode_credit: Literal["episode", "return_to_go"] = option(
        "episode", help="episode_group: episode = every reply of an episode gets its (discounted by gamma_turn) "
        "return's advantage; return_to_go = each turn gets the advantage of its return-to-go, against the "
        "group's mean return-to-go at the same turn."
    )
    kl_penalty: Literal["auto", "reward", "loss"] = option(
        "auto", help="Where the KL to the reference goes. reward: -kl_beta * (log p - log p_ref) per generated "
        "token into the rewards (gae), or summed over a reply and taken off its turn score (group modes); loss: "
        "kl_beta * the k3 estimator, token-mean, added to the policy loss (GRPO). auto: reward under gae, loss "
        "under the group modes, where a reward-side KL would decide every group whose scores tie, and "
        "scale_by_group_std would blow those tiny KL differences up to unit advantages."
    )
    updates: int = option(20, minimum=1, help="PPO iterations: each plays a batch of episodes, then trains on it.")
    episodes_per_update: int = option(
        8, minimum=1, help="Episodes each process plays per update. Group modes: episodes_per_update / group_size scenarios, "
        "each played group_size times (episode_group) or branching group_size ways at every round (turn_group), "
        "so every mode generates episodes_per_update x rounds replies per update."
    )
    generation_batch_size: int = option(
        8, minimum=1, help="Dialogues played together by the rollout engine (one KV cache); turn_group counts each sibling."
    )
    minibatch_episodes: int = option(
        4, minimum=1, help="Episodes per gradient step (per process); turn_group trains on its replies in "
        "episodes_per_update / minibatch_episodes minibatches too."
    )
    micro_batch_tokens: int = option(
        4096, minimum=1, help="Most tokens (rows x padded length) one forward pass holds. Each minibatch, and each "
        "scoring pass over the rollout, runs in micro-batches under this budget, gradients accumulated into the "
        "minibatch's one optimizer step (the same step: every loss term is a sum over the minibatch's tokens). "
        "Memory grows with it: ~1 MB of activations a token for SmolLM2-135M in float32; raise it on a GPU."
    )
    gradient_checkpointing: bool = option(
        False, help="Recompute each decoder layer's activations in the backward pass (policy and critic): a pass "
        "then holds one layer's activations instead of every layer's, for about one more forward pass of compute."
    )
    epochs: int = option(2, minimum=1, help="Passes over each rollout batch, in reshuffled minibatches.")
    learning_rate: float = option(1e-5, help="Policy learning rate.")
    critic_learning_rate: float = option(5e-5, help="Critic learning rate (its own parameter group).")
    critic_warmup_updates: int = option(0, help="First updates that train the critic only (policy frozen).")
    clip_eps: float = option(0.2, help="Policy ratio clip.")
    value_clip: float = option(0.2, help="Value clip around the rollout's values.")
    gamma_turn: float = option(0.95, help="Discount between turns (1 inside a turn).")
    lam: float = option(0.95, help="GAE lambda.")
    kl_beta: float = option(0.05, help="Per-token KL penalty weight (initial value when adaptive).")
    kl_target: float | None = option(
        None, help="Adaptive beta: target mean KL per episode; null keeps beta fixed."
    )
    kl_horizon: int = option(10000, help="Adaptive beta horizon in episodes.")
    entropy_coef: float = option(0.0, help="Entropy bonus weight (entropy is logged either way).")
    max_grad_norm: float = option(1.0, help="Gradient clipping norm, for the policy and the critic separately.")
    whiten_advantages: bool = option(True, help="gae: whiten advantages over all generated tokens of the batch (the group modes use scale_by_group_std).")
    bootstrap_at_cut: bool = option(
        True, help="When an episode stops at the round limit (the dialogue could go on), bootstrap from the "
        "critic's value instead of 0."
    )
    save_every: int = option(5, minimum=1, help="Write a resumable checkpoint every this many updates.")
    save_total_limit: int = option(2, minimum=1, help="Resumable checkpoints kept (the newest).")
    seed: int = option(0, help="Seed for minibatch shuffling and weight init.")

    @property
    def uses_critic(self) -> bool:
        return self.advantage == "gae"

    @property
    def kl_in_loss(self) -> bool:
        return self.kl_penalty == "loss" or (self.kl_penalty == "auto" and not self.uses_critic)

    @property
    def old_logprobs_from_training_pass(self) -> bool:
        """One optimizer step per rollout and nothing needs the KL before it: the policy that trains is the
        one that sampled, so its first training forward gives the old log-probs (ratio 1) and the separate
        no-grad pass is skipped (TRL's GRPOTrainer does the same with num_iterations=1)."""
        return self.epochs == 1 and self.episodes_per_update == self.minibatch_episodes and self.kl_in_loss

    def __post_init__(self) -> None:
        if not self.uses_critic:
            if self.group_size < 2:
                raise ValueError(f"ppo.group_size must be >= 2 for ppo.advantage={self.advantage} (got {self.group_size})")
            for name in ("episodes_per_update", "generation_batch_size"):
                if getattr(self, name) % self.group_size:
                    raise ValueError(f"ppo.{name} ({getattr(self, name)}) must be a multiple of ppo.group_size "
                                     f"({self.group_size}) for ppo.advantage={self.advantage}: groups are never split")
            if self.critic_warmup_updates:
                raise ValueError(f"ppo.critic_warmup_updates must be 0 for ppo.advantage={self.advantage}: "
                                 "the group modes have no critic")
        if self.episodes_per_update % self.minibatch_episodes:
            raise ValueError(f"ppo.episodes_per_update ({self.episodes_per_update}) must be a multiple of "
                             f"ppo.minibatch_episodes ({self.minibatch_episodes})")
        if not 0 < self.gamma_turn <= 1 or not 0 <= self.lam <= 1:
            raise ValueError("ppo.gamma_turn must be in (0, 1] and ppo.lam in [0, 1]")


@register_recipe("ppo")
@dataclass
class PPORecipe:
    model: ModelConfig = option(default_factory=ModelConfig, help="The policy to start from (e.g. an SFT checkpoint).")
    reward: RewardOptions = option(default_factory=RewardOptions, help="How each assistant turn is scored.")
    critic_from: str | None = option(
        None, help="Checkpoint the critic starts from (a scalar head on its backbone); null: reward.model, or the "
        "policy's checkpoint with a fresh head when there is no reward model. gae only."
    )
    responsiveness: TurnResponsiveness = option(
        default_factory=TurnResponsiveness,
        help="The evaluator's fixed responsiveness scorer. Enabled: each reply's turn score gets "
        "reward.responsiveness_weight x its responsiveness term, and its rule score needs `responsive` too.",
    )
    episodes: EpisodeConfig = option(default_factory=EpisodeConfig, help="The dialogues played as episodes.")
    sampling: SamplingConfig = option(
        default_factory=lambda: SamplingConfig(max_new_tokens=64, temperature=0.8),
        help="Decoding of the policy's replies during rollouts (temperature also divides the training logits).",
    )
    ppo: PPOOptions = option(default_factory=PPOOptions, help="The PPO schedule, advantages and losses.")
    lora: LoraOptions = option(
        default_factory=LoraOptions, help="LoRA policy: the reference is the policy with its adapter disabled."
    )
    precision: Literal["auto", "float32", "bfloat16"] = option(
        "auto", help="Mixed precision: auto = bfloat16 on a GPU that supports it, float32 on CPU."
    )
    tracking: TrackingConfig = option(default_factory=TrackingConfig, help="Where metrics are logged.")
    output_dir: str = option("outputs/ppo", help="Checkpoints, the final policy, metrics.jsonl, config.yaml, card.")
    resume: str = option(
        "auto", help="auto: continue from the newest checkpoint in output_dir; never: start over (no checkpoint "
        "may exist); or a checkpoint directory."
    )

    def __post_init__(self) -> None:
        r = self.reward
        if not (r.rm_weight and r.model) and not r.rule_weight and not (
                self.responsiveness.enabled and r.responsiveness_weight):
            raise ValueError("reward: nothing scores a turn; set reward.model with rm_weight > 0, rule_weight > 0, "
                             "or responsiveness.enabled=true with reward.responsiveness_weight > 0")
        if self.critic_from and not self.ppo.uses_critic:
            raise ValueError(f"critic_from is set but ppo.advantage={self.ppo.advantage} trains no critic; "
                             "drop critic_from or use ppo.advantage=gae")
