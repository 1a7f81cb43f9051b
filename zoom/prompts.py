"""Attribute sets: a domain prompt, the attributes to vary one at a time, and the null control
(one paraphrase of the domain, or a list of them that the null edits are drawn from in turn).

Prompt text is cleaned exactly as open_clip cleans it before tokenizing (ftfy, HTML unescape,
whitespace), so the diffusion text encoder and the CLIP models read the same words.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


from .errors import ZoomError, shown, shown_path
from .files import read_yaml
from .words import require_visible

NULL_NAME = "null"


@dataclass(frozen=True)
class Attribute:
    name: str
    prompt: str
    slug: str  # file-system-safe, unique within the set; never derived from raw prompt text alone
    changes_label: bool = False  # the attribute *should* change the label: never label-preserving training data


@dataclass(frozen=True)
class PromptSet:
    domain: str
    attributes: tuple[Attribute, ...]
    nulls: tuple[str, ...]  # paraphrases of the domain, pooled; () -> random directions of matched norm

    def to_dict(self) -> dict:
        out = {"domain": self.domain,
               "attributes": [{"name": a.name, "prompt": a.prompt, **({"changes_label": True} if a.changes_label else {})}
                              for a in self.attributes]}
        if self.nulls:
            out["null"] = self.nulls[0] if len(self.nulls) == 1 else list(self.nulls)
        return out


def clean_prompt(text: str) -> str:
    from open_clip.tokenizer import basic_clean, whitespace_clean

    return whitespace_clean(basic_clean(text))


def slugify(index: int, name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "attribute"
    return f"{index:02d}-{slug}"


def bundled(kind: str) -> dict:
    """The configs or prompt sets that ship inside the package: {name: path}."""
    from importlib import resources

    folder = resources.files("zoom.data").joinpath(kind)
    return {entry.name[:-5]: str(entry) for entry in sorted(folder.iterdir(), key=lambda e: e.name)
            if entry.name.endswith(".yaml")}


def find_bundled(value, kind: str):
    """A path as given if it exists, else the bundled file of that name (`faces`, `demo`, ...), else None."""
    text = os.fspath(value)
    if os.path.exists(os.path.expanduser(text)):
        return text
    return bundled(kind).get(text[:-5] if text.endswith(".yaml") and os.sep not in text else text)


def load_prompts(source) -> PromptSet:
    """From a bundled set's name, a YAML file path, or an already-parsed mapping (as copied into a
    run's config.yaml)."""
    where = "prompts"
    if isinstance(source, (str, os.PathLike)):
        where = f"prompts file {shown_path(source)}"
        found = find_bundled(source, "prompts")
        if found is None:
            raise ZoomError(f"prompts {shown_path(source)} does not exist: neither a file nor a bundled prompt set "
                            f"({', '.join(bundled('prompts'))}); `zoom prompts` lists them")
        source = found
        if not os.path.isfile(source):
            raise ZoomError(f"{where} is not a file")
        source = read_yaml(source, "prompts file", user=True)
    if not isinstance(source, dict):
        raise ZoomError(f"{where} must be a mapping with 'domain' and 'attributes'")
    data = {("null" if k is None else k): v for k, v in source.items()}  # YAML reads a bare `null:` key as None
    unknown = set(data) - {"domain", "attributes", "null"}
    if unknown:
        raise ZoomError(f"{where}: unknown key(s) {shown(sorted(map(str, unknown)))}; allowed: domain, attributes, null")
    domain = data.get("domain")
    if not isinstance(domain, str) or not domain.strip():
        raise ZoomError(f"{where}: 'domain' must be a non-empty prompt string")
    require_visible(where, "the domain", clean_prompt(domain), domain)
    items = data.get("attributes")
    if not isinstance(items, list) or not items:
        raise ZoomError(f"{where}: 'attributes' must be a non-empty list of {{name, prompt}}")
    attributes, seen_names, seen_prompts = [], set(), set()
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not isinstance(item.get("prompt"), str):
            raise ZoomError(f"{where}: attributes[{i}] must have string 'name' and 'prompt'")
        name, prompt = item["name"].strip(), clean_prompt(item["prompt"])
        if name:
            require_visible(where, f"the prompt of attribute {shown(name, 40)}", prompt, item["prompt"])
        if not name or not prompt:
            raise ZoomError(f"{where}: attributes[{i}] has an empty name or prompt")
        if name.lower() == NULL_NAME:
            raise ZoomError(f"{where}: attribute name {shown(name)} is reserved for the null control")
        if name.lower() in seen_names:
            raise ZoomError(f"{where}: attribute name {shown(name)} appears twice; names must be unique")
        if prompt in seen_prompts:
            raise ZoomError(f"{where}: attribute prompt {shown(prompt)} appears twice; prompts must be unique")
        if prompt == clean_prompt(domain):
            raise ZoomError(f"{where}: attribute {shown(name)} has the domain's own prompt, so it changes nothing")
        changes_label = item.get("changes_label", False)
        if not isinstance(changes_label, bool):
            raise ZoomError(f"{where}: attributes[{i}].changes_label must be true or false")
        seen_names.add(name.lower())
        seen_prompts.add(prompt)
        attributes.append(Attribute(name, prompt, slugify(i, name), changes_label))
    null = data.get("null")
    nulls = [null] if isinstance(null, str) else null
    if null is not None and (not isinstance(nulls, list) or not nulls
                             or not all(isinstance(p, str) and p.strip() for p in nulls)):
        raise ZoomError(f"{where}: 'null' must be a prompt string or a list of them (paraphrases of the domain)")
    for j, p in enumerate(nulls or []):
        require_visible(where, f"null paraphrase {j + 1}" if len(nulls) > 1 else "the null paraphrase", clean_prompt(p), p)
    nulls = list(dict.fromkeys(clean_prompt(p) for p in nulls or []))
    if clean_prompt(domain) in nulls:
        raise ZoomError(f"{where}: a 'null' paraphrase is the domain prompt itself, so it changes nothing; "
                        "reword it (e.g. 'a picture of ...') or leave 'null' out for random directions")
    return PromptSet(clean_prompt(domain), tuple(attributes), tuple(nulls))
