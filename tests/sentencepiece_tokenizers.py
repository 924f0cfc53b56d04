"""Real SentencePiece tokenizers, trained here, loaded the way transformers loads Llama-2, Mistral and Gemma.

The hub's tokenizer files cannot be downloaded, so a small SentencePiece model is
trained on chitchat text with the `sentencepiece` trainer and put in a folder as
`tokenizer.model`; `AutoTokenizer` converts it exactly as it converts a real
checkpoint's. Llama-2 and Mistral v0.1 load with `legacy: true` (a word-start
marker after every special token), newer Llama/Mistral with `legacy: false`;
Gemma's model adds no dummy prefix at all.
"""

from __future__ import annotations

import functools
import io
import json
import tempfile
from pathlib import Path

from tiny_model import corpus_lines


@functools.cache
def _model_bytes(dummy_prefix: bool) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines(400)), model_writer=model, vocab_size=1000, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=dummy_prefix, minloglevel=2,
    )
    return model.getvalue()


def sentencepiece_tokenizer(style: str, chat_template: str, special_tokens: list[str] = ()):
    """A `style` ("llama_legacy", "llama", "gemma") tokenizer with the given chat template."""
    from transformers import AutoTokenizer

    folder = Path(tempfile.mkdtemp(prefix=f"sp-{style}-"))
    (folder / "tokenizer.model").write_bytes(_model_bytes(dummy_prefix=style != "gemma"))
    config = {"tokenizer_class": "GemmaTokenizer" if style == "gemma" else "LlamaTokenizer",
              "legacy": style == "llama_legacy", "add_bos_token": False, "add_eos_token": False,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": chat_template}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    return tokenizer
