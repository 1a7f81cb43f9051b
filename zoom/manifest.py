"""The integrity of model folders that come with a MANIFEST.json, the shapes world above all.

tools/train_world.py writes zoom/data/world/MANIFEST.json: every file of the world with its sha256. Before
an audit loads a model from a local folder, the MANIFEST.json that covers it (in the folder itself or up
to two folders above it, as ${ZOOM_WORLD}/sd, ${ZOOM_WORLD}/targets/NAME) is checked: every file it lists
must exist with that sum. A changed file (edited weights, a half-finished copy), a missing one, or a
manifest that is not a mapping of relative paths to sha256 sums is refused with one line naming the file.
The world itself ($ZOOM_WORLD, or zoom/data/world) must have its manifest.

Hashing the world (15 MB) takes a fraction of a second; the sums are cached by file (path, size,
modification and change time, inode) in the user's cache (ZOOM_CACHE, else $XDG_CACHE_HOME/zoom, else
~/.cache/zoom), so later runs only stat the files. The check is against accidents, not attackers: whoever
can edit the weights can edit the manifest, or the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from .errors import ZoomError, shown, shown_path

MANIFEST = "MANIFEST.json"
LEVELS = 2  # a model folder, or a file in it, is covered by a MANIFEST.json this many folders above it
CACHE_FILE = "manifest-sums.json"
CACHE_VERSION = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_MANIFEST_BYTES = 16 << 20  # the world's is 7 KB: about 110 bytes per file listed
MAX_CACHE_BYTES = 64 << 20


def cache_file() -> Path:
    root = os.environ.get("ZOOM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "zoom")
    return Path(root) / CACHE_FILE


def world_roots() -> list[Path]:
    """The folders that must have a manifest: the packaged world and $ZOOM_WORLD."""
    from .world import models_dir

    roots = [models_dir()]
    if os.environ.get("ZOOM_WORLD"):
        roots.append(Path(os.path.expanduser(os.environ["ZOOM_WORLD"])))
    return [Path(os.path.abspath(r)) for r in roots]


def local_model_paths(config, target: bool = True) -> list[str]:
    """The local files and folders an audit's config loads models from (hub ids and names are not);
    target=False leaves out target.spec (a target handed in from Python replaces it)."""
    candidates = [config.generator.model, config.generator.loop_decoder]
    for clip in (config.guide, config.judge):
        model = clip.model or ""
        candidates.append(model[len("local-dir:"):] if model.startswith("local-dir:") else None)
        candidates.append(clip.pretrained)
    specs = [config.target.spec] * target + [o["spec"] for o in config.oracle.values()
                                     if isinstance(o, dict) and isinstance(o.get("spec"), str)]
    for spec in specs:
        kind, _, rest = spec.partition(":")
        if kind in ("hf", "torchscript"):
            candidates.append(rest)
        elif kind in ("torchvision", "timm"):
            candidates.append(rest.partition(":")[2])
        elif kind == "python":
            candidates.append(rest.rpartition(":")[0] if rest.count(":") else rest)
    return [c for c in candidates if isinstance(c, str) and c and os.path.exists(os.path.expanduser(c))]


def covering_manifest(path) -> Path | None:
    """The folder whose MANIFEST.json covers this model path, or None."""
    p = Path(os.path.abspath(os.path.expanduser(path)))
    folder = p if p.is_dir() else p.parent
    for candidate in [folder, *list(folder.parents)[:LEVELS]]:
        if (candidate / MANIFEST).is_file():
            return candidate
    for root in world_roots():
        if folder == root or root in folder.parents:
            if (root / MANIFEST).is_file():  # a model deeper in the world than LEVELS
                return root
            raise ZoomError(f"the shapes world {shown_path(root)} has no {MANIFEST}, so its files cannot be checked; "
                            "copy the whole folder again (or reinstall zoom)")
    return None


def check_models(config, target: bool = True) -> list[Path]:
    """Check every manifest that covers a model the config loads; returns the folders checked."""
    roots = []
    for path in local_model_paths(config, target):
        root = covering_manifest(path)
        if root is not None and root not in roots:
            roots.append(root)
    if roots:
        cache = _load_cache()
        changed = False
        try:
            for root in roots:
                changed |= verify(root, cache)
        finally:
            if changed:
                _save_cache(cache)
    return roots


def _manifest_files(root: Path) -> dict:
    where = shown_path(root / MANIFEST)
    try:
        with open(root / MANIFEST, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ZoomError(f"{where} is larger than {MAX_MANIFEST_BYTES >> 20} MiB, so it is no manifest zoom wrote; "
                            "restore it, e.g. by copying the whole folder again")
        data = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = getattr(e, "strerror", None) or ("not valid JSON" if isinstance(e, ValueError) else type(e).__name__)
        raise ZoomError(f"{where} cannot be read ({reason}); restore it, e.g. by copying the whole folder again") \
            from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not files:
        raise ZoomError(f"{where} is malformed: it needs a 'files' mapping of relative paths to sha256 sums; "
                        "restore it, e.g. by copying the whole folder again")
    for name, digest in files.items():
        parts = name.replace("\\", "/").split("/")
        if os.path.isabs(name) or ".." in parts or "" in parts or not isinstance(digest, str) \
                or not _SHA256.match(digest):
            raise ZoomError(f"{where} is malformed: entry {shown(name)}: {shown(digest)} is not a relative path "
                            "inside the folder with a sha256 sum (64 hex digits); restore it")
    return files


def verify(root: Path, cache: dict) -> bool:
    """Every file the manifest in `root` lists exists with its sum; ZoomError naming the first that does not
    (and how many more). Returns whether the cache changed."""
    files = _manifest_files(root)
    problems, changed = [], False
    for name, expected in sorted(files.items()):
        path = root / name
        try:
            st = path.stat()
        except OSError:
            problems.append(f"its file {shown(name)} is missing")
            continue
        if not path.is_file():
            problems.append(f"its file {shown(name)} is not a file")
            continue
        key = str(path)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        entry = cache.get(key)
        if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
            actual = entry["sha256"]
        else:
            actual = _sha256(path)
            cache[key] = {"stamp": stamp, "sha256": actual}
            changed = True
        if actual != expected:
            problems.append(f"its file {shown(name)} has sha256 {actual[:12]}… but {MANIFEST} says {expected[:12]}…")
    if problems:
        more = f" (and {len(problems) - 1} more file{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise ZoomError(f"the model folder {shown_path(root)} does not match its {MANIFEST}: {problems[0]}{more}; "
                        "restore it (copy the whole folder again, or reinstall zoom), or rerun the tool that made it "
                        "(tools/train_world.py writes the world's manifest)")
    return changed


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_cache() -> dict:
    try:
        with open(cache_file(), "rb") as f:
            data = json.loads(f.read(MAX_CACHE_BYTES + 1).decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # (a cache cut at the bound is not valid JSON either)
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("files"), dict):
        return {}  # a damaged or older cache is rebuilt, never trusted
    return data["files"]


def _save_cache(files: dict) -> None:
    """Best effort: the cache only saves time, so a cache that cannot be written is skipped silently."""
    path = cache_file()
    kept = {k: v for k, v in files.items() if os.path.exists(k)}  # forget files that are gone (old copies)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "files": kept}, indent=0), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass
