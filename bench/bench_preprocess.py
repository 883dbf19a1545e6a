"""Benchmark `llmctl preprocess` against the obvious path, in the same run.

    python bench/bench_preprocess.py                 # 200 MB of tiny Shakespeare, replicated, in /tmp
    python bench/bench_preprocess.py --mb 50 --baseline-mb 10

The input is built in /tmp from ../shared/data/tinyshakespeare.txt (never in the repository). Each path runs in its
own subprocess; its peak RSS is the largest of that process and every worker it started (wait4's rusage). The
exclusive CPU lock (/tmp/llmctl-cpu.lock, see notes/TEAM.md) is held only while a path is being measured.

Paths:
  baseline   the obvious path: read all lines, `encode_batch` with the tokenizers library, collect the ids, write
             them (same 8k BPE as ours, and no cleaning: less work than ours). It needs ~100x the input in memory,
             so it runs on a slice (--baseline-mb); ours runs on that slice too, for a same-size ratio.
  bpe-8k     ours: read + clean (NFKC, cleanup) + train an 8192-token BPE on a 20 MB sample + encode + write
  bytes      ours with the byte vocabulary (256): read + clean + encode + write
  filter     `--to-text` filter mode (stdin -> stdout), plain cleaning, and with the NLTK stages of
             configs/classic-nlp.yaml (sentences, words, stop words, Porter) on a smaller slice: NLTK is pure Python
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
WORK = Path("/tmp/llmctl-bench-preprocess")
LOCK = "/tmp/llmctl-cpu.lock"


@contextlib.contextmanager
def exclusive_cpu():
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def make_input(mb: int) -> Path:
    path = WORK / f"shakespeare-{mb}mb.txt"
    if not path.exists() or path.stat().st_size < mb * 1_000_000:
        text = SHAKESPEARE.read_bytes()
        copies = -(-mb * 1_000_000 // len(text))
        WORK.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            for _ in range(copies):
                f.write(text)
    return path


def measure(argv: list[str], stdin: Path | None = None, capture: bool = False, env: dict | None = None) -> dict:
    """Run argv in a subprocess under the exclusive lock: wall seconds, peak RSS (MB; its own and its workers'),
    stderr, and with `capture` its (small) stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    stdout = subprocess.PIPE if capture else subprocess.DEVNULL
    with exclusive_cpu():
        started = time.perf_counter()
        with open(stdin, "rb") if stdin else contextlib.nullcontext() as fin:
            proc = subprocess.Popen(argv, stdin=fin, stdout=stdout, stderr=subprocess.PIPE, env=env)
            out = proc.stdout.read() if capture else b""
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - started
    err = proc.stderr.read().decode()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{' '.join(argv)} failed ({code}):\n{err}")
    return {"seconds": seconds, "rss_mb": usage.ru_maxrss / 1024, "stderr": err, "stdout": out}


def llmctl(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmctl", *args]


def prepare(path: Path, out: Path, vocab: int) -> dict:
    argv = llmctl("preprocess", str(path), "-o", str(out), "--set", f"tokenizer.vocab_size={vocab}", "--force", "-q",
                  "--json")
    result = measure(argv, capture=True)
    result["tokens"] = sum(json.loads(result["stdout"])["tokens"].values())
    return result


BASELINE = r'''
import sys, numpy as np
from tokenizers import Tokenizer
path, tokenizer_json, out = sys.argv[1:4]
tok = Tokenizer.from_file(tokenizer_json)
lines = open(path, encoding="utf-8").readlines()          # read all lines
ids = []
for enc in tok.encode_batch(lines):                        # encode_batch with the tokenizers library
    ids.extend(enc.ids)                                    # collect ids
np.array(ids, dtype=np.uint16).tofile(out)
print(len(ids))
'''


def baseline(path: Path, tokenizer_json: Path) -> dict:
    argv = [sys.executable, "-c", BASELINE, str(path), str(tokenizer_json), str(WORK / "baseline.bin")]
    result = measure(argv, capture=True, env={"TOKENIZERS_PARALLELISM": "true"})  # let it use both cores
    result["tokens"] = int(result["stdout"])
    return result


def row(name: str, mb: float, r: dict) -> str:
    tokens = f"{r['tokens'] / r['seconds'] / 1e6:8.2f}" if r.get("tokens") else "       -"
    return f"{name:34s} {mb:8.1f} {r['seconds']:8.2f} {mb / r['seconds']:8.2f} {tokens} {r['rss_mb']:9.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="input size in MB (default 200)")
    parser.add_argument("--baseline-mb", type=int, default=20, help="slice for the obvious path (default 20)")
    parser.add_argument("--nltk-mb", type=int, default=2, help="slice for filter mode with NLTK stages (default 2)")
    args = parser.parse_args()
    if not SHAKESPEARE.exists():
        sys.exit(f"{SHAKESPEARE} is missing")
    full = make_input(args.mb)
    mb = full.stat().st_size / 1e6
    small = make_input(args.baseline_mb)
    small_mb = small.stat().st_size / 1e6
    nltk_in = make_input(args.nltk_mb)
    nltk_mb = nltk_in.stat().st_size / 1e6
    print(f"input: {full} ({mb:.1f} MB), tiny Shakespeare replicated; {os.cpu_count()} CPUs", flush=True)
    print(f"{'path':34s} {'MB':>8s} {'seconds':>8s} {'MB/s':>8s} {'Mtok/s':>8s} {'peak RSS MB':>9s}")
    results = {}
    results["bpe"] = prepare(full, WORK / "bpe-8k", 8192)
    print(row("ours bpe-8k (read+clean+train+encode)", mb, results["bpe"]), flush=True)
    results["bytes"] = prepare(full, WORK / "bytes", 256)
    print(row("ours bytes (read+clean+encode+write)", mb, results["bytes"]), flush=True)
    results["bpe_small"] = prepare(small, WORK / "bpe-8k-small", 8192)
    print(row("ours bpe-8k, baseline's slice", small_mb, results["bpe_small"]), flush=True)
    results["baseline"] = baseline(small, WORK / "bpe-8k" / "tokenizer.json")
    print(row("baseline (readlines+encode_batch)", small_mb, results["baseline"]), flush=True)
    results["filter"] = measure(llmctl("preprocess", "--to-text", "-q"), stdin=full)
    print(row("filter --to-text, plain cleaning", mb, results["filter"]), flush=True)
    results["nltk"] = measure(llmctl("preprocess", "-c", str(REPO / "configs" / "classic-nlp.yaml"), "--to-text", "-q"),
                              stdin=nltk_in)
    print(row("filter --to-text, NLTK classic-nlp", nltk_mb, results["nltk"]), flush=True)
    base_rate = small_mb / results["baseline"]["seconds"]
    print()
    print(f"baseline ran on a {small_mb:.0f} MB slice: on {mb:.0f} MB it would need ~"
          f"{results['baseline']['rss_mb'] * mb / small_mb / 1024:.0f} GB of RAM (its peak RSS grows with the input)")
    print(f"ratio ours bpe-8k / baseline, MB/s: {mb / results['bpe']['seconds'] / base_rate:.1f}x on {mb:.0f} MB, "
          f"{small_mb / results['bpe_small']['seconds'] / base_rate:.1f}x on the same {small_mb:.0f} MB slice")
    print(f"targets: bpe-8k >= 10 MB/s: {mb / results['bpe']['seconds']:.1f}; bytes >= 50 MB/s: "
          f"{mb / results['bytes']['seconds']:.1f}; peak RSS < 1024 MB: "
          f"{max(results['bpe']['rss_mb'], results['bytes']['rss_mb']):.0f}; >= 4x baseline: see ratio")


if __name__ == "__main__":
    main()
