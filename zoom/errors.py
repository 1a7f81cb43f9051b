"""The one exception type for bad input: the CLI prints its message on one line and exits 2."""


class ZoomError(Exception):
    """Bad input (config, prompts, model id, path, option). The message names the problem and the fix."""


def looks_like_path(name: str) -> bool:
    """True for strings meant as local paths rather than hub ids (`org/name`)."""
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..")


def load_failure(what: str, name: str, error: Exception) -> ZoomError:
    """One line for a model that failed to load, with the likely fix when the hub is offline."""
    import os

    text = str(error).strip()
    reason = text.splitlines()[0][:300] if text else type(error).__name__
    hint = ""
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not looks_like_path(name):
        hint = " (HF_HUB_OFFLINE=1: hub ids load only from the local cache; give a local path or go online)"
    return ZoomError(f"{what}: cannot load {name!r}: {reason}{hint}")
