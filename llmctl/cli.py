"""The command line: the only module that knows Typer.

Each command turns its flags into config values, loads the config, calls its module's `run(config)` and writes the
result to stdout. `main()` is the one place that maps errors to messages and exit codes (see `llmctl.errors`).
Heavy imports (torch, transformers) happen inside the commands, so `llmctl --help` answers at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer

from llmctl import __version__
from llmctl.errors import (
    EXIT_ERROR,
    EXIT_GATE_FAILED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    LlmctlError,
    OutputError,
    Terminated,
)

app = typer.Typer(
    name="llmctl",
    help="Clean and tokenize a corpus, train or fine-tune a GPT-2-style model, generate text, and evaluate.\n\n"
    "Each command reads one YAML experiment file (-c) and takes `--set section.key=value` overrides.",
    no_args_is_help=True,
    add_completion=True,  # `llmctl --install-completion` (bash, zsh, fish, PowerShell)
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Options every command shares.
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Experiment YAML file.", dir_okay=False, show_default=False, metavar="FILE"),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config value: section.key=value (repeatable).", show_default=False,
                 metavar="KEY=VALUE"),
]
PrintConfigOpt = Annotated[
    bool, typer.Option("--print-config", help="Print the resolved config as YAML and exit.", show_default=False)
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr: no progress, no summary.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging on stderr.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]


def _examples(*lines: str) -> str:
    """A help text's last part: real examples, one per line, kept as written (Click's \\b marker stops rewrapping).
    tests/test_help.py parses every one of them against this CLI."""
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


EXAMPLES = {
    "llmctl": _examples(
        "llmctl train -c configs/quickstart.yaml                  # prepare, train, print the run directory",
        "llmctl generate -c configs/quickstart.yaml -p 'Python is'",
        "llmctl eval -m runs/quickstart -i held-out.txt --fail-over perplexity=40",
        "llmctl --install-completion                              # tab completion for your shell",
    ),
    "preprocess": _examples(
        "llmctl preprocess -c configs/lm-bpe.yaml corpus/ -o data/corpus        # 8k BPE + token shards",
        "llmctl preprocess docs.parquet --set data.text_field=body -o data/docs  # a Parquet column",
        "llmctl preprocess hf:stanfordnlp/imdb@train -o data/imdb               # a cached HF dataset",
        "zcat dump.jsonl.gz | llmctl preprocess - --set data.format=jsonl -o data/dump --json",
        "cat corpus.txt | llmctl preprocess -c configs/classic-nlp.yaml --to-text > tokens.txt",
    ),
    "train": _examples(
        "llmctl train -c configs/quickstart.yaml",
        "llmctl train -c configs/sft.yaml                              # prompt/completion or chat JSONL",
        "llmctl train -c configs/lm-bpe.yaml --resume                 # continue after Ctrl-C (exit 75)",
        "llmctl train -c configs/lm-bpe.yaml --set 'train.loggers=[jsonl,png,tensorboard]'",
        "llmctl train -c configs/sentiment.yaml --set data.inputs=[reviews.parquet] --json",
    ),
    "generate": _examples(
        "llmctl generate -m runs/quickstart -p 'Once upon a time' -n 50",
        "llmctl generate -m runs/quickstart --greedy --stop '.' < prompts.txt",
        "llmctl generate -m runs/quickstart -i prompts.jsonl --input-format jsonl -f jsonl > out.jsonl",
        "llmctl generate -m runs/quickstart -i prompts.parquet -f jsonl       # a `prompt` column",
        "llmctl generate -m runs/sft --chat --system 'Answer briefly.' -p 'Name a prime number.'",
    ),
    "eval": _examples(
        "llmctl eval -c configs/quickstart.yaml                          # validation split of data.dir",
        "llmctl eval -m runs/quickstart -i held-out.txt --fail-over perplexity=40",
        "llmctl eval -m runs/sentiment -i test.csv --set data.label_field=sentiment --fail-under accuracy=0.8",
        "llmctl eval -m runs/quickstart -i reviews.jsonl --task zero-shot --verbalizer pos=' good' "
        "--verbalizer neg=' bad'",
        "llmctl eval --predictions pred.txt --references gold.txt --json",
    ),
}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmctl {__version__}")
        raise typer.Exit()


@app.callback(epilog=EXAMPLES["llmctl"])
def _root(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_version, is_eager=True)
    ] = False,
) -> None:
    pass


def _load(
    config: Path | None, sets: list[str] | None, values: dict[str, Any], print_config: bool, quiet: bool, verbose: bool
):
    """Resolve the config (file, then --set, then dedicated flags); with --print-config print it and stop."""
    from llmctl.config import load_config
    from llmctl.core.console import setup_logging

    setup_logging(quiet=quiet, verbose=verbose)
    for override in sets or []:  # malformed flag values are usage errors (exit 2), as Click's own are
        key, sep, _ = override.partition("=")
        if not sep or "." not in key or not all(part.strip() for part in key.split(".")):
            raise typer.BadParameter(f"{override!r}: expected section.key=value, for example train.max_steps=100",
                                     param_hint="--set")
    cfg = load_config(config, sets or [], {k: v for k, v in values.items() if v is not None})
    if print_config:
        _write(cfg.to_yaml())
        raise typer.Exit(EXIT_OK)
    return cfg


@contextlib.contextmanager
def _stdout_guard():
    """A reader that goes away (`| head -1`) is not an error for a filter: exit 0 quietly. Handled here because
    Typer turns a broken pipe into exit 1 before main() could see it; stdout then points at /dev/null so the
    interpreter's final flush stays quiet."""
    if sys.stdout is None:  # started with stdout closed (`>&-`)
        raise OutputError("cannot write to stdout: it is closed; redirect it to a file or /dev/null instead")
    try:
        yield
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(EXIT_OK) from None
    except OSError as exc:  # a full disk, a closed descriptor: what is buffered can never be written
        from llmctl.core.faults import reason

        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise OutputError(f"cannot write to stdout: {reason(exc)}") from None


def _write(text: str) -> None:
    with _stdout_guard():
        sys.stdout.write(text)
        sys.stdout.flush()


def _write_json(obj: Any) -> None:
    _write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _write_stream(chunks: Iterable[str | dict]) -> None:
    """Write text chunks as they come (flushing each, so pipes see output before input ends); dicts as JSONL."""
    for chunk in chunks:  # guarded per write: an error of the producer is its own, not stdout's
        if isinstance(chunk, dict):
            chunk = json.dumps(chunk, ensure_ascii=False) + "\n"
        _write(chunk)


# ---------------------------------------------------------------------------------------------------------------
# Commands


@app.command(epilog=EXAMPLES["preprocess"])
def preprocess(
    inputs: Annotated[
        list[str] | None,
        # Described in the docstring: Typer would label a listed argument `<list[str]>`.
        typer.Argument(show_default=False, metavar="INPUT", hidden=True),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Prepared data directory (data.dir).", metavar="DIR")
    ] = None,
    to_text: Annotated[
        bool, typer.Option("--to-text", help="Filter mode: write the cleaned text (one document per line) to stdout.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when inputs and config are unchanged.")] = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    print_config: PrintConfigOpt = False,
) -> None:
    """Clean text, train or reuse a tokenizer, and write token shards (or, with --to-text, filter text).

    INPUT: files (text, JSONL, Parquet, CSV/TSV), directories, save_to_disk datasets, hf:NAME[:CONFIG][@SPLIT]
    or - (stdin); default: data.inputs, else stdin."""
    if to_text and out is not None:
        raise typer.BadParameter("--to-text writes the cleaned text to stdout; redirect it (> FILE) instead",
                                 param_hint="--out")
    cfg = _load(config, set_, {"data.inputs": inputs or None, "data.dir": out}, print_config, quiet, verbose)
    from llmctl import preprocess as command

    if to_text:
        _write_stream(command.filter_text(cfg, quiet=quiet))
        return
    result = command.run(cfg, force=force, quiet=quiet)
    if json_:
        _write_json(result)


@app.command(epilog=EXAMPLES["train"])
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Run directory (run.out_dir).", metavar="DIR")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint (train.resume).")] = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="Resume although the config or data changed; overwrite a run directory."),
    ] = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    print_config: PrintConfigOpt = False,
) -> None:
    """Train a model from scratch or fine-tune one; print the saved model's path (exit 75: interrupted, resumable)."""
    values = {"train.resume": True if resume else None, "run.out_dir": out}
    cfg = _load(config, set_, values, print_config, quiet, verbose)
    from llmctl import train as command

    result = command.run(cfg, force=force, quiet=quiet)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun only rank 0 reports
    _train_summary(result, quiet)
    if json_:
        _write_json(result)
    else:
        _write(f"{result['model_path']}\n")


def _train_summary(result: dict[str, Any], quiet: bool) -> None:
    """The end-of-training table, on stderr."""
    if quiet:
        return
    from rich.table import Table

    from llmctl.core.console import stderr_console

    def fmt(value: Any) -> str:
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        if isinstance(value, float):
            return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4f}"
        return "-" if value is None else str(value)

    table = Table(title="training summary", show_header=False, title_justify="left")
    rows = [
        ("steps", result.get("steps")),
        ("tokens", result.get("tokens")),
        ("final train loss", result.get("final_loss")),
        ("final val loss", result.get("final_val_loss")),
        ("final val accuracy", result.get("final_val_accuracy")),
        ("best val loss", f"{fmt(result.get('best_val_loss'))} (step {fmt(result.get('best_step'))})"),
        ("tokens/s", result.get("tokens_per_s")),
        ("wall time", f"{result.get('wall_time_s', 0):.1f} s"),
        ("stopped by", result.get("stopped_by")),
        ("model", result.get("model_path")),
    ]
    for name, value in rows:
        if name == "final val accuracy" and value is None:
            continue
        table.add_row(name, fmt(value))
    stderr_console().print(table)


@app.command(epilog=EXAMPLES["generate"])
def generate(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Run/model directory or hub id.", metavar="DIR_OR_ID")
    ] = None,
    prompt: Annotated[
        list[str] | None,
        typer.Option("--prompt", "-p", help="Prompt (repeatable); default: read --input.", metavar="TEXT")
    ] = None,
    input_: Annotated[
        str | None,
        typer.Option("--input", "-i", help="File of prompts (lines, JSONL, or a Parquet/CSV `prompt` column); - (the "
                     "default) is stdin.", show_default=False, metavar="FILE")
    ] = None,
    input_format: Annotated[
        str | None, typer.Option("--input-format", help="lines | text (all one prompt) | jsonl.", show_default=False,
                     metavar="FORMAT")
    ] = None,
    output_format: Annotated[
        str | None, typer.Option("--output-format", "-f", help="text | jsonl.", metavar="FORMAT")
    ] = None,
    echo: Annotated[
        bool | None, typer.Option("--echo/--no-echo", help="Print the prompt before the completion.")
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", "-n", help="Tokens to generate.", metavar="N")
    ] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", "-t", help="0 is greedy.", metavar="T")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="0 turns top-k off.", metavar="K")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="1 turns nucleus sampling off.", metavar="P")] = None,
    repetition_penalty: Annotated[
        float | None, typer.Option("--repetition-penalty", help="1 turns it off.", metavar="X")
    ] = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="Greedy decoding (no sampling).")] = False,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop string (repeatable).", metavar="TEXT")] = None,
    ignore_eos: Annotated[
        bool | None, typer.Option("--ignore-eos/--no-ignore-eos", help="Generate past the end-of-text token.")
    ] = None,
    num_return_sequences: Annotated[
        int | None, typer.Option("--num-return-sequences", help="Completions per prompt.", metavar="N")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", "-b", help="Prompts decoded together.", metavar="N")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Sampling seed (default: run.seed).", metavar="N")] = None,
    precision: Annotated[
        str | None, typer.Option("--precision", help="auto | fp32 | bf16 | fp16.", metavar="DTYPE")
    ] = None,
    on_error: Annotated[
        str | None, typer.Option("--on-error", help="Malformed input line: fail | skip.", metavar="MODE")
    ] = None,
    chat: Annotated[
        bool | None,
        typer.Option("--chat/--no-chat", help="Render prompts through the model's chat template (generate.chat)."),
    ] = None,
    system: Annotated[
        str | None, typer.Option("--system", help="Chat: a system message before each conversation.", metavar="TEXT")
    ] = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    print_config: PrintConfigOpt = False,
) -> None:
    """Complete prompts from --prompt, a file or stdin; completions go to stdout, in input order."""
    values = {
        "generate.model": model,
        "generate.prompts": prompt or None,
        "generate.input": input_,
        "generate.input_format": input_format,
        "generate.output_format": output_format,
        "generate.echo": echo,
        "generate.max_new_tokens": max_new_tokens,
        "generate.temperature": temperature,
        "generate.top_k": top_k,
        "generate.top_p": top_p,
        "generate.repetition_penalty": repetition_penalty,
        "generate.do_sample": False if greedy else None,
        "generate.stop": stop or None,
        "generate.ignore_eos": ignore_eos,
        "generate.num_return_sequences": num_return_sequences,
        "generate.batch_size": batch_size,
        "generate.seed": seed,
        "generate.precision": precision,
        "generate.on_error": on_error,
        "generate.chat": chat,
        "generate.system": system,
    }
    cfg = _load(config, set_, values, print_config, quiet, verbose)
    from llmctl import generate as command

    _write_stream(command.run(cfg, quiet=quiet))


@app.command(name="eval", epilog=EXAMPLES["eval"])
def eval_(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Run/model directory or hub id.", metavar="DIR_OR_ID")
    ] = None,
    input_: Annotated[
        str | None,
        typer.Option("--input", "-i", help="Held-out text, labeled file (JSONL, CSV, Parquet, hf:NAME) or prepared "
                     "data directory; - for stdin.", metavar="FILE_OR_DIR"),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option("--task", help="auto | lm | classification | zero-shot | sft | generation.", show_default=False,
                     metavar="TASK"),
    ] = None,
    context: Annotated[int | None, typer.Option("--context", help="Window length in tokens.", metavar="N")] = None,
    stride: Annotated[int | None, typer.Option("--stride", help="Tokens the window advances by.", metavar="N")] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Windows or examples per forward pass.", metavar="N")
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="Score only the first N tokens.", metavar="N")
    ] = None,
    verbalizer: Annotated[
        list[str] | None, typer.Option("--verbalizer", help="Zero-shot LABEL=TEXT (repeatable).", show_default=False,
                     metavar="LABEL=TEXT")
    ] = None,
    template: Annotated[
        str | None,
        typer.Option("--template", help="Zero-shot prompt template with {text}.", show_default=False, metavar="TEXT")
    ] = None,
    predictions: Annotated[
        str | None, typer.Option("--predictions", help="File of predicted labels.", metavar="FILE")
    ] = None,
    references: Annotated[str | None, typer.Option("--references", help="File of gold labels.", metavar="FILE")] = None,
    id_field: Annotated[
        str | None, typer.Option("--id-field", help="Match JSONL lines by this field.", metavar="FIELD")
    ] = None,
    predictions_out: Annotated[
        str | None,
        typer.Option("--predictions-out", help="Write per-example predictions (JSONL) here.", metavar="FILE")
    ] = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Also write the JSON result here.", metavar="FILE")
    ] = None,
    fail_under: Annotated[
        list[str] | None,
        typer.Option("--fail-under", help="Gate METRIC=VALUE: fail when below (repeatable).", metavar="METRIC=VALUE")
    ] = None,
    fail_over: Annotated[
        list[str] | None,
        typer.Option("--fail-over", help="Gate METRIC=VALUE: fail when above (repeatable).", metavar="METRIC=VALUE")
    ] = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    print_config: PrintConfigOpt = False,
) -> None:
    """Evaluate a model (perplexity, classification metrics) or prediction files; JSON on stdout, exit 3 when a
    gate fails."""
    sets = list(set_ or [])
    for flag, key, pairs in (
        ("--fail-under", "fail_under", fail_under), ("--fail-over", "fail_over", fail_over),
        ("--verbalizer", "verbalizers", verbalizer),
    ):
        for pair in pairs or []:
            name, sep, value = pair.partition("=")
            if not sep or not name.strip() or not value.strip():
                raise typer.BadParameter(f"{pair!r}: expected NAME=VALUE, for example accuracy=0.8", param_hint=flag)
            # A verbalizer keeps its spaces: " positive" and "positive" tokenize differently.
            sets.append(f"eval.{key}.{name.strip()}={value if key == 'verbalizers' else value.strip()}")
    values = {
        "eval.model": model,
        "eval.input": input_,
        "eval.task": task.replace("-", "_") if task else None,
        "eval.context": context,
        "eval.stride": stride,
        "eval.batch_size": batch_size,
        "eval.max_tokens": max_tokens,
        "eval.prompt_template": template,
        "eval.predictions": predictions,
        "eval.references": references,
        "eval.id_field": id_field,
        "eval.predictions_out": predictions_out,
        "eval.output": output,
    }
    cfg = _load(config, sets, values, print_config, quiet, verbose)
    from llmctl import evaluate as command

    result = command.run(cfg, quiet=quiet)
    if not quiet:
        from llmctl.core.console import stderr_console

        stderr_console().print(command.summary(result))
    if json_ or sys.stdout is None or not sys.stdout.isatty():
        _write_json(result)
    failed = result["gates"]["failed"]
    if failed:
        logging.getLogger("llmctl").error("gate failed: %s", "; ".join(g["message"] for g in failed))
        raise typer.Exit(EXIT_GATE_FAILED)


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; the only place errors become messages and exit codes."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = os.environ.get("LLMCTL_DEBUG", "") not in ("", "0")
    command = typer.main.get_command(app)
    _terminate_as_exception()
    # Typer itself turns typer.Exit into the returned code, Ctrl-C into 130 and a broken pipe into 1 (which
    # _stdout_guard pre-empts where we write), so those never reach the handlers below.
    try:
        code = command.main(args or ["--help"], prog_name="llmctl", standalone_mode=False)
        return code if isinstance(code, int) else EXIT_OK
    except typer.TyperException as exc:  # usage errors (exit_code 2) and bad file options (1), already worded
        show = getattr(exc, "show", None)
        if show is not None:
            show(file=sys.stderr)
        else:
            _error(str(exc))
        return getattr(exc, "exit_code", EXIT_USAGE)
    except LlmctlError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        _error(str(exc))
        return exc.exit_code
    except typer.Abort:  # end of input at a prompt
        _error("interrupted")
        return 130
    except Terminated:
        _error("terminated by SIGTERM; temporary files were removed and earlier outputs are unchanged")
        return EXIT_TERMINATED
    except OSError as exc:  # one no reader or writer mapped: still one line that names the file
        if debug:
            raise
        from llmctl.core.faults import os_error_message

        _error(os_error_message(exc))
        return EXIT_ERROR
    except MemoryError:
        if debug:
            raise
        _error("out of memory; try a smaller batch size (and more gradient accumulation) or a smaller model")
        return EXIT_ERROR


_MAIN_PID: list[int] = []


def _terminate_as_exception() -> None:
    """SIGTERM raises Terminated in the main thread, so that temporary files are removed as on Ctrl-C (training
    installs its own handler: finish the step, save, exit 75). A forked worker that inherited the handler dies as
    the default action would."""
    import signal

    _MAIN_PID[:] = [os.getpid()]

    def handler(signum, frame):
        if os.getpid() != _MAIN_PID[0]:
            os._exit(128 + signum)
        raise Terminated()

    with contextlib.suppress(ValueError):  # not the main thread (main() called from a library's thread)
        signal.signal(signal.SIGTERM, handler)


def _error(message: str) -> None:
    try:
        sys.stderr.write(f"Error: {message}\n")
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):
        pass
