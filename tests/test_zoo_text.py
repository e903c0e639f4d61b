"""The zoo's transformers and their text evaluations.

The evaluation helpers are checked by hand; the models themselves load from
their packages (``scripts/install_data.sh --transformers``, which CI runs).
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import mixquant
from mixquant.zoo import text

HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_models = pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="needs scripts/install_data.sh --transformers")


def test_spearman_by_hand():
    assert text.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert text.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties share their average rank: ranks (1.5, 1.5, 3) and (1, 2, 3) -> 0.866...
    assert text.spearman([5, 5, 7], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)


def test_text_sets_are_apart():
    if importlib.util.find_spec("gensim") is None:
        pytest.skip("needs gensim's data (scripts/install_data.sh --transformers)")
    calib = text.calibration_sentences(40)
    test_docs = " ".join(text.lee_documents("test"))
    assert len(calib) == 40 and not any(s in test_docs for s in calib)
    pl = text.pang_lee_polarity()
    assert len(pl) == 200 and {y for _, y in pl} == {0, 1}
    assert len(text.wordsim353()) > 300


class _CharTokenizer:
    """A stand-in tokenizer: one token per character."""

    def __call__(self, t, add_special_tokens=False):
        return {"input_ids": [ord(c) % 50 for c in t]}


def test_token_windows_and_perplexity_of_a_uniform_model():
    w = text.token_windows(_CharTokenizer(), ["abcdefghij" * 3], 8)
    assert w.shape == (3, 8)

    class Uniform(torch.nn.Module):
        def forward(self, ids):
            return torch.zeros(*ids.shape, 50)

    assert text.perplexity(Uniform(), w) == pytest.approx(50.0)


@needs_models
def test_mpnet_encoder_and_a_data_aware_search():
    enc, tok = mixquant.zoo.mpnet_encoder()
    emb = text.embed(enc, tok, ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell."])
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]
    two = {"model.encoder.layer.11.intermediate.dense", "model.encoder.layer.11.output.dense"}
    calib = text.tokenize(tok, text.calibration_sentences(4))
    cfg = mixquant.search(enc, avg_bits=4, sensitivity="input", calib_data=calib, output_loss="cosine",
                          filter_fn=lambda m, n: n in two)
    assert set(cfg.bits) == two and cfg.calibration["samples"] == 4


@needs_models
def test_smollm2_loads_with_its_tied_head():
    lm, tok = mixquant.zoo.smollm2()
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    ids = text.token_windows(tok, text.lee_documents("test")[:3], 64)[:1]
    ppl = text.perplexity(lm, ids)
    assert 1 < ppl < 200
