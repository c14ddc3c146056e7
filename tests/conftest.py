"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` on 2 cores: one thread per worker (and per process a test starts), or the
    # workers' OpenMP threads wait on each other (4x-17x slower on this kind of machine)
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    """Folder with the real GLUE data (standard ``glue_data/`` layout).

    Located as ``$GLUE_DIR``, else ``<repo root>/../shared/data/glue``; the test is skipped when
    neither exists.
    """
    env = os.environ.get("GLUE_DIR", "")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue")
    for path in candidates:
        if path.is_dir():
            return path
    pytest.skip(
        "real GLUE data not found: set GLUE_DIR or place it at <repo root>/../shared/data/glue "
        f"(looked in {', '.join(str(p) for p in candidates)})"
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random BERT (2 layers, hidden 32) saved with the real MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from factorlab.models import default_model_path

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    path = tmp_path_factory.mktemp("models") / "tiny-bert"
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_glue_dir(tmp_path_factory) -> Path:
    """RTE and SST-2 in the standard GLUE layout, 32 training and 16 dev examples each."""
    import random

    root = tmp_path_factory.mktemp("glue")
    rng = random.Random(0)
    words = ["the", "movie", "was", "great", "bad", "a", "plot", "actor", "film", "boring", "fun"]

    def sentence() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))

    for split, n in (("train", 32), ("dev", 16)):
        rte = ["index\tsentence1\tsentence2\tlabel"] + [
            f"{i}\t{sentence()}\t{sentence()}\t{rng.choice(['entailment', 'not_entailment'])}"
            for i in range(n)
        ]
        sst = ["sentence\tlabel"] + [f"{sentence()}\t{rng.randint(0, 1)}" for _ in range(n)]
        for folder, lines in (("RTE", rte), ("SST-2", sst)):
            (root / folder).mkdir(exist_ok=True)
            (root / folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids oversubscription (4x faster).
    Use it per module: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    """The real MiniLM tokenizer (the tiny models share its vocabulary)."""
    from factorlab.models import default_model_path, load_tokenizer

    return load_tokenizer(default_model_path())


@pytest.fixture(scope="session")
def rte_train(tokenizer, tiny_glue_dir):
    """32 RTE-format examples, tokenized to 32 tokens; batch 8 -> 4 steps per epoch."""
    from factorlab.tasks import get_task, load_split
    from factorlab.training import EncodedSplit

    return EncodedSplit(load_split(get_task("rte"), "train", tiny_glue_dir), tokenizer, 32)
