"""The GPU acceptance run: one command for anyone (person or session) with a CUDA GPU.

    pip install -r requirements.txt -r benchmarks/requirements.txt
    python benchmarks/gpu_acceptance.py                 # ~10 min on one H100-class GPU
    python benchmarks/gpu_acceptance.py --suite         # also the whole test suite on the GPU

1. The CUDA tests (`pytest -k "cuda or nccl"`: bf16 autocast ratio and KL, fused AdamW's skip,
   a bf16 run that checkpoints and resumes, with 2 GPUs the NCCL runs); with --suite, every
   test, where `--device auto` now means CUDA.
2. `benchmarks/bench_ppo.py --preset gpt2` against TRL: seconds per iteration, tokens/s, peak
   GPU memory, and the model FLOP utilization (MFU): the FLOPs an iteration must do per second,
   over the GPU's dense bf16 peak from its datasheet (BF16_PEAK_TFLOPS; --peak-tflops for
   another GPU).

It prints the table for the README's "Measured on a GPU" section, with the GPU and the date.
"""

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s; matched against
# torch.cuda.get_device_name(), longest name first ("H100 PCIe" before "H100")
BF16_PEAK_TFLOPS = {"H200": 989, "H100 PCIe": 756, "H100 NVL": 835, "H100": 989, "GH200": 989,
                    "B200": 2250, "A100": 312, "L40S": 362, "L4": 121, "A10G": 70, "A10": 125}


def bf16_peak_flops(device_name: str) -> float | None:
    """The GPU's dense bf16 peak in FLOP/s, or None for a GPU not in BF16_PEAK_TFLOPS."""
    for name in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):
        if name.lower() in device_name.lower():
            return BF16_PEAK_TFLOPS[name] * 1e12
    return None


def acceptance_table(bench: dict, peak_flops: float | None, tests: str, date: str) -> str:
    """Markdown: the benchmark's rows with MFU against `peak_flops`, headed by GPU and date."""
    lines = [f"{bench['device']}, {date}; preset {bench['preset']}, {bench['rounds']} round(s); "
             f"CUDA tests: {tests}",
             "",
             "| trainer | s/iter | rollout s | update s | tokens/s | peak GPU MB | TFLOP/s "
             "| MFU (bf16 peak) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in bench["rows"]:
        mfu = f"{100 * row['FLOP/s'] / peak_flops:.1f}%" if peak_flops else "n/a"
        lines.append(f"| {row['trainer']} | {row['s/iter']:.3f} | {row['rollout s']:.3f} | "
                     f"{row['update s']:.3f} | {row['tokens/s']:.0f} | {row['peak MB']:.0f} | "
                     f"{row['FLOP/s'] / 1e12:.2f} | {mfu} |")
    ours, trl = bench["rows"][0], bench["rows"][-1]
    lines += ["", f"ours / TRL time per iteration: {ours['s/iter'] / trl['s/iter']:.2f}"]
    return "\n".join(lines)


def run(command: list[str]) -> subprocess.CompletedProcess:
    print("$ " + " ".join(command), flush=True)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    print(result.stdout[-4000:] + result.stderr[-4000:], flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", action="store_true", help="run every test, not only the "
                        "CUDA ones")
    parser.add_argument("--rounds", type=int, default=1, help="benchmark rounds per trainer")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if it is "
                        "not in BF16_PEAK_TFLOPS")
    args = parser.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to accept", file=sys.stderr)
        return 2
    selection = [] if args.suite else ["-k", "cuda or nccl"]
    tests = run([sys.executable, "-m", "pytest", "-q", "-rs", "test_ppo_rlhf.py", *selection])
    summary = (tests.stdout.strip().splitlines() or ["no output"])[-1]
    bench = run([sys.executable, "benchmarks/bench_ppo.py", "--preset", "gpt2", "--device",
                 "cuda", "--rounds", str(args.rounds), "--json"])
    rows = [line for line in bench.stdout.splitlines() if line.startswith("ROWS ")]
    if bench.returncode != 0 or not rows:
        print(f"the benchmark failed (tests: {summary})", file=sys.stderr)
        return 1
    result = json.loads(rows[-1][len("ROWS "):])
    peak = args.peak_tflops * 1e12 if args.peak_tflops else bf16_peak_flops(result["device"])
    print(acceptance_table(result, peak, summary, datetime.date.today().isoformat()))
    return tests.returncode


if __name__ == "__main__":
    sys.exit(main())
