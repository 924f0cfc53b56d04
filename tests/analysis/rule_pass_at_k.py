"""Can a model produce a reply that keeps a rule at all? pass@k per rule type over sampled eval runs.

    python tests/analysis/rule_pass_at_k.py RUN_DIR [RUN_DIR ...] [--model NAME]

Each RUN_DIR is a `dialogrl eval` output directory made with the same scenarios
(same `scenarios.*`) and a different `sampling.seed` at temperature > 0. For every
rule type it prints in how many (dialogue, round) checks it stood, pass@1 (the
mean over runs) and pass@k (some run kept it, with the quality gate passed) for
k = the number of runs. A type whose pass@k stays near 0 is one the model cannot
do from its own samples, so RL from it (which can only reinforce what it samples)
has nothing to reinforce.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def adherent_checks(run_dir: Path, model: str | None) -> dict[tuple[str, str, int, str], bool]:
    """(model, dialogue, round, rule type) -> strict pass with the gate passed, for one run."""
    path = run_dir / "dialogues.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass `dialogrl eval` output directories")
    verdicts = {}
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            if model is not None and record["model"] != model:
                continue
            for turn in record["turns"]:
                for check in turn["checks"]:
                    key = (record["model"], record["dialogue_id"], turn["round"], check["type_name"])
                    verdicts[key] = bool(check["strict"] and turn["gate_pass"])
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--model", help="only this model's dialogues (the name in report.json)")
    args = parser.parse_args()
    runs = [adherent_checks(run_dir, args.model) for run_dir in args.run_dirs]
    common = set.intersection(*(set(run) for run in runs))
    if not common:
        raise SystemExit("the runs share no checks: were they made with the same scenarios?")
    ignored = sum(len(run) for run in runs) - len(common) * len(runs)
    by_type: dict[tuple[str, str], list[list[bool]]] = defaultdict(list)
    for key in sorted(common):
        model, _dialogue, _round, type_name = key
        by_type[(model, type_name)].append([run[key] for run in runs])
    k = len(runs)
    print(f"{k} runs, {len(common)} checks in all of them" + (f" ({ignored} checks not in every run left out)"
                                                            if ignored else ""))
    print(f"| model | rule type | checks | pass@1 | pass@{k} |")
    print("|---|---|---|---|---|")
    for (model, type_name), outcomes in sorted(by_type.items(), key=lambda item: (item[0][0], -_pass_at_k(item[1]))):
        pass_at_1 = sum(sum(o) for o in outcomes) / (len(outcomes) * k)
        print(f"| {model} | {type_name} | {len(outcomes)} | {pass_at_1:.3f} | {_pass_at_k(outcomes):.3f} |")


def _pass_at_k(outcomes: list[list[bool]]) -> float:
    return sum(any(o) for o in outcomes) / len(outcomes)


if __name__ == "__main__":
    main()
