"""The one exception type for bad input: the CLI prints its message on one line and exits 2."""


class ZoomError(Exception):
    """Bad input (config, prompts, model id, path, option). The message names the problem and the fix."""


def looks_like_path(name: str) -> bool:
    """True for strings meant as local paths rather than hub ids (`org/name`)."""
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..")


_HUB_HINTS = {
    "offline": "HF_HUB_OFFLINE is set and it is not in the local cache: run once with a network, or give a local folder",
    "no network": "the hub cannot be reached (no network) and it is not in the local cache: connect, or give a "
                  "local folder",
    "gated": "it is a gated repository: accept its terms on the hub and log in (`huggingface-cli login`)",
    "unknown": "the hub has no such repository (or it is private): check the id",
    "not cached": "it is not in the local cache and the hub was not asked: connect, or give a local folder",
}


def hub_problem(error: BaseException) -> str | None:
    """Which of _HUB_HINTS explains a failed load, from the exception chain's types and messages."""
    import os

    names, texts = set(), []
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        names.update(cls.__name__ for cls in type(error).__mro__)
        texts.append(str(error).lower())
        error = error.__cause__ or error.__context__
    text = " ".join(texts)
    if "GatedRepoError" in names or "gated repo" in text:
        return "gated"
    if "RepositoryNotFoundError" in names or "repository not found" in text or "is not a valid model identifier" in text:
        return "unknown"
    if "OfflineModeIsEnabled" in names or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "offline" if os.environ.get("ZOOM_HUB_UNREACHABLE") != "1" else "no network"
    if names & {"ConnectionError", "ConnectTimeout", "MaxRetryError", "NewConnectionError", "ConnectError"} \
            or "connection" in text or "resolve host" in text:
        return "no network"
    if "LocalEntryNotFoundError" in names or "cannot find the requested files in the local cache" in text:
        return "not cached"
    return None


def names_local_file(name: str) -> bool:
    """Whether a model name refers to a local file or folder in any of its parts: `/models/x`,
    `torchvision:resnet50:/w/x.pth`, `ViT-B-32 (/w/clip.pt)`. A failure to load it is not the hub's."""
    import os
    import re

    return any(looks_like_path(part) or os.path.isfile(os.path.expanduser(part))
               or (os.sep in part and os.path.exists(os.path.expanduser(part)))
               for part in re.split(r"[:()\s]+", name) if part)


def load_failure(what: str, name: str, error: Exception) -> ZoomError:
    """One line for a model that failed to load: what failed, why, and, for hub ids, what to do."""
    from .weights import pickle_failure, pickle_message

    pickled = pickle_failure(error)  # a pickle weights-only loading refused: say so, never blame the hub
    if pickled is not None:
        return ZoomError(pickle_message(what, name, *pickled))
    text = str(error).strip()
    reason = text.splitlines()[0][:300] if text else type(error).__name__
    problem = None if names_local_file(name) else hub_problem(error)
    if problem:
        return ZoomError(f"{what}: cannot load {shown(name)}: {_HUB_HINTS[problem]}")
    return ZoomError(f"{what}: cannot load {shown(name)}: {reason}")


def go_offline_if_hub_unreachable(timeout: float = 3.0) -> None:
    """Without a network, hub libraries retry for about a minute before failing. Ask the hub once (a TCP
    connect, `timeout` seconds); if it cannot be reached, switch this process to offline mode, so models
    in the local cache load at once and missing ones fail at once with a message that says why."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return
    except OSError:
        pass
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["ZOOM_HUB_UNREACHABLE"] = "1"
    try:
        import huggingface_hub.constants as constants

        constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass


def printable(text: str) -> str:
    """Text safe for a terminal and one line: control characters (ANSI escapes, NUL, newlines) are shown
    as escapes instead of acting on the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


ECHO_LIMIT = 80  # characters of a user's value an error line repeats
LINE_LIMIT = 600  # characters of a whole error line; longer ones keep their start and their end (the fix)


def _short_repr(value, budget: int) -> str:
    """repr(value), built only as far as `budget` characters (so a 60,000-item list or a 5 MB string
    costs nothing to show); the caller cuts the result to the budget."""
    if budget <= 0:
        return "..."
    if isinstance(value, (str, bytes)):
        return repr(value[:budget + 1])
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        brackets = "()" if isinstance(value, tuple) else "[]" if isinstance(value, list) else "{}"
        if isinstance(value, (set, frozenset)) and not value:
            return repr(value)
        items = value.items() if isinstance(value, dict) else value
        parts, used = [], 1
        for item in items:
            if used > budget:
                parts.append("...")
                break
            if isinstance(value, dict):
                part = _short_repr(item[0], budget - used) + ": " + _short_repr(item[1], budget - used)
            else:
                part = _short_repr(item, budget - used)
            parts.append(part)
            used += len(part) + 2
        tail = "," if isinstance(value, tuple) and len(parts) == 1 and len(value) == 1 else ""
        return brackets[0] + ", ".join(parts) + tail + brackets[1]
    if isinstance(value, int) and not isinstance(value, bool):
        digits = value.bit_length() * 0.30103
        if digits > budget:  # str() of a huge int is slow, and refused past 4,300 digits
            return f"{'-' if value < 0 else ''}<a number of about {digits:,.0f} digits>"
    return repr(value)


def shown(value, limit: int = ECHO_LIMIT) -> str:
    """A user's value as an error line repeats it: its repr, cut to about `limit` characters with an
    ellipsis and its size when it is longer, e.g. 'aaaa...' (5,000,000 characters) or [1, 2, ...]
    (60,000 items). An error names the value; it does not echo megabytes of it."""
    text = _short_repr(value, limit)
    if len(text) <= limit:
        return text
    size = ""
    if isinstance(value, (str, bytes)):
        size = f" ({len(value):,} {'characters' if isinstance(value, str) else 'bytes'})"
    elif isinstance(value, (list, tuple, set, frozenset, dict)):
        size = f" ({len(value):,} item{'s' if len(value) != 1 else ''})"
    cut = text[:limit]
    if isinstance(value, (list, tuple, set, frozenset, dict)) and ", " in cut:
        cut = cut.rsplit(", ", 1)[0] + ","  # end on a whole item
    return cut + "..." + size


PATH_LIMIT = 160  # characters of a path an error line repeats; a longer one keeps its end


def shown_path(path, limit: int = PATH_LIMIT) -> str:
    """A user's path as an error line names it, quoted: a long one (a path cannot be longer than a few
    thousand characters, a string given for one can) keeps its end, where the file's name is."""
    import os

    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else path
    if not isinstance(text, str):
        return shown(text)
    if len(text) <= limit:
        return repr(text)
    return repr("..." + text[-limit:]) + f" ({len(text):,} characters)"


def clip(text, limit: int = ECHO_LIMIT) -> str:
    """A user's name or key as an error line repeats it unquoted: at most about `limit` characters."""
    if not isinstance(text, str):
        return shown(text, limit)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def one_line(message: str, limit: int = LINE_LIMIT) -> str:
    """The last guard before an error reaches the terminal: one line, printable, at most about `limit`
    characters. A longer message (a value no call site shortened) keeps its start and its end, where
    the fix is, and says how much was left out."""
    text = printable(message)
    if len(text) <= limit:
        return text
    keep = (limit - 40) // 2
    return f"{text[:keep]} ...[{len(text) - 2 * keep:,} characters left out]... {text[-keep:]}"
