"""The hostile-input suite: bad inputs and faults, through the real CLI, as a hostile user would try them.

Every case asserts the exit code, one `Error: ...` line on stderr with no traceback, that the message names the file
or key at fault, and that the artifacts made before (a model, a run with checkpoints, prepared data) are unchanged,
byte for byte. Memory cases run under an address-space limit, so that an unbounded read fails the test instead of
swapping; full-disk cases write to a small tmpfs (root only, as in CI; skipped otherwise).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import CliResult, make_corpus, run_llmctl, write_prepared

MiB = 1 << 20
AS_LIMIT = 3 << 30
"""Address space for memory cases. A normal generate or eval of the tiny model peaks at about 1.2 GB of address
space here (torch's libraries and thread stacks); tokenizing a 16 MB line takes 3.4 GB of resident memory alone."""
TINY = ["--set", "model.n_layer=2", "--set", "model.n_head=2", "--set", "model.n_embd=32", "--set",
        "model.n_positions=64"]


# ---------------------------------------------------------------------------------------------------------------
# The world every case runs against, made once per module


@dataclass
class World:
    root: Path
    model: Path
    prepared: Path
    run: Path
    train_yaml: Path
    text: Path
    labeled: Path
    labels: Path
    hashes: dict[str, str] = field(default_factory=dict)

    def snapshot(self) -> dict[str, str]:
        out = {}
        for base in (self.model, self.prepared, self.run, self.text, self.labeled, self.labels, self.train_yaml):
            files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
            for path in files:
                if path.name == ".lock":
                    continue
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        return out


def train_raw(out_dir: Path, data_dir: Path, **train) -> dict:
    return {
        "run": {"out_dir": str(out_dir), "seed": 7, "threads": 1},
        "data": {"dir": str(data_dir)},
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "train": {"max_steps": 4, "batch_size": 4, "context": 32, "eval_interval": 2, "eval_batches": 2,
                  "log_interval": 2, "precision": "fp32", **train},
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, tokenizer_dir) -> World:
    root = tmp_path_factory.mktemp("world")
    model = root / "model"
    shutil.copytree(tiny_model_dir, model)
    prepared = write_prepared(root / "prepared", make_corpus(), tokenizer_dir)
    run = root / "run"
    train_yaml = root / "train.yaml"
    train_yaml.write_text(yaml.safe_dump(train_raw(run, prepared)))
    result = run_llmctl("train", "-c", str(train_yaml), "-q")
    assert result.code == 0, result.stderr
    text = root / "held-out.txt"
    text.write_text(make_corpus(5, seed=1))
    labeled = root / "labeled.jsonl"
    labeled.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n"
                               for t, lab in [("good day", "pos"), ("bad day", "neg"), ("fine", "pos")]))
    labels = root / "labels.txt"
    labels.write_text("pos\nneg\npos\n")
    w = World(root, model, prepared, run, train_yaml, text, labeled, labels)
    w.hashes = w.snapshot()
    return w


def check(result: CliResult, code: int, *names: str) -> str:
    """The exit code, one `Error:` line without a traceback, naming every one of `names`; returns the line."""
    assert result.code == code, f"exit {result.code}, stderr: {result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    assert len(errors) == 1, result.stderr
    if code != 2:  # Click's usage errors come with its usage lines
        assert len(lines) == 1, result.stderr
    for name in names:
        assert name in errors[0], f"{name!r} not in {errors[0]!r}"
    return errors[0]


def spawn(*args: str, input: bytes | None = None, limit_as: int | None = None, close_fd: int | None = None,
          stdout=subprocess.PIPE, timeout: float = 300) -> CliResult:
    """Like run_llmctl, with an address-space limit or a closed standard stream in the child."""
    env = {k: v for k, v in os.environ.items() if k != "LLMCTL_DEBUG"}
    env["HF_HUB_OFFLINE"] = "1"

    def setup():
        if limit_as is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))
        if close_fd is not None:
            os.close(close_fd)

    proc = subprocess.run([sys.executable, "-m", "llmctl", *args], input=input, stdout=stdout,
                          stderr=subprocess.PIPE, env=env, preexec_fn=setup, timeout=timeout)
    out = proc.stdout.decode("utf-8", "replace") if isinstance(proc.stdout, bytes) else ""
    return CliResult(proc.returncode, out, proc.stderr.decode("utf-8", "replace"))


# ---------------------------------------------------------------------------------------------------------------
# Cases: each returns (argv, stdin) for the world and a scratch directory, and names what the message must hold


@dataclass
class Case:
    id: str
    make: Callable[[World, Path], tuple[list[str], bytes | None]]
    names: Callable[[World, Path], list[str]]
    code: int = 1
    limit_as: int | None = None


def gen(w: World) -> list[str]:
    """generate on the world's model, with few enough new tokens for its 64 positions."""
    return ["generate", "-q", "-n", "4", "-m", str(w.model)]


def case(id, make, names=lambda w, t: [], code=1, limit_as=None):
    return pytest.param(Case(id, make, names, code, limit_as), id=id)


def copy_model(w: World, tmp: Path, mutate: Callable[[Path], None]) -> Path:
    path = tmp / "m"
    shutil.copytree(w.model, path)
    mutate(path)
    return path


def edit_config(**changes):
    def mutate(path: Path):
        config = json.loads((path / "config.json").read_text())
        config.update(changes)
        (path / "config.json").write_text(json.dumps(config))
    return mutate


def truncate(path: Path):
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def zero_bytes(path: Path):
    (path / "model.safetensors").write_bytes(b"")


def huge_header(path: Path):
    f = path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 1 << 50) + f.read_bytes()[8:])


def junk(path: Path):
    (path / "model.safetensors").write_bytes(os.urandom(4096))


def pickle_only(path: Path):
    import torch

    (path / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(2)}, path / "pytorch_model.bin")


def no_weights(path: Path):
    (path / "model.safetensors").unlink()


def nan_weights(path: Path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    tensors["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def sharded_missing(path: Path):
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}}))
    (path / "model.safetensors").unlink()


MODEL_FAULTS = {
    "truncated": (truncate, ["model.safetensors", "truncated"]),
    "zero-byte": (zero_bytes, ["model.safetensors", "empty"]),
    "huge-header": (huge_header, ["model.safetensors", "header claims"]),
    "junk": (junk, ["model.safetensors", "corrupt"]),
    "pickle-only": (pickle_only, ["pytorch_model.bin", "only safetensors", "save_pretrained"]),
    "no-weights": (no_weights, ["model.safetensors", "no weights"]),
    "more-layers": (edit_config(n_layer=3), ["transformer.h.2.", "no tensor"]),
    "fewer-layers": (edit_config(n_layer=1), ["transformer.h.1.", "no place"]),
    "vocab": (edit_config(vocab_size=300), ["transformer.wte.weight", "[257, 32]", "[300, 32]"]),
    "positions": (edit_config(n_positions=128), ["transformer.wpe.weight", "[64, 32]", "[128, 32]"]),
    "nan-weights": (nan_weights, ["transformer.h.0.mlp.c_fc.weight", "NaN"]),
    "shard-missing": (sharded_missing, ["model-00001-of-00002.safetensors", "missing"]),
}


def _model_cases():
    out = []
    for fault, (mutate, names) in MODEL_FAULTS.items():
        def gen(w, t, mutate=mutate):
            return ["generate", "-q", "-m", str(copy_model(w, t, mutate)), "-p", "hi", "-n", "2"], None

        def ev(w, t, mutate=mutate):
            return ["eval", "-q", "-m", str(copy_model(w, t, mutate)), "-i", str(w.text)], None

        def tune(w, t, mutate=mutate):
            model = copy_model(w, t, mutate)
            return ["train", "-q", "-c", str(w.train_yaml), "-o", str(t / "ft"), "--set",
                    f"model.pretrained={model}"], None

        out += [case(f"generate-model-{fault}", gen, lambda w, t, n=names: n),
                case(f"eval-model-{fault}", ev, lambda w, t, n=names: n)]
        if fault not in ("junk", "shard-missing", "no-weights"):
            out.append(case(f"train-model-{fault}", tune, lambda w, t, n=names: n))
    return out


# Config numbers: (command, --set override, what the message must name)
CONFIG_NUMBERS = [
    ("train", "optim.lr=nan", "optim.lr"),
    ("train", "optim.lr=.inf", "optim.lr"),
    ("train", "optim.lr=-0.1", "optim.lr"),
    ("train", "optim.lr=5", "optim.lr"),
    ("train", "optim.min_lr=nan", "optim.min_lr"),
    ("train", "optim.eps=0", "optim.eps"),
    ("train", "optim.eps=nan", "optim.eps"),
    ("train", "optim.weight_decay=inf", "optim.weight_decay"),
    ("train", "optim.weight_decay=5000", "optim.weight_decay"),
    ("train", "optim.weight_decay=-1", "optim.weight_decay"),
    ("train", "optim.grad_clip=nan", "optim.grad_clip"),
    ("train", "optim.grad_clip=-1", "optim.grad_clip"),
    ("train", "optim.beta2=nan", "optim.beta2"),
    ("train", "optim.muon_lr=inf", "optim.muon_lr"),
    ("train", "optim.muon_lr=0", "optim.muon_lr"),
    ("train", "train.max_time=inf", "train.max_time"),
    ("train", "train.max_time=nan", "train.max_time"),
    ("train", "train.max_time=-5", "train.max_time"),
    ("train", "train.epochs=inf", "train.epochs"),
    ("train", "train.epochs=-1", "train.epochs"),
    ("train", "model.dropout=nan", "model.dropout"),
    ("train", "model.activation=gelux", "model.activation"),
    ("train", "model.activation=swishy", "model.activation"),
    ("train", "model.attn_implementation=flash", "model.attn_implementation"),
    ("train", "run.seed=-1", "run.seed"),
    ("train", f"run.seed={2**64}", "run.seed"),
    ("preprocess", "data.val_fraction=nan", "data.val_fraction"),
    ("generate", "generate.temperature=nan", "generate.temperature"),
    ("generate", "generate.temperature=inf", "generate.temperature"),
    ("generate", "generate.temperature=1000", "generate.temperature"),
    ("generate", "generate.temperature=-1", "generate.temperature"),
    ("generate", "generate.repetition_penalty=inf", "generate.repetition_penalty"),
    ("generate", "generate.repetition_penalty=0", "generate.repetition_penalty"),
    ("generate", "generate.top_p=nan", "generate.top_p"),
    ("generate", f"generate.seed={2**64}", "generate.seed"),
    ("eval", "eval.fail_under.accuracy=nan", "eval.fail_under.accuracy"),
]


def _config_number_cases():
    out = []
    for command, override, key in CONFIG_NUMBERS:
        extra = ["--set", "optim.name=muon"] if "muon_lr" in override else []
        out.append(case(f"config-{command}-{override}",
                        lambda w, t, c=command, o=override, e=extra: ([c, "-q", "--set", o, *e], None),
                        lambda w, t, k=key: [k]))
    return out


def _yaml(tmp: Path, text: str) -> str:
    path = tmp / "bad.yaml"
    path.write_text(text)
    return str(path)


# JSONL per-line overrides: the same ranges as the config
JSONL_LINES = [
    ('{"prompt": "a", "temperature": Infinity}', "temperature"),
    ('{"prompt": "a", "temperature": NaN}', "temperature"),
    ('{"prompt": "a", "temperature": 1e9}', "temperature"),
    ('{"prompt": "a", "repetition_penalty": 1e9}', "repetition_penalty"),
    ('{"prompt": "a", "top_p": NaN}', "top_p"),
    ('{"prompt": "a", "seed": 18446744073709551616}', "seed"),
]


def _gzip_corrupt(tmp: Path, name: str) -> Path:
    data = gzip.compress(make_corpus(20).encode())
    path = tmp / name
    path.write_bytes(data[:20] + bytes(b ^ 0x5A for b in data[20:200]) + data[200:])
    return path


def _big_line(tmp: Path, nbytes: int = 50 * MiB, name: str = "line.txt") -> Path:
    path = tmp / name
    with open(path, "wb") as f:
        block = b"x" * MiB
        for _ in range(nbytes // MiB):
            f.write(block)
    return path


def _under_file(tmp: Path) -> Path:
    (tmp / "afile").write_text("not a directory")
    return tmp / "afile" / "out"


CASES = [
    # 1. bounded memory (under an address-space limit)
    case("mem-generate-dev-zero-lines", lambda w, t: ([*gen(w), "-i", "/dev/zero"], None),
         lambda w, t: ["/dev/zero", "longer than 1 MiB"], limit_as=AS_LIMIT),
    case("mem-generate-dev-zero-text", lambda w, t: ([*gen(w), "-i", "/dev/zero",
                                                      "--input-format", "text"], None),
         lambda w, t: ["/dev/zero", "larger than 1 MiB"], limit_as=AS_LIMIT),
    case("mem-generate-dev-zero-jsonl", lambda w, t: ([*gen(w), "-i", "/dev/zero",
                                                       "--input-format", "jsonl"], None),
         lambda w, t: ["/dev/zero", "longer than"], limit_as=AS_LIMIT),
    case("mem-generate-50mb-line", lambda w, t: ([*gen(w), "-i", str(_big_line(t))], None),
         lambda w, t: ["line.txt:1", "longer than 1 MiB"], limit_as=AS_LIMIT),
    case("mem-generate-50mb-stdin", lambda w, t: ([*gen(w)], b"y" * (50 * MiB)),
         lambda w, t: ["<stdin>:1", "longer than"], limit_as=AS_LIMIT),
    case("mem-eval-dev-zero", lambda w, t: (["eval", "-q", "-m", str(w.model), "-i", "/dev/zero"], None),
         lambda w, t: ["/dev/zero", "larger than 8 MiB", "preprocess"], limit_as=AS_LIMIT),
    case("mem-eval-50mb-text", lambda w, t: (["eval", "-q", "-m", str(w.model), "-i", str(_big_line(t))], None),
         lambda w, t: ["line.txt", "larger than 8 MiB"], limit_as=AS_LIMIT),
    case("mem-eval-50mb-jsonl", lambda w, t: (["eval", "-q", "-m", str(w.model), "-i",
                                               str(_big_line(t, name="big.jsonl"))], None),
         lambda w, t: ["big.jsonl:1", "longer than"], limit_as=AS_LIMIT),
    case("mem-eval-50mb-stdin", lambda w, t: (["eval", "-q", "-m", str(w.model), "-i", "-"], b"z" * (50 * MiB)),
         lambda w, t: ["<stdin>", "larger than"], limit_as=AS_LIMIT),
    case("mem-eval-zero-shot-dev-zero", lambda w, t: (["eval", "-q", "-m", str(w.model), "--task", "zero-shot",
                                                       "-i", "/dev/zero"], None),
         lambda w, t: ["/dev/zero", "longer than"], limit_as=AS_LIMIT),
    case("mem-eval-predictions-dev-zero", lambda w, t: (["eval", "-q", "--predictions", "/dev/zero", "--references",
                                                         str(w.labels)], None),
         lambda w, t: ["/dev/zero", "longer than"], limit_as=AS_LIMIT),
    case("mem-config-dev-zero-train", lambda w, t: (["train", "-q", "-c", "/dev/zero"], None),
         lambda w, t: ["/dev/zero", "larger than 1 MiB"], limit_as=AS_LIMIT),
    case("mem-config-dev-zero-generate", lambda w, t: (["generate", "-q", "-c", "/dev/zero"], None),
         lambda w, t: ["/dev/zero", "larger than 1 MiB"], limit_as=AS_LIMIT),
    case("mem-config-50mb", lambda w, t: (["eval", "-q", "-c", str(_big_line(t, 8 * MiB, "big.yaml"))], None),
         lambda w, t: ["big.yaml", "larger than 1 MiB"], limit_as=AS_LIMIT),
    case("mem-preprocess-dev-zero", lambda w, t: (["preprocess", "-q", "/dev/zero", "-o", str(t / "p")], None),
         lambda w, t: ["/dev/zero"], limit_as=AS_LIMIT),
    case("mem-train-classification-dev-zero", lambda w, t: (
        ["train", "-q", "-o", str(t / "r"), "--set", "train.task=classification", "--set", "data.inputs=[/dev/zero]",
         "--set", "train.max_steps=1", *TINY], None),
         lambda w, t: ["/dev/zero", "longer than"], limit_as=AS_LIMIT),
    *[case(f"mem-train-sft-{what}", lambda w, t, make=make: (
        ["train", "-q", "-o", str(t / "r"), "--set", "train.task=sft", "--set", f"data.inputs=[{make(t)}]", "--set",
         "sft.chat_template=chatml", "--set", "train.max_steps=1", *TINY], None),
        lambda w, t, name=name: [name, "longer than"], limit_as=AS_LIMIT)
      for what, make, name in [("dev-zero", lambda t: "/dev/zero", "/dev/zero:1"),
                               ("50mb-line", lambda t: _big_line(t, name="sft.jsonl"), "sft.jsonl:1")]],
    # 2 and 3. model directories: damaged, pickle-only, shape disagreeing with config.json, NaN weights
    *_model_cases(),
    # 4. numbers the config check must refuse
    *_config_number_cases(),
    case("config-yaml-nan", lambda w, t: (["train", "-q", "-c", _yaml(t, "optim:\n  lr: .nan\n")], None),
         lambda w, t: ["optim.lr", "finite"]),
    case("config-yaml-string-inf", lambda w, t: (["train", "-q", "-c", _yaml(t, "optim:\n  eps: '-inf'\n")], None),
         lambda w, t: ["optim.eps", "finite"]),
    *[case(f"jsonl-override-{i}", lambda w, t, line=line: ([*gen(w), "--input-format",
                                                             "jsonl"], (line + "\n").encode()),
           lambda w, t, key=key: ["<stdin>:1", f'"{key}"']) for i, (line, key) in enumerate(JSONL_LINES)],
    # 5. output and environment faults
    case("eval-output-under-a-file", lambda w, t: (["eval", "-q", "--predictions", str(w.labels), "--references",
                                                    str(w.labels), "-o", str(_under_file(t) / "r.json")], None),
         lambda w, t: ["afile", "is a file"]),
    case("eval-output-is-a-directory", lambda w, t: (["eval", "-q", "--predictions", str(w.labels), "--references",
                                                      str(w.labels), "-o", str(t)], None),
         lambda w, t: [str(t), "directory"]),
    case("eval-predictions-out-under-a-file", lambda w, t: (
        ["eval", "-q", "--predictions", str(w.labels), "--references", str(w.labels), "--predictions-out",
         str(_under_file(t) / "p.jsonl")], None), lambda w, t: ["afile", "is a file"]),
    case("train-out-dir-is-a-file", lambda w, t: (["train", "-q", "-c", str(w.train_yaml), "-o",
                                                   str(_under_file(t).parent)], None),
         lambda w, t: ["run.out_dir", "afile", "is a file"]),
    case("train-out-dir-under-a-file", lambda w, t: (["train", "-q", "-c", str(w.train_yaml), "-o",
                                                      str(_under_file(t))], None),
         lambda w, t: ["afile", "is a file"]),
    case("preprocess-out-is-a-file", lambda w, t: (["preprocess", "-q", str(w.text), "-o",
                                                    str(_under_file(t).parent)], None),
         lambda w, t: ["data.dir", "afile"]),
    case("preprocess-out-under-a-file", lambda w, t: (["preprocess", "-q", str(w.text), "-o",
                                                       str(_under_file(t))], None),
         lambda w, t: ["afile", "is a file"]),
    case("eval-corrupt-gzip", lambda w, t: (["eval", "-q", "-m", str(w.model), "-i",
                                             str(_gzip_corrupt(t, "held.txt.gz"))], None),
         lambda w, t: ["held.txt.gz", "gzip"]),
    case("generate-corrupt-gzip", lambda w, t: ([*gen(w), "-i",
                                                 str(_gzip_corrupt(t, "prompts.gz"))], None),
         lambda w, t: ["prompts.gz", "gzip"]),
    case("preprocess-corrupt-gzip", lambda w, t: (["preprocess", "-q", str(_gzip_corrupt(t, "c.txt.gz")), "-o",
                                                   str(t / "p")], None), lambda w, t: ["c.txt.gz"]),
    case("eval-labels-corrupt-gzip", lambda w, t: (["eval", "-q", "--predictions", str(_gzip_corrupt(t, "p.gz")),
                                                    "--references", str(w.labels)], None),
         lambda w, t: ["p.gz", "gzip"]),
    case("generate-not-utf8", lambda w, t: ([*gen(w)], b"\xff\xfe hello\n"),
         lambda w, t: ["<stdin>:1", "UTF-8"]),
    # 6. dead ends and wrong diagnoses (the run-based ones are tests below)
    case("resume-changed-shape", lambda w, t: (
        ["train", "-q", "-c", str(_copy_run_yaml(w, t)), "--resume", "--force", "--set", "model.n_embd=64"], None),
         lambda w, t: ["another model shape", "tensor", "32]", "64]", "run.out_dir"]),
    case("resume-pickled-state", lambda w, t: (["train", "-q", "-c", str(_copy_run_yaml(w, t, _pickle_state)),
                                                "--resume", "--force"], None),
         lambda w, t: ["state.pt", "refused"]),
    # 8. exit codes: malformed flag values are usage errors
    *[case(f"set-without-equals-{c}", lambda w, t, c=c: ([c, "--set", "train.max_steps"], None),
           lambda w, t: ["--set", "section.key=value"], code=2) for c in ("preprocess", "train", "generate", "eval")],
    case("set-without-section", lambda w, t: (["train", "--set", "max_steps=3"], None), lambda w, t: ["--set"],
         code=2),
    case("to-text-with-out", lambda w, t: (["preprocess", str(w.text), "--to-text", "-o", str(t / "x")], None),
         lambda w, t: ["--out", "--to-text"], code=2),
    # small ones
    *[case(f"duplicate-section-{c}",
           lambda w, t, c=c: ([c, "-q", "-c", _yaml(t, "train:\n  max_steps: 3\ntrain:\n  max_steps: 4\n")], None),
           lambda w, t: ["bad.yaml", "duplicate key 'train'"]) for c in ("preprocess", "train", "generate", "eval")],
    case("duplicate-key", lambda w, t: (["train", "-q", "-c", _yaml(t, "optim:\n  lr: 1\n  lr: 2\n")], None),
         lambda w, t: ["line 3", "duplicate key 'lr'"]),
    case("eval-model-in-files-mode", lambda w, t: (["eval", "-q", "-m", str(w.model), "--predictions",
                                                    str(w.labels), "--references", str(w.labels)], None),
         lambda w, t: ["eval.model", "without a model"]),
    # our own
    case("config-missing", lambda w, t: (["train", "-q", "-c", str(t / "nope.yaml")], None),
         lambda w, t: ["nope.yaml", "does not exist"]),
    case("config-is-a-directory", lambda w, t: (["generate", "-q", "-c", str(t)], None), lambda w, t: [str(t)],
         code=2),
    case("config-not-utf8", lambda w, t: (["eval", "-q", "-c", str(_write(t / "c.yaml", b"a: \xff\n"))], None),
         lambda w, t: ["c.yaml", "UTF-8"]),
    case("config-top-level-list", lambda w, t: (["eval", "-q", "-c", _yaml(t, "- a\n- b\n")], None),
         lambda w, t: ["bad.yaml", "mapping"]),
    case("config-unknown-key", lambda w, t: (["train", "-q", "--set", "optim.lrr=1"], None),
         lambda w, t: ["optim.lrr", "optim.lr"]),
    case("model-is-a-file", lambda w, t: (["generate", "-q", "-m", str(w.text), "-p", "x"], None),
         lambda w, t: [str(w.text), "is a file"]),
    case("model-missing", lambda w, t: (["eval", "-q", "-m", str(t / "none"), "-i", str(w.text)], None),
         lambda w, t: [str(t / "none"), "does not exist"]),
    case("eval-input-missing", lambda w, t: (["eval", "-q", "-m", str(w.model), "-i", str(t / "no.txt")], None),
         lambda w, t: ["no.txt", "no such file"]),
    case("generate-max-new-tokens-too-long", lambda w, t: ([*gen(w), "-p", "x", "-n",
                                                            "64"], None),
         lambda w, t: ["generate.max_new_tokens", "64"]),
    case("train-data-dir-missing", lambda w, t: (["train", "-q", "-o", str(t / "r"), "--set",
                                                  f"data.dir={t / 'nodata'}", "--set", "train.max_steps=1", *TINY],
                                                 None), lambda w, t: ["nodata"]),
]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _pickle_state(run: Path):
    import pickle

    latest = sorted((run / "checkpoints").glob("step-*"))[-1]
    (latest / "state.pt").write_bytes(pickle.dumps(Exception("boom")))


def _copy_run_yaml(w: World, tmp: Path, mutate: Callable[[Path], None] | None = None) -> Path:
    """A copy of the world's finished run (so resume cases do not touch it), and a config pointing at it."""
    run = tmp / "run"
    shutil.copytree(w.run, run)
    if mutate is not None:
        mutate(run)
    path = tmp / "train.yaml"
    path.write_text(yaml.safe_dump(train_raw(run, w.prepared, max_steps=6)))
    return path


@pytest.mark.parametrize("c", CASES)
def test_hostile(c: Case, world: World, tmp_path: Path):
    argv, stdin = c.make(world, tmp_path)
    if c.limit_as is not None:
        result = spawn(*argv, input=stdin, limit_as=c.limit_as)
    else:
        result = run_llmctl(*argv, input=stdin)
    check(result, c.code, *c.names(world, tmp_path))
    assert world.snapshot() == world.hashes


def test_case_count():
    assert len(CASES) >= 100


# ---------------------------------------------------------------------------------------------------------------
# The limit is not what makes the memory cases fail: a normal run fits under it


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_normal_runs_fit_the_address_space_limit(command, world, tmp_path):
    args = (["generate", "-q", "-m", str(world.model), "-n", "4"] if command == "generate"
            else ["eval", "-q", "-m", str(world.model), "-i", "-"])
    result = spawn(*args, input=b"The cat watched the red door.\n" * 100, limit_as=AS_LIMIT)
    assert result.code == 0, result.stderr


# ---------------------------------------------------------------------------------------------------------------
# Closed standard streams


def test_stdout_closed(world):
    result = spawn("generate", "-q", "-m", str(world.model), "-p", "hi", "-n", "2", close_fd=1, stdout=None)
    check(result, 1, "stdout", "closed")


def test_stdin_closed_generate(world):
    check(spawn("generate", "-q", "-n", "4", "-m", str(world.model), close_fd=0), 1, "<stdin>", "closed")


def test_stdin_closed_preprocess(world, tmp_path):
    check(spawn("preprocess", "-q", "-o", str(tmp_path / "p"), close_fd=0), 1, "<stdin>", "closed")


def test_literal_end_of_text_in_a_prompt_is_text(world):
    """One rule for generate and preprocess: a literal `<|endoftext|>` in user text is its characters."""
    prompt = "a<|endoftext|>"
    result = run_llmctl("generate", "-q", "-m", str(world.model), "-p", prompt, "-n", "1", "-f", "jsonl")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["prompt_tokens"] == len(prompt.encode())  # bytes, not 2 tokens


# ---------------------------------------------------------------------------------------------------------------
# Full disk: a small tmpfs, mounted here (root only)


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("full-disk cases mount a tmpfs, which needs root (CI runs as root)")
    where = tmp_path_factory.mktemp("disk")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path) -> Path:
    """Take all free space on `disk`; returns the filler to delete afterwards."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 16, 1 << 10, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass
    return filler


def leftovers(disk: Path) -> list[str]:
    return sorted(p.name for p in disk.rglob(".*") if ".p" in p.name or p.name.startswith(".export"))


@pytest.fixture()
def disk(small_disk):
    for path in small_disk.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    yield small_disk


@pytest.mark.parametrize("target", ["output", "predictions-out", "stdout"])
def test_full_disk_eval_and_generate(target, world, disk):
    out = disk / "result"
    out.write_text("earlier\n")
    filler = fill(disk)
    try:
        if target == "stdout":  # a new file: appending to `out` would fit in its page (tmpfs allocates by page)
            with open(disk / "generated", "wb") as stdout:
                result = spawn("generate", "-q", "-m", str(world.model), "-p", "x" * 10, "-n", "40", "--ignore-eos",
                               stdout=stdout)
            check(result, 1, "stdout", "no space left on device")
        else:
            flag = "-o" if target == "output" else "--predictions-out"
            result = spawn("eval", "-q", "--predictions", str(world.labels), "--references", str(world.labels), flag,
                           str(out))
            check(result, 1, str(out), "no space left on device")
            assert out.read_text() == "earlier\n"
        assert leftovers(disk) == []
    finally:
        filler.unlink()


def test_full_disk_preprocess_keeps_the_earlier_data(world, disk):
    data = disk / "prepared"
    assert run_llmctl("preprocess", "-q", str(world.text), "-o", str(data)).code == 0
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    filler = fill(disk)
    try:
        result = spawn("preprocess", "-q", str(world.text), "-o", str(data), "--force")
        check(result, 1, "data.dir", str(data), "no space left on device")
        assert {p.name: p.read_bytes() for p in data.iterdir()} == before
        assert leftovers(disk) == []
    finally:
        filler.unlink()


def test_full_disk_checkpoint_keeps_the_earlier_ones(world, disk):
    run = disk / "run"
    config = disk / "train.yaml"
    config.write_text(yaml.safe_dump(train_raw(run, world.prepared, max_steps=2, keep_checkpoints=5)))
    assert run_llmctl("train", "-q", "-c", str(config)).code == 0
    before = {str(p): p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}
    filler = fill(disk)
    try:
        result = spawn("train", "-q", "-c", str(config), "--resume", "--force", "--set", "train.max_steps=4")
        line = check(result, 1, "no space left on device")
        assert "step-" in line or "metrics.jsonl" in line or str(run) in line
        after = {str(p): p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()
                 and not p.parent.name.startswith(".")}
        assert {k: v for k, v in after.items() if k in before} == before
    finally:
        filler.unlink()
    assert leftovers(run / "checkpoints") == []


# ---------------------------------------------------------------------------------------------------------------
# 5. junk in metrics.jsonl does not stop a resume


def test_junk_in_metrics_does_not_stop_a_resume(world, tmp_path):
    config = _copy_run_yaml(world, tmp_path)
    with open(tmp_path / "run" / "metrics.jsonl", "ab") as f:
        f.write(b"\xff\xfe\x00garbage{\n")
    result = run_llmctl("train", "-q", "-c", str(config), "--resume", "--force")
    assert result.code == 0, result.stderr


# ---------------------------------------------------------------------------------------------------------------
# 6. dead ends: killed before the first checkpoint, stopped by NaN


def _start(*args: str, stdin=None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "llmctl", *args], stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)


def _wait(predicate: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_killed_before_the_first_checkpoint_restarts_without_force(world, tmp_path):
    run = tmp_path / "run"
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(train_raw(run, world.prepared, max_steps=100000, eval_interval=0,
                                               checkpoint_interval=0)))
    proc = _start("train", "-q", "-c", str(config))
    _wait(lambda: (run / "metrics.jsonl").exists() and (run / "run.json").exists(), proc)
    proc.kill()
    proc.wait()
    assert not list((run / "checkpoints").glob("step-*"))
    resumed = run_llmctl("train", "-q", "-c", str(config), "--resume", "--set", "train.max_steps=2")
    assert resumed.code == 0, resumed.stderr
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


def test_nan_stops_marks_failed_and_restarts_without_force(world, tmp_path):
    run = tmp_path / "run"
    config = tmp_path / "train.yaml"
    raw = train_raw(run, world.prepared, max_steps=6, eval_interval=0)
    raw["optim"].update(lr=1.0, grad_clip=0.0, warmup_steps=0, beta2=0.0, eps=1e-30, weight_decay=0.0)
    config.write_text(yaml.safe_dump(raw))
    line = check(run_llmctl("train", "-q", "-c", str(config)), 1, "became", "optim.")
    assert "weights_only" not in line
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "failed" and "became" in status["error"]
    again = run_llmctl("train", "-q", "-c", str(config), "--set", "optim.lr=1e-3", "--set", "optim.eps=1e-8",
                       "--set", "train.max_steps=2")
    assert again.code == 0, again.stderr


# ---------------------------------------------------------------------------------------------------------------
# 7. leftovers: SIGTERM cleans up as SIGINT does; what SIGKILL leaves is swept by the next run


def _preprocess_waiting_on_stdin(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    data = tmp_path / "prepared"
    proc = _start("preprocess", "-q", "-o", str(data), "--set", "tokenizer.vocab_size=300", stdin=subprocess.PIPE)
    proc.stdin.write(make_corpus(50).encode())
    proc.stdin.flush()
    _wait(lambda: any(p.name.startswith(".llmctl-spool.p") for p in tmp_path.iterdir()), proc)
    return proc, data


def test_sigterm_during_preprocess_leaves_nothing(tmp_path):
    proc, data = _preprocess_waiting_on_stdin(tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err.decode() and err.decode().count("Error:") == 1
    assert [p.name for p in tmp_path.iterdir()] == []


def test_what_sigkill_leaves_is_swept_by_the_next_run(tmp_path, world):
    proc, data = _preprocess_waiting_on_stdin(tmp_path)
    proc.kill()
    proc.wait()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.startswith(".prepared.p") for n in left) and any(n.startswith(".llmctl-spool.p") for n in left)
    result = run_llmctl("preprocess", "-q", str(world.text), "-o", str(data))
    assert result.code == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]
