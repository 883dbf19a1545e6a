"""Instruction data: answer masks checked token by token, chat templates, and packing that changes no example's loss."""

from __future__ import annotations

import json

import pytest
import torch

from llmctl.config import SftConfig
from llmctl.core import chat
from llmctl.core.sft import Encoder, collate, examples_iter, read_examples
from llmctl.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE that has learnt "hello" as one token: the prompt "Say hel" + completion "lo there" crosses
    a merge."""
    from llmctl.core.tokenizer import to_transformers, train_bpe

    text = ["hello there, hello world, hello again, say hello"] * 200
    return to_transformers(train_bpe(text, 300, 2, ["<|endoftext|>"]), "<|endoftext|>")


@pytest.fixture()
def byte_tok(tokenizer_dir):
    from llmctl.core.model import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def labeled_text(tok, example) -> str:
    """The text of the tokens that carry loss (answer tokens after the first position), in order."""
    ids = [int(i) for i, a in zip(example.ids[1:], example.answer[1:]) if a]
    return tok.decode(ids, skip_special_tokens=False)


def test_plain_prompt_completion_labels_exactly_the_completion_and_eos_across_a_merge(bpe):
    whole = bpe.encode("Say hello there", add_special_tokens=False)
    assert " hello" in [bpe.decode([t]) for t in whole]  # one token that crosses the prompt/answer boundary
    enc = Encoder(bpe, None, SftConfig(), 64)
    ex = enc.encode({"prompt": "Say hel", "completion": "lo there"}, "x:1")
    assert labeled_text(bpe, ex) == "lo there<|endoftext|>"
    # the prompt tokens are exactly what generate would feed (the prompt encoded alone)
    n_prompt = int((~ex.answer).sum())
    assert ex.ids[:n_prompt].tolist() == bpe("Say hel")["input_ids"]
    assert ex.ids[-1] == bpe.eos_token_id and ex.answer[-1]


def test_chatml_conversation_labels_each_answer_and_its_end_marker_only(byte_tok):
    template = chat.resolve_template("chatml", byte_tok)
    assert chat.add_markers(byte_tok, template) == ["<|im_start|>", "<|im_end|>"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Bye now."}]
    ex = Encoder(byte_tok, template, SftConfig(), 512).encode({"messages": messages}, "x:1")
    full = byte_tok.apply_chat_template(messages, chat_template=template.source, tokenize=False)
    assert byte_tok.decode(ex.ids.tolist(), skip_special_tokens=False) == full
    # token by token: the answer runs are exactly each assistant content followed by <|im_end|>
    runs, current = [], []
    for token, is_answer in zip(ex.ids.tolist(), ex.answer.tolist()):
        if is_answer:
            current.append(token)
        elif current:
            runs.append(byte_tok.decode(current, skip_special_tokens=False))
            current = []
    assert runs == ["Hello!<|im_end|>", "Bye now.<|im_end|>"]
    assert byte_tok.convert_tokens_to_ids("<|im_end|>") in ex.ids.tolist()  # one token, never split


def test_train_on_prompt_labels_everything(byte_tok):
    ex = Encoder(byte_tok, None, SftConfig(train_on_prompt=True), 64).encode({"prompt": "a", "completion": "b"}, "x")
    assert ex.answer.all()


def test_cutting_and_dropping_long_examples_is_counted(byte_tok, tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": "p" * 10, "completion": "c" * 10}, {"prompt": "p" * 40, "completion": "c"},
            {"prompt": "p", "completion": "c"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    enc = Encoder(byte_tok, None, SftConfig(), 16)  # context 15
    kept = read_examples([str(path)], enc)
    assert [len(e.ids) for e in kept] == [16, 3]  # the first cut to the context, the third whole
    assert enc.stats.as_dict() == {"read": 3, "kept": 2, "cut": 2, "dropped_too_long": 0, "dropped_no_answer": 1,
                                   "tokens": 19}
    enc = Encoder(byte_tok, None, SftConfig(truncation="drop"), 16)
    assert len(read_examples([str(path)], enc)) == 1 and enc.stats.too_long == 2
    with pytest.raises(DataError, match=r"d.jsonl:1: 21 tokens, more than the 15-token context"):
        read_examples([str(path)], Encoder(byte_tok, None, SftConfig(truncation="fail"), 16))


@pytest.mark.parametrize("line, message", [
    ('{"text": "hi"}', r"x.jsonl:1: neither \{\"prompt\", \"completion\"\} nor \{\"messages\"\}"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "x.jsonl:1: message 0 has unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": 3}]}', "x.jsonl:1: message 0 \\(user\\): content must be a string"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}',
     "x.jsonl:1: message 1 \\(assistant\\) is empty"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "x.jsonl:1: no assistant turn"),
    ('{"prompt": "a", "completion": ""}', "x.jsonl:1: \"completion\" is empty"),
    ('[1, 2]', "x.jsonl:1: expected a JSON object"),
    ('{"prompt": ', "x.jsonl:1: invalid JSON"),
])
def test_bad_examples_name_their_line(byte_tok, tmp_path, line, message):
    path = tmp_path / "x.jsonl"
    path.write_text(line + "\n")
    template = chat.resolve_template("chatml", byte_tok)
    with pytest.raises(DataError, match=message):
        read_examples([str(path)], Encoder(byte_tok, template, SftConfig(), 64))


def test_a_template_that_fails_names_the_template_line_and_the_example(byte_tok, tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n')
    bad = chat.Template("{% for m in messages %}\n{{ m.content | nosuchfilter }}{% endfor %}", "config")
    with pytest.raises((DataError, ConfigError), match="x.jsonl:1: chat template config"):
        read_examples([str(path)], Encoder(byte_tok, bad, SftConfig(), 64))


def test_messages_without_a_template_name_the_key(byte_tok, tmp_path):
    with pytest.raises(ConfigError, match="sft.chat_template"):
        Encoder(byte_tok, None, SftConfig(), 64).encode(
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "x:1")


def test_end_of_turn_markers_of_the_builtin_templates(byte_tok):
    assert chat.end_of_turn(byte_tok, chat.resolve_template("chatml", byte_tok)) == "<|im_end|>"
    assert chat.end_of_turn(byte_tok, chat.resolve_template("llama3", byte_tok)) == "<|eot_id|>"
    assert chat.end_of_turn(byte_tok, chat.resolve_template("zephyr", byte_tok)) == "<|endoftext|>"
    # a marker that is not one token becomes a stop string
    assert chat.stop_ids_and_strings(byte_tok, chat.resolve_template("llama3", byte_tok)) == (set(), ["<|eot_id|>"])


# ---------------------------------------------------------------------------------------------------------------
# Packing is exact


def _examples(tok, n=5, seed=0):
    import random

    rng = random.Random(seed)
    enc = Encoder(tok, None, SftConfig(), 64)
    out = []
    for i in range(n):
        prompt = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(3, 15)))
        answer = "".join(rng.choice("ABCDEFGH ") for _ in range(rng.randint(2, 12)))
        out.append(enc.encode({"prompt": prompt, "completion": answer}, f"x:{i}"))
    return out


@pytest.mark.parametrize("which", ["gpt2-lean", "gpt2-hf", "llama"])
def test_packed_rows_give_every_example_its_unpacked_loss(which, byte_tok, tiny_model_dir, tiny_llama_dir):
    from llmctl.core.fastgpt import SFTObjective
    from llmctl.core.model import load_model

    model = load_model(tiny_llama_dir if which == "llama" else tiny_model_dir, dtype=torch.float32).eval()
    objective = SFTObjective(model, lean=which == "gpt2-lean")
    assert objective.lean == (which == "gpt2-lean")
    pairs = list(examples_iter(_examples(byte_tok)))
    packed = collate([pairs[:3], pairs[3:]], torch.device("cpu"))  # two rows of 3 and 2 examples
    assert "position_ids" in packed
    with torch.no_grad():
        together = objective(**packed, reduction="sum")
        alone = sum(objective(**collate([[p]], torch.device("cpu")), reduction="sum") for p in pairs)
        # and per token: the packed row's logits at each example's positions are the example's own
        single = collate([[pairs[1]]], torch.device("cpu"))
        inner = model
        if which == "gpt2-lean":
            from llmctl.core.fastgpt import lean_gpt2_hidden

            row = lean_gpt2_hidden(model, packed["input_ids"], packed["position_ids"])[0]
            own = lean_gpt2_hidden(model, single["input_ids"])[0]
        else:
            from llmctl.core.packing import attention_for

            with attention_for(inner, packed=True):
                row = inner(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                            use_cache=False).logits[0]
            # and transformers' own packed-sequence mask agrees
            own_mask = inner(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                             use_cache=False).logits[0]
            torch.testing.assert_close(row, own_mask, rtol=0, atol=1e-5)
            own = inner(input_ids=single["input_ids"]).logits[0]
    n0, n1 = len(pairs[0][0]), len(pairs[1][0])
    torch.testing.assert_close(row[n0 : n0 + n1], own, rtol=0, atol=1e-5)
    assert together[1] == alone[1]  # the same answer tokens
    torch.testing.assert_close(together[0], alone[0], rtol=1e-5, atol=1e-5)
