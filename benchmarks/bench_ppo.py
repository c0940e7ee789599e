"""ppo_rlhf vs TRL's PPOTrainer, same configuration, side by side. A benchmark, not a test.

    pip install -r benchmarks/requirements.txt      # adds trl==1.12.0, its last PPO release
    python benchmarks/bench_ppo.py                  # tiny GPT-2 on CPU (the README's table)
    python benchmarks/bench_ppo.py --preset gpt2    # GPT-2-size (124M) models, for a GPU
    python benchmarks/bench_ppo.py --preset gpt2-cpu --rounds 1   # the same, small batch, CPU

Both trainers get identical models (built here with random weights and saved to a temp dir:
no download), the same prompts, batch, response length, PPO epochs and minibatches, and four
models each: policy, frozen reference, value model initialized from the reward model, frozen
reward model. Each runs in its own process, so each peak memory is its own.

Reported per trainer: seconds per PPO iteration (the first excluded: warm-up), its split into
rollout and update, generated tokens per second, peak memory (max RSS on CPU, max allocated on
CUDA), and the FLOPs an iteration must do divided by its time, against the machine's measured
matrix-multiply rate.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ppo_rlhf as P  # noqa: E402  (the file under test, from the repository root)

PRESETS = {
    # the CPU configuration: tiny GPT-2, batch 16, 32 new tokens, 4 epochs, 1 minibatch
    "tiny": dict(model=dict(n_layer=2, n_head=4, n_embd=64, n_positions=128),
                 batch_size=16, max_new_tokens=32, ppo_epochs=4, num_mini_batches=1, steps=11),
    # GPT-2 small's shape (124M, 50257-token vocabulary): for a GPU
    "gpt2": dict(model=dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024,
                            vocab_size=50257), batch_size=64, max_new_tokens=128, ppo_epochs=4,
                 num_mini_batches=4, steps=6),
    # the same GPT-2-size models, few and short sequences: fits a CPU, for peak memory
    "gpt2-cpu": dict(model=dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024,
                                vocab_size=50257), batch_size=8, max_new_tokens=32, ppo_epochs=2,
                     num_mini_batches=1, steps=4),
}
PROMPTS = P.BUILTIN_PROMPTS


def build_models(preset: dict, root: Path) -> dict:
    """Policy and reward model (GPT-2 architecture, random weights) with the demo's character
    tokenizer, given a pad token distinct from EOS as TRL's PPOTrainer requires."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel
    tokenizer = P.build_tiny_tokenizer(separate_pad=True)
    shape = {"vocab_size": len(tokenizer), **preset["model"]}
    ids = dict(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    paths = {"policy": root / "policy", "reward": root / "reward"}
    GPT2LMHeadModel(GPT2Config(**ids, **shape)).save_pretrained(paths["policy"])
    GPT2ForSequenceClassification(GPT2Config(**ids, num_labels=1, **shape)).save_pretrained(
        paths["reward"])
    for path in paths.values():
        tokenizer.save_pretrained(path)
    return {k: str(v) for k, v in paths.items()}


# ------------------------------------------------------------------------------------------------
# The two runners. Each prints one JSON line: per-iteration times and the peak memory.
# ------------------------------------------------------------------------------------------------

def run_ours(preset: dict, paths: dict, device: str, out: str) -> dict:
    cfg = P.Config(model=paths["policy"], reward_model=paths["reward"],
                   critic_model=paths["reward"], output_dir=out, steps=preset["steps"],
                   batch_size=preset["batch_size"],
                   mini_batch_size=preset["batch_size"] // preset["num_mini_batches"],
                   ppo_epochs=preset["ppo_epochs"], max_new_tokens=preset["max_new_tokens"],
                   samples=0, device=device, actor_lr=1e-5, critic_lr=1e-5)
    P.train(cfg)
    rows = [json.loads(line) for line in (Path(out) / P.METRICS).read_text().splitlines()]
    return {"rollout_s": [r["time/rollout_s"] for r in rows],
            "update_s": [r["time/update_s"] for r in rows],
            "tokens": [r["response/tokens"] for r in rows]}


def run_trl(preset: dict, paths: dict, device: str, out: str) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import trl.experimental.ppo.ppo_trainer as trl_ppo
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer, TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(paths["policy"], padding_side="left")
    dataset = Dataset.from_dict({"input_ids": [tokenizer(p)["input_ids"] for p in PROMPTS]})
    steps, batch = preset["steps"], preset["batch_size"]
    args = PPOConfig(output_dir=out, per_device_train_batch_size=batch,
                     gradient_accumulation_steps=1, num_mini_batches=preset["num_mini_batches"],
                     num_ppo_epochs=preset["ppo_epochs"], response_length=preset["max_new_tokens"],
                     total_episodes=steps * batch, local_rollout_forward_batch_size=batch,
                     stop_token="eos", num_sample_generations=0, learning_rate=1e-5,
                     report_to="none", save_strategy="no", logging_steps=10 ** 9,
                     use_cpu=device == "cpu", bf16=device != "cpu", seed=0)
    trainer = PPOTrainer(
        args=args, processing_class=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(paths["policy"]),
        ref_model=AutoModelForCausalLM.from_pretrained(paths["policy"]),
        reward_model=AutoModelForSequenceClassification.from_pretrained(paths["reward"]),
        value_model=AutoModelForSequenceClassification.from_pretrained(paths["reward"]),
        train_dataset=dataset)

    marks = {"start": [], "rollout_end": [], "end": []}
    generate, whiten = trl_ppo.batch_generation, trl_ppo.masked_whiten

    def timed_generation(*a, **k):  # the first thing of an iteration: its start
        marks["start"].append(time.perf_counter())
        return generate(*a, **k)

    def timed_whiten(*a, **k):  # the advantages' whitening is the last step of the rollout
        result = whiten(*a, **k)
        synchronize(device)
        marks["rollout_end"].append(time.perf_counter())
        return result

    class Timer(TrainerCallback):
        def on_step_end(self, *a, **k):
            synchronize(device)
            marks["end"].append(time.perf_counter())

    trl_ppo.batch_generation, trl_ppo.masked_whiten = timed_generation, timed_whiten
    trainer.add_callback(Timer())
    trainer.train()
    # the rollout's end is the last whitening before each iteration's end
    rollout_end = [max(t for t in marks["rollout_end"] if s < t < e)
                   for s, e in zip(marks["start"], marks["end"])]
    return {"rollout_s": [r - s for s, r in zip(marks["start"], rollout_end)],
            "update_s": [e - r for r, e in zip(rollout_end, marks["end"])],
            "tokens": None}


def synchronize(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def peak_memory_mb(device: str) -> float:
    if device != "cpu":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------------------------------------
# FLOPs an iteration must do, and the machine's matmul rate
# ------------------------------------------------------------------------------------------------

def backbone_flops_per_token(model: dict, context: float) -> float:
    """2 x (matmul weights of the transformer blocks) + attention's QK^T and AV over
    `context` earlier tokens."""
    d, layers = model["n_embd"], model["n_layer"]
    return 2 * layers * 12 * d * d + 4 * layers * d * context  # qkv 3d^2, proj d^2, mlp 8d^2


def iteration_flops(preset: dict, vocab: int, prompt_len: float, response_len: float) -> float:
    """The least an iteration must compute, over batch x (prompt + response) tokens: generation
    (prefill + one token at a time; its logits give the old log-probs), the rollout forwards of
    reference, critic and reward model, and ppo_epochs of forward+backward (3x a forward) of
    actor and critic. The LM head (2 x d x vocab per token) is needed only where a response
    token is predicted."""
    model, batch = preset["model"], preset["batch_size"]
    seq = prompt_len + response_len
    body = batch * seq * backbone_flops_per_token(model, seq / 2)
    head = batch * response_len * 2 * model["n_embd"] * vocab
    generation = body + head
    rollout = 3 * body + head  # the reference needs the head, critic and reward model not
    update = preset["ppo_epochs"] * 3 * (2 * body + head)
    return generation + rollout + update


def matmul_rate(device: str, n: int = 1024, repeats: int = 10, trials: int = 5) -> float:
    """Measured fp32 (CPU) / bf16 (CUDA) matrix-multiply FLOP/s on this machine: the best of
    `trials` timings, since a shared machine's speed drifts and the limit is the best it does."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(repeats):  # warm-up: thread pool, caches
        a @ b
    best = float("inf")
    for _ in range(trials):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 * repeats / best


# ------------------------------------------------------------------------------------------------

def child(which: str, preset_name: str, paths: dict, device: str) -> None:
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    runner = run_ours if which == "ours" else run_trl
    with tempfile.TemporaryDirectory() as out:  # a GPT-2-size run writes GBs of checkpoint
        result = runner(PRESETS[preset_name], paths, device, out)
    result["peak_mb"] = peak_memory_mb(device)
    print("RESULT " + json.dumps(result))


def summarize(name: str, result: dict, preset: dict, vocab: int, rate: float,
              prompt_len: float) -> dict:
    rollout, update = result["rollout_s"], result["update_s"]
    per_iter = [r + u for r, u in zip(rollout, update)]
    tokens = result.get("tokens_ref")
    response_len = tokens / preset["batch_size"] if tokens else preset["max_new_tokens"]
    flops = iteration_flops(preset, vocab, prompt_len, response_len)
    seconds = statistics.median(per_iter)
    return {"trainer": name, "s/iter": seconds, "rollout s": statistics.median(rollout),
            "update s": statistics.median(update),
            "tokens/s": (tokens / seconds) if tokens else float("nan"),
            "peak MB": result["peak_mb"], "FLOP/s": flops / seconds,
            "of matmul peak": flops / seconds / rate}


def run_child(which: str, args, paths: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", which, "--preset", args.preset,
                           "--device", args.device, "--paths", json.dumps(paths)],
                          capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"{which} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each trainer, "
                        "interleaved (ours, TRL, ours, ...): machine noise hits both alike")
    parser.add_argument("--json", action="store_true", help="also print the rows as one "
                        "JSON line (ROWS {...}), for gpu_acceptance.py")
    parser.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.preset, json.loads(args.paths), args.device)
        return

    preset = PRESETS[args.preset]
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # saving the models would draw progress bars
    with tempfile.TemporaryDirectory() as root:
        paths = build_models(preset, Path(root))
        results = {"ours": [], "trl": []}
        for _ in range(args.rounds):
            for which in ("ours", "trl"):
                results[which].append(run_child(which, args, paths))
    # every round's iterations after its first (warm-up), pooled; peak memory: the largest
    results = {which: {"rollout_s": [t for r in runs for t in r["rollout_s"][1:]],
                       "update_s": [t for r in runs for t in r["update_s"][1:]],
                       "tokens": [t for r in runs if r["tokens"] for t in r["tokens"][1:]],
                       "peak_mb": max(r["peak_mb"] for r in runs)}
               for which, runs in results.items()}

    # both trainers sample from the same policy: count tokens with ours' measured lengths
    tokens = statistics.median(results["ours"]["tokens"])
    vocab = preset["model"].get("vocab_size") or len(P.build_tiny_tokenizer(separate_pad=True))
    prompt_len = statistics.mean(len(p) for p in PROMPTS)  # character tokens
    rate = matmul_rate(args.device)
    rows = []
    for which, label in (("ours", "ppo_rlhf"), ("trl", "TRL 1.12.0")):
        results[which]["tokens_ref"] = tokens
        rows.append(summarize(label, results[which], preset, vocab, rate, prompt_len))

    device_name = (torch.cuda.get_device_name() if args.device != "cpu"
                   else f"CPU, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"preset {args.preset}: batch {preset['batch_size']}, {preset['max_new_tokens']} new "
          f"tokens, {preset['ppo_epochs']} PPO epochs, {preset['num_mini_batches']} minibatch(es)"
          f"; {device_name}; matmul {rate / 1e9:.1f} GFLOP/s; medians of "
          f"{args.rounds} x {preset['steps'] - 1} iterations")
    header = ["trainer", "s/iter", "rollout s", "update s", "tokens/s", "peak MB", "FLOP/s",
              "of matmul peak"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [row["trainer"], f"{row['s/iter']:.3f}", f"{row['rollout s']:.3f}",
                 f"{row['update s']:.3f}", f"{row['tokens/s']:.0f}", f"{row['peak MB']:.0f}",
                 f"{row['FLOP/s'] / 1e9:.2f} G", f"{100 * row['of matmul peak']:.2f}%"]
        print("| " + " | ".join(cells) + " |")
    print(f"ours / TRL time per iteration: {rows[0]['s/iter'] / rows[1]['s/iter']:.2f}")
    if args.json:
        print("ROWS " + json.dumps({"device": device_name, "preset": args.preset,
                                    "rounds": args.rounds, "matmul": rate, "rows": rows}))


if __name__ == "__main__":
    main()
