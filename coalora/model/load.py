"""Loading a base model and its tokenizer: a hub id, a local Hugging Face folder, or the base stage's output.

Every failure a user can fix (a missing folder, a hub id that is not in the local cache while offline, an
unknown repository) becomes a :class:`coalora.errors.UserError` naming ``model.name_or_path``, the value,
and how to make it available; never a raw traceback. With ``HF_HUB_OFFLINE=1`` (or
``TRANSFORMERS_OFFLINE=1``) nothing here touches the network: hub ids are looked up in the local cache only.
"""

from __future__ import annotations

import os
from pathlib import Path

from coalora.artifacts import read_json
from coalora.errors import OfflineError, UserError

FIELD = "model.name_or_path"
BASE_RECORD = "base.json"
DTYPES = ("float32", "bfloat16", "float16")
_TRUE = {"1", "on", "yes", "true"}


def is_offline() -> bool:
    """True when the Hugging Face hub must not be contacted (env read now, not at import time)."""
    if any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    import huggingface_hub.constants as hub_constants

    return bool(hub_constants.HF_HUB_OFFLINE)


def looks_local(name_or_path: str) -> bool:
    """A local folder (existing, or spelled as a path) rather than a hub id ``owner/name``."""
    if Path(name_or_path).expanduser().exists():
        return True
    return (name_or_path.startswith(("/", "./", "../", "~", ".\\")) or name_or_path.count("/") > 1
            or "\\" in name_or_path)


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise UserError(f"model.dtype: {dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def _prefetch_hint(hub_id: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return (f"pre-fetch it on a machine with network (`hf download {hub_id}{rev}`, or "
            f"`huggingface-cli download {hub_id}{rev}`) and copy the Hugging Face cache (HF_HOME) here, "
            f"or point {FIELD} at a local model folder")


def _load_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, ValueError]
    try:
        import httpx

        errors.append(httpx.HTTPError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _from_pretrained(source: str, revision: str | None, dtype: str, local_files_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"revision": revision, "local_files_only": local_files_only}
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=_torch_dtype(dtype), **kwargs)
    if tokenizer.pad_token is None:       # Llama-2 has none; batched scoring needs one
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def load_model(name_or_path: str, revision: str | None = None, dtype: str = "float32"):
    """Load a causal LM and its tokenizer through ``AutoModelForCausalLM`` / ``AutoTokenizer``.

    Args:
        name_or_path: a hub id (``Qwen/Qwen2.5-1.5B``) or a local Hugging Face model folder.
        revision: hub revision (branch, tag or commit); ignored for local folders.
        dtype: ``float32`` | ``bfloat16`` | ``float16``.

    Returns:
        ``(model, tokenizer)``, the model in eval mode; a tokenizer without a pad token gets EOS as pad.

    Raises:
        UserError: a local folder that does not exist or is not a model folder.
        OfflineError: a hub id that is not in the local cache while offline, or cannot be fetched.
    """
    _torch_dtype(dtype)
    errors = _load_errors()
    if looks_local(name_or_path):
        folder = Path(name_or_path).expanduser()
        if not folder.is_dir():
            raise UserError(f"{FIELD}: local folder {name_or_path!r} does not exist; point {FIELD} at a "
                            f"Hugging Face model folder (config.json + weights), a hub id, or 'builtin'")
        if not (folder / "config.json").is_file():
            raise UserError(f"{FIELD}: {name_or_path!r} is not a Hugging Face model folder (no config.json)")
        from coalora.fetch.cache import check_fetched_model

        check_fetched_model(folder)  # a folder `coalora fetch` wrote: digests as recorded, or a clear error
        try:
            return _from_pretrained(str(folder), None, dtype, local_files_only=True)
        except errors as exc:
            raise UserError(f"{FIELD}: cannot load the model folder {name_or_path!r}: {exc}") from None

    offline = is_offline()
    if offline and not _in_cache(name_or_path, revision):
        raise OfflineError(f"{FIELD}: model {name_or_path!r}"
                           f"{f' (revision {revision})' if revision else ''} is not in the local Hugging Face "
                           f"cache and the hub is offline (HF_HUB_OFFLINE=1); "
                           + _prefetch_hint(name_or_path, revision))
    try:
        return _from_pretrained(name_or_path, revision, dtype, local_files_only=offline)
    except errors as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OfflineError(f"{FIELD}: cannot load model {name_or_path!r}"
                           f"{f' (revision {revision})' if revision else ''}: {first_line}; "
                           + _prefetch_hint(name_or_path, revision)) from None


def _in_cache(hub_id: str, revision: str | None) -> bool:
    """Whether the hub id's config.json is in the local cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(hub_id, "config.json", revision=revision)
    except ValueError:   # not a valid repo id
        return False
    return isinstance(found, str)


def base_reference(base_dir: Path) -> dict:
    """The base stage's ``base.json``: ``{"source": "builtin"|"hub"|"local", "path", "revision"}``."""
    record_path = Path(base_dir) / BASE_RECORD
    if not record_path.is_file():
        raise UserError(f"{base_dir}: no {BASE_RECORD}; run `coalora stage base_model` first")
    return read_json(record_path)


def load_base(base_dir: Path | str, dtype: str = "float32"):
    """Load the base model recorded by the base stage's output folder (``base.json``).

    ``builtin`` models live inside the folder (``path`` relative to it); hub and local models are loaded
    from where the record points, at the recorded revision.

    Returns:
        ``(model, tokenizer)`` as :func:`load_model`.
    """
    base_dir = Path(base_dir)
    ref = base_reference(base_dir)
    if ref["source"] == "builtin":
        return load_model(str((base_dir / ref["path"]).resolve()), None, dtype)
    return load_model(ref["path"], ref.get("revision"), dtype)
