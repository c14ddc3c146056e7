"""Sliding-window perplexity (the SVD-LLM / ASVD protocol) and `evaluate --task perplexity`."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import factorlab as fl
from factorlab.cli import main
from factorlab.errors import ConfigError
from factorlab.tasks.perplexity import NonFiniteLossError, sliding_window_perplexity
from tests.tiny import VOCAB, tiny_gpt2


def ids(length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(3))


def brute_force_nll(model, tokens: torch.Tensor, seq_len: int, stride: int) -> list[float]:
    """Each token's negative log-likelihood from its own model call, with the context the
    protocol gives it: the tokens before it in the first window that holds it after its first
    position (a token that starts every window holding it is not scored)."""
    out = []
    for t in range(1, tokens.numel()):
        begins = [b for b in range(0, t, stride) if t < b + seq_len]
        if not begins:
            continue
        with torch.no_grad():
            logits = model(input_ids=tokens[min(begins) : t][None]).logits[0, -1]  # predicts t
        out.append(F.cross_entropy(logits[None], tokens[t : t + 1]).item())
    return out


@pytest.mark.parametrize(("seq_len", "stride"), [(8, 3), (8, 8), (8, 1), (64, 16)])
def test_every_token_scored_once_with_the_protocol_context(seq_len, stride):
    model = tiny_gpt2()
    tokens = ids(30)
    result = sliding_window_perplexity(model, tokens, seq_len, stride)
    expected = brute_force_nll(model, tokens, seq_len, stride)
    assert result.tokens == len(expected) == (29 if stride < seq_len else 29 - 3)
    assert result.nll == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.nll))


def test_one_window_is_the_model_loss():
    model = tiny_gpt2()
    tokens = ids(20)
    result = sliding_window_perplexity(model, tokens, seq_len=32, stride=16)
    with torch.no_grad():
        loss = model(input_ids=tokens[None], labels=tokens[None]).loss.item()
    assert result.windows == 1
    assert result.nll == pytest.approx(loss, rel=1e-5)


def test_a_non_finite_window_is_an_error_naming_its_span():
    model = tiny_gpt2()
    # windows [0, 8), [4, 12), [8, 13): only the last, 5 tokens long, overflows
    model.lm_head.register_forward_hook(lambda m, a, o: o * math.nan if a[0].shape[1] < 6 else o)
    with pytest.raises(NonFiniteLossError, match=r"tokens \[8, 13\)"):
        sliding_window_perplexity(model, ids(13), seq_len=8, stride=4)


def test_bad_windows_are_refused_before_any_work():
    model = tiny_gpt2()
    with pytest.raises(ConfigError, match="stride"):
        sliding_window_perplexity(model, ids(10), seq_len=8, stride=9)
    with pytest.raises(ConfigError, match="seq-len"):
        sliding_window_perplexity(model, ids(10), seq_len=1, stride=1)


@pytest.fixture(scope="module")
def causal_dirs(tmp_path_factory, tokenizer):
    """A tiny GPT-2 with the MiniLM vocabulary, dense and low-rank, saved with the tokenizer."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=4)
    dense = GPT2LMHeadModel(config).eval()
    root = tmp_path_factory.mktemp("causal")
    fl.save(dense, root / "dense", tokenizer=tokenizer)
    fl.factorize_(dense, fl.LowRankConfig(param_ratio=0.5))
    fl.save(dense, root / "low-rank", tokenizer=tokenizer)
    text = root / "text.txt"
    text.write_text("Low-rank factorization keeps the largest singular values. " * 20)
    return root, text


@pytest.mark.parametrize("name", ["dense", "low-rank"])
def test_cli_perplexity_of_dense_and_factorized_checkpoints(causal_dirs, capsys, name):
    root, text = causal_dirs
    args = ["evaluate", str(root / name), "--task", "perplexity", "--text-file", str(text)]
    assert main([*args, "--seq-len", "64", "--stride", "32", "--no-progress"]) == 0
    record = json.loads(capsys.readouterr().out)
    metrics = record["metrics"]
    assert record["task"] == "perplexity" and metrics["seq_len"] == 64
    assert metrics["tokens"] > 64 and metrics["windows"] >= 3
    assert 1 < metrics["perplexity"] < 1e6 and math.isfinite(metrics["perplexity"])


def test_cli_perplexity_refuses_bad_input(causal_dirs, tiny_model_dir, capsys):
    root, text = causal_dirs
    base = ["evaluate", str(root / "dense"), "--task", "perplexity"]
    assert main(base) == 2
    assert "--text-file" in capsys.readouterr().err
    assert main([*base, "--text-file", str(text), "--seq-len", "5000"]) == 2
    assert "positions" in capsys.readouterr().err
    assert main([*base, "--text-file", str(root / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    encoder = ["evaluate", str(tiny_model_dir), "--task", "perplexity", "--text-file", str(text)]
    assert main(encoder) == 2
    assert "not a causal language model" in capsys.readouterr().err
