"""Real text and the evaluations of the zoo's transformers, read from gensim's test data (no gensim import).

``pip install --no-deps gensim==4.4.0`` ships ``gensim/test/test_data/``:

* ``lee_background.cor``: 300 ABC news documents (calibration text);
* ``lee.cor``: 50 other news documents (held-apart evaluation text);
* ``wordsim353.tsv``: word pairs with human similarity scores;
* ``pang_lee_polarity.cor``: 200 movie-review sentences labelled positive/negative.

Evaluations: :func:`wordsim_spearman` (rank correlation of embedding cosines
with the human scores), :func:`polarity_accuracy` (nearest-centroid accuracy,
10-fold), :func:`embedding_cosine` (fidelity of a quantized encoder to the
float one) and :func:`perplexity` (of a causal LM on token windows).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

from ._paths import package_file

__all__ = ["gensim_file", "lee_documents", "calibration_sentences", "wordsim353", "pang_lee_polarity",
           "tokenize", "embed", "wordsim_spearman", "polarity_accuracy", "embedding_cosine", "token_windows",
           "perplexity", "spearman"]

GENSIM_SPEC = "gensim==4.4.0"


def gensim_file(name: str) -> str:
    return package_file("gensim", GENSIM_SPEC, f"test/test_data/{name}")


def _lines(name: str) -> List[str]:
    with open(gensim_file(name), encoding="latin-1") as fh:
        return [line.strip() for line in fh if line.strip()]


def lee_documents(which: str = "background") -> List[str]:
    """The Lee corpus: ``"background"`` (300 documents, for calibration) or ``"test"`` (50, for evaluation)."""
    if which not in ("background", "test"):
        raise ValueError(f"which must be 'background' or 'test', got {which!r}")
    return _lines("lee_background.cor" if which == "background" else "lee.cor")


def calibration_sentences(n: int, seed: int = 0, min_words: int = 6) -> List[str]:
    """``n`` sentences drawn from the background documents (never from evaluation text)."""
    sentences = [s.strip() for doc in lee_documents("background") for s in re.split(r"(?<=[.!?])\s+", doc)]
    sentences = [s for s in sentences if len(s.split()) >= min_words]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(sentences), generator=g).tolist()
    return [sentences[i] for i in order[:n]]


def wordsim353() -> List[Tuple[str, str, float]]:
    out = []
    for line in _lines("wordsim353.tsv"):
        if line.startswith("#"):
            continue
        a, b, score = line.split("\t")[:3]
        try:
            out.append((a, b, float(score)))
        except ValueError:  # the header row
            continue
    return out


def pang_lee_polarity() -> List[Tuple[str, int]]:
    """``(sentence, label)`` with label 1 for positive, 0 for negative."""
    out = []
    for line in _lines("pang_lee_polarity.cor"):
        tag, _, text = line.partition(" ")
        out.append((text, 1 if tag == "__label__pos" else 0))
    return out


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int = 384) -> Dict[str, torch.Tensor]:
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def embed(encoder: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Sentence embeddings ``[N, D]`` of ``texts``."""
    encoder.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        out.append(encoder(**tokenize(tokenizer, texts[i:i + batch_size])).float())
    return torch.cat(out)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(x)
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    for v in torch.unique(x):  # ties share their average rank
        tie = x == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    ra, rb = _ranks(torch.as_tensor(a, dtype=torch.float64)), _ranks(torch.as_tensor(b, dtype=torch.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / math.sqrt(float((ra * ra).sum() * (rb * rb).sum())))


def wordsim_spearman(encoder: torch.nn.Module, tokenizer: Any) -> float:
    """Spearman correlation of the cosine between each WordSim353 pair's embeddings and the human scores."""
    pairs = wordsim353()
    words = sorted({w for a, b, _ in pairs for w in (a, b)})
    emb = dict(zip(words, embed(encoder, tokenizer, words)))
    cos = [float(emb[a] @ emb[b]) for a, b, _ in pairs]
    return spearman(cos, [s for _, _, s in pairs])


def polarity_accuracy(encoder: torch.nn.Module, tokenizer: Any, folds: int = 10) -> float:
    """Nearest-centroid accuracy on the Pang-Lee sentences, ``folds``-fold (a fixed interleaved split)."""
    data = pang_lee_polarity()
    emb = embed(encoder, tokenizer, [t for t, _ in data])
    labels = torch.tensor([y for _, y in data])
    correct = 0
    for f in range(folds):
        test = torch.arange(len(data)) % folds == f
        centroids = torch.stack([emb[~test & (labels == c)].mean(0) for c in (0, 1)])
        pred = (emb[test] @ torch.nn.functional.normalize(centroids, dim=1).t()).argmax(1)
        correct += int((pred == labels[test]).sum())
    return correct / len(data)


def embedding_cosine(encoder: torch.nn.Module, tokenizer: Any, texts: Sequence[str], reference: torch.Tensor) -> float:
    """Mean cosine between ``encoder``'s embeddings of ``texts`` and ``reference`` (the float model's)."""
    emb = embed(encoder, tokenizer, texts)
    return float(torch.nn.functional.cosine_similarity(emb, reference, dim=1).mean())


def token_windows(tokenizer: Any, texts: Sequence[str], window: int) -> torch.Tensor:
    """The texts' tokens, concatenated and cut into non-overlapping windows ``[N, window]`` (the rest dropped)."""
    ids: List[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"]
    n = len(ids) // window
    if n == 0:
        raise ValueError(f"{len(ids)} tokens do not fill one window of {window}")
    return torch.tensor(ids[: n * window]).reshape(n, window)


@torch.no_grad()
def perplexity(lm: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4,
               forward: Callable[[torch.Tensor], torch.Tensor] = None) -> float:
    """Perplexity of next-token prediction over ``windows`` ``[N, T]`` (every token after the first of a window)."""
    lm.eval()
    nll, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i:i + batch_size]
        logits = (forward or lm)(ids).float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += ids[:, 1:].numel()
    return math.exp(nll / count)
