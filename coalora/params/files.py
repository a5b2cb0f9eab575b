"""Reading params.yaml and profiles: YAML that rejects repeated keys, the profile overlay, and validation
errors that name each bad key path and what is allowed."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from coalora.errors import ParamsError
from coalora.params.schema import Params


def deep_merge(base: dict, overlay: dict) -> dict:
    """``overlay`` over ``base``, recursively for nested mappings; lists and scalars are replaced."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key repeated in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key] + 1}); each key may appear once",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict:
    """A params file as a mapping; ParamsError for a missing file, bytes that are not UTF-8, invalid YAML
    or a repeated key (each naming the file and, where YAML knows it, the line)."""
    if not path.is_file():
        raise ParamsError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ParamsError(f"{path}: line {line}: byte 0x{data[exc.start]:02x} is not UTF-8 text; save the file "
                          f"as UTF-8") from None
    try:
        loaded = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(loaded, dict):
        raise ParamsError(f"{path}: must be a mapping of sections, got {type(loaded).__name__}")
    return loaded


def _describe(error: dict) -> str:
    """One pydantic error as ``key.path: what is allowed (got X)``."""
    path = ".".join(str(part) for part in error["loc"] if not str(part).startswith("function-after"))
    if error["type"] == "extra_forbidden":
        parent = ".".join(path.split(".")[:-1])
        return f"{path}: unknown key{' in ' + parent if parent else ''}"
    got = error.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    if not path:   # a check across sections (Params._instructions_exist): its message names the keys
        return error["msg"].removeprefix("Value error, ") + shown
    return f"{path}: {error['msg']}{shown}"


def _allowed_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    for part in path:
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def validate(raw: dict, source: str = "params.yaml") -> Params:
    """Validate a raw mapping; raise ParamsError listing every bad key path and what is allowed.

    The rules relating keys of different sections to each other live in :mod:`coalora.checks`, which the
    command line runs right after loading (they import parts of the library this module must not).
    """
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            line = _describe(error)
            if error["type"] == "extra_forbidden":
                allowed = _allowed_keys(Params, [str(p) for p in error["loc"][:-1]])
                line += f"; allowed: {', '.join(allowed)}"
            lines.append(f"{source}: {line}")
        raise ParamsError("\n".join(lines)) from None
    return params


PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def profile_path(root: Path, profile: str) -> Path:
    """``root/profiles/<profile>.yaml``; ParamsError unless ``profile`` is a bare name of a file there (a
    path such as ``../params`` would read a file outside ``profiles/``)."""
    available = ", ".join(sorted(p.stem for p in (root / "profiles").glob("*.yaml"))) or "none"
    if not PROFILE_NAME.fullmatch(profile) or ".." in profile:
        raise ParamsError(f"profile: {profile!r} is not a profile name; give the name of a file in profiles/ "
                          f"without .yaml; available: {available}")
    path = root / "profiles" / f"{profile}.yaml"
    if not path.is_file():
        raise ParamsError(f"profile: unknown profile {profile!r}; available: {available}")
    return path


def load_params(root: Path | str = ".", profile: str | None = None) -> Params:
    """Load ``root/params.yaml``, overlay ``root/profiles/<profile>.yaml`` when a profile is given (or
    ``COALORA_PROFILE`` is set), and validate.

    With a profile, params.yaml is validated on its own first: it is what a run without the profile (and
    ``dvc repro``) uses, so a value the profile happens to override must still be valid there.
    """
    root = Path(root)
    profile = profile if profile is not None else os.environ.get("COALORA_PROFILE") or None
    raw = _read_yaml(root / "params.yaml")
    if not profile:
        return validate(raw)
    overlay = _read_yaml(profile_path(root, profile))
    validate(raw, f"params.yaml (valid on its own, whatever profiles/{profile}.yaml overrides)")
    return validate(deep_merge(raw, overlay), f"params.yaml + profiles/{profile}.yaml")


def dump_params(params: Params) -> str:
    """The resolved params as YAML (``coalora params`` prints this; it can be saved as a params.yaml)."""
    return yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)
