"""`dialogrl reward score --model RM SOURCE`: reward-model scores for every assistant turn of every row."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def score_file(model_dir: str, source: str, *, split: str = "train", turns: str = "all", output: str | None = None,
               batch_size: int = 8) -> int:
    from dialogrl.data.chat_tokens import ChatTokenizer
    from dialogrl.data.records import Conversation
    from dialogrl.data.sources import DataError, load_records
    from dialogrl.training.cli import UserError
    from dialogrl.training.models import ModelConfig, load_scorer, load_tokenizer, resolve_model, stop_tokens
    from dialogrl.training.reward_scoring import score_conversations

    resolved = resolve_model(model_dir)
    model_config = ModelConfig(name_or_path=model_dir)
    tokenizer = load_tokenizer(model_config, resolved)
    chat = ChatTokenizer(tokenizer, stop_tokens(model_config, tokenizer, resolved))
    try:
        records, report = load_records(source, split=split, on_invalid="skip", forbidden_substrings=chat.special_tokens)
    except DataError as err:
        raise UserError(str(err)) from None
    conversations = []
    skipped = [str(problem) for problem in report.problems]
    for record in records:
        if not isinstance(record, Conversation) or not record.num_assistant_turns:
            kind = "a preference pair" if not isinstance(record, Conversation) else "a conversation with no reply"
            skipped.append(f"{source}: row {record.meta.get('source_row')}: {kind}; nothing to score")
            continue
        conversations.append(record)
    model = load_scorer(ModelConfig(name_or_path=model_dir), resolved, trained_head=True).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = score_conversations(model, chat, [r.messages for r in conversations], pad_id=pad_id,
                                 batch_size=batch_size, tools=[r.tools for r in conversations])
    lines = []
    for record, row_scores in zip(conversations, scores, strict=True):
        value = {"scores": row_scores} if turns == "all" else {"score": row_scores[-1]}
        lines.append(json.dumps({"row": record.meta.get("source_row"), **value}) + "\n")
    if output:
        Path(output).write_text("".join(lines), encoding="utf-8")
    else:
        sys.stdout.write("".join(lines))
    not_scored = report.rejected_rows + len(records) - len(conversations)
    print(f"scored {len(conversations)} of {report.rows} rows" + (f"; {not_scored} not scored:" if not_scored else ""),
          file=sys.stderr)
    for line in skipped[:20]:
        print(f"  {line}", file=sys.stderr)
    return 1 if not_scored else 0
