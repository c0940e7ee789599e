"""Memory of full fine-tuning vs LoRA on the same GPT-2-size models. A benchmark, not a test.

    python benchmarks/bench_memory.py            # 124M policy and reward model, CPU, ~3 min

Each configuration is one short command-line run (`ppo_rlhf.py`, 2 iterations) in its own
process. Reported: the bytes the run holds for its models (`memory_bytes`: parameters, each
storage once; gradients; AdamW state), per policy parameter, and the process's peak RSS
(activations, logits and the Python runtime included), and the size of its checkpoint.
"""

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_ppo  # noqa: E402  (its GPT-2-size models, built with random weights)

CONFIGS = {
    "full fine-tuning": [],
    "full, --frozen-bf16": ["--frozen-bf16"],
    "LoRA r=16": ["--lora-r", "16"],
    "LoRA r=16, --frozen-bf16": ["--lora-r", "16", "--frozen-bf16"],
}
# the child: ppo_rlhf's command line, then its own peak RSS (Linux: KiB) however it exits
CHILD = """
import resource, runpy, sys
sys.argv = {argv!r}
try:
    runpy.run_path({script!r}, run_name="__main__")
finally:
    print("PEAK_RSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
MEMORY_LINE = re.compile(r"parameters ([\d.]+) MiB, gradients ([\d.]+) MiB, optimizer "
                         r"([\d.]+) MiB")


def measure(paths: dict, options: list[str], out: Path) -> dict:
    argv = ["ppo_rlhf.py", "--model", paths["policy"], "--reward-model", paths["reward"],
            "--output-dir", str(out), "--steps", "2", "--batch-size", "4",
            "--mini-batch-size", "2", "--max-new-tokens", "16", "--ppo-epochs", "1",
            "--samples", "0", "--no-tensorboard", *options]
    code = CHILD.format(argv=argv, script=str(ROOT / "ppo_rlhf.py"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    held = MEMORY_LINE.search(proc.stdout)
    rss = re.search(r"PEAK_RSS_KIB (\d+)", proc.stdout)
    if proc.returncode != 0 or not held or not rss:
        sys.exit(f"{options} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    parameters, gradients, optimizer = (float(x) * 2 ** 20 for x in held.groups())
    return {"parameters": parameters, "gradients": gradients, "optimizer": optimizer,
            "peak_rss": int(rss.group(1)) * 1024,
            "checkpoint": (out / "checkpoint.pt").stat().st_size}


def main() -> None:
    from transformers import AutoModelForCausalLM
    with tempfile.TemporaryDirectory() as root:
        paths = bench_ppo.build_models(bench_ppo.PRESETS["gpt2-cpu"], Path(root))
        n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(
            paths["policy"]).parameters())
        results = {name: measure(paths, options, Path(root) / f"run{i}")
                   for i, (name, options) in enumerate(CONFIGS.items())}
    print(f"GPT-2-size policy and reward model ({n / 1e6:.0f}M parameters each), CPU, batch 4, "
          "16 new tokens")
    print("| configuration | parameters MB | gradients MB | AdamW MB | bytes / policy param "
          "| peak RSS MB | checkpoint.pt MB |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        held = r["parameters"] + r["gradients"] + r["optimizer"]
        print(f"| {name} | {r['parameters'] / 1e6:.0f} | {r['gradients'] / 1e6:.0f} | "
              f"{r['optimizer'] / 1e6:.0f} | {held / n:.1f} | {r['peak_rss'] / 1e6:.0f} | "
              f"{r['checkpoint'] / 1e6:.1f} |")
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
