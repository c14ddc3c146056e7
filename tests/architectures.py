"""The architecture support matrix: tiny random models of every family, checked per method.

Each family is built from its transformers config with every size shrunk (hidden 32, 2 layers,
4 heads, vocabulary 96), so a whole row runs in about a second. ``check(family, method)`` runs
what a user does with a compressed model: factorize (with calibration statistics where the
method needs them), forward, backward, save, load (bit-exact outputs) and densify (the dense
model computes what the factorized one does). ``tests/test_architectures.py`` runs every cell;
``python -m tests.architectures --write README.md`` reruns them and writes the README's support
matrix from the results (between its ``support-matrix`` markers).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.testing import assert_close
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    BertConfig,
    EncoderDecoderConfig,
    PreTrainedModel,
    T5GemmaConfig,
)
from transformers.models.t5gemma.configuration_t5gemma import T5GemmaModuleConfig

import factorlab as fl
from factorlab.calibration import collect_statistics
from factorlab.io import marked_block, write_marked_block
from factorlab.targets import select_targets

VOCAB = 96
SIZES: dict[str, Any] = {
    "vocab_size": VOCAB,
    "src_vocab_size": VOCAB,
    "tgt_vocab_size": VOCAB,
    "hidden_size": 32,
    "d_model": 32,
    "n_embd": 32,
    "dim": 32,
    "embedding_size": 32,
    "num_hidden_layers": 2,
    "num_layers": 2,
    "n_layer": 2,
    "n_layers": 2,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "num_decoder_layers": 2,
    "num_encoder_layers": 2,
    "num_attention_heads": 4,
    "n_head": 4,
    "n_heads": 4,
    "num_heads": 4,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "num_encoder_attention_heads": 4,
    "num_decoder_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "d_ff": 64,
    "ffn_dim": 64,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "hidden_dim": 64,
    "d_kv": 8,
    "head_dim": 8,
    "max_position_embeddings": 64,
    "n_positions": 64,
    "max_encoder_position_embeddings": 64,
    "max_decoder_position_embeddings": 64,
    "num_experts": 2,
    "expert_capacity": 8,
    "global_attn_every_n_layers": 1,
    "local_attention": 8,
    "attention_window": 4,
    "ngram": 2,
    "sliding_window": 16,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 0,
}
"""Config fields shrunk in every family that has them (others keep their defaults)."""


def _shrunk(model_type: str, **extra: Any) -> Any:
    fields = AutoConfig.for_model(model_type).to_dict()
    return AutoConfig.for_model(
        model_type, **{k: v for k, v in SIZES.items() if k in fields}, **extra
    )


def _t5gemma() -> T5GemmaConfig:
    module = {k: SIZES[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers")}
    module |= {"intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
    module |= {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 16}
    return T5GemmaConfig(
        encoder=T5GemmaModuleConfig(**module),
        decoder=T5GemmaModuleConfig(**module, is_decoder=True),
        vocab_size=VOCAB,
    )


def _bert2bert() -> EncoderDecoderConfig:
    bert = {k: SIZES[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers")}
    bert |= {"num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64}
    config = EncoderDecoderConfig.from_encoder_decoder_configs(
        BertConfig(**bert), BertConfig(**bert, is_decoder=True, add_cross_attention=True)
    )
    config.decoder_start_token_id = 1
    config.pad_token_id = 0
    return config


ENCODERS = ("bert", "roberta", "distilbert", "electra", "deberta-v2", "modernbert", "albert")
DECODERS = ("gpt2", "gpt_neox", "opt", "llama", "mistral", "qwen2", "phi", "gemma")
ENCODER_DECODERS = (
    "bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "encoder-decoder", "fsmt",
    "led", "longt5", "m2m_100", "marian", "mbart", "mt5", "mvp", "nllb-moe", "pegasus",
    "pegasus_x", "plbart", "prophetnet", "switch_transformers", "t5", "t5gemma", "umt5",
)  # fmt: skip
"""Every text encoder-decoder family of transformers' AutoModelForSeq2SeqLM (speech and audio
ones, which take features rather than token ids, are left out)."""
FAMILIES = (*ENCODERS, *DECODERS, *ENCODER_DECODERS)
METHODS = ("low-rank", "monarch", "block-low-rank", "fwsvd", "act-svd", "autoencoder")
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "monarch": {"nblocks": 4},
    "block-low-rank": {"nblocks": 2},
    "autoencoder": {"epochs": 2},
}
"""Options that fit the tiny shapes (32 x 32 and 64 x 32 matrices) or keep the row fast."""
_CONFIGS: dict[str, Callable[[], Any]] = {
    "t5gemma": _t5gemma,
    "encoder-decoder": _bert2bert,
    "bigbird_pegasus": lambda: _shrunk("bigbird_pegasus", attention_type="original_full"),
}


@dataclass
class Family:
    """A tiny model of one family and the batch it is checked on."""

    name: str
    kind: str  # "encoder" (sequence classifier), "decoder" (causal LM) or "encoder-decoder"
    model: PreTrainedModel
    batch: dict[str, torch.Tensor]  # input ids, mask, labels (a loss for Fisher and backward)

    def outputs(self, model: PreTrainedModel) -> torch.Tensor:
        with torch.no_grad():
            inputs = {k: v for k, v in self.batch.items() if k != "labels"}
            return model(**inputs).logits


def build_family(name: str) -> Family:
    """A tiny random model of family ``name`` (seeded) in eval mode, with its batch."""
    config = _CONFIGS.get(name, lambda: _shrunk(name))()
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB - 3, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # one padded example
    batch = {"input_ids": ids, "attention_mask": mask}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name in ENCODERS:
            model = AutoModelForSequenceClassification.from_config(config)
            batch["labels"] = torch.tensor([0, 1])
            kind = "encoder"
        elif name in DECODERS:
            model = AutoModelForCausalLM.from_config(config)
            batch["labels"] = ids.masked_fill(mask == 0, -100)
            kind = "decoder"
        else:
            model = AutoModelForSeq2SeqLM.from_config(config)
            batch["decoder_input_ids"] = ids[:, :5].clone()
            batch["labels"] = ids[:, 1:6].clone()
            kind = "encoder-decoder"
    return Family(name, kind, model.eval(), batch)


def factorize(family: Family, method: str) -> tuple[PreTrainedModel, fl.FactorizationReport]:
    """A copy of the family's model factorized by ``method`` at param_ratio 0.5."""
    model = copy.deepcopy(family.model)
    config = fl.make_config(method, param_ratio=0.5, **METHOD_OPTIONS.get(method, {}))
    statistics = None
    if method in ("fwsvd", "act-svd"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # decoder inputs not laid out like the mask
            statistics = collect_statistics(
                model, [family.batch], fisher=method == "fwsvd", gram=True, progress=False
            )
    return model, fl.factorize_(model, config, calibration=statistics, progress=False)


def check(family: Family, method: str) -> None:
    """Factorize, forward, backward, save, load exactly, densify; raises on any failure."""
    dense = family.outputs(family.model)
    model, report = factorize(family, method)
    assert fl.factorized_modules(model), "nothing was factorized"
    assert [m.name for m in report.modules] == [t.name for t in select_targets(family.model)]
    out = family.outputs(model)
    assert out.shape == dense.shape and torch.isfinite(out).all()
    loss = model(**family.batch).loss
    loss.backward()
    grads = [p.grad for layer in fl.factorized_modules(model).values() for p in layer.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "no gradient reached a factor"
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    model.zero_grad(set_to_none=True)
    with tempfile.TemporaryDirectory() as tmp:
        fl.save(model, Path(tmp) / "ck")
        loaded = fl.load(Path(tmp) / "ck")
    assert_close(family.outputs(loaded), out, rtol=0, atol=0)
    fl.densify(loaded)
    assert not fl.factorized_modules(loaded)
    assert_close(family.outputs(loaded), out, rtol=1e-4, atol=1e-5)


MARKERS = ("<!-- support-matrix:start -->", "<!-- support-matrix:end -->")


def render(results: dict[tuple[str, str], str | None]) -> str:
    """The README table: one row per family, one column per method; a cell is "yes" when the
    check passed, else the failure's exception type."""
    kinds = {**dict.fromkeys(ENCODERS, "encoder"), **dict.fromkeys(DECODERS, "decoder")}
    lines = [
        "| family | kind | " + " | ".join(METHODS) + " |",
        "|---|---|" + "---|" * len(METHODS),
    ]
    for family in FAMILIES:
        cells = [results.get((family, m)) or "yes" for m in METHODS]
        kind = kinds.get(family, "encoder-decoder")
        lines.append(f"| {family} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_all() -> dict[tuple[str, str], str | None]:
    """``{(family, method): None if it passed else the exception's type name}``."""
    results: dict[tuple[str, str], str | None] = {}
    for name in FAMILIES:
        family = build_family(name)
        for method in METHODS:
            try:
                check(family, method)
                results[(name, method)] = None
            except Exception as exc:  # the table reports every failure
                results[(name, method)] = type(exc).__name__
                print(f"{name} x {method}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return results


def readme_table(text: str) -> str:
    """The table between the README's support-matrix markers."""
    start, end = marked_block(text, MARKERS, "README.md")
    return text[start:end].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, help="README to update in place")
    args = parser.parse_args()
    table = render(run_all())
    if args.write is None:
        print(table)
        return
    write_marked_block(args.write, MARKERS, table)
    print(f"wrote the support matrix into {args.write}")


if __name__ == "__main__":
    main()
