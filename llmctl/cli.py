"""The command line: the only module that knows Typer.

Each command turns its flags into config values, loads the config, calls its module's `run(config)` and writes the
result to stdout. `main()` is the one place that maps errors to messages and exit codes (see `llmctl.errors`).
Heavy imports (torch, transformers) happen inside the commands, so `llmctl --help` answers at once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer

from llmctl import __version__
from llmctl.errors import EXIT_ERROR, EXIT_GATE_FAILED, EXIT_OK, EXIT_USAGE, LlmctlError

app = typer.Typer(
    name="llmctl",
    help="Clean and tokenize a corpus, train or fine-tune a GPT-2-style model, generate text, and evaluate.\n\n"
    "Each command reads one YAML experiment file (-c) and takes `--set section.key=value` overrides.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Options every command shares.
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="Experiment YAML file.", dir_okay=False, show_default=False)
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config value: section.key=value (repeatable).", show_default=False),
]
PrintConfigOpt = Annotated[
    bool, typer.Option("--print-config", help="Print the resolved config as YAML and exit.", show_default=False)
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr: no progress, no summary.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging on stderr.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_version, is_eager=True)
    ] = False,
) -> None:
    pass


def _load(config: Path | None, sets: list[str] | None, values: dict[str, Any], print_config: bool, quiet: bool, verbose: bool):
    """Resolve the config (file, then --set, then dedicated flags); with --print-config print it and stop."""
    from llmctl.config import load_config
    from llmctl.core.console import setup_logging

    setup_logging(quiet=quiet, verbose=verbose)
    cfg = load_config(config, sets or [], {k: v for k, v in values.items() if v is not None})
    if print_config:
        _write(cfg.to_yaml())
        raise typer.Exit(EXIT_OK)
    return cfg


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _write_json(obj: Any) -> None:
    _write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _write_stream(chunks: Iterable[str | dict]) -> None:
    """Write text chunks as they come (flushing each, so pipes see output before input ends); dicts as JSONL."""
    for chunk in chunks:
        if isinstance(chunk, dict):
            chunk = json.dumps(chunk, ensure_ascii=False) + "\n"
        sys.stdout.write(chunk)
        sys.stdout.flush()


# ---------------------------------------------------------------------------------------------------------------
# Commands


@app.command()
def preprocess(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(help="Files, directories or - (stdin); default: data.inputs, else stdin.", show_default=False),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Prepared data directory (data.dir).")] = None,
    to_text: Annotated[
        bool, typer.Option("--to-text", help="Filter mode: write the cleaned text (one document per line) to stdout.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when inputs and config are unchanged.")] = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    print_config: PrintConfigOpt = False,
) -> None:
    """Clean text, train or reuse a tokenizer, and write token shards (or, with --to-text, filter text)."""
    cfg = _load(config, set_, {"data.inputs": inputs or None, "data.dir": out}, print_config, quiet, verbose)
    from llmctl import preprocess as command

    if to_text:
        _write_stream(command.filter_text(cfg, quiet=quiet))
        return
    result = command.run(cfg, force=force, quiet=quiet)
    if json_:
        _write_json(result)


@app.command()
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint (train.resume).")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Resume even if the config or data changed since the checkpoint.")
    ] = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    print_config: PrintConfigOpt = False,
) -> None:
    """Train a model from scratch or fine-tune one; print the saved model's path."""
    cfg = _load(config, set_, {"train.resume": True if resume else None}, print_config, quiet, verbose)
    from llmctl import train as command

    result = command.run(cfg, force=force, quiet=quiet)
    if json_:
        _write_json(result)
    else:
        _write(f"{result['model_path']}\n")


@app.command()
def generate(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Run/model directory or hub id.")] = None,
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", "-p", help="Prompt (repeatable); default: read stdin.")
    ] = None,
    input_format: Annotated[
        str | None, typer.Option("--input-format", help="stdin as: lines | text | jsonl.", show_default=False)
    ] = None,
    output_format: Annotated[str | None, typer.Option("--output-format", help="text | jsonl.")] = None,
    echo: Annotated[bool | None, typer.Option("--echo/--no-echo", help="Print the prompt before the completion.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", "-n", help="Tokens to generate.")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", "-t", help="0 is greedy.")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="0 turns top-k off.")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="1 turns nucleus sampling off.")] = None,
    repetition_penalty: Annotated[float | None, typer.Option("--repetition-penalty")] = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="Greedy decoding (no sampling).")] = False,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop string (repeatable).")] = None,
    num_return_sequences: Annotated[int | None, typer.Option("--num-return-sequences", help="Completions per prompt.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Prompts decoded together.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Sampling seed.")] = None,
    on_error: Annotated[str | None, typer.Option("--on-error", help="Malformed input line: fail | skip.")] = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    print_config: PrintConfigOpt = False,
) -> None:
    """Complete prompts from --prompt or stdin; completions go to stdout."""
    values = {
        "generate.model": model,
        "generate.prompts": prompt or None,
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
        "generate.num_return_sequences": num_return_sequences,
        "generate.batch_size": batch_size,
        "generate.seed": seed,
        "generate.on_error": on_error,
    }
    cfg = _load(config, set_, values, print_config, quiet, verbose)
    from llmctl import generate as command

    _write_stream(command.run(cfg, quiet=quiet))


@app.command(name="eval")
def eval_(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Run/model directory or hub id.")] = None,
    input_: Annotated[
        str | None, typer.Option("--input", "-i", help="Held-out text or labeled file; - for stdin.")
    ] = None,
    task: Annotated[str | None, typer.Option("--task", help="auto | lm | classification.")] = None,
    predictions: Annotated[str | None, typer.Option("--predictions", help="File of predicted labels.")] = None,
    references: Annotated[str | None, typer.Option("--references", help="File of gold labels.")] = None,
    id_field: Annotated[str | None, typer.Option("--id-field", help="Match JSONL lines by this field.")] = None,
    predictions_out: Annotated[
        str | None, typer.Option("--predictions-out", help="Write per-example predictions (JSONL) here.")
    ] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Also write the JSON result here.")] = None,
    fail_under: Annotated[
        list[str] | None, typer.Option("--fail-under", help="Gate METRIC=VALUE: fail when below (repeatable).")
    ] = None,
    fail_over: Annotated[
        list[str] | None, typer.Option("--fail-over", help="Gate METRIC=VALUE: fail when above (repeatable).")
    ] = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    print_config: PrintConfigOpt = False,
) -> None:
    """Evaluate a model (perplexity, classification metrics) or prediction files; JSON on stdout."""
    sets = list(set_ or [])
    for flag, key, gates in (("--fail-under", "fail_under", fail_under), ("--fail-over", "fail_over", fail_over)):
        for gate in gates or []:
            metric, sep, value = gate.partition("=")
            if not sep or not metric.strip() or not value.strip():
                raise typer.BadParameter(f"{gate!r}: expected METRIC=VALUE, for example accuracy=0.8", param_hint=flag)
            sets.append(f"eval.{key}.{metric.strip()}={value.strip()}")
    values = {
        "eval.model": model,
        "eval.input": input_,
        "eval.task": task,
        "eval.predictions": predictions,
        "eval.references": references,
        "eval.id_field": id_field,
        "eval.predictions_out": predictions_out,
        "eval.output": output,
    }
    cfg = _load(config, sets, values, print_config, quiet, verbose)
    from llmctl import evaluate as command

    result = command.run(cfg, quiet=quiet)
    if json_ or not sys.stdout.isatty():
        _write_json(result)
    failed = result.get("gates", {}).get("failed", [])
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
    try:
        code = command.main(args or ["--help"], prog_name="llmctl", standalone_mode=False)
        return code if isinstance(code, int) else EXIT_OK
    except typer.Exit as exc:
        return exc.exit_code
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
    except BrokenPipeError:
        # The reader went away (`| head -1`): not an error for a filter. Point stdout at /dev/null so the
        # interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except (KeyboardInterrupt, typer.Abort):
        _error("interrupted")
        return 130
    except MemoryError:
        if debug:
            raise
        _error("out of memory; try a smaller batch size (and more gradient accumulation) or a smaller model")
        return EXIT_ERROR


def _error(message: str) -> None:
    try:
        sys.stderr.write(f"Error: {message}\n")
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):
        pass
