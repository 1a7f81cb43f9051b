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
line, for records), never a traceback.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import yaml

from .config import dump_config
from .errors import ZoomError
from .files import read_yaml

RECORDS_DIR = "records"
IMAGES_DIR = "images"
CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"

# The fields every record carries, with the JSON types they may hold (None: null allowed).
NUMBER = (int, float)
RECORD_FIELDS = {
    "key": (str,), "seed": (int,), "attribute": (str,), "slug": (str,), "prompt": (str,), "status": (str,),
    "flipped": (bool,), "strength": NUMBER + (type(None),), "base_pred": (int,), "base_label": (str, int),
    "base_prob": NUMBER + (type(None),), "final_prob": NUMBER + (type(None),), "validity": (bool, type(None)),
    "seconds": NUMBER, "unet_calls": (int,), "steps": (int,),
}
META_FIELDS = {"rank": (int,), "peak_memory_bytes": (int, type(None)), "memory_kind": (str, type(None)),
               "end_time": (str, type(None))}


# ---------------------------------------------------------------------------------------------
# Writing


def _io_error(path, e: OSError, kept: str = "") -> ZoomError:
    reason = e.strerror or type(e).__name__
    return ZoomError(f"cannot write {str(path)!r}: {reason}{'; ' + kept if kept else ''}")


def atomic_write(path, data: bytes | str) -> None:
    """Write to a temporary file next to path and rename it into place: readers see the old file or the
    new one, never half of one; a failed write leaves nothing behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _io_error(path, e, "finished items are kept; `zoom audit ... --resume` continues the run once "
                                 "there is room") from None


def save_png(path: Path, image) -> None:
    from PIL import Image

    array = image.detach().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _io_error(path.parent, e) from None
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
            raise _io_error(self.path, e, "the records written before are kept; `zoom audit ... --resume` "
                                          "continues the run once there is room") from None

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
        try:
            self._file = open(self.path, "a+")
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
    if out.exists() and not resume:
        raise ZoomError(f"output directory {str(out)!r} already exists; pass --resume to continue it or choose "
                        "another --out")
    if resume and out.exists():
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


def _read_text(path: Path, what: str) -> str:
    if path.is_dir():
        raise ZoomError(f"{str(path)!r} is a directory, not {what}; the run directory is damaged")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ZoomError(f"{str(path)!r} is not UTF-8 text (byte {e.start}); the run directory is damaged") from None
    except OSError as e:
        raise ZoomError(f"cannot read {str(path)!r}: {e.strerror or type(e).__name__}") from None


def read_config(run_dir, what: str = "") -> dict:
    path = Path(run_dir) / CONFIG_FILE
    prefix = f"{what}: " if what else ""
    if not path.exists():
        raise ZoomError(f"{prefix}{str(run_dir)!r} is not a zoom run directory (no config.yaml)")
    if path.is_dir():
        raise ZoomError(f"{prefix}{str(path)!r} is a directory, not a config file; the run directory is damaged")
    config = read_yaml(path, f"{prefix}the run's config")
    attributes = (config.get("prompts") or {}).get("attributes") if isinstance(config, dict) else None
    if not isinstance(config, dict) or not isinstance(config.get("prompts"), dict) or not isinstance(attributes, list) \
            or not all(isinstance(a, dict) and isinstance(a.get("name"), str) and isinstance(a.get("prompt"), str)
                       for a in attributes):
        raise ZoomError(f"{prefix}{str(path)!r} is not a zoom run config (no prompts.attributes list of "
                        "{name, prompt}); the run directory is damaged")
    if not isinstance(config.get("search", {}), dict):
        raise ZoomError(f"{prefix}{str(path)!r}: search must be a mapping; the run directory is damaged")
    return config


def _read_json_object(path: Path, what: str) -> dict:
    try:
        data = json.loads(_read_text(path, what))
    except json.JSONDecodeError as e:
        raise ZoomError(f"{str(path)!r} is not valid JSON (line {e.lineno}); the run directory is damaged") from None
    if not isinstance(data, dict):
        raise ZoomError(f"{str(path)!r} should hold a JSON object, found {type(data).__name__}; "
                        "the run directory is damaged")
    return data


def _check_fields(obj: dict, fields: dict, where: str) -> None:
    for name, types in fields.items():
        if name not in obj:
            raise ZoomError(f"{where}: field {name!r} is missing; the records are corrupt or were not written by zoom")
        value = obj[name]
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if isinstance(value, float) and not math.isfinite(value):
            ok = False
        if not ok:
            raise ZoomError(f"{where}: field {name!r} is {json.dumps(value)[:40]}, which zoom never writes; "
                            "the records are corrupt")


def read_records(run_dir) -> list[dict]:
    """All finished records of a run, deduplicated by key, each validated; a torn (unterminated) last
    line is an append a kill cut off and is ignored, as --resume does."""
    folder = Path(run_dir) / RECORDS_DIR
    records, seen = [], set()
    for path in sorted(folder.glob("rank-*.jsonl")):
        if path.is_dir():
            raise ZoomError(f"{str(path)!r} is a directory, not a records file; the run directory is damaged")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ZoomError(f"cannot read {str(path)!r}: {e.strerror or type(e).__name__}") from None
        lines = data.split(b"\n")[:-1]  # the last piece is "" or an unterminated (torn) line
        for number, raw in enumerate(lines, 1):
            where = f"{path}: line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ZoomError(f"{where} is not UTF-8 text; the records file is corrupt") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ZoomError(f"{where} is not valid JSON; the records file is corrupt") from None
            if not isinstance(record, dict):
                raise ZoomError(f"{where} is {type(record).__name__}, not a record object; the records file is corrupt")
            _check_fields(record, RECORD_FIELDS, where)
            if record["key"] not in seen:
                seen.add(record["key"])
                records.append(record)
    return records


def load_run(run_dir) -> tuple[list[dict], dict, dict, list[dict]]:
    """(records, resolved config, run.json, rank meta) of a run directory; ZoomError when damaged."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ZoomError(f"run directory {str(run_dir)!r} does not exist")
    resolved = read_config(run_dir)
    if not (run_dir / RECORDS_DIR).is_dir():
        raise ZoomError(f"{str(run_dir)!r} has no records/ folder: the audit never started; run `zoom audit` first")
    run = _read_json_object(run_dir / RUN_FILE, "run.json") if (run_dir / RUN_FILE).exists() else {}
    meta = []
    for path in sorted((run_dir / RECORDS_DIR).glob("rank-*.meta.json")):
        m = _read_json_object(path, "a rank meta file")
        _check_fields(m, META_FIELDS, str(path))
        meta.append(m)
    records = read_records(run_dir)
    if not records:
        raise ZoomError(f"{str(run_dir)!r} has no finished records to report on (records/ is empty); "
                        "finish the audit with `zoom audit ... --resume`")
    return records, resolved, run, meta
