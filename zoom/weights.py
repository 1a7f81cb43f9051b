"""Weights files that are pickles: refused with a message that says so.

zoom loads weights from safetensors files, or from PyTorch files that `torch.load(weights_only=True)`
reads (tensors and plain containers). A checkpoint that pickles Python objects besides them (a whole
nn.Module, an argparse.Namespace of training options, a custom class) cannot be read that way, and zoom
never unpickles it: unpickling runs whatever code the file names. Such files are named as pickles, not
blamed on the hub or the network.
"""

from __future__ import annotations

import os
import re

from .errors import ZoomError, shown

WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_PATH = re.compile(r"""['"]([^'"]+?(?:%s))['"]""" % "|".join(re.escape(s) for s in WEIGHT_SUFFIXES))
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def pickle_failure(error: BaseException) -> tuple[str, str | None] | None:
    """(the Python object the file pickles, or "", the file when an error names it) when a load failed
    because torch.load(weights_only=True) refused a pickle; None for any other failure."""
    found, seen, texts = False, set(), []
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error)
        texts.append(text)
        if any(cls.__name__ == "UnpicklingError" for cls in type(error).__mro__) or "weights only load failed" in text.lower():
            found = True
        error = error.__cause__ or error.__context__
    if not found:
        return None
    text = "\n".join(texts)
    obj = _GLOBAL.search(text)
    path = _PATH.search(text)
    return (obj.group(1) if obj else ""), (path.group(1) if path else None)


def pickle_message(what: str, name: str, obj: str = "", path: str | None = None) -> str:
    """One line: which model, which file, that it is a pickle (of what), and how to re-save it."""
    holds = f" (it holds Python objects such as {obj}, not only tensors)" if obj else " (it holds Python objects, not only tensors)"
    file = "it" if path == name else "its weights file" if not path else f"its weights file {shown(path, 160)}"
    return (f"{what}: cannot load {shown(name, 160)}: {file} is a pickle{holds}; zoom loads only safetensors or weights-only "
            "PyTorch files and never unpickles code: re-save the weights as safetensors (safetensors.torch.save_file) "
            "or as a plain state dict (torch.save(model.state_dict(), PATH))")


def refuse_pickle(path: str, what: str, name: str) -> None:
    """Raise ZoomError when the local file `path` is a pickle torch.load(weights_only=True) refuses. Cheap:
    a zip-format PyTorch file is opened memory-mapped, so its tensors are not read; other files (safetensors,
    the legacy format) are left to the loader, whose failure load_failure names the same way."""
    import pickle
    import zipfile

    import torch

    path = os.path.expanduser(path)
    if path.endswith(".safetensors") or not os.path.isfile(path) or not zipfile.is_zipfile(path):
        return
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        found = pickle_failure(e)
        raise ZoomError(pickle_message(what, name, found[0] if found else "", path)) from None
    except Exception:  # anything else wrong with the file: the loader says what
        return


def refuse_pickled_files(folder: str, what: str, name: str) -> None:
    """refuse_pickle for the pickle-format weights files a model folder would be loaded from: those of a
    folder without safetensors files (loaders prefer safetensors when there are some)."""
    folder = os.path.expanduser(folder)
    try:
        files = sorted(f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f)))
    except OSError:
        return
    if any(f.endswith(".safetensors") for f in files):
        return
    for f in files:
        if f.endswith(WEIGHT_SUFFIXES):
            refuse_pickle(os.path.join(folder, f), what, name)


def refuse_pickled_folder(folder: str, what: str, name: str) -> None:
    """refuse_pickled_files for each component subfolder of a diffusers pipeline folder (unet, vae,
    text_encoder, ...): before diffusers is asked, which would print its own lines first."""
    folder = os.path.expanduser(folder)
    if not os.path.isdir(folder):
        return
    for sub in sorted(os.listdir(folder)):
        if os.path.isdir(os.path.join(folder, sub)):
            refuse_pickled_files(os.path.join(folder, sub), what, name)
