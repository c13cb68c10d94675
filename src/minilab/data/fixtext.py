"""`fix_text(text)`: exactly `ftfy.fix_text(text, normalization="NFC")`, 20-50x faster on ordinary text.

ftfy runs every step of its pipeline on every line, twice when anything changed: its mojibake test
(`badness.is_bad`, one large regex tried at every position) alone is half the time, and a curly
apostrophe, common in real text, forces the second pass. On a 2-core machine that made ftfy most of
`minilab corpus`'s time on any text that is not plain ASCII (about 1.3 MB/s per core).

The same result, with each step run only where it can change something:

- the steps that look beyond one character (HTML unescaping, mojibake repair) are needed only where
  a line has a '&', or could match ftfy's mojibake pattern; every branch of that pattern needs one
  of its few hundred non-ASCII characters, and a match is at most 7 characters long (the pattern's width), so the
  pattern is tried only in short windows around those characters. Where either may apply, ftfy
  itself does the whole text;
- the character-local steps (C1 controls, ligatures, character width, curly quotes, line breaks,
  surrogates, terminal escapes, control characters) are run only when a character they act on is
  present, in ftfy's order, with ftfy's own functions, then NFC, repeated until nothing changes,
  as ftfy's loop does. If a step produces a '&' or something mojibake-like, ftfy redoes the text.

The character sets are read from the installed ftfy at import; if its pipeline is not the one this
module was written for (another default configuration, a branch of the mojibake pattern without a
non-ASCII character it requires), every text goes to ftfy. tests/test_data_corpus.py compares the
two on mojibake, entities, ligatures, full-width text, quotes, controls and random Unicode.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

import ftfy
from ftfy import badness, chardata, fixes

_EXPECTED_CONFIG = {
    "unescape_html": "auto", "remove_terminal_escapes": True, "fix_encoding": True, "restore_byte_a0": True,
    "replace_lossy_sequences": True, "decode_inconsistent_utf8": True, "fix_c1_controls": True,
    "fix_latin_ligatures": True, "fix_character_width": True, "uncurl_quotes": True, "fix_line_breaks": True,
    "fix_surrogates": True, "remove_control_chars": True, "normalization": "NFC"}


def _char_class(codes: set[int]) -> re.Pattern:
    return re.compile("[" + "".join(re.escape(chr(c)) for c in sorted(codes)) + "]")


def _mojibake_chars() -> tuple[set[int], int] | None:
    """The non-ASCII characters of ftfy's mojibake pattern and its longest match, or None when some
    branch of the pattern could match without one of them (then no shortcut is safe)."""
    try:
        from re import _constants as C
        from re import _parser as P
    except ImportError:  # Python < 3.11 names them sre_*
        return None
    tree = P.parse(badness.BADNESS_RE.pattern, badness.BADNESS_RE.flags)
    chars: set[int] = set()

    def members(op, av) -> set[int] | None:  # the characters one required element matches, or None
        if op is C.LITERAL:
            return {av}
        if op is C.IN and not any(o is C.NEGATE for o, _ in av):
            out: set[int] = set()
            for o, a in av:
                if o is C.LITERAL:
                    out.add(a)
                elif o is C.RANGE:
                    out.update(range(a[0], a[1] + 1))
                else:
                    return None
            return out
        return None

    branches = tree[0][1][1] if len(tree) == 1 and tree[0][0] is C.BRANCH else [tree]
    for branch in branches:
        required = [m for m in (members(op, av) for op, av in branch) if m is not None and min(m) >= 128]
        if not required:
            return None
        for m in required:
            chars |= m
    return chars, tree.getwidth()[1]


def _build() -> tuple[re.Pattern, int, list[tuple[re.Pattern, Callable[[str], str]]]] | None:
    config = ftfy.TextFixerConfig()
    if any(getattr(config, k, None) != v for k, v in _EXPECTED_CONFIG.items()):
        return None
    found = _mojibake_chars()
    if found is None:
        return None
    mojibake, reach = found
    quotes = set(range(0x2018, 0x201C)) | {0x02BC} | set(range(0x201C, 0x2020))
    if (chardata.SINGLE_QUOTE_RE.pattern, chardata.DOUBLE_QUOTE_RE.pattern) != ("[\u02bc\u2018-\u201b]",
                                                                                 "[\u201c-\u201f]"):
        return None
    local = [  # ftfy.fix_and_explain's order; each with the characters it can act on
        (set(range(0x80, 0xA0)), fixes.fix_c1_controls),
        (set(chardata.LIGATURES), fixes.fix_latin_ligatures),
        (set(chardata.WIDTH_MAP), fixes.fix_character_width),
        (quotes, fixes.uncurl_quotes),
        ({0x0D, 0x2028, 0x2029, 0x85}, fixes.fix_line_breaks),
        (set(range(0xD800, 0xE000)), fixes.fix_surrogates),
        ({0x1B}, fixes.remove_terminal_escapes),
        (set(chardata.CONTROL_CHARS), fixes.remove_control_chars),
    ]
    one = _char_class(mojibake).pattern
    clusters = re.compile(f"{one}(?:[^\\n]{{0,{2 * reach}}}{one})*")
    return clusters, reach, [(_char_class(codes), fix) for codes, fix in local]


_FAST = _build()


def _may_need_ftfy(text: str) -> bool:
    """True where ftfy's own pipeline may do more than the local steps: a '&' (HTML entities), or
    a line on which ftfy's mojibake pattern may match (tried in windows around its characters)."""
    if "&" in text:
        return True
    clusters, reach, _ = _FAST
    for m in clusters.finditer(text):  # runs of its characters less than 2 * reach apart, on one line
        line_start = text.rfind("\n", 0, m.start()) + 1
        line_end = text.find("\n", m.end())
        line_end = len(text) if line_end < 0 else line_end + 1
        # A match lies within reach of one of the run's characters. A window that starts mid-line
        # may match '^' where ftfy would not: a false alarm (ftfy then does the text), never a miss.
        if badness.is_bad(text[max(line_start, m.start() - reach):min(line_end, m.end() + reach)]):
            return True
    return False


def fix_text(text: str) -> str:
    """`ftfy.fix_text(text, normalization="NFC")`, the same string, faster."""
    if _FAST is None or len(text) > ftfy.TextFixerConfig().max_decode_length or _may_need_ftfy(text):
        return ftfy.fix_text(text, normalization="NFC")
    original = text
    while True:
        before = text
        for chars, fix in _FAST[2]:
            if chars.search(text):
                text = fix(text)
        if not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        if text == before:
            return text
        if _may_need_ftfy(text):  # a step made an entity or mojibake-like text: ftfy's next pass would act
            return ftfy.fix_text(original, normalization="NFC")
