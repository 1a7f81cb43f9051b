"""`zoom discover`: propose attributes from a vocabulary, screen them cheaply, confirm the best on fresh seeds.

1. Propose (offline): every vocabulary word put in the place of another word of its category in the domain
   prompt ("a small plain green square ..." -> "... red square ..."), and every vocabulary phrase as
   "DOMAIN, PHRASE" (README.md and zoom/data/vocabularies/world.yaml document the file format); those
   with words the models' tokenizers cannot read, or that read as the domain once tokenized, are left out.
2. Screen, on a few screening seeds, ALL proposals, by one of:
   - bracket (default): one audit (single mode: the config's bracket search, null twins), into OUT/screen.
     A proposal's score is its confirmed flip rate minus its null twins' (ties broken by the raw flip-rate
     gap, then by name).
   - gradient: one backward pass per seed, the margin's directional derivative along every proposal's
     direction minus its null twin's (zoom/directions.py), into OUT/screen-gradient.json.
   With --free-direction, a free, norm-bounded direction that flips the target on the screening seeds is
   optimised first and named by its nearest proposals in the guide CLIP's space (OUT/free-direction.json);
   those proposals are marked in discover.json.
3. Confirm: the top k proposals with a positive score, not marked as changing the label, audited again
   on fresh seeds that follow the screening seeds (disjoint from them), into OUT/confirm: the full audit
   (null twins, paired exact tests, confirmed flips), Benjamini-Hochberg over those k.

Writes OUT/discover.json (proposals, screening scores, the confirmed table, cost), OUT/discover.md (the
same as text, linking the confirmation audit's gallery OUT/confirm/report.html), OUT/discover.html (the
page: zoom.report.discovery) and OUT/discovered.yaml:
a prompt set of the significant confirmed attributes, which `zoom audit --prompts` takes as it is.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ZoomError, shown, shown_path

DEFAULT_SCREEN_SAMPLES = 8
DEFAULT_TOP_K = 5
SCREENS = ("bracket", "gradient")
SCREEN_METHODS = {
    "bracket": "the audit's single-mode bracket search on every proposal with its null twin; score = confirmed flip "
               "rate - null twins' confirmed flip rate (ties: raw flip-rate gap, then name)",
    "gradient": "the target margin's directional derivative along each proposal's conditioning direction at alpha = 0 "
                "(one backward pass per seed), as the share of the seed's margin a full edit would remove to first "
                "order, clipped to [-1, 1]; score = mean over seeds, minus the same for its null twins (ties: name)",
}
MIN_SCREEN_SAMPLES = 2
PLAN_FILE = "discover-plan.json"
GRADIENT_FILE = "screen-gradient.json"
FREE_FILE = "free-direction.json"
FREE_NAMES = 3  # proposals named after the free direction
_PUNCT = ".,;:!?\"'()"


@dataclass(frozen=True)
class Category:
    name: str
    words: tuple[str, ...]
    slot: str = "{word}"
    changes_label: bool = False
    oracle: str | None = None


@dataclass(frozen=True)
class Vocabulary:
    name: str
    source: str
    categories: tuple[Category, ...]
    phrases: tuple[str, ...]
    phrase_groups: tuple[tuple[str, str], ...] = ()  # (phrase, group) for phrases given under a group name


@dataclass(frozen=True)
class Proposal:
    name: str
    prompt: str
    kind: str  # "substitution" or "phrase"
    category: str | None
    replaces: str | None
    changes_label: bool
    oracle: dict | None

    def to_dict(self) -> dict:
        return {"name": self.name, "prompt": self.prompt, "kind": self.kind, "category": self.category,
                "replaces": self.replaces, "changes_label": self.changes_label}


def load_vocabulary(source) -> Vocabulary:
    """A bundled vocabulary's name (`world`) or a YAML file; ZoomError (one line) when it is missing,
    unreadable, empty or malformed."""
    from .files import read_yaml
    from .prompts import bundled, find_bundled

    found = find_bundled(source, "vocabularies")
    if found is None:
        raise ZoomError(f"vocabulary {shown_path(source)} does not exist: neither a file nor a bundled vocabulary "
                        f"({', '.join(bundled('vocabularies'))})")
    where = f"vocabulary {shown_path(found)}"
    if not os.path.isfile(found):
        raise ZoomError(f"{where} is not a file")
    if not os.access(found, os.R_OK):
        raise ZoomError(f"{where} cannot be read (permission denied)")
    data = read_yaml(found, "vocabulary", user=True)
    if data is None or data == {} or data == []:
        raise ZoomError(f"{where} is empty; give 'categories' (lists of words) and/or 'phrases' "
                        "(zoom/data/vocabularies/world.yaml shows the format)")
    if not isinstance(data, dict):
        raise ZoomError(f"{where} must be a mapping with 'categories' and/or 'phrases'")
    unknown = set(map(str, data)) - {"name", "categories", "phrases", "description"}
    if unknown:
        raise ZoomError(f"{where}: unknown key(s) {shown(sorted(unknown))}; allowed: name, description, categories, phrases")
    categories = []
    raw_categories = data.get("categories") or []
    if not isinstance(raw_categories, list):
        raise ZoomError(f"{where}: 'categories' must be a list of {{name, words}}")
    for i, c in enumerate(raw_categories):
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not isinstance(c.get("words"), list):
            raise ZoomError(f"{where}: categories[{i}] must have a string 'name' and a list 'words'")
        bad = set(c) - {"name", "words", "slot", "changes_label", "oracle"}
        if bad:
            raise ZoomError(f"{where}: categories[{i}]: unknown key(s) {shown(sorted(map(str, bad)))}")
        words = [w.strip() for w in c["words"] if isinstance(w, str) and w.strip()]
        if len(words) != len(c["words"]) or len(words) < 2:
            raise ZoomError(f"{where}: categories[{i}] ({shown(c['name'])}): 'words' must be at least two non-empty strings")
        slot = c.get("slot", "{word}")
        if not isinstance(slot, str) or slot.count("{word}") != 1:
            raise ZoomError(f"{where}: categories[{i}].slot must be a string with one {{word}}, got {shown(slot)}")
        changes_label = c.get("changes_label", False)
        if not isinstance(changes_label, bool):
            raise ZoomError(f"{where}: categories[{i}].changes_label must be true or false")
        oracle = c.get("oracle")
        if oracle is not None and not (isinstance(oracle, dict) and set(oracle) == {"spec"}
                                       and isinstance(oracle["spec"], str)):
            raise ZoomError(f"{where}: categories[{i}].oracle must be {{spec: TARGET_SPEC}}")
        categories.append(Category(c["name"], tuple(dict.fromkeys(words)), slot, changes_label,
                                   oracle["spec"] if oracle else None))
    names = [c.name for c in categories]
    if len(set(names)) < len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise ZoomError(f"{where}: category names must be unique; {shown(repeated)} repeat")
    raw_phrases = data.get("phrases") or []
    # a list of phrases, or groups of them ({pose: [...], lighting: [...]}): the group is the proposal's category
    groups = raw_phrases if isinstance(raw_phrases, dict) else {None: raw_phrases}
    phrases, phrase_groups = [], []
    for group, members in groups.items():
        if not isinstance(members, list) or not all(isinstance(p, str) for p in members) \
                or not isinstance(group, (str, type(None))):
            raise ZoomError(f"{where}: 'phrases' must be a list of strings, or a mapping of group names to such lists")
        for p in members:
            if p.strip() and p not in phrases:
                phrases.append(p)
                if group is not None:
                    phrase_groups.append((p, group))
    if not categories and not phrases:
        raise ZoomError(f"{where} holds no words and no phrases; give 'categories' and/or 'phrases'")
    name = data.get("name") if isinstance(data.get("name"), str) else Path(found).stem
    return Vocabulary(name, str(found), tuple(categories), tuple(phrases), tuple(phrase_groups))


def _norm(word: str) -> str:
    return word.strip(_PUNCT).lower()


def propose(domain: str, vocabulary: Vocabulary) -> list[Proposal]:
    """The proposals of a vocabulary for a (cleaned) domain prompt, in vocabulary order, without duplicates
    and without any that reads as the domain itself. A slot inside a longer slot of another category is
    not used (the "blue" of "blue background" is a background, not a colour)."""
    from .prompts import clean_prompt

    words = domain.split(" ")
    matches = []  # (start, end, category, word)
    for category in vocabulary.categories:
        for word in category.words:
            pattern = [_norm(w) for w in category.slot.format(word=word).split()]
            for i in range(len(words) - len(pattern) + 1):
                if [_norm(w) for w in words[i:i + len(pattern)]] == pattern:
                    matches.append((i, i + len(pattern), category, word))
    matches = [m for m in matches if not any(o[2] is not m[2] and o[0] <= m[0] and m[1] <= o[1]
                                             and o[1] - o[0] > m[1] - m[0] for o in matches)]
    domain_key = clean_prompt(domain).lower()
    out, seen_prompts, seen_names = [], {domain_key}, set()
    for start, end, category, word in matches:
        for other in category.words:
            if other == word:
                continue
            slot = category.slot.format(word=other)
            prompt = clean_prompt(" ".join(words[:start] + slot.split() + words[end:]))
            name = slot if slot.lower() not in seen_names else f"{slot} (for {' '.join(words[start:end])})"
            if prompt.lower() in seen_prompts or name.lower() in seen_names:
                continue
            seen_prompts.add(prompt.lower())
            seen_names.add(name.lower())
            oracle = {"spec": category.oracle, "label": other} if category.oracle else None
            out.append(Proposal(name, prompt, "substitution", category.name, " ".join(words[start:end]),
                                category.changes_label, oracle))
    groups = dict(vocabulary.phrase_groups)
    for phrase in vocabulary.phrases:
        prompt = clean_prompt(f"{domain}, {phrase}")
        name = clean_prompt(phrase)
        if not name or name.lower() == domain_key or prompt.lower() in seen_prompts or name.lower() in seen_names \
                or name.lower() == "null":
            continue
        seen_prompts.add(prompt.lower())
        seen_names.add(name.lower())
        out.append(Proposal(name, prompt, "phrase", groups.get(phrase), None, False, None))
    return out


def load_tokenizers(config) -> list[tuple[str, object]]:
    """(model, tokenizer) of the generator and both CLIPs, loaded without their models: seconds, offline (a
    local folder, the hub cache, open_clip's bundled vocabulary). One not to be had this way is left out:
    the audit checks every prompt again as it loads each model."""
    import open_clip
    from transformers import AutoTokenizer

    out = []
    g = config.generator
    try:
        out.append(("generator", AutoTokenizer.from_pretrained(
            os.path.expanduser(g.model), subfolder="tokenizer", revision=g.revision, local_files_only=True)))
    except Exception:  # not in the cache yet: the audit downloads and checks it
        pass
    for role, clip in (("guide", config.guide), ("judge", config.judge)):
        if clip.model.startswith("hf-hub:"):  # its tokenizer's config lives on the hub: not fetched here
            continue
        try:
            out.append((f"{role} CLIP", open_clip.get_tokenizer(clip.model)))
        except Exception:
            pass
    return out


def _content_tokens(tokenizer, text: str) -> list[str]:
    """The tokens of a text without those of punctuation alone: what a phrase says, as the tokenizer reads it
    (case and spacing are already gone)."""
    return [t for t in tokenizer.tokenize(text) if any(c.isalnum() for c in t.replace("</w>", ""))]


def _reads_as_domain(tokenizer, proposal: Proposal, domain: str) -> bool:
    """The proposal's prompt encodes exactly like the domain (its edit would be zero), or its phrase says
    the domain again in other case, spacing or punctuation."""
    if tokenizer is None or not hasattr(tokenizer, "tokenize"):
        return False
    padded = dict(padding="max_length", max_length=tokenizer.model_max_length, truncation=True, verbose=False)
    if tokenizer(proposal.prompt, **padded).input_ids == tokenizer(domain, **padded).input_ids:
        return True
    return proposal.kind == "phrase" and _content_tokens(tokenizer, proposal.name) == _content_tokens(tokenizer, domain)


def readable_proposals(proposals: list[Proposal], domain: str, tokenizers, vocabulary: Vocabulary,
                       warn: bool = True) -> list[Proposal]:
    """The proposals whose new words every tokenizer can read (zoom.words: a word-level tokenizer reads only
    its whole words) and that the generator's reads as something other than the domain. The others are
    named in one warning line on stderr; ZoomError when none is left."""
    import sys

    from .words import MAX_LISTED, _named, reader_vocab, unreadable_words, vocabulary_words

    def unreadable(tokenizer, text):
        spelled, unknown, _ = unreadable_words(tokenizer, text)
        return spelled + unknown

    generator = dict(tokenizers).get("generator")
    # words of the domain itself are the audit's to refuse, with its own message
    in_domain = {reader: set(unreadable(t, domain)) for reader, t in tokenizers}
    kept, as_domain, left_out, words, readers = [], [], [], [], []
    for p in proposals:
        if _reads_as_domain(generator, p, domain):
            as_domain.append(p.name)
            continue
        bad = []
        for reader, t in tokenizers:
            new = [w for w in unreadable(t, p.prompt) if w not in in_domain[reader]]
            if new and reader not in readers:
                readers.append(reader)
            bad += new
        if bad:
            left_out.append(p.name)
            words += [w for w in dict.fromkeys(bad) if w not in words]
        else:
            kept.append(p)
    cannot = f"words the tokenizer of the {' or the '.join(readers)} cannot read ({_named(words)})" if words else ""
    same = "read as the domain itself once tokenized by the generator's tokenizer (case, spacing and punctuation aside)"
    if not kept:
        why = [f"{len(left_out)} have {cannot}"] if left_out else []
        why += [f"{len(as_domain)} {same}"] if as_domain else []
        # a word-level tokenizer knows a short list of words: name them
        known = next((vocabulary_words(reader_vocab(t)) for reader, t in tokenizers
                      if reader in readers and unreadable_words(t, "")[2]), [])
        listed = ", ".join(known[:MAX_LISTED]) + (", ..." if len(known) > MAX_LISTED else "")
        fix = "use words that change the domain" if not left_out else \
            f"use only words the models know: {listed}" if known else "use words the models' tokenizers can read"
        raise ZoomError(f"vocabulary {shown_path(vocabulary.source)} proposes nothing for the domain {shown(domain)}: "
                        f"of its {len(proposals)} proposals, {' and '.join(why)}; {fix}")
    if (as_domain or left_out) and warn:
        left = ([f"{_named(left_out)} (with {cannot})"] if left_out else []) + \
            ([f"{_named(as_domain)} ({same})"] if as_domain else [])
        print(f"zoom: warning: vocabulary {shown(vocabulary.name)}: {len(as_domain) + len(left_out)} of "
              f"{len(proposals)} proposals left out before screening: {'; '.join(left)}", file=sys.stderr)
    return kept


def plan_sizes(n_proposals: int, screen_samples: int, confirm_samples: int, top_k: int, budget: int | None,
               screen_costs: bool = True):
    """(screening seeds, k) within a budget of counterfactuals (each attribute and its null twin on one seed
    are two): the screening seeds are cut first, down to MIN_SCREEN_SAMPLES. screen_costs=False: a screen
    that makes no counterfactuals (the gradient screen), so the budget is the confirmation's alone."""
    k = min(top_k, n_proposals)
    confirm = 2 * confirm_samples * k
    if budget is None:
        return screen_samples, k
    if not screen_costs:
        if budget < confirm:
            raise ZoomError(f"--budget {budget} counterfactuals is too small: confirming the top {k} on "
                            f"{confirm_samples} seeds needs {confirm} (each with its null twin); raise --budget or "
                            "lower --samples / --top-k")
        return screen_samples, k
    fit = (budget - confirm) // (2 * n_proposals)
    if fit < MIN_SCREEN_SAMPLES:
        need = 2 * MIN_SCREEN_SAMPLES * n_proposals + confirm
        raise ZoomError(f"--budget {budget} counterfactuals is too small for {n_proposals} proposals: screening them "
                        f"on {MIN_SCREEN_SAMPLES} seeds and confirming the top {k} on {confirm_samples} seeds needs "
                        f"{need} (each with its null twin); raise --budget or lower --samples / --top-k")
    return min(screen_samples, fit), k


def _cost(run: Path, wall: float | None) -> dict:
    from .rundir import read_records

    records = read_records(run)
    return {"counterfactuals": len(records),
            "unet_calls": int(sum(r.get("unet_calls") or 0 for r in records)),
            "search_seconds": round(sum(r.get("seconds") or 0 for r in records), 2),
            "wall_seconds": None if wall is None else round(wall, 2)}


def _audit(config_path, run: Path, overrides: dict, progress: bool, state) -> tuple[dict, float | None]:
    """An audit through zoom's machinery, sharded over the processes as `zoom audit` does; a finished one is
    read back (report rebuilt from its records). Every process returns the main process's report."""
    from .config import load_config
    from .report import write_report
    from .runner import _shared, run_audit

    def finished():
        if (run / "report.json").exists():
            report = json.loads((run / "report.json").read_text(encoding="utf-8"))
            if (report.get("completeness") or {}).get("complete", True):
                return write_report(run, html=False)
        return None

    # looked at by the main process alone: the others could see `run` half made by it
    report, started = _on_main(state, lambda: (finished(), run.exists()))
    if report is not None:
        return report, None
    config = load_config(config_path, overrides)
    start = time.perf_counter()
    report = run_audit(config, run, resume=started, progress=progress)
    # run_audit returns the report on the main process only; every process must rank from the same one
    return _shared(state, report), time.perf_counter() - start


def _on_main(state, work):
    """work() on the main process only; its result, or its ZoomError, on every process."""
    from .runner import _shared

    result = failure = None
    if state.is_main_process:
        try:
            result = work()
        except ZoomError as e:
            failure = str(e)
    result, failure = _shared(state, (result, failure))
    if failure is not None:
        raise ZoomError(failure)
    return result


def _score(row: dict | None) -> dict:
    if row is None:
        return {"score": None, "raw_gap": None, "confirmed_flips": None, "n": None}
    gap = lambda a, b: None if a is None or b is None else round(a - b, 6)  # noqa: E731
    return {"score": gap(row.get("confirmed_rate"), row.get("null_confirmed_rate")),
            "raw_gap": gap(row.get("flip_rate"), row.get("null_flip_rate")),
            "confirmed_flips": row.get("confirmed_flips"), "flips": row.get("flips"), "n": row.get("n"),
            "confirmed_rate": row.get("confirmed_rate"), "null_confirmed_rate": row.get("null_confirmed_rate")}


def _gradient_screen(config_path, out: Path, overrides: dict, seeds: list[int]) -> tuple[dict, dict]:
    """({name: screening scores}, cost) of the gradient screen; a finished one is read back from its file."""
    from .config import load_config
    from .directions import gradient_screen
    from .rundir import atomic_write

    path = out / GRADIENT_FILE
    if not path.exists():
        start = time.perf_counter()
        data = gradient_screen(load_config(config_path, overrides), seeds)
        data["cost"]["wall_seconds"] = round(time.perf_counter() - start, 2)
        atomic_write(path, json.dumps(data, indent=1))
    data = json.loads(path.read_text(encoding="utf-8"))
    rows = {name: {**s, "raw_gap": None, "confirmed_flips": None} for name, s in data["scores"].items()}
    return rows, data["cost"]


def _free_direction(config_path, out: Path, overrides: dict, seeds: list[int], keep_out: tuple[str, ...]) -> dict:
    """The free direction's result (zoom/directions.py); a finished one is read back from its file."""
    from .config import load_config
    from .directions import free_direction
    from .rundir import atomic_write

    path = out / FREE_FILE
    if not path.exists():
        start = time.perf_counter()
        data = free_direction(load_config(config_path, overrides), seeds, keep_out=keep_out)
        data["cost"]["wall_seconds"] = round(time.perf_counter() - start, 2)
        atomic_write(path, json.dumps(data, indent=1))
    return json.loads(path.read_text(encoding="utf-8"))


def discover(config_path, out, *, vocabulary="world", prompts=None, target_spec=None, seed=None, samples=None,
             screen_samples: int = DEFAULT_SCREEN_SAMPLES, top_k: int = DEFAULT_TOP_K, budget: int | None = None,
             screen: str = "bracket", free_direction: bool = False, device=None, resume: bool = False,
             progress: bool = True, echo=print) -> dict:
    """Run (or with resume, continue) a discovery into `out`; returns discover.json's content."""
    from .config import load_config
    from .models import quiet_libraries
    from .prompts import load_prompts
    from .runner import process_state

    quiet_libraries()
    if budget is not None and budget < 1:
        raise ZoomError(f"--budget must be a positive number of counterfactuals, got {budget}")
    if screen_samples < 1 or top_k < 1 or (samples is not None and samples < 1):
        raise ZoomError("--screen-samples, --top-k and --samples must be positive")
    if screen not in SCREENS:
        raise ZoomError(f"--screen must be one of {', '.join(SCREENS)}, got {shown(screen)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ZoomError(f"--out {shown_path(out)} is a file; give a directory")
    if out.exists() and any(out.iterdir()) and not resume:
        raise ZoomError(f"output directory {shown_path(out)} already exists; pass --resume to continue it or "
                        "choose another --out")
    if resume and not (out / PLAN_FILE).exists():
        raise ZoomError(f"--resume: {shown_path(out)} holds no discovery to continue ({PLAN_FILE} is missing)")
    vocab = load_vocabulary(vocabulary)
    base = {"target.spec": target_spec, "prompts": prompts, "device": device}
    config = load_config(config_path, base)
    # under `accelerate launch` (--num-processes) every process runs this; only the main one writes and speaks
    state = process_state(config)
    main = state.is_main_process
    domain_set = load_prompts(config.prompts)
    proposals = propose(domain_set.domain, vocab)
    if not proposals:
        raise ZoomError(f"vocabulary {shown_path(vocab.source)} proposes nothing for the domain "
                        f"{shown(domain_set.domain)}: none of its words stands in the domain prompt, or every "
                        "phrase reads as the domain itself; use a vocabulary of this domain's words")
    proposals = readable_proposals(proposals, domain_set.domain, load_tokenizers(config), vocab, warn=main)
    confirm_samples = samples or config.search.samples
    first = config.search.seed if seed is None else seed
    # the gradient screen makes no counterfactuals: the budget is the confirmation's alone
    screen_n, k = plan_sizes(len(proposals), screen_samples, confirm_samples, top_k, budget,
                             screen_costs=screen == "bracket")
    plan = {"config": str(config_path), "vocabulary": vocab.source, "prompts": None if prompts is None else str(prompts),
            "target": config.target.spec, "domain": domain_set.domain, "screen_seeds": [first, first + screen_n - 1],
            "confirm_seeds": [first + screen_n, first + screen_n + confirm_samples - 1], "top_k": k,
            "budget": budget, "proposals": [p.to_dict() for p in proposals]}
    # only when not the default: a discovery started before these options resumes as it was
    plan.update({key: value for key, value in (("screen", screen), ("free_direction", free_direction))
                 if value != {"screen": "bracket", "free_direction": False}[key]})
    state.wait_for_everyone()  # every process has looked at --out before the main one writes there
    if resume:
        previous = json.loads((out / PLAN_FILE).read_text(encoding="utf-8"))
        changed = sorted(key for key in set(plan) | set(previous) if plan.get(key) != previous.get(key))
        if changed:
            raise ZoomError(f"--resume: the discovery differs from the one {shown_path(out)} was started with "
                            f"({', '.join(changed)}); resume with the same options or use a new --out")
    elif main:
        out.mkdir(parents=True, exist_ok=True)
        (out / PLAN_FILE).write_text(json.dumps(plan, indent=1), encoding="utf-8")
    nulls = list(domain_set.nulls)
    common = {**{k_: v for k_, v in base.items() if v is not None}, "search.mode": "single"}

    def prompt_set(chosen):
        return {"domain": domain_set.domain, "attributes": [{"name": p.name, "prompt": p.prompt} for p in chosen],
                **({"null": nulls} if nulls else {})}

    def oracles(chosen):
        found = {p.name: p.oracle for p in chosen if p.oracle}
        return {"oracle": found} if found else {}

    if main:
        echo(f"discover: {len(proposals)} proposals from vocabulary {vocab.name!r}; {screen} screen on seeds "
             f"{plan['screen_seeds'][0]}-{plan['screen_seeds'][1]}, then the top {k} on seeds "
             f"{plan['confirm_seeds'][0]}-{plan['confirm_seeds'][1]}")
    screen_overrides = {**common, "prompts": prompt_set(proposals), **oracles(proposals), "search.samples": screen_n,
                        "search.seed": first}
    screen_seeds = list(range(first, first + screen_n))
    try:
        # The free direction and the gradient screen run on the main process alone (each one optimisation or
        # one backward pass per seed, not sharded); the others take its result.
        free = _on_main(state, lambda: _free_direction(config_path, out, screen_overrides, screen_seeds, tuple(
            p.name for p in proposals if p.changes_label))) if free_direction else None
        if screen == "bracket":
            report, screen_wall = _audit(config_path, out / "screen", screen_overrides, progress, state)
            rows = {a["name"]: _score(a) for a in report["attributes"]}
            screen_cost = _cost(out / "screen", screen_wall)
        else:
            rows, screen_cost = _on_main(state, lambda: _gradient_screen(config_path, out, screen_overrides,
                                                                         screen_seeds))
    except ZoomError:
        if main and not resume and not any((out / name).exists() for name in ("screen", GRADIENT_FILE, FREE_FILE)):
            (out / PLAN_FILE).unlink(missing_ok=True)  # refused before any work: leave nothing behind
            if not any(out.iterdir()):
                out.rmdir()
        raise
    by_name = {p.name: p for p in proposals}
    named = {}  # the proposals the free direction is named by (all proposals already: marked, not added again)
    if free:
        label_kept = [r for r in free["nearest"] if not by_name[r["name"]].changes_label]  # never confirmed anyway
        named = {r["name"]: {"rank": i, "cosine": r["cosine"]} for i, r in enumerate(label_kept[:FREE_NAMES], 1)}
    scored = [{**p.to_dict(), "screening": rows.get(p.name) or _score(None), "free_direction": named.get(p.name)}
              for p in proposals]
    key = lambda s: (-(s["screening"]["score"] if s["screening"]["score"] is not None else -2),  # noqa: E731
                     -(s["screening"]["raw_gap"] if s["screening"]["raw_gap"] is not None else -2), s["name"])
    scored.sort(key=key)
    for rank, s in enumerate(scored, 1):
        s["rank"] = rank
    eligible = [s for s in scored if not s["changes_label"] and (s["screening"]["score"] or 0) > 0][:k]
    chosen = [by_name[s["name"]] for s in eligible]
    confirmed, confirm, confirm_wall = [], None, None
    if chosen:
        confirm, confirm_wall = _audit(config_path, out / "confirm", {
            **common, "prompts": prompt_set(chosen), **oracles(chosen), "search.samples": confirm_samples,
            "search.seed": plan["confirm_seeds"][0]}, progress, state)
        for a in confirm["attributes"]:
            confirmed.append({key_: a.get(key_) for key_ in (
                "name", "prompt", "flips", "n", "flip_rate", "confirmed_flips", "confirmed_rate", "confirmed_ci_low",
                "confirmed_ci_high", "null_confirmed_rate", "oracle_rate", "p_value", "q_value", "significant")})
    significant = [c for c in confirmed if c["significant"]]
    result = {
        "vocabulary": {"name": vocab.name, "source": vocab.source}, "domain": domain_set.domain,
        "target": config.target.spec,
        "proposer": "vocabulary substitution (each word of a category in the place of another) and 'DOMAIN, PHRASE'",
        "screen": {"name": screen, "method": SCREEN_METHODS[screen], "seeds": plan["screen_seeds"],
                   "run": str(out / ("screen" if screen == "bracket" else GRADIENT_FILE))},
        "free_direction": None if free is None else {
            "method": "a direction in conditioning space (norm <= alpha_max x the median proposal direction's), "
                      "optimised to flip the target on the screening seeds while its image change stays off the CLIP "
                      "text directions of the proposals that change the label, named by the cosine between the guide "
                      f"CLIP image change it causes and each proposal's CLIP text direction; the first {FREE_NAMES} "
                      "that do not change the label are marked in proposals (free_direction)",
            **{key_: free[key_] for key_ in ("norm", "bound", "flipped", "of", "steps")},
            "named": list(named), "nearest": free["nearest"][:10], "file": str(out / FREE_FILE)},
        "screened": len(proposals), "top_k": k,
        "confirm": {"seeds": plan["confirm_seeds"], "run": str(out / "confirm") if chosen else None,
                    "chosen": [p.name for p in chosen],
                    "correction": f"Benjamini-Hochberg over the {len(chosen)} confirmed attributes, "
                                  f"chosen from {len(proposals)} screened" if chosen else None,
                    "gallery": str(out / "confirm" / "report.html") if chosen else None},
        "proposals": scored, "confirmed": confirmed,
        "discovered": [c["name"] for c in significant],
        "discovered_prompts": str(out / "discovered.yaml") if significant else None,
        "cost": {**({"free_direction": free["cost"]} if free else {}), "screening": screen_cost,
                 "confirmation": _cost(out / "confirm", confirm_wall) if chosen else None},
    }
    if not main:  # the same result on every process; the main one writes it
        return result
    if significant:
        from .rundir import atomic_write
        import yaml

        chosen_sig = [by_name[c["name"]] for c in significant]
        text = (f"# zoom discover: the significant attributes of {shown_path(out)} (vocabulary {vocab.name}); "
                f"{len(chosen)} confirmed of {len(proposals)} screened\n"
                + yaml.safe_dump(prompt_set(chosen_sig), sort_keys=False, allow_unicode=True))
        load_prompts(yaml.safe_load(text))  # what `zoom audit --prompts` will read
        atomic_write(out / "discovered.yaml", text)
    (out / "discover.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    (out / "discover.md").write_text(summary(result), encoding="utf-8")
    from .report.discovery import write_discovery

    write_discovery(result, out)  # discover.html: proposals, confirmed table, gallery of the confirmed
    return result


def summary(result: dict) -> str:
    """discover.json as text: the proposals ranked by screening score, then the confirmed table."""
    lines = [f"zoom discover: {result['screened']} proposals screened ({result['screen'].get('name', 'bracket')}) "
             f"on seeds {result['screen']['seeds'][0]}-{result['screen']['seeds'][1]} "
             f"(vocabulary {result['vocabulary']['name']}, domain {result['domain']!r})",
             "", "rank  score   confirmed/n  proposal"]
    for s in result["proposals"]:
        sc = s["screening"]
        score = "  n/a " if sc["score"] is None else f"{sc['score']:+.2f}"
        mark = "  (changes the label: not confirmed)" if s["changes_label"] else ""
        lines.append(f"{s['rank']:>4}  {score}  {sc['confirmed_flips'] if sc['confirmed_flips'] is not None else '-':>4}/"
                     f"{sc['n'] if sc['n'] is not None else '-':<6} {s['name']}{mark}")
    lines.append("")
    if not result["confirmed"]:
        lines.append("confirmed: none (no proposal scored above its null twins in screening)")
    else:
        lines += [f"confirmed on fresh seeds {result['confirm']['seeds'][0]}-{result['confirm']['seeds'][1]} "
                  f"({result['confirm']['correction']}):",
                  "attribute             confirmed/n  rate  null   q       significant"]
        for c in result["confirmed"]:
            q = "n/a" if c["q_value"] is None else f"{c['q_value']:.2g}"
            lines.append(f"{c['name'][:20]:<21} {c['confirmed_flips']:>4}/{c['n']:<6} {c['confirmed_rate'] or 0:.2f}  "
                         f"{c['null_confirmed_rate'] or 0:.2f}  {q:<7} {'yes' if c['significant'] else 'no'}")
        lines.append(f"gallery: {result['confirm']['gallery']}")
    if result["discovered_prompts"]:
        lines.append(f"prompt set of the significant ones: {result['discovered_prompts']}  "
                     f"(zoom audit --prompts {result['discovered_prompts']})")
    cost = result["cost"]
    for stage in ("free_direction", "screening", "confirmation"):
        c = cost.get(stage)
        if c:
            wall = "" if c.get("wall_seconds") is None else f", {c['wall_seconds']:.0f} s wall"
            lines.append(f"cost, {stage.replace('_', ' ')}: {c['counterfactuals']} counterfactuals, "
                         f"{c['unet_calls']:,} UNet calls, "
                         f"{c['search_seconds']:.0f} s of search{wall}")
    return "\n".join(lines) + "\n"
