"""Every stage for a few steps under DDP, ZeRO-3 and FSDP2 on one GPU: tokens/s, peak GPU memory, MFU.

    python tests/benchmarks/gpu_backends.py [--steps 6] [--stages sft reward dpo ppo] \
        [--backends ddp zero3 fsdp2] [--layers 20] [--workdir outputs/gpu-backends]
    python tests/benchmarks/gpu_backends.py --cpu --layers 2 --hidden 64   # the plumbing, on 2 CPU processes

A check for when a GPU machine is lent, not a test. The model is built from a config (a Llama of
`--layers` x `--hidden`: about 1.0B parameters with the defaults) with the tiny test model's trained BPE
tokenizer and ChatML template, in bf16; the data are real chitchat dialogues (8 rounds each) and
preference pairs made from them (chosen: the human reply; rejected: a reply from another dialogue).
Each stage is launched with the repository's GPU launch config for the backend (recipes/accelerate/
ddp.yaml, zero3.yaml, fsdp2.yaml) on one process, so the backend's code paths run without a second GPU.

Printed per stage and backend: tokens/s (run_summary.json: non-padding tokens the trainer saw per second
of training), peak GPU memory (nvidia-smi, polled every 0.2 s: what the process held, CUDA context
included) and MFU = tokens/s x flops per token / the GPU's dense bf16 peak, with flops per token 6N for
sft and reward (forward + backward) and 8N for dpo (plus the reference's forward), N = parameters
(attention's quadratic term left out: rows are short). PPO prints seconds per update and its generation
share instead: most of an update is generation, whose flops mean little next to its memory traffic.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import threading
import time
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tests"))

# Dense bf16 peaks (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
GPU_CONFIGS = {"ddp": "ddp.yaml", "zero3": "zero3.yaml", "fsdp2": "fsdp2.yaml"}
CPU_CONFIGS = {"ddp": "cpu.yaml", "zero3": "cpu-zero3.yaml", "fsdp2": "cpu-fsdp2.yaml"}
FLOPS_PER_PARAMETER = {"sft": 6, "reward": 6, "dpo": 8}


def build_model(directory: Path, layers: int, hidden: int, cpu: bool) -> int:
    """A config-built Llama and the tiny model's tokenizer, saved in `directory`; returns its parameter count."""
    import torch
    from tiny_model import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(vocab_size=8192)
    heads = max(hidden // 128, 2)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=int(hidden * 2.6875) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32 if cpu else torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def write_data(directory: Path, dialogues: int = 64, rounds: int = 8) -> tuple[Path, Path]:
    """Chitchat dialogues as `messages` rows, and per-turn preference pairs made from them."""
    data = json.loads((resources.files("chitchat_dataset") / "dataset.json").read_text())
    rng = random.Random(0)
    lines = [" ".join(m["text"] for m in group) for c in data.values() for group in c["messages"]]
    conversations, pairs = [], []
    for conversation in list(data.values())[:dialogues]:
        turns = [" ".join(m["text"] for m in group) for group in conversation["messages"]][: 2 * rounds]
        if len(turns) < 4:
            continue
        messages = [{"role": "system", "content": "Answer in one or two sentences."}]
        for k, text in enumerate(turns[: len(turns) // 2 * 2]):
            messages.append({"role": "user" if k % 2 == 0 else "assistant", "content": text})
        conversations.append({"messages": messages})
        cut = 2 * rng.randrange(1, len(messages) // 2)  # a user turn to compare replies after
        pairs.append({"prompt": messages[: cut], "chosen": [messages[cut]],
                      "rejected": [{"role": "assistant", "content": rng.choice(lines)}]})
    sft, preference = directory / "conversations.jsonl", directory / "pairs.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in conversations))
    preference.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return sft, preference


class PeakGPUMemory:
    """The largest memory.used nvidia-smi reports on GPU 0 while the block runs (GiB; None without nvidia-smi)."""

    def __enter__(self):
        self.peak, self._stop = None, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            try:
                used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                       "-i", "0"], capture_output=True, text=True, timeout=5).stdout.strip()
                self.peak = max(self.peak or 0.0, float(used) / 1024)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return
            time.sleep(0.2)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def stage_command(stage: str, model: Path, sft_rows: Path, pairs: Path, steps: int, out: Path, config: Path) -> list[str]:
    config.write_text(f"stage: {stage}\n")
    common = [stage, "--config", str(config), f"model.name_or_path={model}", "tracking.report_to=none",
              f"output_dir={out}"]
    if stage == "ppo":
        return [*common, f"ppo.updates={steps}", "ppo.episodes_per_update=8", "ppo.minibatch_episodes=4",
                "ppo.advantage=turn_group", "ppo.group_size=4", "episodes.rounds=4", "sampling.max_new_tokens=48",
                "reward.rm_weight=0", "reward.rule_weight=1", "responsiveness.enabled=false",
                "ppo.generation_batch_size=8"]
    rows = sft_rows if stage == "sft" else pairs
    return [*common, f"data.train=[{{path: {rows}}}]", "data.eval_fraction=0", "data.max_length=2048",
            f"training.max_steps={steps}", "training.per_device_batch_size=4", "training.logging_steps=1",
            "training.save_steps=100000", "training.gradient_checkpointing=false"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", nargs="+", default=["sft", "reward", "dpo", "ppo"])
    parser.add_argument("--backends", nargs="+", default=list(GPU_CONFIGS), choices=list(GPU_CONFIGS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "outputs" / "gpu-backends")
    parser.add_argument("--cpu", action="store_true", help="2 CPU processes with the cpu-* launch configs (fp32)")
    args = parser.parse_args()

    import torch

    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.workdir / "model"
    parameters = build_model(model, args.layers, args.hidden, args.cpu)
    sft_rows, pairs = write_data(args.workdir)
    device = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    peak = next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in device), None)
    print(f"model: {parameters / 1e9:.2f}B parameters ({args.layers} layers x {args.hidden}); device: {device}")
    configs = CPU_CONFIGS if args.cpu else GPU_CONFIGS
    print(f"{'stage':6} {'backend':7} {'tokens/s':>9} {'peak GiB':>8} {'MFU':>6}  notes")
    for stage in args.stages:
        for backend in args.backends:
            out = args.workdir / f"{stage}-{backend}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                      str(REPO_ROOT / "recipes" / "accelerate" / configs[backend])]
            if not args.cpu:
                launch += ["--num_processes", "1"]
            command = [*launch, "-m", "dialogrl.training.cli",
                       *stage_command(stage, model, sft_rows, pairs, args.steps, out, args.workdir / f"{stage}.yaml")]
            with PeakGPUMemory() as memory:
                done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
            if done.returncode != 0:
                print(f"{stage:6} {backend:7} failed: {done.stderr.strip().splitlines()[-1][:160]}")
                (args.workdir / f"{stage}-{backend}.log").write_text(done.stderr)
                continue
            summary = json.loads((out / "run_summary.json").read_text())
            memory_text = f"{memory.peak:8.1f}" if memory.peak is not None else f"{'-':>8}"
            used = summary["distributed"]
            notes = f"{used['type']} zero={used['zero_stage']} fsdp={used['fsdp_version']}"
            if stage == "ppo":
                metrics = summary["metrics"]
                notes += (f"; {metrics.get('seconds_per_update', float('nan')):.1f} s/update, generation "
                          f"{metrics.get('generation_share', float('nan')):.0%}")
                print(f"{stage:6} {backend:7} {summary['tokens_per_second'] or 0:9.0f} {memory_text} {'-':>6}  {notes}")
                continue
            tokens_per_second = summary["tokens_per_second"] or 0.0
            mfu = (tokens_per_second * FLOPS_PER_PARAMETER[stage] * parameters / peak) if peak else None
            mfu_text = f"{mfu:6.1%}" if mfu is not None else f"{'-':>6}"
            print(f"{stage:6} {backend:7} {tokens_per_second:9.0f} {memory_text} {mfu_text}  {notes}", flush=True)


if __name__ == "__main__":
    main()
