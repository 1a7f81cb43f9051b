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


def load_failure(what: str, name: str, error: Exception) -> ZoomError:
    """One line for a model that failed to load: what failed, why, and, for hub ids, what to do."""
    text = str(error).strip()
    reason = text.splitlines()[0][:300] if text else type(error).__name__
    problem = None if looks_like_path(name.split(":", 1)[-1]) else hub_problem(error)
    if problem:
        return ZoomError(f"{what}: cannot load {name!r}: {_HUB_HINTS[problem]}")
    return ZoomError(f"{what}: cannot load {name!r}: {reason}")


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
