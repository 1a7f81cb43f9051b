"""Reading the YAML files users hand to zoom (configs, prompt sets) and that runs store, safely: UTF-8
only, YAML's safe loader only, and no "billion laughs": a document whose aliases expand past a size
limit is refused before it is built.
"""

from __future__ import annotations

import os

import yaml

from .errors import ZoomError

MAX_NODES = 100_000  # nodes after expanding aliases; real configs have a few hundred


def _expanded_size(node, memo: dict, limit: int) -> int:
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a self-referencing alias counts once (safe_load builds it as a cycle)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        for child in node.value:
            size += _expanded_size(child, memo, limit)
            if size > limit:
                break
    elif isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            size += _expanded_size(k, memo, limit) + _expanded_size(v, memo, limit)
            if size > limit:
                break
    memo[key] = size
    return size


def read_yaml(path, what: str):
    """The parsed content of a YAML file; ZoomError naming `what` and the problem otherwise."""
    where = f"{what} {os.fspath(path)!r}"
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ZoomError(f"cannot read {where}: {e.strerror or type(e).__name__}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ZoomError(f"{where} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and _expanded_size(node, {}, MAX_NODES) > MAX_NODES:
            raise ZoomError(f"{where} expands to more than {MAX_NODES:,} YAML nodes (aliases repeated too often); "
                            "write it out plainly")
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ZoomError(f"{where} is not valid YAML ({yaml_where(e)})") from None
    except RecursionError:
        raise ZoomError(f"{where} is nested too deeply to be a zoom file") from None


def yaml_where(e) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or "parse error"
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem
