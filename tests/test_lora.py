"""LoRA through peft: only adapters train, the run directory loads in plain transformers and plain peft, resume,
adapter directories wherever a model is accepted, and bad inputs (through the real CLI)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmctl.errors import CheckpointError, LlmctlError
from tests.test_train import lm_config, train_run, write_labeled
from tests.test_train_cli import flags

GPT2_TARGETS = {"c_attn", "c_proj", "c_fc"}
LLAMA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(params=["gpt2", "llama"])
def base_dir(request, tiny_model_dir, tiny_llama_dir) -> Path:
    return tiny_model_dir if request.param == "gpt2" else tiny_llama_dir


def lora_config(out_dir: Path, data_dir: Path, base: Path, lora: dict | None = None, **sections) -> dict:
    raw = lm_config(out_dir, data_dir, model={"pretrained": str(base)}, **sections)
    raw["optim"].update(lr=1e-2)  # adapters start at zero (B = 0): a higher rate moves them in a few steps
    raw["lora"] = {"enabled": True, "rank": 4, "alpha": 8, **(lora or {})}
    return raw


def test_only_adapters_train_and_the_outputs_load_in_plain_transformers_and_peft(tmp_path, prepared_dir, base_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    result = train_run(lora_config(out, prepared_dir, base_dir))
    assert result["trainable_parameters"] < result["parameters"] / 5
    base = load_file(str(base_dir / "model.safetensors"))
    targets = GPT2_TARGETS if "c_attn" in json.dumps(list(base)) else LLAMA_TARGETS

    # the checkpoint holds the adapters (and their optimizer state) alone, and names the base
    ckpt_dir = out / "checkpoints" / "step-00000024"
    adapter_tensors = load_file(str(ckpt_dir / "model.safetensors"))
    assert adapter_tensors and all(".lora_A." in k or ".lora_B." in k for k in adapter_tensors)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapter_tensors} == targets
    state = torch.load(ckpt_dir / "state.pt", weights_only=True)
    assert len(state["optimizer"]["state"]) == len(adapter_tensors)
    meta = json.loads((ckpt_dir / "meta.json").read_text())
    assert meta["lora_base"]["base"] == str(base_dir.resolve()) and len(meta["lora_base"]["sha256"]) == 64

    # the run directory is the merged model: every weight outside the adapted layers is bit-identical to the base
    merged_model = AutoModelForCausalLM.from_pretrained(out)
    merged = load_file(str(out / "model.safetensors"))
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in targets for k in changed)

    # adapter/ loads with plain peft onto the untouched base, and gives the merged model's logits
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (out / "adapter").iterdir()}
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out / "adapter")
    frozen = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
              for k, v in peft_model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(frozen[k], base[k]) for k in base if k in frozen)
    ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged_model(ids).logits, peft_model.eval()(ids).logits, rtol=0, atol=1e-5)
        assert not torch.allclose(merged_model(ids).logits, AutoModelForCausalLM.from_pretrained(base_dir)(ids).logits)


def test_lora_with_muon_groups_what_trains(tmp_path, prepared_dir, tiny_model_dir):
    from llmctl.config import config_from_dict
    from llmctl.core.lora import apply_lora
    from llmctl.core.model import load_model
    from llmctl.core.optim import build_optimizer

    raw = lora_config(tmp_path / "run", prepared_dir, tiny_model_dir, optim={"name": "muon"})
    cfg = config_from_dict(raw)
    model = apply_lora(load_model(tiny_model_dir), cfg, "causal_lm")
    (muon,) = build_optimizer(model, cfg.optim).optimizers  # the adapters are all 2-D: Muon takes every one
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in muon.param_groups for p in g["params"]} == trainable
    assert train_run(raw)["final_val_loss"] < 5.6


def test_classification_trains_the_head_in_full(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    data = write_labeled(tmp_path / "reviews.jsonl", n=40)
    raw = {
        "run": {"out_dir": str(tmp_path / "clf"), "threads": 1},
        "data": {"inputs": [str(data)]},
        "model": {"pretrained": str(tiny_model_dir)},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "train": {"task": "classification", "max_steps": 6, "batch_size": 6, "precision": "fp32"},
        "lora": {"enabled": True, "rank": 2},
    }
    train_run(raw)
    adapter = json.loads((tmp_path / "clf" / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf")
    assert model.config.id2label == {0: "neg", 1: "pos"}


def test_resume_with_lora_is_bit_identical_and_refuses_another_base(tmp_path, prepared_dir, tiny_model_dir):
    train = {"checkpoint_interval": 6, "keep_checkpoints": 9}
    train_run(lora_config(tmp_path / "ref", prepared_dir, tiny_model_dir, train=train))
    cut = lora_config(tmp_path / "cut", prepared_dir, tiny_model_dir, train=train)
    train_run(cut)
    for path in (tmp_path / "cut" / "checkpoints").iterdir():
        if path.name > "step-00000012":
            shutil.rmtree(path)
    result = train_run({**cut, "train": {**cut["train"], "resume": True}})
    assert result["resumed_from"].endswith("step-00000012") and result["steps"] == 24
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(tmp_path / "ref" / name)), load_file(str(tmp_path / "cut" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # same path, other weights: the adapters would be meaningless on it
    other = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other)
    train_run(lora_config(tmp_path / "moved", prepared_dir, other, train={"max_steps": 8}))
    weights = load_file(str(other / "model.safetensors"))
    weights = {k: v + 0.01 if k.endswith("ln_f.weight") else v for k, v in weights.items()}
    from safetensors.torch import save_file

    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"adapters were trained on base {other} \(sha256 [0-9a-f]{{12}}\), "
                                              rf"this run's base is {other} \(sha256 [0-9a-f]{{12}}\)"):
        train_run(lora_config(tmp_path / "moved", prepared_dir, other, train={"max_steps": 8, "resume": True}))


def test_from_scratch_is_allowed_with_a_warning(tmp_path, prepared_dir, caplog):
    raw = lm_config(tmp_path / "run", prepared_dir, train={"max_steps": 4}, lora={"enabled": True, "rank": 4})
    with caplog.at_level("WARNING", logger="llmctl"):
        result = train_run(raw)
    assert result["steps"] == 4 and "trained from scratch" in caplog.text
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] \
        is None


@pytest.mark.slow
def test_adapter_directories_work_wherever_a_model_does(tmp_path, prepared_dir, tiny_llama_dir, llmctl):
    """`lora.save: adapter` writes no merged model; generate and eval load base + adapter and merge them, with the
    same results as the merged run directory of the same training."""
    merged = tmp_path / "merged"
    train_run(lora_config(merged, prepared_dir, tiny_llama_dir))
    only = tmp_path / "only"
    train_run(lora_config(only, prepared_dir, tiny_llama_dir, lora={"save": "adapter"}))
    assert not (only / "model.safetensors").exists() and not (only / "config.json").exists()
    assert (only / "adapter" / "adapter_model.safetensors").stat().st_size < 0.2 * (
        (merged / "model.safetensors").stat().st_size)
    args = ["-p", "The cat", "-p", "A farmer", "--greedy", "-n", "12", "--quiet"]
    want = llmctl("generate", "-m", str(merged), *args)
    assert want.code == 0, want.stderr
    for name in (only, only / "adapter"):
        got = llmctl("generate", "-m", str(name), *args)
        assert (got.code, got.stdout) == (0, want.stdout), got.stderr
    scores = [llmctl("eval", "-m", str(name), "-i", str(prepared_dir), "--json", "--quiet") for name in (merged, only)]
    assert all(s.code == 0 for s in scores), scores[1].stderr
    a, b = (json.loads(s.stdout)["metrics"]["loss"] for s in scores)
    assert a == pytest.approx(b, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 1, nothing written


@pytest.mark.parametrize("lora, message", [
    ({"target_modules": ["nothere"]}, "Error: lora.target_modules: nothere match no module of this GPT2LMHeadModel; "
                                      "its layers are: c_attn, c_fc, c_proj, lm_head, wpe, wte\n"),
    ({"rank": 0}, "Error: lora.rank: must be positive, not 0\n"),
    ({"rank": 40}, "Error: lora.rank: 40 is larger than layer transformer.h.0.attn.c_attn (32 x 96) can use; set "
                   "lora.rank to at most 32\n"),
    ({"target_modules": ["ln_1"]}, "Error: peft cannot put LoRA on GPT2LMHeadModel (gpt2): Target module LayerNorm("),
    ({"quantize": "4bit", "save": "adapter"}, "Error: lora.quantize: 4bit (QLoRA) needs "),
], ids=["no-match", "rank-0", "rank-too-large", "unsupported-layer", "qlora-on-cpu"])
def test_bad_lora_settings(tmp_path, prepared_dir, tiny_model_dir, llmctl, lora, message):
    raw = lora_config(tmp_path / "run", prepared_dir, tiny_model_dir, lora=lora)
    result = llmctl("train", *flags(raw))
    assert (result.code, result.stdout) == (1, "")
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "run").exists()


def test_fsdp_with_lora_is_refused(tmp_path, prepared_dir, tiny_model_dir, llmctl):
    raw = lora_config(tmp_path / "run", prepared_dir, tiny_model_dir, train={"fsdp": True})
    result = llmctl("train", *flags(raw))
    assert result.code == 1 and result.stderr.splitlines()[-1].startswith(
        "Error: train.fsdp: sharding is not supported with lora.enabled")
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A small peft adapter for the tiny GPT-2, saved as peft saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    model.peft_config["default"].base_model_name_or_path = str(tiny_model_dir)
    model.save_pretrained(path)
    return path


def broken(adapter_dir: Path, tmp_path: Path, config=None, drop: str | None = None) -> Path:
    path = tmp_path / "adapter"
    shutil.copytree(adapter_dir, path)
    if config is not None:
        (path / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if drop:
        (path / drop).unlink()
    return path


@pytest.mark.parametrize("case", ["base-missing", "base-hub-offline", "no-weights", "bad-config", "no-base-named"])
def test_bad_adapter_directories(tmp_path, adapter_dir, llmctl, case):
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    path = {
        "base-missing": lambda: broken(adapter_dir, tmp_path, {**config, "base_model_name_or_path": "/no/such/base"}),
        "base-hub-offline": lambda: broken(adapter_dir, tmp_path, {**config, "base_model_name_or_path": "org/model"}),
        "no-weights": lambda: broken(adapter_dir, tmp_path, drop="adapter_model.safetensors"),
        "bad-config": lambda: broken(adapter_dir, tmp_path, "{not json"),
        "no-base-named": lambda: broken(adapter_dir, tmp_path, {**config, "base_model_name_or_path": None}),
    }[case]()
    expected = {
        "base-missing": f"Error: the base model of adapter {path} cannot be found: model directory /no/such/base does "
                        "not exist\n",
        "base-hub-offline": f"Error: the base model of adapter {path} cannot be found: 'org/model' is not a local "
                            "directory and not in the Hugging Face cache, and HF_HUB_OFFLINE is set; pass a local "
                            "model directory\n",
        "no-weights": f"Error: adapter {path} has no weights (adapter_model.safetensors is missing)\n",
        "bad-config": f"Error: cannot read adapter config {path / 'adapter_config.json'}: ",
        "no-base-named": f"Error: adapter {path} does not name its base model",
    }[case]
    result = llmctl("generate", "-m", str(path), "-p", "hi", "--greedy", "-n", "4")
    assert (result.code, result.stdout) == (1, "")
    assert result.stderr.startswith(expected) and result.stderr.count("\n") == 1, result.stderr


def test_an_adapter_that_does_not_fit_its_base(tmp_path, adapter_dir, tiny_llama_dir, llmctl):
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    path = broken(adapter_dir, tmp_path, {**config, "base_model_name_or_path": str(tiny_llama_dir)})
    result = llmctl("eval", "-m", str(path), "-i", "-", input="The cat sat on the mat. " * 20)
    assert (result.code, result.stdout) == (1, "")
    assert result.stderr.startswith(f"Error: cannot load adapter {path} onto base {tiny_llama_dir}: ")
    assert result.stderr.count("\n") == 1, result.stderr


def test_the_lean_gpt2_forward_runs_the_adapters(tiny_model_dir):
    """Full fine-tuning's fast GPT-2 forward also serves LoRA (adapters on the projections): same logits as peft's."""
    from peft import LoraConfig, get_peft_model

    from llmctl.core.fastgpt import CausalLMObjective, lean_gpt2_logits
    from llmctl.core.model import load_model

    model = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"],
                                                                  fan_in_fan_out=True, init_lora_weights=False))
    model.eval()
    ids = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(1))
    assert CausalLMObjective(model).lean
    with torch.no_grad():
        theirs = model(input_ids=ids).logits
        torch.testing.assert_close(lean_gpt2_logits(model, ids), theirs, rtol=0, atol=1e-5)
        with model.disable_adapter():
            assert not torch.allclose(model(input_ids=ids).logits, theirs, atol=1e-3)  # the adapters do count
    on_norm = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, target_modules=["c_attn"],
                                                                    modules_to_save=["ln_f"]))
    assert not CausalLMObjective(on_norm).lean  # the lean forward reads ln_f's weight directly: it would skip it


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_sft_with_lora_trains_the_adapters_and_the_chat_markers_rows(tmp_path, tiny_model_dir, tiny_llama_dir, which):
    """The chat template adds two marker tokens: their new embedding rows train (peft's trainable tokens) beside the
    adapters; everything else in the merged model is the base's."""
    from transformers import AutoModelForCausalLM

    from tests.test_sft_train import sft_config, write_data

    base = tiny_model_dir if which == "gpt2" else tiny_llama_dir
    data = write_data(tmp_path)
    raw = sft_config(tmp_path / "run", [data["chat"]], model={"pretrained": str(base)}, train={"max_steps": 12},
                     lora={"enabled": True, "rank": 4})
    summary = train_run(raw)
    assert summary["trainable_parameters"] < summary["parameters"] / 5
    adapters = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000012" / "model.safetensors"))
    assert any("trainable_tokens" in k for k in adapters) and any(".lora_A." in k for k in adapters)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    embeddings = merged.get_input_embeddings().weight
    original = AutoModelForCausalLM.from_pretrained(base).get_input_embeddings().weight
    assert embeddings.shape[0] == 259 and torch.equal(embeddings[:257], original)  # only the marker rows moved
    with pytest.raises(LlmctlError, match="lora.save: adapter cannot hold the embedding rows"):
        train_run({**raw, "run": {**raw["run"], "out_dir": str(tmp_path / "only")},
                   "lora": {**raw["lora"], "save": "adapter"}})
