"""Text curation rules called once per document: markup removal, normalisation, URL removal,
language identification, Gopher quality filters (CJK-aware), flagged words and PII masking.

Everything here is a pure function of its arguments. Regexes are compiled once at import because
these rules are most of the per-document cost of the curation actors.
"""

from __future__ import annotations

import datetime
import html
import ipaddress
import re
import sys
import unicodedata
from collections import Counter

import numpy as np

from deepkiln.config import QualityArgs

# ---------------------------------------------------------------------------------------- units

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
CJK_RE = re.compile(f"[{_CJK}]")
# CJK scripts are written without spaces, so each ideograph / kana / hangul is its own unit.
_UNIT_RE = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+")


def units(text: str) -> list[str]:
    """CJK-aware words: each CJK character, or a maximal run of other word characters."""
    return _UNIT_RE.findall(text)


def unit_ends(text: str) -> list[int]:
    """Where each of units(text) ends in `text`: text[:unit_ends(text)[5]] is its first six units."""
    return [m.end() for m in _UNIT_RE.finditer(text)]


# ------------------------------------------------------------------------------------ markup

# Terminal escape sequences, whole: CSI (colours, cursor moves: ESC [ parameters, final byte), OSC
# (titles, hyperlinks: ESC ] ... BEL or ESC \), and the two-character ones (ESC and one of @-Z \ ^ _);
# the same with ESC written in caret notation (^[), as copied logs carry it.
_ANSI_RE = re.compile(r"(?:\x1b|\^\[)(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\^_])")
# HTML that leaks into scraped text, tags matched by name so that code's "<stdin>" or "List<int>" stay.
_HTML_TAGS = ("a abbr address article aside b big blockquote body br caption center cite code col dd del details "
              "dfn div dl dt em figcaption figure font footer form h1 h2 h3 h4 h5 h6 head header hr html i iframe "
              "img input ins kbd label li link main mark meta nav noscript ol option p pre q s samp section select "
              "small span strike strong sub summary sup table tbody td textarea tfoot th thead time title tr tt u "
              "ul var wbr").split()
_HTML_BREAK_RE = re.compile(r"<(?:br|p|div|li|tr|h[1-6])\b[^<>]*/?>", re.IGNORECASE)  # leave a line break
_HTML_TAG_RE = re.compile(r"</?(?:" + "|".join(_HTML_TAGS) + r")\b[^<>]*/?>", re.IGNORECASE)
_HTML_BLOCK_RE = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>|<!--.*?-->", re.IGNORECASE | re.DOTALL)
_HTML_ENTITY_RE = re.compile(r"&(?:#\d{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
# What only HTML has: a closing tag, a tag with an attribute, a <br>. Without it a bare "<input>" or
# "<select>" is a placeholder in documentation and stays.
_HTML_EVIDENCE_RE = re.compile(r"</(?:" + "|".join(_HTML_TAGS) + r")\s*>|<(?:" + "|".join(_HTML_TAGS)
                               + r")\s+[A-Za-z_:][-A-Za-z0-9_:.]*\s*=|<br\s*/?>", re.IGNORECASE)


def strip_markup(text: str) -> tuple[str, Counter]:
    """Remove terminal escape sequences whole, HTML comments, script and style blocks and HTML tags (a
    line-breaking tag leaves a line break) in text that holds HTML (a closing tag, a tag with an
    attribute or a <br>), and decode HTML entities (&amp;, &nbsp;, &#x4e2d;).
    Returns the text and what was removed, by kind. Text with no ESC, "^[", "<" or "&" is returned
    untouched after four `in` tests."""
    found = Counter()
    if "\x1b" in text or "^[" in text:
        text, found["ansi"] = _ANSI_RE.subn("", text)
    if "<" in text:
        text, found["html_blocks"] = _HTML_BLOCK_RE.subn("", text)
    if "<" in text and _HTML_EVIDENCE_RE.search(text):
        text, breaks = _HTML_BREAK_RE.subn("\n", text)
        text, tags = _HTML_TAG_RE.subn("", text)
        found["html_tags"] = breaks + tags
    if "&" in text:
        found["html_entities"] = len(_HTML_ENTITY_RE.findall(text))
        if found["html_entities"]:
            text = html.unescape(text)
    return text, +found


# ------------------------------------------------------------------------------------ language

_LANG_ALIASES = {"zh-Hant": "zh", "zh-Hans": "zh"}  # CLD2 names the two Chinese scripts apart


def language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, share of the text's bytes in that language) by CLD2, offline, tens of MB/s;
    ("und", 0.0) when it finds none. Chinese in either script is "zh"."""
    import pycld2

    try:
        _, _, details = pycld2.detect(text, bestEffort=True)
    except pycld2.error:  # text CLD2 cannot read (it wants valid UTF-8)
        return "und", 0.0
    _, code, percent, _ = details[0]
    return ("und", 0.0) if code in ("un", "xxx") else (_LANG_ALIASES.get(code, code), percent / 100)


def language_mix(languages: dict[str, int], total: int, shown: int = 8) -> str:
    """"zh 4,410 (45%), en 3,430 (35%), ..., 12 others 310 (3%)": the commonest languages first."""
    total, items = max(1, total), sorted(languages.items(), key=lambda item: -item[1])
    parts = [f"{lang} {n:,} ({n / total:.0%})" for lang, n in items[:shown]]
    rest = sum(n for _, n in items[shown:])
    if rest:
        parts.append(f"{len(items) - shown} others {rest:,} ({rest / total:.0%})")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------ normalize

def _char_class(categories: tuple[str, ...], keep: str) -> str:
    """Regex class of every code point in `categories` but `keep`, as ranges (a class of single
    characters outside the BMP is eight times slower to match)."""
    cps = [cp for cp in range(sys.maxunicode + 1)
           if unicodedata.category(chr(cp)) in categories and chr(cp) not in keep]
    ranges, start = [], cps[0]
    for prev, cp in zip(cps, cps[1:] + [None]):
        if cp != prev + 1:
            ranges.append(f"\\U{start:08x}-\\U{prev:08x}")
            start = cp
    return "[" + "".join(ranges) + "]"


# \x85, \u2028 and \u2029 are line breaks too; turning them into \n keeps lines apart.
LINE_BREAKS = ("\r\n", "\r", "\x85", "\u2028", "\u2029")
# Zero-width spaces and joiners, BOM, soft hyphen, bidi marks, NUL, ...
_CONTROL_RE = re.compile(_char_class(("Cc", "Cf"), keep="\n\t") + "+")
_BLANK_LINES_RE = re.compile(r"\n{3,}")


def normalize(text: str) -> str:
    """NFKC, \\n line ends, no control/format characters (but \\n, \\t), no trailing spaces, at most
    one blank line in a row, no leading/trailing blank lines. Indentation of every line is kept."""
    text = unicodedata.normalize("NFKC", text)
    for line_break in LINE_BREAKS:  # str.replace is ten times faster than a regex here
        text = text.replace(line_break, "\n")
    # Most lines are printable, i.e. hold no control or format character, and skip the regex.
    lines = [(line if line.isprintable() else _CONTROL_RE.sub("", line)).rstrip()
             for line in text.split("\n")]
    # Drop whole blank lines only at the start: the first line's indentation matters in code.
    first = next((i for i, line in enumerate(lines) if line), len(lines))
    text = "\n".join(lines[first:]).rstrip()
    return _BLANK_LINES_RE.sub("\n\n", text) if "\n\n\n" in text else text


# URL characters are ASCII (RFC 3986), so a URL ends where Chinese text starts; trailing
# punctuation belongs to the sentence, not the URL.
_URL_RE = re.compile(r"(?<![A-Za-z0-9])(?:https?://|www\.)[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*"
                     r"[A-Za-z0-9/_~#=%&+\-]", re.IGNORECASE)


def remove_urls(text: str) -> tuple[str, int]:
    """Remove http(s):// and www. URLs; returns the text and how many were removed."""
    return _URL_RE.subn("", text)


# -------------------------------------------------------------------------------------- quality

BULLETS = ("\u2022", "-", "*", "\u00b7")
ELLIPSES = ("...", "\u2026")
# A unit of digits and underscores only, in units joined by spaces. The lookbehind sits after the
# first character so that re can skip straight to digits (a leading lookbehind is 3x slower).
_NO_ALPHA_UNIT_RE = re.compile(r"[\d_](?<![^ ].)[\d_]*(?![^ ])")
_NON_DIGITS_RE = re.compile(r"\D+")


def _lines(text: str) -> list[str]:
    return [line for line in map(str.strip, text.split("\n")) if line]


def _repeated_lines(lines: list[str]) -> tuple[int, int]:
    """(number, characters) of lines that repeat an earlier line."""
    seen, count, chars = set(), 0, 0
    for line in lines:
        if line in seen:
            count, chars = count + 1, chars + len(line)
        seen.add(line)
    return count, chars


def _unit_chars(words: list[str]) -> np.ndarray:
    return np.fromiter(map(len, words), dtype=np.int64, count=len(words))


def _ngrams(words: list[str], max_n: int):
    """Yield (n, counts, chars) for n = 2..max_n: counts[i] is how often the n-gram starting at
    unit i occurs in `words` and chars[i] is its length in characters."""
    vocab: dict[str, int] = {}
    word_ids = np.array([vocab.setdefault(w, len(vocab)) for w in words], dtype=np.int64)
    cum = np.concatenate(([0], np.cumsum(_unit_chars(words))))
    # ids[i] numbers the gram at unit i, or is -1 when it occurs once, and so does every longer
    # gram there: only repeated grams are extended and sorted, fewer and fewer as n grows.
    ids = np.where(np.bincount(word_ids)[word_ids] > 1, word_ids, -1)
    for n in range(2, min(max_n, len(words)) + 1):
        live = np.flatnonzero(ids[:-1] >= 0)
        # An n-gram is an (n-1)-gram plus one unit: number the pairs exactly, no hashing.
        keys = ids[live] * len(words) + word_ids[live + n - 1]
        _, inverse, found = np.unique(keys, return_inverse=True, return_counts=True)
        counts, ids = np.ones(len(ids) - 1, dtype=np.int64), np.full(len(ids) - 1, -1)
        counts[live] = found[inverse]
        ids[live] = np.where(found[inverse] > 1, inverse, -1)
        yield n, counts, cum[n:] - cum[:-n]


def too_short(text: str, words: list[str], args: QualityArgs) -> bool:
    return len(words) < args.min_units


def too_long(text: str, words: list[str], args: QualityArgs) -> bool:
    return len(words) > args.max_units


def symbol_ratio(text: str, words: list[str], args: QualityArgs) -> bool:
    symbols = text.count("#") + sum(text.count(e) for e in ELLIPSES)
    return symbols > args.max_symbol_ratio * len(words)


def alpha_ratio(text: str, words: list[str], args: QualityArgs) -> bool:
    alpha = len(words) - len(_NO_ALPHA_UNIT_RE.findall(" ".join(words)))
    return alpha < args.min_alpha_unit_ratio * len(words)


def mean_word_length(text: str, words: list[str], args: QualityArgs) -> bool:
    # units() makes every CJK character a unit of its own, so counting them counts CJK units.
    cjk = len(CJK_RE.findall(" ".join(words)))
    latin = len(words) - cjk
    if not latin or 2 * latin < len(words):
        return False  # mostly CJK: written without spaces, so word length means nothing
    mean = (sum(map(len, words)) - cjk) / latin
    return not args.min_mean_word_len <= mean <= args.max_mean_word_len


def digit_ratio(text: str, words: list[str], args: QualityArgs) -> bool:
    digits, chars = len(_NON_DIGITS_RE.sub("", text)), len("".join(text.split()))
    return digits > args.max_digit_ratio * chars


def bullet_lines(text: str, words: list[str], args: QualityArgs) -> bool:
    lines = _lines(text)
    bullets = sum(line.startswith(BULLETS) for line in lines)
    return bullets > args.max_bullet_line_ratio * len(lines)


def ellipsis_lines(text: str, words: list[str], args: QualityArgs) -> bool:
    lines = _lines(text)
    ellipses = sum(line.endswith(ELLIPSES) for line in lines)
    return ellipses > args.max_ellipsis_line_ratio * len(lines)


def dup_lines(text: str, words: list[str], args: QualityArgs) -> bool:
    lines = _lines(text)
    return _repeated_lines(lines)[0] > args.max_dup_line_ratio * len(lines)


def dup_line_chars(text: str, words: list[str], args: QualityArgs) -> bool:
    lines = _lines(text)
    return _repeated_lines(lines)[1] > args.max_dup_line_char_ratio * sum(map(len, lines))


def top_ngram(text: str, words: list[str], args: QualityArgs) -> bool:
    limits, total = args.max_top_ngram_char_ratio, sum(map(len, words))
    for n, counts, chars in _ngrams(words, max(limits, default=0)):
        top = counts.max()
        # Ties between equally frequent n-grams: the longest one counts.
        if n in limits and top > 1 and top * chars[counts == top].max() > limits[n] * total:
            return True
    return False


def dup_ngram(text: str, words: list[str], args: QualityArgs) -> bool:
    limits, lens = args.max_dup_ngram_char_ratio, _unit_chars(words)
    for n, counts, _ in _ngrams(words, max(limits, default=0)):
        if n in limits:
            # Unit i is covered when any n-gram starting at i-n+1..i repeats; count it once.
            covered = np.convolve(counts > 1, np.ones(n, dtype=np.int64)) > 0
            if lens[covered].sum() > limits[n] * lens.sum():
                return True
    return False


QUALITY_RULES = tuple((rule.__name__, rule) for rule in (
    too_short, too_long, symbol_ratio, alpha_ratio, mean_word_length, digit_ratio, bullet_lines,
    ellipsis_lines, dup_lines, dup_line_chars, top_ngram, dup_ngram))


def quality_reason(text: str, args: QualityArgs, words: list[str] | None = None) -> str | None:
    """Name of the first rule in QUALITY_RULES that drops `text`, or None to keep it; `words`: its
    units(text), where the caller has them already."""
    words = units(text) if words is None else words
    return next((name for name, rule in QUALITY_RULES if rule(text, words, args)), None)


# ------------------------------------------------------------------------------------ flagged words

def flagged_lists(words: list[str]) -> tuple[frozenset[str], tuple[str, ...]]:
    """A flagged-word list split as `flagged_ratio` matches it: alphabetic words (lowercased, whole
    units) and CJK entries (substrings, longest first). Blank lines and '#' comments are skipped."""
    entries = {w.strip() for w in words if w.strip() and not w.strip().startswith("#")}
    cjk = tuple(sorted((w for w in entries if CJK_RE.search(w)), key=len, reverse=True))
    return frozenset(w.lower() for w in entries if not CJK_RE.search(w)), cjk


def flagged_ratio(text: str, words: list[str], flagged: tuple[frozenset[str], tuple[str, ...]]) -> float:
    """Share of the text's units (`units(text)`: words; CJK: characters) that flagged words cover:
    an alphabetic entry covers each word equal to it, a CJK entry each character of each occurrence."""
    if not words:
        return 0.0
    alphabetic, cjk = flagged
    covered = sum(w.lower() in alphabetic for w in words) if alphabetic else 0
    for entry in cjk:
        if entry in text:
            covered += text.count(entry) * len(entry)
            text = text.replace(entry, "")  # a shorter entry inside a longer one is not counted twice
    return min(1.0, covered / len(words))


# ------------------------------------------------------------------------------------------ PII

PII_TYPES = ("EMAIL", "PHONE", "IP", "CARD", "ID")
_PRIORITY = {kind: rank for rank, kind in enumerate(("CARD", "ID", "EMAIL", "IP", "PHONE"))}

_LUHN_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)
CARD_DIGITS = range(13, 19 + 1)
# Major Industry Identifier 2-6 (Mastercard, Amex/Diners/JCB, Visa, Mastercard, Discover/UnionPay):
# skips most order and tracking numbers that pass Luhn by chance (one in ten does).
CARD_LEADING_DIGITS = "23456"
PHONE_DIGITS = range(8, 15 + 1)  # E.164: at most 15 digits with the country code
CN_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
CN_ID_CHECK = "10X98765432"
CN_ID_YEARS = range(1900, 2099 + 1)
# "a[1::2]" or "x[10::]" are valid IPv6 too; real addresses have at least three groups.
MIN_IPV6_GROUPS = 3


def luhn_valid(digits: str) -> bool:
    """True when `digits` (digits only) passes the Luhn checksum."""
    if not digits.isascii() or not digits.isdigit():
        return False
    nums = [int(d) for d in reversed(digits)]
    return (sum(nums[0::2]) + sum(_LUHN_DOUBLED[d] for d in nums[1::2])) % 10 == 0


_CN_ID_FORMAT = re.compile(r"[0-9]{17}[0-9Xx]")


def cn_id_valid(s: str) -> bool:
    """True for a China resident ID: 18 chars, ISO 7064 MOD 11-2 check char, valid birth date."""
    if not _CN_ID_FORMAT.fullmatch(s):
        return False
    check = CN_ID_CHECK[sum(int(d) * w for d, w in zip(s, CN_ID_WEIGHTS)) % 11]
    try:
        born = datetime.date(int(s[6:10]), int(s[10:12]), int(s[12:14]))
    except ValueError:
        return False
    return s[17].upper() == check and born.year in CN_ID_YEARS


def _card_valid(s: str) -> bool:
    digits = s.replace(" ", "").replace("-", "")
    return len(digits) in CARD_DIGITS and digits[0] in CARD_LEADING_DIGITS and luhn_valid(digits)


def _ip_valid(s: str) -> bool:
    try:
        ip = ipaddress.ip_address(s)
    except ValueError:
        return False
    groups = sum(1 for g in s.split(":") if g) + ("." in s)  # a dotted IPv4 tail is two groups
    return ip.version == 4 or groups >= MIN_IPV6_GROUPS


def _phone_valid(s: str) -> bool:
    return sum(c.isdigit() for c in s) in PHONE_DIGITS


def _ssn_valid(s: str) -> bool:
    area, group, serial = s.split("-")
    # Never issued: area 000, 666 or 900-999, group 00, serial 0000.
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


# Right after a pattern's first character: no letter or digit touches the match on the left. Not
# \b: \w matches Chinese, which puts no space before a number. Placed after the first character,
# not before, so that re can jump between candidate characters (3x faster).
_LEFT = r"(?<![0-9A-Za-z].)"
_RIGHT = r"(?![0-9A-Za-z])"


def _bounded(first: str, rest: str) -> re.Pattern:
    return re.compile(first + _LEFT + "(?:" + rest + ")" + _RIGHT)


# (type, a substring every match holds, regex, validator or None); all run on the original text.
_DETECTORS = (
    ("EMAIL", "@", re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+"
                              r"(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![A-Za-z0-9-])"), None),
    # 4111111111111111, 4111 1111 1111 1111, 4111-1111-1111-1111, 3782 822463 10005
    ("CARD", "", _bounded("[0-9]", r"[0-9]{12,18}|[0-9]{3}(?:[ -][0-9]{3,6}){2,4}"), _card_valid),
    ("ID", "", _bounded("[0-9]", r"[0-9]{16}[0-9Xx]"), cn_id_valid),
    ("ID", "-", _bounded("[0-9]", r"[0-9]{2}-[0-9]{2}-[0-9]{4}(?!-[0-9])"), _ssn_valid),
    ("IP", ".", re.compile(r"[0-9](?<![0-9A-Za-z.].)[0-9]{0,2}(?:\.[0-9]{1,3}){3}"
                           r"(?![0-9A-Za-z]|\.[0-9])"), _ip_valid),
    ("IP", ":", re.compile(r"(?<![0-9A-Za-z:.])(?:[0-9A-Fa-f]{0,4}:){2,7}"
                           r"(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3}|[0-9A-Fa-f]{1,4})?"
                           r"(?![0-9A-Za-z]|:[0-9A-Fa-f]|\.[0-9])"), _ip_valid),
    # With a country code: +1 (555) 123-4567, +44 20 7946 0958, +86 138 0013 8000
    ("PHONE", "+", re.compile(r"\+(?<![0-9A-Za-z+].)[0-9]{1,3}"
                              r"(?:[ .-]?(?:\([0-9]{1,4}\)|[0-9]{1,4})){2,5}" + _RIGHT),
     _phone_valid),
    # North America: (555) 123-4567, 555-123-4567, 555.123.4567
    ("PHONE", "(", _bounded(r"\(", r"[0-9]{3}\)[ .-]?[0-9]{3}[ .-][0-9]{4}"), None),
    ("PHONE", "", _bounded("[0-9]", r"[0-9]{2}[ .-]?[0-9]{3}[ .-][0-9]{4}"), None),
    # China mobile: 13800138000, 138-0013-8000, 138 0013 8000
    ("PHONE", "", _bounded("1", r"[3-9][0-9](?P<sep>[ -]?)[0-9]{4}(?P=sep)[0-9]{4}"), None),
)


def _pii_spans(text: str) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, type) spans to mask, in text order."""
    found, failed_cards = [], []
    for kind, needs, regex, valid in _DETECTORS:
        for m in regex.finditer(text) if needs in text else ():
            if valid is None or valid(m.group()):
                found.append((m.start(), m.end(), kind))
            elif kind == "CARD":
                failed_cards.append(m.span())
    # A digit group that failed the card check is not a phone number either.
    found = [(s, e, k) for s, e, k in found
             if k != "PHONE" or not any(s < fe and fs < e for fs, fe in failed_cards)]
    kept = []
    for s, e, k in sorted(found, key=lambda f: (f[0] - f[1], _PRIORITY[f[2]], f[0])):
        if not any(s < ke and ks < e for ks, ke, _ in kept):
            kept.append((s, e, k))
    return sorted(kept)


def mask_pii(text: str) -> tuple[str, Counter]:
    """Replace emails, phones, IPs, valid card numbers and valid IDs by "<TYPE>"; returns the text
    and how many of each type were masked. Spans are found on the original text and replaced in
    one pass, so nothing is masked twice and a placeholder is never cut into."""
    spans = _pii_spans(text)
    out, pos = [], 0
    for start, end, kind in spans:
        out += [text[pos:start], f"<{kind}>"]
        pos = end
    out.append(text[pos:])
    return "".join(out), Counter(kind for _, _, kind in spans)
