"""Configuration: ``[tool.fitcli]`` in the nearest pyproject.toml, a ``fitcli.toml``, or --config.

Keys are the long option names with underscores (``max_dead``, ``arch``, ``metrics``...).
Command-line flags win over the file; the file wins over built-in defaults. A file that was read
is never silent: ``provenance`` says which settings came from it, for stderr and the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from fitcli.errors import InputError, UsageError, close_matches

# keys only the command line has (strings it parses, output choices); every other key is a field
# of fitcli.Settings, with its type
CLI_KEYS: dict[str, type | tuple[type, ...]] = {
    "arch": str, "arch_kwargs": (str, dict), "trust_checkpoint": bool, "data": str, "loss": str,
    "baseline": str, "format": str, "output": str, "quiet": bool, "verbose": bool, "units": str, "mode": str,
    "text": str, "max_seq_len": int,
}
ALIASES = {"layer": "layers", "metric": "metrics", "mode": "ablation_mode"}


def _settings_keys() -> dict[str, type | tuple[type, ...]]:
    import typing

    from fitcli.settings import Settings

    out: dict[str, type | tuple[type, ...]] = {}
    for name, hint in typing.get_type_hints(Settings).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        base = typing.get_origin(args[0]) or args[0]
        out[name] = (int, float) if base is float else base
    return out


KEYS: dict[str, type | tuple[type, ...]] = {**_settings_keys(), **CLI_KEYS,
                                             **{k: list for k in ("layer", "metric")}}


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise InputError(f"config file not found: {path}") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: invalid TOML ({e})") from e
    except OSError as e:
        raise InputError(f"{path}: cannot read config ({e})") from e


def find_config(start: Path | None = None) -> tuple[dict[str, Any], str | None]:
    """The nearest ``fitcli.toml`` or ``pyproject.toml`` with ``[tool.fitcli]``, walking up."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        f = folder / "fitcli.toml"
        if f.is_file():
            data = _read_toml(f)
            tool = data.get("tool")
            return (tool.get("fitcli", data) if isinstance(tool, dict) else data), str(f)
        p = folder / "pyproject.toml"
        if p.is_file():
            data = _read_toml(p)
            tool = data.get("tool")
            section = tool.get("fitcli") if isinstance(tool, dict) else None
            if section is not None:
                return section, str(p)
    return {}, None


def load_config(path: str | None = None) -> tuple[dict[str, Any], str | None]:
    if path:
        p = Path(path)
        data = _read_toml(p)
        section = data.get("tool", {}).get("fitcli", data) if isinstance(data.get("tool"), dict) else data
        cfg, where = section, str(p)
    else:
        cfg, where = find_config()
    return check(cfg, where or "config"), where


def check(cfg: Any, where: str) -> dict[str, Any]:
    if not isinstance(cfg, dict):
        raise UsageError(f"{where}: [tool.fitcli] must be a table of settings, not {type(cfg).__name__}")
    out = {}
    for key, value in cfg.items():
        k = key.replace("-", "_")
        if k not in KEYS:
            raise UsageError(f"{where}: unknown key {key!r}" + close_matches(k, KEYS))
        typ = KEYS[k]
        if typ is list:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UsageError(f"{where}: {key} must be a string or a list of strings")
        elif not isinstance(value, typ) or (isinstance(value, bool) and typ in (int, (int, float))):
            raise UsageError(f"{where}: {key} has the wrong type ({type(value).__name__})")
        if k == "arch_kwargs" and isinstance(value, dict):
            import json

            try:
                json.dumps(value)
            except (TypeError, ValueError) as e:
                raise UsageError(f"{where}: arch_kwargs must hold plain JSON values ({e})") from e
        out[ALIASES.get(k, k)] = value
    return out


def provenance(cfg: dict[str, Any], where: str | None, given: dict[str, Any]) -> dict[str, Any] | None:
    """The config file read and what it set: ``{"path", "keys", "values", "overridden"}``, where
    ``keys`` are the settings taken from the file (sorted) and ``overridden`` those a flag in
    ``given`` replaced. None when no file was read."""
    if where is None:
        return None
    flagged = {k for k, v in given.items() if v is not None and v != []}
    used = sorted(k for k in cfg if k not in flagged)
    return {"path": str(Path(where).resolve()), "keys": used, "values": {k: cfg[k] for k in used},
            "overridden": sorted(k for k in cfg if k in flagged)}


def describe(info: dict[str, Any]) -> str:
    """One line for stderr: the file and the settings it gave, e.g.
    ``settings from /p/fitcli.toml: max_dead = 1, arch = "m.py:Net"``."""
    import json

    if not info["keys"] and not info["overridden"]:
        return f"config file {info['path']} read: it sets nothing"
    parts = [f"{k} = {json.dumps(v)}" for k, v in info["values"].items()]
    text = f"settings from {info['path']}: " + (", ".join(parts) if parts else "none")
    if info["overridden"]:
        text += " (the command line overrides " + ", ".join(info["overridden"]) + ")"
    return text
