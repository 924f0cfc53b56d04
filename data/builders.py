"""Training sets built from real dialogue and the constraint catalogue.

- SFT: corpus dialogues whose system prompt carries 1-3 non-conflicting rules
  (some stated by the user in a turn instead), with every assistant turn made to
  comply from the round its rule is in force.
- Preferences: a comparison at every assistant turn, not only the last. The
  prompt is the history up to user turn r (earlier replies compliant); chosen
  is a compliant reply, rejected a violating one: the natural reply as the human
  wrote it, or a reply that keeps all rules but one ("partial" drift). Rounds
  are balanced so late rounds are as common as early ones.
- Edits: `{messages, draft, edited}` records become chosen = edited, rejected = draft.

Only train-split conversations, train phrasings and seen constraint types go
in; the builder asserts it. Replies come from the corpus's human turns here; policy replies
(rejection sampling) are chosen in `on_policy.py`.
Every skipped dialogue or pair is counted by reason in the manifest.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from dialogrl.data import constraints as catalogue
from dialogrl.data.constraints import Constraint
from dialogrl.data.corpora import CorpusDialogue
from dialogrl.data.options import option

BASE_SYSTEM_PROMPT = "You are a helpful assistant chatting with a user."


@dataclass
class DialogueConfig:
    min_rounds: int = option(4, help="Shortest dialogue window, in user+assistant rounds.")
    max_rounds: int = option(8, help="Longest dialogue window; longer corpus dialogues are cut into several windows.")
    min_constraints: int = option(1, help="Fewest rules per dialogue.")
    max_constraints: int = option(3, help="Most rules per dialogue (all mutually compatible).")
    user_rule_fraction: float = option(
        0.3, help="Share of dialogues where one rule is stated by the user in a turn rather than by the system prompt."
    )
    max_intro_round: int = option(3, help="Latest round at which a user-stated rule is introduced.")

    def __post_init__(self) -> None:
        if not 1 <= self.min_rounds <= self.max_rounds:
            raise ValueError(f"need 1 <= min_rounds <= max_rounds, got {self.min_rounds} and {self.max_rounds}")
        if not 1 <= self.min_constraints <= self.max_constraints:
            raise ValueError("need 1 <= min_constraints <= max_constraints")
        if not 0 <= self.user_rule_fraction <= 1:
            raise ValueError(f"user_rule_fraction must be in [0, 1], got {self.user_rule_fraction}")


@dataclass
class SFTSetConfig:
    conversations: int = option(2400, help="SFT conversations to build (fewer if the corpus runs out; the manifest says).")
    reply_source: Literal["corpus", "policy"] = option(
        "corpus", help="Where the targets come from: corpus = the human replies, made compliant by the "
        "catalogue's rewrites; policy = rejection sampling from the model (samples_per_turn replies per turn, "
        "the first that keeps every rule and passes the evaluator's gate, else the closest one rewritten)."
    )
    samples_per_turn: int = option(4, minimum=1, help="reply_source policy: replies sampled per assistant turn.")
    min_rounds_kept: int = option(
        2, minimum=1, help="reply_source policy: a dialogue cut short by a turn with no usable target is kept "
        "when it has this many rounds before that turn."
    )
    min_dialogues_per_type: int = option(
        0, minimum=0, help="Curriculum: every seen rule type is in at least this many SFT dialogues (more windows "
        "are given the types still short); the manifest shows the counts. 0: rules drawn at random only."
    )


@dataclass
class PreferenceSetConfig:
    pairs: int = option(5000, help="Preference pairs to build, balanced over rounds.")
    rejected: dict[str, float] = option(
        default_factory=lambda: {"natural": 0.5, "partial": 0.5},
        help="Mix of rejected replies: natural (the corpus reply as written, violating a rule), partial "
        "(compliant with every rule but one), on_policy (a policy sample at the same history that fails a rule "
        "or the gate, against one that passes; needs sft.reply_source policy).",
    )

    def __post_init__(self) -> None:
        unknown = set(self.rejected) - {"natural", "partial", "on_policy"}
        if unknown or not self.rejected or any(w < 0 for w in self.rejected.values()) or not sum(
            self.rejected.values()
        ):
            raise ValueError("rejected must weight natural, partial and/or on_policy with non-negative weights, "
                             f"got {self.rejected}")


@dataclass
class Window:
    """A slice of a corpus dialogue with its rules: the unit every set is built from."""

    dialogue: CorpusDialogue
    start_round: int
    rounds: int
    constraints: list[Constraint]
    intro_round: list[int]  # per constraint: 1 for system rules, r >= 1 for user-stated rules

    @property
    def key(self) -> str:
        return f"{self.dialogue.conversation_id}:{self.start_round}"

    def active(self, round_number: int) -> list[Constraint]:
        return [c for c, r in zip(self.constraints, self.intro_round, strict=True) if r <= round_number]

    def system_prompt(self) -> str:
        rules = [c.instruction for c in self.constraints if c.type.introduced_by == "system"]
        return " ".join([BASE_SYSTEM_PROMPT, *rules])

    def user_turn(self, round_number: int) -> str:
        text = self.dialogue.turns[2 * (self.start_round + round_number - 1)]
        stated = [c.instruction for c, r in zip(self.constraints, self.intro_round, strict=True)
                  if c.type.introduced_by == "user" and r == round_number]
        return " ".join([*stated, text]) if stated else text

    def corpus_reply(self, round_number: int) -> str:
        return self.dialogue.turns[2 * (self.start_round + round_number - 1) + 1]

    def meta(self) -> dict[str, Any]:
        return {
            "conversation_id": self.dialogue.conversation_id,
            "split": self.dialogue.split,
            "window_start": self.start_round,
            "rounds": self.rounds,
            "constraints": [c.to_dict() for c in self.constraints],
            "intro_round": list(self.intro_round),
        }


def make_windows(dialogues: Sequence[CorpusDialogue], config: DialogueConfig, rng: random.Random) -> list[Window]:
    """Cut dialogues into windows of min..max rounds and give each its rules (train phrasings, seen types)."""
    windows = []
    for dialogue in dialogues:
        if dialogue.split != "train":
            raise ValueError(f"conversation {dialogue.conversation_id} is from the {dialogue.split} split; "
                             "training sets are built from the train split only")
        start = 0
        while dialogue.rounds - start >= config.min_rounds:
            rounds = min(config.max_rounds, dialogue.rounds - start)
            windows.append(with_rules(dialogue, start, rounds, config, rng))
            start += rounds
    rng.shuffle(windows)
    return windows


def with_rules(dialogue: CorpusDialogue, start: int, rounds: int, config: DialogueConfig, rng: random.Random,
               *, required: str | Sequence[str] = ()) -> Window:
    """A window with 1..k compatible rules (train phrasings, seen types); the `required` types (compatible with
    each other) are always among them, and k grows to hold them."""
    required = [required] if isinstance(required, str) else list(required)
    k = max(rng.randint(config.min_constraints, config.max_constraints), len(required))
    held_out = sorted(set(required) & catalogue.HELD_OUT_TYPES)
    if held_out:
        raise ValueError(f"{', '.join(held_out)}: held-out type(s); training windows never carry one")
    if not catalogue.compatible(required):
        raise ValueError(f"required types {required} conflict with each other")
    chosen = [catalogue.make_constraint(name, rng, split="train") for name in required]
    has_user_rule = any(c.type.introduced_by == "user" for c in chosen)
    if not has_user_rule and len(chosen) < k and rng.random() < config.user_rule_fraction:
        for rule in catalogue.sample_constraints(rng, 1, split="train", held_out=False, introduced_by="user"):
            if catalogue.compatible([rule.type_name, *(c.type_name for c in chosen)]):
                chosen.append(rule)
    if len(chosen) < k:
        system_rules = catalogue.sample_constraints(rng, k, split="train", held_out=False, introduced_by="system")
        for rule in system_rules:
            if len(chosen) == k:
                break
            if catalogue.compatible([rule.type_name, *(c.type_name for c in chosen)]):
                chosen.append(rule)
    intro = [rng.randint(1, min(config.max_intro_round, rounds)) if c.type.introduced_by == "user" else 1
             for c in chosen]
    return Window(dialogue, start, rounds, chosen, intro)


@dataclass
class BuildStats:
    """What happened to every candidate: built, or skipped and why."""

    built: int = 0
    skipped: Counter = field(default_factory=Counter)
    constraint_types: Counter = field(default_factory=Counter)
    rounds: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "built": self.built,
            "skipped": dict(self.skipped),
            "constraint_types": dict(sorted(self.constraint_types.items())),
            "rounds": {str(k): v for k, v in sorted(self.rounds.items())},
        }


def compliant_dialogue(window: Window) -> tuple[list[dict[str, str]], str | None]:
    """The window as messages with every reply made to comply; or the reason it cannot be."""
    messages = [{"role": "system", "content": window.system_prompt()}]
    for r in range(1, window.rounds + 1):
        messages.append({"role": "user", "content": window.user_turn(r)})
        reply = catalogue.rewrite_all(window.corpus_reply(r), window.active(r))
        if reply is None or not reply.strip():
            return messages, f"no compliant rewrite at round {r}"
        messages.append({"role": "assistant", "content": reply})
    return messages, None


def build_sft(windows: Sequence[Window], *, rejects: list[dict], stats: BuildStats) -> list[dict[str, Any]]:
    """Rows `{messages, meta}` from the corpus replies made compliant; skipped windows go to `rejects`."""
    rows = []
    for window in windows:
        messages, problem = compliant_dialogue(window)
        if problem:
            stats.skipped[problem.split(" at round")[0]] += 1
            rejects.append({"set": "sft", "window": window.key, "reason": problem, "meta": window.meta()})
            continue
        rows.append({"messages": messages, "meta": window.meta()})
        stats.built += 1
        stats.rounds[window.rounds] += 1
        stats.constraint_types.update(c.type_name for c in window.constraints)
    return rows


def _partial_violation(reply: str, active: list[Constraint], rng: random.Random) -> tuple[str | None, str | None]:
    """A reply that keeps every active rule but one, which it breaks; and that rule's type."""
    for dropped in rng.sample(active, len(active)):
        kept = [c for c in active if c is not dropped]
        candidate = catalogue.rewrite_all(reply, kept) if kept else reply
        if candidate and not dropped.check(candidate).strict:
            return candidate, dropped.type_name
    return None, None


def build_preferences(
    windows: Sequence[Window], config: PreferenceSetConfig, rng: random.Random, *, rejects: list[dict],
    pairs: int | None = None,
) -> tuple[list[dict[str, Any]], BuildStats]:
    """`pairs` (default config.pairs) rows `{prompt, chosen, rejected, meta}` from the corpus replies (natural
    and partial rejected replies, in the recipe's proportions), balanced over rounds 1..max."""
    pairs = config.pairs if pairs is None else pairs
    corpus_kinds = sorted((k, w) for k, w in config.rejected.items() if k != "on_policy" and w > 0)
    candidates: dict[int, list[dict[str, Any]]] = {}
    stats = BuildStats()
    if not corpus_kinds or pairs <= 0:
        return [], stats
    kinds, weights = zip(*corpus_kinds, strict=True)
    for window in windows:
        messages, problem = compliant_dialogue(window)
        if problem:
            stats.skipped["no compliant dialogue"] += 1
            continue
        for r in range(1, window.rounds + 1):
            active = window.active(r)
            prompt = messages[: 2 * r]  # system + r user turns + r-1 replies
            chosen = messages[2 * r]["content"]
            kind = rng.choices(kinds, weights=weights)[0]
            violated: list[str] = []
            if kind == "natural":
                rejected = window.corpus_reply(r)
                violated = [c.type_name for c in active if not c.check(rejected).strict]
                if not violated:  # the natural reply happens to comply: fall back to a partial violation
                    kind = "partial"
            if kind == "partial":
                rejected, broken = _partial_violation(window.corpus_reply(r), active, rng)
                violated = [broken] if broken else []
            if not violated or rejected is None or rejected.strip() == chosen.strip():
                stats.skipped["no violating reply"] += 1
                rejects.append({"set": "preferences", "window": window.key, "round": r,
                                "reason": "no violating reply", "meta": window.meta()})
                continue
            candidates.setdefault(r, []).append({
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "meta": window.meta() | {"turn_index": r, "rejected_kind": kind, "violated": violated,
                                         "active_constraints": [c.type_name for c in active]},
            })
    rows = balance_over_rounds(candidates, pairs, rng)
    for row in rows:
        stats.built += 1
        stats.rounds[row["meta"]["turn_index"]] += 1
        stats.constraint_types.update(row["meta"]["active_constraints"])
    available = sum(len(v) for v in candidates.values())
    if available > len(rows):
        stats.skipped["not needed after balancing rounds"] = available - len(rows)
    if len(rows) < pairs:
        stats.skipped["fewer usable pairs than requested"] = pairs - len(rows)
    return rows, stats


def balance_over_rounds(candidates: dict[int, list[dict]], total: int, rng: random.Random) -> list[dict]:
    """Take pairs round-robin over rounds, so late rounds (rarer in the corpus) are not crowded out."""
    pools = {r: rng.sample(pool, len(pool)) for r, pool in sorted(candidates.items())}
    rows: list[dict] = []
    while len(rows) < total and any(pools.values()):
        for r in sorted(pools):
            if pools[r] and len(rows) < total:
                rows.append(pools[r].pop())
    rows.sort(key=lambda row: (row["meta"]["conversation_id"], row["meta"]["window_start"], row["meta"]["turn_index"]))
    return rows


def edit_pairs(records: Sequence[Any]) -> list[dict[str, Any]]:
    """User edits as preference rows: the edited reply is chosen over the draft."""
    from dialogrl.data.records import PreferencePair

    rows = []
    for record in records:
        if not isinstance(record, PreferencePair) or record.meta.get("format") != "edit":
            continue
        rows.append({"prompt": record.prompt, "chosen": record.chosen, "rejected": record.rejected,
                     "meta": {"turn_index": record.turn_index, "source_row": record.meta.get("source_row"),
                              "rejected_kind": "draft"}})
    return rows


def assert_training_safe(rows: Sequence[dict[str, Any]], name: str) -> None:
    """No eval conversation, eval phrasing or held-out type may reach a training set."""
    for i, row in enumerate(rows):
        meta = row["meta"]
        if meta.get("split", "train") != "train":
            raise AssertionError(f"{name} row {i} comes from the {meta['split']} split")
        for c in meta.get("constraints", []):
            if c["type_name"] in catalogue.HELD_OUT_TYPES:
                raise AssertionError(f"{name} row {i} uses held-out constraint type {c['type_name']}")
            if c["phrasing_split"] != "train":
                raise AssertionError(f"{name} row {i} uses an eval phrasing of {c['type_name']}")
