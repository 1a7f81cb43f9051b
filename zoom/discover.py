"""`zoom discover`: propose attributes from a vocabulary, screen them cheaply, confirm the best on fresh seeds.

1. Propose (offline): every vocabulary word put in the place of another word of its category in the domain
   prompt ("a small plain green square ..." -> "... red square ..."), and every vocabulary phrase as
   "DOMAIN, PHRASE" (zoom/data/vocabularies/world.yaml documents the file format).
2. Screen: one audit (single mode: the config's bracket search, null twins) of ALL proposals on a few
   screening seeds, into OUT/screen. A proposal's screening score is its confirmed flip rate minus its
   null twins' (ties broken by the raw flip-rate gap, then by name).
3. Confirm: the top k proposals with a positive score, not marked as changing the label, audited again
   on fresh seeds that follow the screening seeds (disjoint from them), into OUT/confirm: the full audit
   (null twins, paired exact tests, confirmed flips), Benjamini-Hochberg over those k.

Writes OUT/discover.json (proposals, screening scores, the confirmed table, cost), OUT/discover.md (the
same as text, linking the confirmation audit's gallery OUT/confirm/report.html) and OUT/discovered.yaml:
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
MIN_SCREEN_SAMPLES = 2
PLAN_FILE = "discover-plan.json"
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
    phrases = data.get("phrases") or []
    if not isinstance(phrases, list) or not all(isinstance(p, str) for p in phrases):
        raise ZoomError(f"{where}: 'phrases' must be a list of strings")
    phrases = [p for p in phrases if p.strip()]
    if not categories and not phrases:
        raise ZoomError(f"{where} holds no words and no phrases; give 'categories' and/or 'phrases'")
    name = data.get("name") if isinstance(data.get("name"), str) else Path(found).stem
    return Vocabulary(name, str(found), tuple(categories), tuple(dict.fromkeys(phrases)))


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
    for phrase in vocabulary.phrases:
        prompt = clean_prompt(f"{domain}, {phrase}")
        name = clean_prompt(phrase)
        if not name or name.lower() == domain_key or prompt.lower() in seen_prompts or name.lower() in seen_names \
                or name.lower() == "null":
            continue
        seen_prompts.add(prompt.lower())
        seen_names.add(name.lower())
        out.append(Proposal(name, prompt, "phrase", None, None, False, None))
    return out


def plan_sizes(n_proposals: int, screen_samples: int, confirm_samples: int, top_k: int, budget: int | None):
    """(screening seeds, k) within a budget of counterfactuals (each attribute and its null twin on one seed
    are two): the screening seeds are cut first, down to MIN_SCREEN_SAMPLES."""
    k = min(top_k, n_proposals)
    confirm = 2 * confirm_samples * k
    if budget is None:
        return screen_samples, k
    fit = (budget - confirm) // (2 * n_proposals)
    if fit < MIN_SCREEN_SAMPLES:
        need = 2 * MIN_SCREEN_SAMPLES * n_proposals + confirm
        raise ZoomError(f"--budget {budget} counterfactuals is too small for {n_proposals} proposals: screening them "
                        f"on {MIN_SCREEN_SAMPLES} seeds and confirming the top {k} on {confirm_samples} seeds needs "
                        f"{need} (each with its null twin); raise --budget or lower --samples / --top-k")
    return min(screen_samples, fit), k


def _records(run: Path) -> list[dict]:
    out = []
    for path in sorted((run / "records").glob("rank-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a crash: the audit's resume redoes it
                    pass
    return out


def _cost(run: Path, wall: float | None) -> dict:
    records = _records(run)
    return {"counterfactuals": len(records),
            "unet_calls": int(sum(r.get("unet_calls") or 0 for r in records)),
            "search_seconds": round(sum(r.get("seconds") or 0 for r in records), 2),
            "wall_seconds": None if wall is None else round(wall, 2)}


def _audit(config_path, run: Path, overrides: dict, progress: bool) -> tuple[dict, float | None]:
    """An audit through zoom's machinery; a finished one is read back (report rebuilt from its records)."""
    from .config import load_config
    from .report import write_report
    from .runner import run_audit

    if (run / "report.json").exists():
        report = json.loads((run / "report.json").read_text(encoding="utf-8"))
        if (report.get("completeness") or {}).get("complete", True):
            return write_report(run, html=False), None
    config = load_config(config_path, overrides)
    start = time.perf_counter()
    report = run_audit(config, run, resume=run.exists(), progress=progress)
    return report, time.perf_counter() - start


def _score(row: dict | None) -> dict:
    if row is None:
        return {"score": None, "confirmed_flips": None, "n": None}
    gap = lambda a, b: None if a is None or b is None else round(a - b, 6)  # noqa: E731
    return {"score": gap(row.get("confirmed_rate"), row.get("null_confirmed_rate")),
            "raw_gap": gap(row.get("flip_rate"), row.get("null_flip_rate")),
            "confirmed_flips": row.get("confirmed_flips"), "flips": row.get("flips"), "n": row.get("n"),
            "confirmed_rate": row.get("confirmed_rate"), "null_confirmed_rate": row.get("null_confirmed_rate")}


def discover(config_path, out, *, vocabulary="world", prompts=None, target_spec=None, seed=None, samples=None,
             screen_samples: int = DEFAULT_SCREEN_SAMPLES, top_k: int = DEFAULT_TOP_K, budget: int | None = None,
             device=None, resume: bool = False, progress: bool = True, echo=print) -> dict:
    """Run (or with resume, continue) a discovery into `out`; returns discover.json's content."""
    from .config import load_config
    from .models import quiet_libraries
    from .prompts import load_prompts

    quiet_libraries()
    if budget is not None and budget < 1:
        raise ZoomError(f"--budget must be a positive number of counterfactuals, got {budget}")
    if screen_samples < 1 or top_k < 1 or (samples is not None and samples < 1):
        raise ZoomError("--screen-samples, --top-k and --samples must be positive")
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
    domain_set = load_prompts(config.prompts)
    proposals = propose(domain_set.domain, vocab)
    if not proposals:
        raise ZoomError(f"vocabulary {shown_path(vocab.source)} proposes nothing for the domain "
                        f"{shown(domain_set.domain)}: none of its words stands in the domain prompt, or every "
                        "phrase reads as the domain itself; use a vocabulary of this domain's words")
    confirm_samples = samples or config.search.samples
    first = config.search.seed if seed is None else seed
    screen_n, k = plan_sizes(len(proposals), screen_samples, confirm_samples, top_k, budget)
    plan = {"config": str(config_path), "vocabulary": vocab.source, "prompts": None if prompts is None else str(prompts),
            "target": config.target.spec, "domain": domain_set.domain, "screen_seeds": [first, first + screen_n - 1],
            "confirm_seeds": [first + screen_n, first + screen_n + confirm_samples - 1], "top_k": k,
            "budget": budget, "proposals": [p.to_dict() for p in proposals]}
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        previous = json.loads((out / PLAN_FILE).read_text(encoding="utf-8"))
        changed = sorted(key for key in set(plan) | set(previous) if plan.get(key) != previous.get(key))
        if changed:
            raise ZoomError(f"--resume: the discovery differs from the one {shown_path(out)} was started with "
                            f"({', '.join(changed)}); resume with the same options or use a new --out")
    else:
        (out / PLAN_FILE).write_text(json.dumps(plan, indent=1), encoding="utf-8")
    nulls = list(domain_set.nulls)
    common = {**{k_: v for k_, v in base.items() if v is not None}, "search.mode": "single"}

    def prompt_set(chosen):
        return {"domain": domain_set.domain, "attributes": [{"name": p.name, "prompt": p.prompt} for p in chosen],
                **({"null": nulls} if nulls else {})}

    def oracles(chosen):
        found = {p.name: p.oracle for p in chosen if p.oracle}
        return {"oracle": found} if found else {}

    echo(f"discover: {len(proposals)} proposals from vocabulary {vocab.name!r}; screening on seeds "
         f"{plan['screen_seeds'][0]}-{plan['screen_seeds'][1]}, then the top {k} on seeds "
         f"{plan['confirm_seeds'][0]}-{plan['confirm_seeds'][1]}")
    try:
        screen, screen_wall = _audit(config_path, out / "screen", {
            **common, "prompts": prompt_set(proposals), **oracles(proposals), "search.samples": screen_n,
            "search.seed": first}, progress)
    except ZoomError:
        if not resume and not (out / "screen").exists():  # refused before any work: leave nothing behind
            (out / PLAN_FILE).unlink(missing_ok=True)
            if not any(out.iterdir()):
                out.rmdir()
        raise
    rows = {a["name"]: a for a in screen["attributes"]}
    scored = [{**p.to_dict(), "screening": _score(rows.get(p.name))} for p in proposals]
    key = lambda s: (-(s["screening"]["score"] if s["screening"]["score"] is not None else -2),  # noqa: E731
                     -(s["screening"]["raw_gap"] if s["screening"]["raw_gap"] is not None else -2), s["name"])
    scored.sort(key=key)
    for rank, s in enumerate(scored, 1):
        s["rank"] = rank
    eligible = [s for s in scored if not s["changes_label"] and (s["screening"]["score"] or 0) > 0][:k]
    by_name = {p.name: p for p in proposals}
    chosen = [by_name[s["name"]] for s in eligible]
    confirmed, confirm, confirm_wall = [], None, None
    if chosen:
        confirm, confirm_wall = _audit(config_path, out / "confirm", {
            **common, "prompts": prompt_set(chosen), **oracles(chosen), "search.samples": confirm_samples,
            "search.seed": plan["confirm_seeds"][0]}, progress)
        for a in confirm["attributes"]:
            confirmed.append({key_: a.get(key_) for key_ in (
                "name", "prompt", "flips", "n", "flip_rate", "confirmed_flips", "confirmed_rate", "confirmed_ci_low",
                "confirmed_ci_high", "null_confirmed_rate", "oracle_rate", "p_value", "q_value", "significant")})
    significant = [c for c in confirmed if c["significant"]]
    result = {
        "vocabulary": {"name": vocab.name, "source": vocab.source}, "domain": domain_set.domain,
        "target": config.target.spec,
        "proposer": "vocabulary substitution (each word of a category in the place of another) and 'DOMAIN, PHRASE'",
        "screen": {"method": "the audit's single-mode bracket search on every proposal with its null twin; score = "
                             "confirmed flip rate - null twins' confirmed flip rate (ties: raw flip-rate gap, then name)",
                   "seeds": plan["screen_seeds"], "run": str(out / "screen")},
        "screened": len(proposals), "top_k": k,
        "confirm": {"seeds": plan["confirm_seeds"], "run": str(out / "confirm") if chosen else None,
                    "chosen": [p.name for p in chosen],
                    "correction": f"Benjamini-Hochberg over the {len(chosen)} confirmed attributes, "
                                  f"chosen from {len(proposals)} screened" if chosen else None,
                    "gallery": str(out / "confirm" / "report.html") if chosen else None},
        "proposals": scored, "confirmed": confirmed,
        "discovered": [c["name"] for c in significant],
        "discovered_prompts": str(out / "discovered.yaml") if significant else None,
        "cost": {"screening": _cost(out / "screen", screen_wall),
                 "confirmation": _cost(out / "confirm", confirm_wall) if chosen else None},
    }
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
    return result


def summary(result: dict) -> str:
    """discover.json as text: the proposals ranked by screening score, then the confirmed table."""
    lines = [f"zoom discover: {result['screened']} proposals screened on seeds {result['screen']['seeds'][0]}-"
             f"{result['screen']['seeds'][1]} (vocabulary {result['vocabulary']['name']}, domain {result['domain']!r})",
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
    for stage in ("screening", "confirmation"):
        c = cost[stage]
        if c:
            wall = "" if c["wall_seconds"] is None else f", {c['wall_seconds']:.0f} s wall"
            lines.append(f"cost, {stage}: {c['counterfactuals']} counterfactuals, {c['unet_calls']:,} UNet calls, "
                         f"{c['search_seconds']:.0f} s of search{wall}")
    return "\n".join(lines) + "\n"
