"""Text cleaning and Gopher/C4-style quality filters.

`clean_text` repairs what is mechanically wrong (mojibake, Unicode forms, control characters,
ragged whitespace) without changing what the text says. `QualityFilter.check` then returns the
name of the first rule a document breaks, or None to keep it; the rule names are the "dropped
per reason" keys of the corpus manifest and data card. Defaults follow the Gopher paper's
(Rae et al. 2021) thresholds, loosened where they assume web pages rather than books.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

# C0/C1 control characters except tab and newline, plus zero-width and BOM characters.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_WORD = re.compile(r"\w+", re.UNICODE)
# Gopher's English stop-word rule: real English prose contains at least two of these.
_STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])
_STOP_WORDS_ASCII = frozenset(w.encode() for w in _STOP_WORDS)


_is_ascii = str.isascii  # the test of every ASCII fast path below (tests force the general path)
# Printable ASCII plus tab and newline, without '&' (HTML entities): text ftfy leaves as it is.
_ASCII_PLAIN = re.compile(r"[^\t\n\x20-\x25\x27-\x7e]")
_DIGITS = b"0123456789"
_LETTERS = bytes(range(65, 91)) + bytes(range(97, 123))
_LETTERS_AND_SPACE = _LETTERS + b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"  # what str.split() splits ASCII at
# `_WORD.findall(text.lower())` for ASCII as a byte translation: word bytes kept (lower-cased), others spaces.
_ASCII_WORDS = bytes(c + 32 if 65 <= c <= 90 else c if 97 <= c <= 122 or 48 <= c <= 57 or c == 95 else 32
                     for c in range(256))
# A word (of a text joined by single spaces) without an ASCII letter: `alpha_word_ratio` for ASCII.
_ASCII_NO_ALPHA_WORD = re.compile(r"(?:^| )[^A-Za-z ]+(?= |$)")


def clean_text(text: str, fix_encoding: bool = True) -> str:
    """Repair encoding, normalise to NFC, drop control characters, tidy whitespace."""
    plain = _is_ascii(text) and not _ASCII_PLAIN.search(text)
    if not plain:  # plain ASCII has nothing for ftfy, NFC or the control filter to change
        if fix_encoding:  # ftfy: mojibake repair ("Ã©" -> "é"), entities, ligatures, width, quotes, NFC
            from minilab.data.fixtext import fix_text

            text = fix_text(text)
        else:
            text = unicodedata.normalize("NFC", text)
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = _CONTROL.sub("", text)
    if plain and "\t" not in text and "  " not in text:
        lines = [line.strip(" ") for line in text.split("\n")]  # no run of spaces to collapse
    else:
        lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    text = "\n".join(lines)
    return (_MANY_NEWLINES.sub("\n\n", text) if "\n\n\n" in text else text).strip()


@dataclass
class QualityConfig:
    """Quality filter thresholds (set a bound to 0 or 1.0 as appropriate to disable it)."""

    min_chars: int = field(default=200, metadata={"help": "drop documents shorter than this"})
    max_chars: int = field(default=2_000_000, metadata={"help": "drop documents longer than this"})
    min_words: int = field(default=30, metadata={"help": "drop documents with fewer words"})
    min_mean_word_length: float = field(default=3.0, metadata={"help": "Gopher: mean word length ≥ 3"})
    max_mean_word_length: float = field(default=10.0, metadata={"help": "Gopher: mean word length ≤ 10"})
    max_symbol_ratio: float = field(default=0.1, metadata={"help": "max (# and …) per word"})
    max_digit_ratio: float = field(default=0.2, metadata={"help": "max share of characters that are digits"})
    min_alpha_word_ratio: float = field(default=0.8, metadata={
        "help": "min share of words with an alphabetic character"})
    max_duplicate_line_ratio: float = field(default=0.3, metadata={
        "help": "max share of non-empty lines that repeat an earlier line"})
    max_top_2gram_ratio: float = field(default=0.2, metadata={
        "help": "max share of characters covered by the most frequent word 2-gram"})
    max_duplicate_5gram_ratio: float = field(default=0.15, metadata={
        "help": "max share of characters in word 5-grams seen more than once"})
    language: str | None = field(default=None, metadata={
        "help": "'en' keeps only documents with ≥ 2 English stop words (Gopher rule); none = off"})


# The config keys that loosen each rule, by the reason `QualityFilter.check` returns.
RULE_KEYS: dict[str, tuple[str, ...]] = {
    "too_short": ("min_chars",), "too_long": ("max_chars",), "too_few_words": ("min_words",),
    "mean_word_length": ("min_mean_word_length", "max_mean_word_length"),
    "symbol_ratio": ("max_symbol_ratio",), "digit_ratio": ("max_digit_ratio",),
    "alpha_word_ratio": ("min_alpha_word_ratio",), "duplicate_lines": ("max_duplicate_line_ratio",),
    "repeated_2gram": ("max_top_2gram_ratio",), "repeated_5grams": ("max_duplicate_5gram_ratio",),
    "language": ("language",),
}


def _ngram_char_ratio(words: list[str] | list[bytes], n: int, top_only: bool) -> float:
    """Share of word characters in repeated n-grams (or in the single most frequent n-gram)."""
    if len(words) < n:
        return 0.0
    grams = list(zip(*(words[i:len(words) - n + 1 + i] for i in range(n)), strict=True))
    counts = Counter(grams)
    if len(counts) == len(grams):
        return 0.0  # no n-gram repeats
    total = sum(map(len, words)) or 1
    if top_only:
        gram, c = counts.most_common(1)[0]
        return c * sum(map(len, gram)) / total
    covered = [False] * len(words)
    for i, g in enumerate(grams):
        if counts[g] > 1:
            for j in range(i, i + n):
                covered[j] = True
    return sum(len(w) for w, c in zip(words, covered, strict=True) if c) / total


class QualityFilter:
    """Apply `QualityConfig` rules; `check(text)` -> reason string or None."""

    def __init__(self, cfg: QualityConfig):
        self.cfg = cfg

    def check(self, text: str) -> str | None:
        c = self.cfg
        if len(text) < c.min_chars:
            return "too_short"
        if len(text) > c.max_chars:
            return "too_long"
        words = text.split()
        if len(words) < c.min_words:
            return "too_few_words"
        mean = sum(map(len, words)) / len(words)
        if not c.min_mean_word_length <= mean <= c.max_mean_word_length:
            return "mean_word_length"
        if (text.count("#") + text.count("...") + text.count("…")) / len(words) > c.max_symbol_ratio:
            return "symbol_ratio"
        ascii_ = _is_ascii(text)  # ASCII: the same counts by C-speed byte and regex operations
        if ascii_:
            raw = text.encode("ascii")
            digits = len(raw) - len(raw.translate(None, _DIGITS))
            # A word without a letter holds at least one character that is neither letter nor space,
            # so there are at most that many such words: when that is few enough, no need to count.
            alpha_words = len(words) - len(raw.translate(None, _LETTERS_AND_SPACE))
            if alpha_words / len(words) < c.min_alpha_word_ratio:
                alpha_words = len(words) - len(_ASCII_NO_ALPHA_WORD.findall(" ".join(words)))
        else:
            digits = sum(map(str.isdigit, text))
            alpha_words = sum(any(map(str.isalpha, w)) for w in words)
        if digits / len(text) > c.max_digit_ratio:
            return "digit_ratio"
        if alpha_words / len(words) < c.min_alpha_word_ratio:
            return "alpha_word_ratio"
        lines = [ln for ln in text.split("\n") if ln.strip()]
        if len(lines) > 1 and 1 - len(set(lines)) / len(lines) > c.max_duplicate_line_ratio:
            return "duplicate_lines"
        if ascii_:  # words as lower-case bytes
            lower, stop = raw.translate(_ASCII_WORDS).split(), _STOP_WORDS_ASCII
        else:
            lower, stop = [w.lower() for w in _WORD.findall(text)], _STOP_WORDS
        if _ngram_char_ratio(lower, 2, top_only=True) > c.max_top_2gram_ratio:
            return "repeated_2gram"
        if _ngram_char_ratio(lower, 5, top_only=False) > c.max_duplicate_5gram_ratio:
            return "repeated_5grams"
        if c.language == "en" and len(stop.intersection(lower)) < 2:
            return "language"
        return None
