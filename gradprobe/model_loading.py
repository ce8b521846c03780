"""Loading a checkpoint and its tokenizer, safely and offline.

MODEL is a local Hugging Face checkpoint directory or a hub id already in the local cache,
optionally with a PEFT (LoRA) adapter directory on top.
Only safetensors weights load unless the user allows pickled ones; remote code runs only when
asked for. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradprobe.errors import UserInputError

PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


@dataclass(frozen=True)
class LoadedModel:
    model: Any
    tokenizer: Any
    path: Path
    fingerprint: str
    dtype: str
    device: str


def resolve_model_path(spec: str) -> Path:
    """A local directory as is, or the local-cache snapshot of a hub id (no network)."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserInputError(f"{spec}: MODEL must be a checkpoint directory, not a file")
        if not (path / "config.json").is_file():
            raise UserInputError(f"{spec}: no config.json; is this a Hugging Face checkpoint directory?")
        return path
    if spec.count("/") != 1 or spec.startswith((".", "/")):
        raise UserInputError(f"{spec}: no such directory (and not a hub id like org/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, local_files_only=True))
    except Exception:
        raise UserInputError(
            f"{spec}: not a local directory and not in the local Hugging Face cache; "
            "gradprobe never downloads: fetch it first (huggingface-cli download) or pass a path"
        ) from None


def check_weights(path: Path, allow_pickle: bool) -> None:
    """Refuse a checkpoint without safetensors weights unless pickled ones are allowed."""
    if any(path.glob("*.safetensors")):
        return
    pickled = [name for name in PICKLED_WEIGHTS if (path / name).exists()]
    if pickled and not allow_pickle:
        raise UserInputError(
            f"{path}: has only pickled weights ({pickled[0]}), which can run code when loaded; "
            "convert them to safetensors, or pass --allow-pickle if you trust the file"
        )
    if not pickled:
        raise UserInputError(f"{path}: no model weights (*.safetensors) found")


def fingerprint(path: Path, config_name: str = "config.json") -> str:
    """SHA-256 of the config and, per weight file, its name, size and first and last MiB.

    Cheap for checkpoints of any size and changes whenever the weights are rewritten.
    """
    digest = hashlib.sha256()
    files = [path / config_name, *sorted(path.glob("*.safetensors")), *sorted(path.glob("*.bin"))]
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(1 << 20))
            if size > 2 << 20:
                handle.seek(-(1 << 20), os.SEEK_END)
                digest.update(handle.read())
    return digest.hexdigest()


def choose_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda but no CUDA device is available; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise UserInputError(f"--device {device!r}: choose auto, cpu or cuda")
    return device


def choose_dtype(dtype: str, device: str) -> Any:
    import torch

    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
    if dtype == "auto":
        bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    if dtype not in names:
        raise UserInputError(f"--dtype {dtype!r}: choose auto, float32 or bfloat16")
    return names[dtype]


def check_adapter(adapter: str, allow_pickle: bool) -> Path:
    """The directory of a PEFT adapter, checked before any weights load."""
    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise UserInputError(
            f"{adapter}: not a PEFT adapter directory (no adapter_config.json); --adapter takes "
            "the folder written by save_pretrained of a PEFT model"
        )
    try:
        import peft  # noqa: F401
    except ImportError:
        raise UserInputError("--adapter needs peft: pip install 'gradprobe[peft]'") from None
    if not (path / "adapter_model.safetensors").is_file() and not allow_pickle:
        raise UserInputError(
            f"{adapter}: no adapter_model.safetensors (pickled adapter weights load only with "
            "--allow-pickle)"
        )
    return path


def attach_adapter(model: Any, path: Path) -> Any:
    """`model` with the PEFT adapter at `path` on top; only the adapter's parameters train."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(path), is_trainable=True)
    except Exception as exc:  # peft raises many types for mismatched adapters
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserInputError(f"{path}: cannot load this adapter onto MODEL ({first})") from None


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> Any:
    """Only the tokenizer of `spec` (for rendering prompts), resolved like a model."""
    from transformers import AutoTokenizer

    path = resolve_model_path(spec)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserInputError(f"{spec}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from None


def load_model(
    spec: str,
    device: str = "auto",
    dtype: str = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    adapter: str | None = None,
) -> LoadedModel:
    """The causal LM and tokenizer at `spec`, on the chosen device and dtype, in eval mode.

    With `adapter`, a PEFT (LoRA) adapter directory goes on top and the fingerprint covers it.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec)
    check_weights(path, allow_pickle)
    adapter_path = None if adapter is None else check_adapter(adapter, allow_pickle)
    device = choose_device(device)
    torch_dtype = choose_dtype(dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch_dtype,
            use_safetensors=not allow_pickle or None,
            trust_remote_code=trust_remote_code,
        )
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UserInputError(
                f"{spec}: this model needs its own code; pass --trust-remote-code if you trust it"
            ) from None
        raise UserInputError(f"{spec}: cannot load ({str(exc).splitlines()[0]})") from None
    except OSError as exc:
        raise UserInputError(f"{spec}: cannot load ({str(exc).splitlines()[0]})") from None
    except SafetensorError as exc:
        raise UserInputError(
            f"{spec}: corrupt or truncated safetensors weights ({str(exc).splitlines()[0]}); "
            "copy or save the checkpoint again"
        ) from None
    identity = fingerprint(path)
    if adapter_path is not None:
        model = attach_adapter(model, adapter_path)
        identity = hashlib.sha256(
            (identity + fingerprint(adapter_path, "adapter_config.json")).encode()).hexdigest()
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, path, identity, str(torch_dtype).removeprefix("torch."), device)
