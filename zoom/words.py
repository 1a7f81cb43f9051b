"""Prompts the models can read: refused before any work when a text encoder would not see their words.

Two checks, both raising ZoomError with the prompt's name and the words at fault:

- `require_visible`: a prompt with nothing left once invisible characters are dropped (zero-width
  spaces, joiners, control characters, format marks, lone combining marks, blank fillers) says
  nothing to any tokenizer, BPE included; it is refused when the prompt file is read.
- `check_readable`: once a tokenizer is loaded, every prompt it reads (domain, attributes, null
  paraphrases) must be made of words it knows. A word is unreadable when the tokenizer maps part of
  it to its unknown token (characters outside its vocabulary), or, for a *word-level* tokenizer,
  when it takes more than one token. A word-level tokenizer is one with a closed vocabulary (fewer
  than WORD_LEVEL_VOCAB tokens, like the shapes world's, which holds the world's words plus letters
  to spell anything else): its model was trained on its words only, so a word it spells letter by
  letter is noise to it, and an audit "finding" on it would be a finding about that noise. Subword
  tokenizers (CLIP's BPE, 49,408 tokens) spell rare words in pieces by design and are not refused
  for that.
"""

from __future__ import annotations

import unicodedata

from .errors import ZoomError, shown

# A subword vocabulary of a real language holds its byte alphabet (256-512 tokens) and tens of
# thousands of merges; a vocabulary this small is a closed list of words (plus letters).
WORD_LEVEL_VOCAB = 1000
# Unicode categories drawn as nothing: controls, format characters (zero-width space U+200B, joiners,
# U+2060, soft hyphen, BOM...), surrogates, separators, and combining marks with no letter to sit on.
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zs", "Zl", "Zp", "Mn", "Me"})
# Letters and symbols that render blank: Hangul fillers, the braille blank.
BLANK_CHARACTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
# Words as CLIP's tokenizers split them (open_clip's SimpleTokenizer pattern), numbers kept whole.
WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}\p{M}]+|\p{N}+|[^\s\p{L}\p{N}]+"""
MAX_NAMED = 12  # words named in one error line
MAX_LISTED = 40  # vocabulary words listed as the fix


def visible_text(text: str) -> str:
    """The text without the characters that show nothing (and without surrounding whitespace)."""
    return "".join(c for c in text if unicodedata.category(c) not in INVISIBLE_CATEGORIES
                   and c not in BLANK_CHARACTERS).strip()


def require_visible(where: str, what: str, prompt: str, written: str | None = None) -> None:
    """Refuse a (cleaned) prompt that is empty once invisible characters are dropped, whatever the
    tokenizer; `written` is the prompt as the user wrote it, for the message."""
    if not visible_text(prompt):
        raise ZoomError(f"{where}: {what} is empty once invisible characters are removed (it holds only "
                        f"zero-width, control or blank characters: {shown(prompt if written is None else written, 70)}); "
                        "write the prompt in words")


# ---------------------------------------------------------------------------------------------
# What a tokenizer can read


def _inner(tokenizer):
    """open_clip's HFTokenizer wraps a transformers tokenizer; check that one."""
    inner = getattr(tokenizer, "tokenizer", None)
    return inner if inner is not None and hasattr(inner, "tokenize") else tokenizer


def _reader(tokenizer):
    """(pieces(word) -> list of tokens, is_unknown(token) -> bool, vocabulary size, vocabulary) for the
    tokenizer kinds zoom loads, or None for a kind it does not know how to ask."""
    tok = _inner(tokenizer)
    if hasattr(tok, "tokenize") and hasattr(tok, "get_vocab"):  # transformers
        vocab = tok.get_vocab()
        unk, unk_id = getattr(tok, "unk_token", None), getattr(tok, "unk_token_id", None)

        def unknown(piece):
            return (unk is not None and piece == unk) or (unk_id is not None and vocab.get(piece, unk_id) == unk_id) \
                or (unk_id is None and piece not in vocab)

        return tok.tokenize, unknown, len(tok), vocab
    if hasattr(tok, "bpe") and hasattr(tok, "encoder") and hasattr(tok, "byte_encoder"):  # open_clip SimpleTokenizer
        def pieces(word):
            return tok.bpe("".join(tok.byte_encoder[b] for b in word.lower().encode("utf-8"))).split(" ")

        return pieces, lambda piece: piece not in tok.encoder, len(tok.encoder), tok.encoder
    return None


def vocabulary_words(vocab) -> list[str]:
    """The whole words of a (word-level) vocabulary: CLIP-style end-of-word tokens when it has them."""
    ends = [t[:-4] for t in vocab if isinstance(t, str) and t.endswith("</w>")]
    words = ends if ends else [t for t in vocab if isinstance(t, str)]
    return sorted({w for w in words if len(w) > 1 and w.isalpha()})


def unreadable_words(tokenizer, prompt: str) -> tuple[list[str], list[str], bool]:
    """(words spelled in pieces by a word-level tokenizer, words with unknown characters, word_level)."""
    import regex

    reader = _reader(tokenizer)
    if reader is None:
        return [], [], False
    pieces, unknown, size, _ = reader
    word_level = size < WORD_LEVEL_VOCAB
    spelled, unknowns = [], []
    for word in dict.fromkeys(regex.findall(WORD_PATTERN, prompt, flags=regex.IGNORECASE)):
        tokens = pieces(word)
        if not tokens or any(unknown(t) for t in tokens):
            unknowns.append(word)
        elif word_level and len(tokens) > 1:
            spelled.append(word)
    return spelled, unknowns, word_level


def _named(words: list[str]) -> str:
    shown = [repr(w) for w in words[:MAX_NAMED]]  # repr: escapes for what does not print
    more = f" and {len(words) - MAX_NAMED} more" if len(words) > MAX_NAMED else ""
    return (", ".join(shown[:-1]) + " and " + shown[-1] if len(shown) > 1 else shown[0]) + more


def prompt_names(prompts, nulls: bool = True) -> list[tuple[str, str]]:
    """(name for an error line, prompt) of every prompt of a prompt set that a text encoder reads."""
    out = [("the domain", prompts.domain)]
    out += [(f"attribute {shown(a.name, 40)}", a.prompt) for a in prompts.attributes]
    if nulls:
        several = len(prompts.nulls) > 1
        out += [(f"null paraphrase {i + 1}" if several else "the null paraphrase", p) for i, p in enumerate(prompts.nulls)]
    return out


def check_readable(prompts, tokenizer, reader: str, *, nulls: bool = True) -> None:
    """Refuse (ZoomError) the first prompt with a word `tokenizer` cannot read; `reader` names it in the
    message ("the generator's tokenizer (generator.model)")."""
    if tokenizer is None or _reader(tokenizer) is None:
        return
    for what, prompt in prompt_names(prompts, nulls):
        spelled, unknowns, word_level = unreadable_words(tokenizer, prompt)
        if not spelled and not unknowns:
            continue
        why = []
        if spelled:
            why.append(f"{_named(spelled)} (not in its vocabulary of whole words: it would spell "
                       f"{'it' if len(spelled) == 1 else 'them'} in letters its model never learned as words)")
        if unknowns:
            why.append(f"{_named(unknowns)} (characters outside its vocabulary: they become its unknown token)")
        if word_level:
            words = vocabulary_words(reader_vocab(tokenizer))
            listed = ", ".join(words[:MAX_LISTED]) + (", ..." if len(words) > MAX_LISTED else "")
            letters = " (and single letters such as 'a')" if "a</w>" in reader_vocab(tokenizer) else ""
            fix = f"use only the words it knows: {listed}{letters}" if words else "use only words of its vocabulary"
        else:
            fix = "reword the prompt without them"
        raise ZoomError(f"prompts: {what}: {shown(prompt, 70)} has words the {reader} cannot read: "
                        f"{'; '.join(why)}; {fix}")


def reader_vocab(tokenizer) -> dict:
    reader = _reader(tokenizer)
    return reader[3] if reader else {}


def same_encoding(tokenizer, prompt: str, domain: str) -> str:
    """Why `prompt` encodes exactly like `domain` (its edit direction is zero), its tokens counted as the
    text encoder counts them: start and end tokens included."""
    limit = getattr(tokenizer, "model_max_length", None)
    n = same = None
    try:
        n = len(tokenizer(prompt, verbose=False).input_ids)
        padded = dict(padding="max_length", max_length=limit, truncation=True, verbose=False)
        same = tokenizer(prompt, **padded).input_ids == tokenizer(domain, **padded).input_ids
    except Exception:  # a tokenizer that cannot be asked this way: say what is known
        pass
    if n is not None and isinstance(limit, int) and n > limit:
        return (f"its prompt encodes exactly like the domain prompt: the text encoder reads only the first {limit} "
                f"tokens (start and end tokens included) and this prompt has {n}, differing from the domain only "
                "after them, so its edit would be zero; make the difference earlier in the prompt")
    if n is not None and same:
        return (f"its prompt encodes exactly like the domain prompt: the tokenizer reads both as the same {n} tokens "
                "(start and end tokens included; it ignores case and spacing), so its edit would be zero; "
                "change its words, not their spelling")
    return "its prompt encodes exactly like the domain prompt, so its edit would be zero; change its words"
