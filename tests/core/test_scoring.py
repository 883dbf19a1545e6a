import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmctl.core.scoring import classifier_logprobs, continuation_logprobs, sliding_windows, token_nll


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from llmctl.core.model import load_model

    return load_model(tiny_model_dir).eval()  # 64 positions, vocabulary 257


def _ids(n, seed=0):
    return torch.randint(0, 257, (n,), generator=torch.Generator().manual_seed(seed))


def hf_guide_loop(model, ids, max_length, stride):
    """The sliding-window recipe of Hugging Face's perplexity guide, one window at a time, with transformers
    computing the loss: the reference token_nll must reproduce."""
    seq_len = ids.size(0)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[begin:end][None]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        valid = (target_ids[:, 1:] != -100).sum().item()  # transformers shifts labels inside
        nll_sum += loss.item() * valid
        n_tokens += valid
        prev_end = end
        if end == seq_len:
            break
    return nll_sum, n_tokens


def test_one_window_equals_transformers_loss(lm):
    ids = _ids(64)
    total, count = token_nll(lm, ids, context=64, stride=64)
    assert count == 63  # the first token has no history
    assert total / count == pytest.approx(lm(ids[None], labels=ids[None]).loss.item(), rel=1e-5)


@pytest.mark.parametrize("n, context, stride", [(200, 64, 16), (200, 64, 63), (130, 32, 7), (40, 64, 32)])
def test_sliding_window_matches_hugging_face_guide_loop(lm, n, context, stride):
    ids = _ids(n, seed=n + stride)
    total, count = token_nll(lm, ids, context=context, stride=stride, batch_size=3)
    ref_total, ref_count = hf_guide_loop(lm, ids, context, stride)
    assert count == ref_count == n - 1
    assert total == pytest.approx(ref_total, rel=1e-5)


def test_stride_equal_to_context_scores_blocks_that_share_one_token(lm):
    ids = _ids(200, seed=1)
    total, count = token_nll(lm, ids, context=64, stride=64)
    assert count == 199  # Hugging Face's guide would drop each block's first token; no token is lost here
    expected = 0.0
    for start in range(0, 199, 63):  # blocks [0, 64), [63, 127), [126, 190), [189, 200)
        block = ids[start : start + 64][None]
        expected += lm(block, labels=block).loss.item() * (block.size(1) - 1)
    assert total == pytest.approx(expected, rel=1e-5)


def test_smaller_stride_gives_more_history_and_a_different_total(lm):
    ids = _ids(256, seed=3)
    disjoint, n1 = token_nll(lm, ids, context=64, stride=64)
    overlapping, n2 = token_nll(lm, ids, context=64, stride=16)
    assert n1 == n2 == 255
    assert overlapping != pytest.approx(disjoint, rel=1e-6)


def test_windows_score_every_token_once_with_enough_history():
    for n, context, stride in [(1, 8, 4), (2, 8, 8), (100, 10, 3), (100, 10, 10), (7, 10, 5), (33, 8, 1)]:
        windows = sliding_windows(n, context, stride)
        targets = [t for _, end, first in windows for t in range(first, end)]
        assert targets == list(range(1, n))
        for start, end, first in windows:
            assert end - start <= context
            assert first - start >= min(context - stride, first)  # history of the first target in the window
    with pytest.raises(ValueError):
        sliding_windows(10, 8, 9)


def test_batching_and_input_types_do_not_change_the_result(lm, tmp_path):
    ids = _ids(300, seed=5)
    expected = token_nll(lm, ids, context=48, stride=20, batch_size=1)
    assert token_nll(lm, ids.tolist(), context=48, stride=20, batch_size=7) == pytest.approx(expected)
    shard = tmp_path / "val.bin"
    ids.numpy().astype(np.uint16).tofile(shard)
    memmap = np.memmap(shard, dtype=np.uint16, mode="r")
    assert token_nll(lm, memmap, context=48, stride=20, batch_size=4) == pytest.approx(expected)


def test_models_without_logits_to_keep_score_the_same(lm):
    class Plain(torch.nn.Module):  # a causal LM whose forward takes only input_ids
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids)

    ids = _ids(150, seed=9)
    assert token_nll(Plain(lm), ids, 64, 24, 4) == pytest.approx(token_nll(lm, ids, 64, 24, 4))


def test_continuation_logprobs_match_an_unbatched_hand_computation(lm):
    prompts = [[256, 72, 105], [256, 65, 32, 108, 111, 110, 103, 101, 114, 32, 111, 110, 101], [66]]
    continuations = [[32, 121, 101, 115], [32, 110, 111]]
    scores = continuation_logprobs(lm, prompts, continuations, batch_size=4)  # rows of mixed lengths: padded
    assert scores.shape == (3, 2)
    for i, p in enumerate(prompts):
        for j, c in enumerate(continuations):
            x = torch.tensor([p + c])
            with torch.no_grad():
                logprobs = F.log_softmax(lm(x).logits[0].double(), dim=-1)
            expected = sum(logprobs[len(p) - 1 + k, tok].item() for k, tok in enumerate(c))
            assert scores[i, j].item() == pytest.approx(expected, abs=1e-4)


def test_one_token_continuations_take_one_row_per_prompt(lm):
    class Counting(torch.nn.Module):  # the real model, counting the rows it is given
        def __init__(self, inner):
            super().__init__()
            self.inner, self.rows = inner, 0

        def forward(self, input_ids, attention_mask):
            self.rows += input_ids.shape[0]
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    prompts = [[256, 72, 105], [256, 65, 32, 108, 111, 110, 103, 101, 114], [66]]
    continuations = [[121], [110], [63]]
    counting = Counting(lm)
    scores = continuation_logprobs(counting, prompts, continuations, batch_size=2)
    assert counting.rows == 3  # not 9
    for i, p in enumerate(prompts):
        with torch.no_grad():
            logprobs = F.log_softmax(lm(torch.tensor([p])).logits[0, -1].double(), dim=-1)
        assert scores[i].tolist() == pytest.approx([logprobs[c[0]].item() for c in continuations], abs=1e-5)


def test_classifier_logprobs_ignore_padding(tokenizer_dir):
    from transformers import AutoModelForSequenceClassification, GPT2Config

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=257, n_positions=32, n_embd=16, n_layer=2, n_head=2, num_labels=3,
                        pad_token_id=256, bos_token_id=256, eos_token_id=256)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    inputs = [[10, 20, 30], [40], [50, 60, 70, 80, 90]]
    batched = classifier_logprobs(model, inputs, batch_size=3, pad_id=256)
    assert batched.shape == (3, 3)
    for row, ids in zip(batched, inputs):
        with torch.no_grad():
            alone = F.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        assert row.tolist() == pytest.approx(alone.tolist(), abs=1e-5)
    assert torch.exp(batched).sum(-1).tolist() == pytest.approx([1.0] * 3)
