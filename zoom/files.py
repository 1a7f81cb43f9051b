"""Reading the YAML files users hand to zoom (configs, prompt sets) and that runs store, safely: UTF-8
only, YAML's safe loader only, and bounded: a file over its byte bound is refused before it is read, one
of more values than its bound is refused as soon as the parser passes that many, and a "billion laughs"
document whose aliases expand past that bound is refused before it is built.

Why these bounds: zoom's own files are a few kilobytes; a prompt set takes about 80 bytes and 5 YAML
values per attribute, so 5,000 attributes (an audit of weeks of GPU time at the default 64 seeds) are
about 0.4 MiB and 25,000 values. USER_MAX_BYTES (4 MiB) and USER_MAX_NODES (100,000) leave room for four
times that and for long prompts, while PyYAML (pure Python, about 1.3 s and 100 MB per MiB on a slow
core) still answers in seconds; past them a file is not a zoom file, or not one zoom can audit (a 50 MB
prompt file used to mean minutes of silence and gigabytes of memory). A run's config.yaml holds the
config and its prompt set together, so what zoom itself stored gets three times the room
(STORED_MAX_*): every run zoom accepted, it can report on.
"""

from __future__ import annotations

import os

import yaml

from .errors import ZoomError, shown, shown_path

USER_MAX_BYTES = 4 << 20  # config and prompt files a user hands to zoom
USER_MAX_NODES = 100_000  # YAML values (every scalar, list and mapping), as written and after expanding aliases
STORED_MAX_BYTES = 3 * USER_MAX_BYTES  # what a run stores (RUN_DIR/config.yaml)
STORED_MAX_NODES = 3 * USER_MAX_NODES
MAX_BYTES, MAX_NODES = USER_MAX_BYTES, USER_MAX_NODES  # (the names zoom.rundir imports)


class _TooManyNodes(Exception):
    pass


class _CountingLoader(yaml.SafeLoader):
    """YAML's safe loader, counting the values it composes (an alias is not a new value) and stopping
    past `limit`: a large document is refused before the rest of it is parsed."""

    def __init__(self, stream, limit: int):
        super().__init__(stream)
        self.nodes, self.limit = 0, limit

    def compose_node(self, parent, index):
        if not self.check_event(yaml.AliasEvent):
            self.nodes += 1
            if self.nodes > self.limit:
                raise _TooManyNodes
        return super().compose_node(parent, index)


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


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:,.1f} MiB" if n >= 2 ** 20 else f"{n:,} bytes"


_SPLIT = "trim it, or split the attributes over several runs"


def _read_bounded(path, where: str, max_bytes: int) -> bytes:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise ZoomError(f"{where} is too large ({_mib(size)}): zoom reads files of this kind up to "
                                f"{_mib(max_bytes)} (a 5,000-attribute prompt set is about 0.4 MiB); {_SPLIT}")
            raw = f.read(max_bytes + 1)  # a pipe or a file that grows reports no size: read no more than this
    except OSError as e:
        raise ZoomError(f"cannot read {where}: {e.strerror or type(e).__name__}") from None
    if len(raw) > max_bytes:
        raise ZoomError(f"{where} is too large (more than {_mib(max_bytes)}, the most zoom reads of a file of this "
                        f"kind); {_SPLIT}")
    return raw


def read_yaml(path, what: str, *, user: bool = False):
    """The parsed content of a YAML file; ZoomError naming `what` and the problem otherwise. user: a file
    a user hands to zoom (USER_MAX_*), not one a run stored (STORED_MAX_*)."""
    where = f"{what} {shown_path(path)}"
    raw = _read_bounded(path, where, USER_MAX_BYTES if user else STORED_MAX_BYTES)
    return parse_yaml(raw, where, max_nodes=USER_MAX_NODES if user else STORED_MAX_NODES)


def parse_yaml(raw, where: str, *, max_nodes: int = STORED_MAX_NODES):
    """The parsed content of YAML bytes (or text) already read within a size bound; ZoomError naming
    `where` (e.g. "config file 'c.yaml'") and the problem otherwise."""
    if isinstance(raw, (bytes, bytearray)):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ZoomError(f"{where} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    else:
        text = raw
    loader = _CountingLoader(text, max_nodes)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, max_nodes) > max_nodes:
            raise ZoomError(f"{where} expands to more than {max_nodes:,} YAML values through aliases repeated too "
                            f"often (it holds {loader.nodes:,} as written); write it out plainly")
        return loader.construct_document(node)
    except _TooManyNodes:
        raise ZoomError(f"{where} is too large: it holds more than {max_nodes:,} YAML values (each list item, key "
                        f"and value counts; a 5,000-attribute prompt set holds about 25,000); {_SPLIT}") from None
    except yaml.YAMLError as e:
        raise ZoomError(f"{where} is not valid YAML ({yaml_where(e)})") from None
    except RecursionError:
        raise ZoomError(f"{where} is nested too deeply to be a zoom file") from None
    except (ValueError, OverflowError) as e:  # a number past Python's 4,300 digits, a date like 2024-13-45
        reason = "a number with more than 4,300 digits" if "digits" in str(e) else shown(str(e).split("\n")[0])
        raise ZoomError(f"{where} holds a value YAML cannot read ({reason}); fix or quote it") from None
    finally:
        loader.dispose()


def yaml_where(e) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or "parse error"
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem
