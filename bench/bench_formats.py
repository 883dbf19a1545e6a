"""Benchmark `llmctl preprocess` of a Parquet file against the same text as a .txt file, in the same run.

    python bench/bench_formats.py                 # 50 MB of tiny Shakespeare, replicated, in /tmp
    python bench/bench_formats.py --mb 1000       # the issue's 1 GB case (needs ~3 GB of /tmp, minutes)
    python bench/bench_formats.py --vocab 8192    # with BPE training and encoding instead of the byte vocabulary

The corpus is built in /tmp from ../shared/data/tinyshakespeare.txt (never in the repository): its paragraphs,
replicated, are the documents, written once as a .txt file (blank lines between documents, `data.documents:
paragraph`) and once as a Parquet file (one row per document, a `text` column, pyarrow's default row groups, as a
user would have it). Both go through the same command with the byte vocabulary by default, where reading is the
largest share of the work, so any cost of the Parquet path shows most. Each run is its own subprocess; its peak RSS
is the largest of that process and the workers it started (wait4's rusage). The exclusive CPU lock
(/tmp/llmctl-cpu.lock) is held only while a path is being measured.

Targets (issue 15): Parquet peak RSS under 1 GB at 1 GB of input, and at least 80% of the .txt path's speed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_preprocess import SHAKESPEARE, llmctl, measure  # noqa: E402

WORK = Path("/tmp/llmctl-bench-formats")


def make_inputs(mb: int) -> tuple[Path, Path, int]:
    """The same documents as .txt and .parquet; returns both paths and the number of documents."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    txt, parquet = WORK / f"corpus-{mb}mb.txt", WORK / f"corpus-{mb}mb.parquet"
    paragraphs = [p.strip() for p in SHAKESPEARE.read_text().split("\n\n") if p.strip()]
    size = sum(len(p.encode()) + 2 for p in paragraphs)
    copies = -(-mb * 1_000_000 // size)
    if not (txt.exists() and parquet.exists()):
        WORK.mkdir(parents=True, exist_ok=True)
        with open(txt, "w") as f:
            for _ in range(copies):
                f.write("\n\n".join(paragraphs) + "\n\n")
        schema = pa.schema([("text", pa.string())])
        with pq.ParquetWriter(parquet, schema) as writer:  # written a copy at a time: the bench's own memory stays low
            for _ in range(copies):
                writer.write_table(pa.table({"text": paragraphs}, schema=schema))
    return txt, parquet, copies * len(paragraphs)


def run(path: Path, out: Path, vocab: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    result = measure(llmctl("preprocess", str(path), "-o", str(out), "--set", f"tokenizer.vocab_size={vocab}",
                            "--json", "-q"), capture=True)
    summary = json.loads(result["stdout"])
    return {"seconds": result["seconds"], "rss_mb": result["rss_mb"], "tokens": sum(summary["tokens"].values()),
            "documents": sum(summary["documents"].values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=50, help="corpus size in MB (1000 for the issue's 1 GB case)")
    parser.add_argument("--vocab", type=int, default=256, help="tokenizer.vocab_size (256: bytes, no training)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each path; the fastest counts")
    args = parser.parse_args()
    if not SHAKESPEARE.is_file():
        sys.exit(f"{SHAKESPEARE} is missing")
    txt, parquet, n_docs = make_inputs(args.mb)
    print(f"corpus: {n_docs:,} documents; .txt {txt.stat().st_size / 1e6:.0f} MB, "
          f".parquet {parquet.stat().st_size / 1e6:.0f} MB", file=sys.stderr)
    results = {}
    for name, path in (("txt", txt), ("parquet", parquet)):
        runs = [run(path, WORK / f"out-{name}", args.vocab) for _ in range(args.repeat)]
        best = min(runs, key=lambda r: r["seconds"])
        best["rss_mb"] = max(r["rss_mb"] for r in runs)
        best["mb_per_s"] = txt.stat().st_size / 1e6 / best["seconds"]  # the same text either way
        results[name] = best
        print(f"{name:8} {best['seconds']:7.1f} s  {best['mb_per_s']:6.1f} MB/s of text  "
              f"peak RSS {best['rss_mb']:6.0f} MB  {best['tokens']:,} tokens", file=sys.stderr)
    ratio = results["txt"]["seconds"] / results["parquet"]["seconds"]
    same = results["txt"]["tokens"] == results["parquet"]["tokens"]
    print(f"parquet speed / txt speed: {ratio:.2f} (target >= 0.80); parquet peak RSS "
          f"{results['parquet']['rss_mb']:.0f} MB (target < 1024 at 1 GB); same tokens: {same}", file=sys.stderr)
    print(json.dumps({"mb": args.mb, "vocab": args.vocab, "speed_ratio": round(ratio, 3), **results}))


if __name__ == "__main__":
    main()
