"""The run directory on disk (DESIGN §4): layout, atomic writes, the lock, records, and reading a run
back with every file validated.

    RUN_DIR/config.yaml            the resolved config (written last when a run starts: it marks a run)
    RUN_DIR/run.json               provenance: command, device, versions, models and their hashes
    RUN_DIR/records/rank-R.jsonl   one JSON object per finished item, appended and fsynced per batch
    RUN_DIR/records/rank-R.meta.json   peak memory and end time of rank R
    RUN_DIR/images/...             PNGs (slugs, never raw prompt text)
    RUN_DIR/.lock                  held (fcntl) by the process writing the run

Everything that writes here or reads a run back goes through this module: the audit, `zoom report`,
`compare` and `check`. A file that is not what zoom writes is one ZoomError naming the file (and the
line, for records and config.yaml) and the field, never a traceback: every field the report, check and
compare read is type-checked here, so nothing downstream meets a value zoom never writes. Only regular
files are read, each within a size bound (a named pipe never blocks, /dev/zero is never opened), and
gallery images only where they resolve to a regular file inside the run directory.
"""

from __future__ import annotations

import datetime as _dt
import errno
import io
import json
import os
import stat
import typing
from pathlib import Path

import yaml

from .config import (EDIT_SPACES, MODES, PRECISIONS, RANGES, TASKS, ClipConfig, GeneratorConfig, SearchConfig,
                     TargetConfig, dump_config)
from .errors import ZoomError, shown
from .files import MAX_BYTES as MAX_SMALL_BYTES
from .files import parse_yaml

RECORDS_DIR = "records"
IMAGES_DIR = "images"
CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"

# What zoom reads back from a run directory, at most; past these a file is not one zoom wrote, and it is
# refused before it is read (a link to /dev/zero, a sparse 100 GB file) instead of filling the memory.
# A record is 0.5-2 KB (a sweep's curve and joint mode's per-attribute judge moves make the large ones),
# so 4 GiB per rank holds 2-8 million items: months of one GPU at the 1-5 counterfactuals per second
# zoom reaches. One record line of 16 MiB is 20 times a 1,001-point sweep curve or 5,000 attributes'
# judge moves. config.yaml, run.json and the rank meta files are bounded like every config zoom reads
# (files.MAX_BYTES, 4 MiB: a 5,000-attribute run's config is 0.4 MiB; run.json and meta, a few KB).
MAX_RECORDS_BYTES = 4 << 30
MAX_RECORD_LINE = 16 << 20
MAX_IMAGE_BYTES = 64 << 20  # one gallery PNG: a 4096 x 4096 RGB image is 48 MiB even uncompressed
MAX_DEPTH = 32  # nesting of config.yaml and run.json; zoom writes 4 levels

NONE = type(None)
NUMBER = (int, float)


class _Spec:
    """A field's allowed values beyond a tuple of JSON types: test(value) -> bool, and what it expects."""

    def __init__(self, test, expected: str, locate=None):
        self.test, self.expected = test, expected
        self.locate = locate  # value -> (key path inside it, the value there, expected) of what is wrong

    def __call__(self, value) -> bool:
        return self.test(value)


def _fits(value, types) -> bool:
    """value is one of these JSON types; bool is not a number, a float is finite, an int fits 64 bits.
    (Exact types, as json and YAML's safe loader build them; this runs for every field of every record.)"""
    if types.__class__ is _Spec:
        return types.test(value)
    kind = value.__class__
    if kind is float:
        return float in types and value - value == 0.0  # False for NaN and the infinities
    if kind is int:
        return int in types and -2 ** 63 <= value < 2 ** 64
    return kind in types


def _number(value) -> bool:
    kind = value.__class__
    return (kind is float and value - value == 0.0) or (kind is int and -2 ** 63 <= value < 2 ** 64)


def _curve_ok(value) -> bool:
    if value is None:
        return True
    if value.__class__ is not list:
        return False
    for point in value:
        if point.__class__ is not list or len(point) != 3:
            return False
        alpha, prob, pred = point
        if not (_number(alpha) and (prob is None or _number(prob)) and pred.__class__ is int):
            return False
    return True


def _expected(types) -> str:
    if isinstance(types, _Spec):
        return types.expected
    names = {str: "text", int: "an integer", bool: "true or false", NONE: "null", dict: "a mapping", list: "a list"}
    words = ["a number"] if float in types else []
    words += [names[t] for t in types if t is not float and not (t is int and float in types)]
    return " or ".join(words)


def _map_of(types, nullable: bool = True) -> _Spec:
    return _Spec(lambda v: (nullable and v is None) or (isinstance(v, dict) and all(
        isinstance(k, str) and _fits(x, types) for k, x in v.items())),
        f"{'null or ' if nullable else ''}a mapping of names to {_expected(types)}")


def _list_of(types, nullable: bool = True) -> _Spec:
    return _Spec(lambda v: (nullable and v is None) or (isinstance(v, list) and all(_fits(x, types) for x in v)),
                 f"{'null or ' if nullable else ''}a list of {_expected(types)}")


def _is_time(value) -> bool:
    if value is None:
        return True
    if not isinstance(value, str) or len(value) > 64:
        return False
    try:
        return _dt.datetime.fromisoformat(value).tzinfo is not None
    except ValueError:
        return False


ISO_TIME = _Spec(_is_time, "null or an ISO 8601 time with its UTC offset, such as 2026-01-01T00:00:00+00:00")
CURVE = _Spec(_curve_ok, "null or a list of [alpha, probability or null, class index] points")

def _count(value) -> bool:
    return value.__class__ is int and 0 <= value < 2 ** 63


def _numbers(value, n=None) -> bool:
    return value.__class__ is list and (n is None or len(value) == n) and all(v is None or _number(v) for v in value)


def _boxes_problem(value):
    if value.__class__ is not list:
        return [], value, "a list of detections"
    for j, box in enumerate(value):
        if box.__class__ is not dict:
            return [j], box, "a mapping of box, label and score"
        for key, ok, expected in (("box", lambda v: _numbers(v, 4), "four numbers (x0, y0, x1, y1)"),
                                  ("label", lambda v: v.__class__ is str, "text"),
                                  ("score", lambda v: v is None or _number(v), "a number or null")):
            if not ok(box.get(key)):
                return [j, key], box.get(key), expected
    return None


def _by_label_problem(value):
    if value.__class__ is not dict:
        return [], value, "a mapping of labels to counts"
    for name, cell in value.items():
        if cell.__class__ is not dict:
            return [name], cell, "a mapping of n, lost and relabelled"
        for key in ("n", "lost", "relabelled"):
            if not _count(cell.get(key)):
                return [name, key], cell.get(key), "a count (an integer >= 0)"
    return None


def _points_problem(value):
    if value.__class__ is not list or not all(_numbers(p, 2) for p in value):
        return [], value, "a list of [x, y] points"
    return None


# A structured task's per-item details (tasks.*Flip.details): the keys report and gallery read, checked
# each by a test or a locator (key path, value, expected); keys zoom does not read pass, as in records.
TASK_DETAILS = {
    "nme": lambda v: None if v is None or _number(v) else ([], v, "a number or null"),
    "base_keypoints": _points_problem, "final_keypoints": _points_problem,
    "class": lambda v: None if v.__class__ is int else ([], v, "an integer"),
    "class_label": lambda v: None if v.__class__ is str else ([], v, "text"),
    "iou": lambda v: None if v is None or (_number(v) and 0 <= v <= 1) else ([], v, "a number from 0 to 1 or null"),
    **{k: (lambda v: None if _count(v) else ([], v, "a count (an integer >= 0)"))
       for k in ("base_area", "final_area", "lost", "relabelled", "fabricated")},
    "by_label": _by_label_problem, "base_boxes": _boxes_problem, "final_boxes": _boxes_problem,
}


def _task_problem(value):
    """(key path below `task`, the value there, what was expected) for the first wrong detail, or None."""
    if value is None:
        return None
    if value.__class__ is not dict:
        return [], value, "null or a mapping of task details"
    for key, check in TASK_DETAILS.items():
        if key in value:
            found = check(value[key])
            if found:
                return [key] + found[0], found[1], found[2]
    return None


# The fields every record carries, with the JSON types they may hold (None: null allowed).
RECORD_FIELDS = {
    "key": (str,), "seed": (int,), "attribute": (str,), "slug": (str,), "prompt": (str,), "status": (str,),
    "flipped": (bool,), "strength": NUMBER + (NONE,), "base_pred": (int,), "base_label": (str, int),
    "base_prob": NUMBER + (NONE,), "final_prob": NUMBER + (NONE,), "validity": (bool, NONE),
    "seconds": NUMBER, "unet_calls": (int,), "steps": (int,),
}
# The fields some records carry (by mode, edit space, oracle, null twin) and report, check and compare read.
OPTIONAL_RECORD_FIELDS = {
    "mode": (str,), "edit_space": (str,), "precision": (str,), "final_pred": (int,), "final_label": (str, int),
    "alpha": NUMBER + (NONE,), "delta_rel": NUMBER + (NONE,), "reach": NUMBER + (NONE,),
    "strength_low": NUMBER + (NONE,), "validity_score": NUMBER + (NONE,), "judge_change": NUMBER + (NONE,),
    "judge_change_toward": _map_of(NUMBER + (NONE,)), "base_image": (str, NONE), "counterfactual_image": (str, NONE),
    "pair": (str, NONE), "oracle": (bool, NONE), "oracle_base": (bool, NONE), "oracle_toward": _map_of((bool,)),
    "share": NUMBER, "any_flip": (bool,), "raw_flipped": (bool,), "monotone": (bool, NONE), "curve": CURVE,
    "fabricated": _Spec(_count, "a count (an integer >= 0)"),
    "task": _Spec(lambda v: _task_problem(v) is None, "null or a mapping of task details", locate=_task_problem),
    "base_overlay": (str, NONE), "counterfactual_overlay": (str, NONE),
}
META_FIELDS = {"rank": (int,), "peak_memory_bytes": (int, NONE), "memory_kind": (str, NONE), "end_time": ISO_TIME}


def _models_problem(value):
    """run.json's models: {role: null or {id/spec: text, ..., files: null or {path, sha256, files}}}.
    (key path below models, the value there, what was expected) for the first value that is not, or None."""
    if value is None:
        return None
    if not isinstance(value, dict):
        return [], value, "null or a mapping of roles to models"
    for role, model in value.items():
        if model is None:
            continue
        if not isinstance(model, dict):
            return [role], model, "null or a mapping"
        for key in ("id", "spec"):
            if not _fits(model.get(key), (str, NONE)):
                return [role, key], model[key], "text or null"
        files = model.get("files")
        if files is None:
            continue
        if not isinstance(files, dict):
            return [role, "files"], files, "null or a mapping of path, sha256 and files"
        for key, types in (("path", (str, NONE)), ("sha256", (str, NONE)), ("files", (int, NONE))):
            if not _fits(files.get(key), types):
                return [role, "files", key], files[key], _expected(types)
    return None


# run.json: everything the report, check and compare read from it (all optional: a run may lack run.json).
RUN_FIELDS = {
    "start_time": ISO_TIME, "end_time": ISO_TIME, "command": (str, NONE), "device": (str, NONE),
    "precision": (str, NONE), "num_processes": (int, NONE), "random_models": (bool, NONE),
    "overridden": _list_of((str,)), "versions": _map_of((str, NONE)),
    "models": _Spec(lambda v: _models_problem(v) is None, "null or a mapping of roles to models",
                    locate=_models_problem),
    "search": (dict, NONE),
}


# ---------------------------------------------------------------------------------------------
# Writing


KEPT = ("finished items are kept; `zoom audit ... --resume` continues the run once zoom can write there again "
        "(free space, permissions)")


def _io_error(path, e: OSError, kept: str = "") -> ZoomError:
    reason = e.strerror or type(e).__name__
    return ZoomError(f"cannot write {str(path)!r}: {reason}{'; ' + kept if kept else ''}")


def atomic_write(path, data: bytes | str) -> None:
    """Write to a temporary file next to path and rename it into place: readers see the old file or the
    new one, never half of one; a failed write leaves nothing behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:  # O_NOFOLLOW: a link planted under the temporary name is refused, never written through
        with open(tmp, "wb", opener=lambda name, flags: os.open(name, flags | os.O_NOFOLLOW, 0o666)) as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _io_error(path, e, KEPT) from None


def image_array(image):
    """An image tensor [3, H, W] in [0, 1] -> [H, W, 3] uint8, as saved."""
    return image.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()


def save_png(path: Path, image) -> None:
    """image: a tensor [3, H, W] in [0, 1], or a PIL image (a gallery overlay)."""
    from PIL import Image

    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image_array(image))).save(buffer, format="PNG")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _io_error(path.parent, e, KEPT) from None
    atomic_write(path, buffer.getvalue())


class RecordWriter:
    """Appends records as JSON lines; each batch is flushed and fsynced before returning."""

    def __init__(self, path: Path):
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                data = path.read_bytes()
                cut = data.rfind(b"\n") + 1
                if cut != len(data):  # drop a torn last line left by a kill mid-write
                    with open(path, "r+b") as f:
                        f.truncate(cut)
            self._file = open(path, "a", encoding="utf-8")
        except OSError as e:
            raise _io_error(path, e) from None

    def write(self, records: list[dict]) -> None:
        start = self._file.tell()
        try:
            self._file.write("".join(json.dumps(r, sort_keys=True, allow_nan=False) + "\n" for r in records))
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as e:
            try:  # leave whole lines only: the batch is either on disk or not
                self._file.truncate(start)
            except OSError:
                pass
            raise _io_error(self.path, e, KEPT) from None

    def close(self):
        try:
            self._file.close()
        except OSError:
            pass


class RunLock:
    """An exclusive lock on a run directory, held by the process writing there. fcntl locks die with
    their process, so a killed run never leaves a stale lock behind."""

    def __init__(self, run_dir: Path):
        import fcntl

        self.path = Path(run_dir) / LOCK_FILE
        # The lock file is opened without following a link and only if it is a regular file: the pid
        # written into it must never land in a file a link points at, nor a FIFO block the open.
        if os.path.islink(self.path) or (os.path.lexists(self.path) and not os.path.isfile(self.path)):
            what = "a symbolic link" if os.path.islink(self.path) else _kind(os.stat(self.path).st_mode)
            raise ZoomError(f"{_p(self.path)} is {what}, not the lock file zoom writes; remove it (no zoom process "
                            "is using it) and try again")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
            self._file = os.fdopen(fd, "r+")
        except OSError as e:
            raise _io_error(self.path, e) from None
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise ZoomError(f"run directory {str(run_dir)!r} is in use by another zoom process (pid {holder}); "
                            "wait for it to finish, or choose another --out") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self):
        import fcntl

        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


def check_out_dir(out, resolved: dict, resume: bool) -> None:
    """Before any model loads: may out be started (fresh) or continued (--resume) with this config?"""
    out = Path(out)
    exists = check_path(out, "--out")  # a name too long, a loop of links: said now, before any model loads
    if not exists and os.path.islink(out):
        raise ZoomError(f"--out {_p(out)} is a symbolic link to {shown(os.readlink(out))}, which does not exist; "
                        "zoom creates the run directory itself: remove the link or choose another --out")
    if exists and not resume:
        raise ZoomError(f"output directory {str(out)!r} already exists; pass --resume to continue it or choose "
                        "another --out")
    if resume and exists:
        _check_same_config(out, resolved)
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ZoomError(f"--out {str(out)!r}: cannot create it, {str(parent)!r} is not writable")


def _check_same_config(out: Path, resolved: dict) -> None:
    previous = read_config(out, what="--resume")
    current = yaml.safe_load(dump_config(resolved))
    if previous != current:
        changed = sorted(k for k in set(current) | set(previous) if previous.get(k) != current.get(k))
        raise ZoomError(f"--resume: the config differs from the one {str(out)!r} was started with "
                        f"(section(s): {', '.join(map(str, changed))}); resume with the same config or use a new --out")


def open_run_dir(out, resolved: dict, resume: bool, run_info: dict) -> RunLock:
    """Create (exclusively) or continue the run directory, deciding under its lock, and return the lock.

    A fresh run creates the folder itself: if another process created it since the early check, this
    fails instead of writing into that run. A resumed run re-reads config.yaml once it holds the lock.
    """
    out = Path(out)
    if not resume or not out.exists():
        try:
            out.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            raise ZoomError(f"output directory {str(out)!r} was created by another process meanwhile; choose "
                            "another --out") from None
        except OSError as e:
            raise _io_error(out, e) from None
        lock = RunLock(out)
        try:
            (out / RECORDS_DIR).mkdir()
            atomic_write(out / RUN_FILE, json.dumps(run_info, indent=1))
            atomic_write(out / CONFIG_FILE, dump_config(resolved))  # last: marks the run as started
        except (OSError, ZoomError) as e:
            lock.release()
            import shutil

            shutil.rmtree(out, ignore_errors=True)  # nothing half-written: the run never started
            raise e if isinstance(e, ZoomError) else _io_error(out, e) from None
        return lock
    lock = RunLock(out)
    try:
        _check_same_config(out, resolved)
        (out / RECORDS_DIR).mkdir(exist_ok=True)
    except BaseException:
        lock.release()
        raise
    return lock


def write_rank_meta(out: Path, rank: int, peak: int, memory_kind: str, end_time: str) -> None:
    meta = {"rank": rank, "peak_memory_bytes": int(peak), "memory_kind": memory_kind, "end_time": end_time}
    atomic_write(out / RECORDS_DIR / f"rank-{rank}.meta.json", json.dumps(meta))


# ---------------------------------------------------------------------------------------------
# Reading, validated


def _p(path) -> str:
    """A path for an error line: quoted, the middle of a very long one left out (its file name stays)."""
    text = str(path)
    return repr(text if len(text) <= 200 else f"{text[:80]}…{text[-110:]}")


def check_path(path, what: str) -> bool:
    """Whether a path the user gave exists (links followed). ZoomError, naming `what`, for one no file
    system call can take: a name longer than the file system allows (checked on the text, so a too-long
    name below a folder that does not exist yet is caught too, before anything is created), a path past
    4,095 bytes, a loop of links, a folder that may not be searched."""
    text = os.fspath(path)
    raw = os.fsencode(text)
    longest = max(raw.split(b"/"), key=len)
    folder = os.path.dirname(os.path.abspath(text))
    name_max = 255
    while folder:
        try:
            name_max = os.pathconf(folder, "PC_NAME_MAX")
            break
        except (OSError, ValueError):
            parent = os.path.dirname(folder)
            folder = None if parent == folder else parent
    if len(longest) > name_max:
        raise ZoomError(f"{what} {shown(text)}: a name in it is {len(longest):,} bytes long, more than the file system "
                        f"allows ({name_max}); choose a shorter name")
    if len(raw) > 4095:
        raise ZoomError(f"{what} {shown(text)}: the path is {len(raw):,} bytes long, more than the system allows "
                        "(4,095); choose a shorter path")
    try:
        os.stat(text)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        reason = {errno.ELOOP: "its symbolic links form a loop", errno.EACCES: "permission denied",
                  errno.ENAMETOOLONG: "a name in it is longer than the file system allows; choose a shorter one"
                  }.get(e.errno, e.strerror or type(e).__name__)
        raise ZoomError(f"{what} {shown(text)}: {reason}") from None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):,.1f} {unit}"
    return f"{n:,} bytes"


def open_run_file(path, what: str, limit: int):
    """A file of a run directory, opened for binary reading: a regular file (a link to one is followed) of
    at most `limit` bytes, else one ZoomError naming it. It is looked at before it is opened and checked
    again once open, so a named pipe never blocks and a device (/dev/zero, a tape) is never opened."""
    path = Path(path)
    try:
        before = os.stat(path)
    except OSError as e:
        raise ZoomError(f"cannot read {_p(path)}: {e.strerror or type(e).__name__}") from None
    if stat.S_ISDIR(before.st_mode):
        raise ZoomError(f"{_p(path)} is a directory, not {what}; the run directory is damaged")
    if not stat.S_ISREG(before.st_mode):
        raise ZoomError(f"{_p(path)} is {_kind(before.st_mode)}, not {what}: zoom reads only regular files from a "
                        "run directory; the run directory is damaged")
    if before.st_size > limit:
        raise ZoomError(f"{_p(path)} is {_size(before.st_size)}, more than zoom reads for {what} ({_size(limit)}); "
                        "it is not a file zoom wrote: the run directory is damaged")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ZoomError(f"cannot read {_p(path)}: {e.strerror or type(e).__name__}") from None
    after = os.fstat(fd)
    if not stat.S_ISREG(after.st_mode) or after.st_size > limit:  # swapped for something else meanwhile
        os.close(fd)
        raise ZoomError(f"{_p(path)} changed while zoom opened it ({_kind(after.st_mode)}, {_size(after.st_size)}); "
                        "is another program writing the run directory?")
    return os.fdopen(fd, "rb")


def read_run_file(path, what: str, limit: int = MAX_SMALL_BYTES) -> bytes:
    """The bytes of a small file of a run directory (config.yaml, run.json, a rank meta file), read by
    open_run_file's rules and never past `limit` bytes (a /proc file or one still growing reports no size)."""
    with open_run_file(path, what, limit) as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise ZoomError(f"cannot read {_p(path)}: {e.strerror or type(e).__name__}") from None
    if len(data) > limit:
        raise ZoomError(f"{_p(path)} is more than zoom reads for {what} ({_size(limit)}); it is not a file zoom "
                        "wrote: the run directory is damaged")
    return data


def run_image(run_dir, relative, refused: list | None = None) -> Path | None:
    """The file a record's image path names, when it is safe to show: a relative path of plain names
    that resolves (links followed) to a regular file inside the run directory, of at most
    MAX_IMAGE_BYTES. Otherwise None; a path refused for safety (not merely missing) is added to
    `refused` as (path, reason), so the caller can say so."""
    def refuse(reason):
        if refused is not None:
            refused.append((relative, reason))
        return None

    if not isinstance(relative, str) or not relative or relative.startswith("/") or "\\" in relative \
            or "\x00" in relative or any(part in ("", ".", "..") for part in relative.split("/")):
        return refuse("is not a plain path inside the run directory")
    root = Path(run_dir)
    try:
        if not os.path.lexists(root / relative):
            return None  # missing: the report says "image missing"
        real_root = root.resolve(strict=True)
        real = (root / relative).resolve(strict=True)
        info = os.stat(real)
    except (OSError, RuntimeError, ValueError):
        return refuse("cannot be resolved (a dangling link, a loop of links, or a name too long)")
    if real == real_root or not real.is_relative_to(real_root):
        return refuse("leads outside the run directory (a symbolic link)")
    if not stat.S_ISREG(info.st_mode):
        return refuse(f"is {_kind(info.st_mode)}, not an image file")
    if info.st_size > MAX_IMAGE_BYTES:
        return refuse(f"is {_size(info.st_size)}, more than zoom shows ({_size(MAX_IMAGE_BYTES)})")
    return real


def read_run_image(run_dir, relative, refused: list | None = None) -> bytes | None:
    """The bytes of a record's image, by run_image's rules (never a file outside the run directory, a pipe
    or a device), or None."""
    path = run_image(run_dir, relative, refused)
    if path is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = f.read(MAX_IMAGE_BYTES + 1)
    return data if len(data) <= MAX_IMAGE_BYTES else None


def _parse_json(text: str, where: str, damaged: str, line_numbers: bool = True):
    """JSON, or one ZoomError. (NaN and Infinity parse, as Python's json reads them; the field checks then
    refuse them by name, since zoom writes with allow_nan=False.)"""
    try:
        return json.loads(text)
    except RecursionError:
        raise ZoomError(f"{where} is nested too deeply to be a file zoom wrote; {damaged}") from None
    except json.JSONDecodeError as e:
        raise ZoomError(f"{where} is not valid JSON{f' (line {e.lineno})' if line_numbers else ''}; {damaged}") from None
    except ValueError:  # a number past Python's 4,300 digits
        raise ZoomError(f"{where} is not valid JSON (a number with more than 4,300 digits); {damaged}") from None


def _plain_problem(value, parts: list, depth: int = 0):
    """(path, what is wrong) for the first value zoom could not write back as JSON: a mapping key that is
    not text, a date, NaN or infinity, an integer past 64 bits, nesting past MAX_DEPTH; else None."""
    if depth > MAX_DEPTH:
        return parts, f"is nested more than {MAX_DEPTH} levels deep"
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return parts, f"has the key {shown(key, 40)}, which is not text"
            found = _plain_problem(item, parts + [key], depth + 1)
            if found:
                return found
        return None
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _plain_problem(item, parts + [i], depth + 1)
            if found:
                return found
        return None
    if value is None or isinstance(value, (str, bool)) or _fits(value, NUMBER):
        return None
    return parts, f"is {shown(value, 40)}, not text, a finite number, true/false or null"


def _dotted(parts) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f"{'.' if out else ''}{part}"
    return out or "(top level)"


def _check_fields(obj: dict, fields: dict, where: str, *, optional: bool = False,
                  damaged: str = "the records are corrupt") -> None:
    for name, types in fields.items():
        if name not in obj:
            if optional:
                continue
            raise ZoomError(f"{where}: field {name!r} is missing; the records are corrupt or were not written by zoom")
        value = obj[name]
        if not _fits(value, types):  # (the message is built only here, off the hot path)
            expected = _expected(types)
            if isinstance(types, _Spec) and types.locate is not None:
                parts, value, expected = types.locate(value)
                name = _dotted([name] + parts)
            raise ZoomError(f"{where}: field {name!r} is {shown(value, 40)}, which zoom never writes (expected "
                            f"{expected}); {damaged}")


def _check_record(record: dict, where: str) -> None:
    _check_fields(record, RECORD_FIELDS, where)
    _check_fields(record, OPTIONAL_RECORD_FIELDS, where, optional=True)
    if record.get("oracle") is not None and not isinstance(record.get("oracle_base"), bool):
        raise ZoomError(f"{where}: field 'oracle_base' is {shown(record.get('oracle_base'), 40)}, but a record with "
                        "'oracle' set always carries it (true or false); the records are corrupt")


# config.yaml: the sections and keys zoom writes, with the types config.py gives them; unknown keys pass
_CONFIG_SECTIONS = {"generator": GeneratorConfig, "guide": ClipConfig, "judge": ClipConfig, "target": TargetConfig,
                    "search": SearchConfig}
_CONFIG_CHOICES = {("search", "mode"): MODES, ("search", "edit_space"): EDIT_SPACES, ("target", "task"): TASKS,
                   ("precision",): PRECISIONS}
_CONFIG_TOP = {"precision": (str,), "device": (str,), "description": (str, NONE), "oracle": (dict, NONE)}


def _hint_types(hint) -> tuple:
    args = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
    return tuple(t for a in args for t in (NUMBER if a is float else (a,)))


def _yaml_line(text: str, parts: list):
    """The line of config.yaml where the value at `parts` starts (for the error line), or None."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        for part in parts:
            if isinstance(node, yaml.MappingNode):
                node = next(v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(part))
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
                node = node.value[part]
            else:
                return None
        return node.start_mark.line + 1
    except Exception:  # noqa: BLE001 - only a better error message is at stake
        return None


def _never(value, expected: str) -> str:
    return f"is {shown(value, 40)}, which zoom never writes (expected {expected})"


def _bound(x) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:g}"


def _config_problem(config: dict):
    """(key path, what is wrong) for the first value of a run's config that report, check or compare could
    not use, or None: the known keys of each section by their config.py types, choices and ranges, the
    prompts, and everything JSON-writable (report.json embeds the config)."""
    for name, types in _CONFIG_TOP.items():
        if name in config and not _fits(config[name], types):
            return [name], _never(config[name], _expected(types))
    for section, cls in _CONFIG_SECTIONS.items():
        if section not in config:
            continue
        data = config[section]
        if not isinstance(data, dict):
            return [section], _never(data, "a mapping")
        hints = typing.get_type_hints(cls)
        for key, value in data.items():
            if key in hints and not _fits(value, _hint_types(hints[key])):
                return [section, key], _never(value, _expected(_hint_types(hints[key])))
    for parts, choices in _CONFIG_CHOICES.items():
        node = config
        for part in parts:
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and node not in choices:
            return list(parts), _never(node, f"one of {', '.join(choices)}")
    for dotted, low, high, what in RANGES:
        section, key = dotted.split(".")
        value = (config.get(section) or {}).get(key)
        if value is not None and not low <= value <= high:
            return [section, key], _never(value, f"{what} between {_bound(low)} and {_bound(high)}")
    prompts = config["prompts"]
    if not isinstance(prompts.get("domain"), str):
        return ["prompts", "domain"], _never(prompts.get("domain"), "text")
    null = prompts.get("null")
    if not (null is None or isinstance(null, str) or (isinstance(null, list) and null
                                                        and all(isinstance(x, str) for x in null))):
        return ["prompts", "null"], _never(null, "null, text or a non-empty list of texts")
    return _plain_problem(config, [])


def read_config(run_dir, what: str = "") -> dict:
    path = Path(run_dir) / CONFIG_FILE
    prefix = f"{what}: " if what else ""
    if not path.exists():
        raise ZoomError(f"{prefix}{shown(str(run_dir), 200)} is not a zoom run directory (no config.yaml)")
    raw = read_run_file(path, "a config file")
    config = parse_yaml(raw, f"{prefix}the run's config {_p(path)}")
    attributes = (config.get("prompts") or {}).get("attributes") if isinstance(config, dict) else None
    if not isinstance(config, dict) or not isinstance(config.get("prompts"), dict) or not isinstance(attributes, list) \
            or not all(isinstance(a, dict) and isinstance(a.get("name"), str) and isinstance(a.get("prompt"), str)
                       for a in attributes):
        raise ZoomError(f"{prefix}{_p(path)} is not a zoom run config (no prompts.attributes list of "
                        "{name, prompt}); the run directory is damaged")
    if not isinstance(config.get("search", {}), dict):
        raise ZoomError(f"{prefix}{_p(path)}: search must be a mapping; the run directory is damaged")
    found = _config_problem(config)
    if found:
        parts, problem = found
        line = _yaml_line(raw.decode("utf-8"), parts)
        raise ZoomError(f"{prefix}{_p(path)}{f': line {line}' if line else ''}: {_dotted(parts)} {problem}; "
                        "the run directory is damaged")
    return config


def _read_json_object(path: Path, what: str, fields: dict | None = None, required: bool = False) -> dict:
    """A small JSON file of the run holding one object; with fields, each present one (each one, when
    required) type-checked."""
    try:
        text = read_run_file(path, what).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ZoomError(f"{_p(path)} is not UTF-8 text (byte {e.start}); the run directory is damaged") from None
    data = _parse_json(text, _p(path), "the run directory is damaged")
    if not isinstance(data, dict):
        raise ZoomError(f"{_p(path)} should hold a JSON object, found {type(data).__name__}; "
                        "the run directory is damaged")
    if fields:
        _check_fields(data, fields, _p(path), optional=not required, damaged="the run directory is damaged")
    found = _plain_problem(data, [])
    if found:
        raise ZoomError(f"{_p(path)}: field {_dotted(found[0])!r} {found[1]}; the run directory is damaged")
    return data


def read_records(run_dir) -> list[dict]:
    """All finished records of a run, deduplicated by key, each validated; a torn (unterminated) last
    line is an append a kill cut off and is ignored, as --resume does. Read a line at a time, within
    MAX_RECORDS_BYTES per file and MAX_RECORD_LINE per line."""
    folder = Path(run_dir) / RECORDS_DIR
    records, seen = [], set()
    for path in sorted(folder.glob("rank-*.jsonl")):
        with open_run_file(path, "a records file", MAX_RECORDS_BYTES) as f:
            total, number = 0, 0
            while True:
                try:
                    raw = f.readline(MAX_RECORD_LINE + 1)
                except OSError as e:
                    raise ZoomError(f"cannot read {_p(path)}: {e.strerror or type(e).__name__}") from None
                if not raw:
                    break
                number += 1
                where = f"{path}: line {number}"
                total += len(raw)
                if total > MAX_RECORDS_BYTES:
                    raise ZoomError(f"{_p(path)} grew past {_size(MAX_RECORDS_BYTES)} while zoom read it; it is not "
                                    "a records file zoom wrote")
                if not raw.endswith(b"\n"):
                    if len(raw) > MAX_RECORD_LINE:
                        raise ZoomError(f"{where} is longer than {_size(MAX_RECORD_LINE)}, which no record zoom "
                                        "writes is; the records file is corrupt")
                    break  # the last, unterminated line: a torn append
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise ZoomError(f"{where} is not UTF-8 text; the records file is corrupt") from None
                if not line.strip():
                    continue
                record = _parse_json(line, where, "the records file is corrupt", line_numbers=False)
                if not isinstance(record, dict):
                    raise ZoomError(f"{where} is {type(record).__name__}, not a record object; the records file is "
                                    "corrupt")
                _check_record(record, where)
                if record["key"] not in seen:
                    seen.add(record["key"])
                    records.append(record)
    return records


def load_run(run_dir) -> tuple[list[dict], dict, dict, list[dict]]:
    """(records, resolved config, run.json, rank meta) of a run directory; ZoomError when damaged."""
    run_dir = Path(run_dir)
    if not check_path(run_dir, "run directory"):
        raise ZoomError(f"run directory {shown(str(run_dir), 200)} does not exist")
    if not run_dir.is_dir():
        raise ZoomError(f"run directory {shown(str(run_dir), 200)} is not a directory")
    resolved = read_config(run_dir)
    if not (run_dir / RECORDS_DIR).is_dir():
        raise ZoomError(f"{_p(run_dir)} has no records/ folder: the audit never started; run `zoom audit` first")
    run = _read_json_object(run_dir / RUN_FILE, "run.json", RUN_FIELDS) if os.path.lexists(run_dir / RUN_FILE) else {}
    meta = []
    for path in sorted((run_dir / RECORDS_DIR).glob("rank-*.meta.json")):
        meta.append(_read_json_object(path, "a rank meta file", META_FIELDS, required=True))
    records = read_records(run_dir)
    if not records:
        raise ZoomError(f"{_p(run_dir)} has no finished records to report on (records/ is empty); "
                        "finish the audit with `zoom audit ... --resume`")
    return records, resolved, run, meta
