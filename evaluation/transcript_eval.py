"""`dialogrl eval score FILE`: judge transcripts produced anywhere exactly as `dialogrl eval` judges its own.

The same verdict (`verdicts.judge`: dialogue-aware gate, the fixed responsiveness scorer,
strict and loose checks), the same metrics and the same outputs; only the dialogues come
from a file (see `dialogrl.data.transcripts` for the row format) instead of being played.
Rows carrying a `model` field are grouped by it, so one file can compare several sources.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dialogrl.data.transcripts import Transcript, load_transcripts
from dialogrl.evaluation.gate import GateConfig
from dialogrl.evaluation.report import build_report, write_outputs
from dialogrl.evaluation.responsiveness import ResponsivenessScorer
from dialogrl.evaluation.verdicts import DialogueToJudge, judge, rule_checks

USER_SOURCE = "transcript"


def transcript_records(transcripts: list[Transcript], gate: GateConfig,
                       scorer: ResponsivenessScorer | None) -> dict[str, dict[str, Any]]:
    """label -> {"model", "intervention", "records"}, the shape `build_report` reads."""
    to_judge = [DialogueToJudge(t.messages, lambda r, reply, t=t: rule_checks(t.standing(r), reply))
                for t in transcripts]
    results: dict[str, dict[str, Any]] = {}
    for transcript, turns in zip(transcripts, judge(to_judge, gate, scorer), strict=True):
        entry = results.setdefault(transcript.model, {"model": transcript.model, "intervention": "none",
                                                      "records": []})
        entry["records"].append({
            "dialogue_id": transcript.dialogue_id, "user_source": USER_SOURCE, "unseen": transcript.unseen,
            "constraints": [c.to_dict() for c, _ in transcript.rules],
            "intro_round": [start for _, start in transcript.rules],
            "turns": turns, "messages": transcript.messages,
        })
    return results


def read_transcripts(source: str | Path, output_dir: str | Path, log=print) -> tuple[list[Transcript], Any]:
    """Every valid row of `source`; bad rows go to `output_dir/rejects.jsonl` and are listed in the log."""
    transcripts, load_report = load_transcripts(source, Path(output_dir) / "rejects.jsonl")
    log(load_report.summary())
    for problem in load_report.problems[:20]:
        log(f"  {problem}")
    if not transcripts:
        raise ValueError(f"{source}: no valid transcript to score ({load_report.rejected_rows} rejected rows; "
                         f"see {load_report.rejects_path})")
    return transcripts, load_report


def score_transcripts(transcripts: list[Transcript], load_report, output_dir: str | Path, config: dict[str, Any],
                      gate: GateConfig, scorer: ResponsivenessScorer | None, *, seed: int = 0,
                      bootstrap_samples: int = 1000) -> dict:
    """Judge the transcripts and write the evaluator's outputs; report.json's `input` counts the rows."""
    results = transcript_records(transcripts, gate, scorer)
    report = build_report(results, {**config, "input": load_report.to_dict()}, seed, bootstrap_samples)
    write_outputs(report, results, output_dir)
    return report
