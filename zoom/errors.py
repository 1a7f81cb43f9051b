"""The one exception type for bad input: the CLI prints its message on one line and exits 2."""


class ZoomError(Exception):
    """Bad input (config, prompts, model id, path, option). The message names the problem and the fix."""


def looks_like_path(name: str) -> bool:
    """True for strings meant as local paths rather than hub ids (`org/name`)."""
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..")
