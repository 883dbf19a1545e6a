"""The config loader: YAML sections, --set overrides, type checks, every problem at once, did-you-mean."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from llmctl.config import SECTIONS, Config, config_from_dict, field_docs, load_config
from llmctl.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def problems_of(*args, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    return info.value.problems


def test_defaults_without_a_file():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.train.max_steps > 0 and cfg.run.device == "auto"


def test_file_values_and_overrides(tmp_path):
    path = write(tmp_path, "run:\n  out_dir: runs/x\ntrain:\n  max_steps: 10\n  batch_size: 4\noptim:\n  lr: 3e-4\n")
    cfg = load_config(path, ["train.max_steps=20", "optim.schedule=linear", "run.seed=7"])
    assert cfg.run.out_dir == "runs/x"
    assert cfg.train.max_steps == 20 and cfg.train.batch_size == 4
    assert cfg.optim.lr == pytest.approx(3e-4)  # YAML reads 3e-4 as a string; the float field accepts it
    assert cfg.optim.schedule == "linear" and cfg.run.seed == 7


def test_override_values_are_typed_by_the_field():
    cfg = load_config(None, ["run.out_dir=007", "model.pretrained=null", "data.inputs=a.txt", "train.max_tokens=1e6"])
    assert cfg.run.out_dir == "007"  # a string field keeps the text as written
    assert cfg.model.pretrained is None
    assert cfg.data.inputs == ["a.txt"]  # a scalar given to a list field becomes a one-item list
    assert cfg.train.max_tokens == 1_000_000 and isinstance(cfg.train.max_tokens, int)
    cfg = load_config(None, ["data.inputs=[a.txt, b.txt]", "eval.fail_under.accuracy=0.8", "train.resume=auto"])
    assert cfg.data.inputs == ["a.txt", "b.txt"]
    assert cfg.eval.fail_under == {"accuracy": 0.8}
    assert cfg.train.resume == "auto"


def test_flag_values_win_over_set(tmp_path):
    cfg = load_config(None, ["generate.temperature=0.5"], {"generate.temperature": 0.9, "generate.prompts": ["a: b"]})
    assert cfg.generate.temperature == 0.9
    assert cfg.generate.prompts == ["a: b"]


def test_unknown_key_did_you_mean():
    assert problems_of(None, ["train.max_step=5"]) == ["train.max_step: unknown key; did you mean train.max_steps?"]


def test_unknown_section_and_unknown_without_close_match(tmp_path):
    path = write(tmp_path, "trian:\n  max_steps: 1\nmodel:\n  zzz: 1\n")
    found = problems_of(path)
    assert found[0] == "trian: unknown section; did you mean train?"
    assert found[1].startswith("model.zzz: unknown key; expected one of: pretrained, n_layer")


def test_every_problem_reported_at_once(tmp_path):
    path = write(
        tmp_path,
        "train:\n  max_steps: ten\n  batch_size: 0\n  precison: bf16\noptim:\n  schedule: cosin\nrun:\n  seed: true\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    found = info.value.problems
    assert "train.max_steps: expected an integer, got a string ('ten')" in found
    assert "train.precison: unknown key; did you mean train.precision?" in found
    assert "optim.schedule: must be one of constant, linear, cosine, not cosin; did you mean cosine?" in found
    assert "run.seed: expected an integer, got a boolean (true)" in found
    # The section rules (batch_size > 0) run only once the types are right, so this section reports types first.
    assert str(info.value).startswith(f"4 config problems in {path}:")


def test_section_rules(tmp_path):
    found = problems_of(None, ["model.n_head=3", "optim.min_lr=1", "generate.top_p=0", "data.val_fraction=1.5"])
    assert "model.n_embd: 128 is not a multiple of n_head (3)" in found
    assert "optim.min_lr: must be between 0 and lr" in found
    assert "generate.top_p: must be above 0 and at most 1" in found
    assert "data.val_fraction: must be at least 0 and below 1" in found


@pytest.mark.parametrize(
    "text, expected",
    [
        ("train: [1, 2]\n", "train: must be a mapping of keys to values, not a list"),
        ("- a\n- b\n", "the top level must be a mapping"),
        ("train:\n  max_steps: [1\n", "invalid YAML"),
    ],
)
def test_malformed_files(tmp_path, text, expected):
    found = problems_of(write(tmp_path, text))
    assert len(found) == 1 and expected in found[0]


def test_missing_file_and_bad_override_syntax(tmp_path):
    assert problems_of(tmp_path / "nope.yaml") == [f"config file {tmp_path / 'nope.yaml'} does not exist"]
    assert problems_of(None, ["train.max_steps"]) == ["--set train.max_steps: expected section.key=value"]
    assert problems_of(None, ["train.max_steps.x=1"]) == ["train.max_steps.x: train.max_steps has no sub-keys"]


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.max_steps=3", "data.inputs=[x.txt]", "eval.fail_over.perplexity=40"])
    saved = tmp_path / "config.yaml"
    cfg.save(saved)
    again = load_config(saved)
    assert again == cfg
    assert yaml.safe_load(saved.read_text())["train"]["max_steps"] == 3


def test_config_from_dict_checks_too():
    assert config_from_dict({"train": {"max_steps": 4}}).train.max_steps == 4
    with pytest.raises(ConfigError):
        config_from_dict({"train": {"max_stepz": 4}})


def test_every_field_has_a_docstring():
    for name, section in SECTIONS.items():
        docs = field_docs(section)
        for f in dataclasses.fields(section):
            assert docs.get(f.name), f"{name}.{f.name} has no docstring"


def test_every_shipped_config_loads():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs, "no configs/*.yaml found"
    for path in configs:
        load_config(path)  # raises ConfigError on any problem
        assert path.read_text().startswith("#"), f"{path.name} must start with a comment showing how to run it"
