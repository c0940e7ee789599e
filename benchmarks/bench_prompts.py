"""Loading a large prompt set: time, memory per prompt, and how often each prompt is tokenized.
A benchmark, not a test.

    python benchmarks/bench_prompts.py              # 100k prompts in a Parquet file
    python benchmarks/bench_prompts.py --n 20000

Writes N prompts of 4-20 words to a Parquet file (with `datasets`), then, in a fresh process,
runs what a run does before its first iteration: `load_prompts` (through `datasets`) and
`usable_prompts` (the policy's tokenizer: the demo's character tokenizer, so that prompts are
long in tokens). Reported: seconds, the growth of the process's resident memory per prompt,
what the kept prompts and token ids take as Python objects per prompt, and the number of
strings the tokenizer was given (N: each prompt tokenized once).
"""

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
import ppo_rlhf as P

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

tokenizer = P.build_tiny_tokenizer()
calls, strings, call = [0], [0], type(tokenizer).__call__
def counted(self, text, *args, **kwargs):
    calls[0] += 1
    strings[0] += len(text) if isinstance(text, list) else 1
    return call(self, text, *args, **kwargs)
type(tokenizer).__call__ = counted
import datasets  # imported before the first measurement: its own import is not the prompts'
before, t0 = rss_mb(), time.perf_counter()
prompts = P.load_prompts({path!r})
cfg = P.Config(max_prompt_length=10 ** 6)
kept, ids = P.usable_prompts(prompts, tokenizer, None, cfg, "--prompts", print)
seconds, after = time.perf_counter() - t0, rss_mb()
objects = sum(sys.getsizeof(p) for p in kept) + sum(
    sys.getsizeof(row) + sum(sys.getsizeof(t) for t in row) for row in ids)
print(json.dumps({{"n": len(kept), "seconds": seconds, "rss_mb": after - before,
                   "objects_mb": objects / 2**20, "calls": calls[0], "strings": strings[0],
                   "tokens": sum(map(len, ids))}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="prompts")
    args = parser.parse_args()
    import datasets
    datasets.disable_progress_bars()
    words = "the a sea cat dream market went river house night song road day old new".split()
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 20)))
               for _ in range(args.n)]
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "prompts.parquet")
        datasets.Dataset.from_dict({"prompt": prompts}).to_parquet(path)
        out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), path=path)],
                             capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    n = result["n"]
    print(f"{n} prompts ({result['tokens'] / n:.1f} tokens each) loaded and tokenized in "
          f"{result['seconds']:.2f} s; resident memory +{result['rss_mb']:.1f} MB = "
          f"{result['rss_mb'] * 2**20 / n:.0f} B per prompt; the prompts and their token ids "
          f"as Python objects {result['objects_mb'] * 2**20 / n:.0f} B per prompt; tokenizer "
          f"given {result['strings']} strings in {result['calls']} call(s)")


if __name__ == "__main__":
    main()
