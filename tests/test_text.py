import random
import re
from collections import Counter

import pytest

from deepkiln.text import (CJK_RE, CN_ID_CHECK, CN_ID_WEIGHTS, PII_TYPES, QUALITY_RULES,
                           QualityArgs, cn_id_valid, dup_ngram, flagged_lists, flagged_ratio, language,
                           luhn_valid, mask_pii, mean_word_length, normalize, quality_reason, remove_urls,
                           strip_markup, top_ngram, units)

EN = ("The old lighthouse stood at the edge of the cliff for more than a century, guiding fishing "
      "boats safely into the harbor during storms. Every evening the keeper climbed the narrow "
      "spiral staircase, trimmed the wick, and polished the heavy brass lens until it gleamed. "
      "When electric lamps finally replaced the oil burners, the town held a small ceremony, and "
      "many families who had depended on that light came to thank him for his years of careful "
      "work.")
ZH = ("秋天的傍晚，我们沿着河边慢慢散步。微风吹过，岸边的柳树轻轻摇动，水面上泛起一圈圈细小的波纹。"
      "远处的山在夕阳下显得格外安静，几只归巢的鸟从头顶飞过。走累了，我们就在石凳上坐下，"
      "一边喝着热茶，一边聊起小时候在乡下度过的那些日子。")
WORDS = EN.replace(",", "").replace(".", "").split()
PLACEHOLDER_RE = re.compile("<(?:" + "|".join(PII_TYPES) + ")>")


def cn_id(first17: str) -> str:
    return first17 + CN_ID_CHECK[sum(int(d) * w for d, w in zip(first17, CN_ID_WEIGHTS)) % 11]


# ---------------------------------------------------------------------------------- units, text

def test_units_split_cjk_per_character_and_latin_per_word_run():
    assert units("我爱Python 3.11和NLP!") == ["我", "爱", "Python", "3", "11", "和", "NLP"]
    assert units("한국어 テスト") == ["한", "국", "어", "テ", "ス", "ト"]
    assert all(CJK_RE.fullmatch(c) for c in "漢かカ한") and not CJK_RE.search("abc é 1")


def test_normalize_nfkc_controls_newlines_and_blank_lines():
    assert normalize("ＡＢＣ１２３") == "ABC123"
    assert normalize("\ufeffzero\u200bwidth\u200c join\u200der\u2060\x00\x07") == "zerowidth joiner"
    assert normalize("a\r\nb\rc") == "a\nb\nc"
    assert normalize("\n\n  first  \n\n\n\n\nsecond\t \n\n\n") == "  first\n\nsecond"
    assert normalize("tab\there") == "tab\there"


def test_normalize_keeps_code_indentation():
    code = "    def f(x):\n        if x:\n\n            return 1\n        return 2"
    assert normalize(code + "   \r\n\r\n") == code


def test_remove_urls_counts_and_keeps_sentence_punctuation():
    text = "See https://example.com/a?b=1&c=2. Or www.foo.org/x, or (HTTP://a.io/p)."
    assert remove_urls(text) == ("See . Or , or ().", 3)
    assert remove_urls("访问https://example.com/docs获取更多信息") == ("访问获取更多信息", 1)
    plain = "no links here, just www and http"
    assert remove_urls(plain) == (plain, 0)


# -------------------------------------------------------------------------------------- quality

def test_real_prose_is_kept_in_english_and_chinese():
    args = QualityArgs()
    assert len(units(EN)) >= 60 and len(units(ZH)) >= 80
    assert quality_reason(EN, args) is None
    assert quality_reason(ZH, args) is None
    assert quality_reason(EN + "\n\n" + ZH, args) is None


def test_mean_word_length_is_skipped_for_chinese():
    text = ZH + "详见第1章第2节。"  # units "1" and "2" alone would fail the 3-letter minimum
    assert all(len(w) == 1 for w in units(text))
    assert not mean_word_length(text, units(text), QualityArgs())
    assert quality_reason(text, QualityArgs()) is None


def test_rule_names_and_order():
    assert [name for name, _ in QUALITY_RULES] == [
        "too_short", "too_long", "symbol_ratio", "alpha_ratio", "mean_word_length", "digit_ratio",
        "bullet_lines", "ellipsis_lines", "dup_lines", "dup_line_chars", "top_ngram", "dup_ngram"]


REPEATED_EN = "please remember to water the garden before you leave"
REPEATED_ZH = "请记得出门前给花园浇水。"
JUNK = [  # (rule expected to drop it, text)
    ("too_short", "Click here to subscribe."),
    ("too_short", "你好，世界。"),
    ("too_long", " ".join([EN] * 40)),
    ("symbol_ratio", " ".join("#" + w for w in WORDS)),
    ("alpha_ratio", "Totals: " + " ".join(str(n * 7919 % 10007) for n in range(60))),
    ("mean_word_length", " ".join("a b c d e f g h i j k l m n o p".split() * 4)),
    ("mean_word_length", " ".join("".join(WORDS[i:i + 4]) for i in range(0, 72, 2))),
    ("digit_ratio", "Codes: " + " ".join(f"ref{n * 7919 % 1000003:06d}" for n in range(40))),
    ("bullet_lines", "\n".join(f"- {' '.join(WORDS[i:i + 5])}" for i in range(0, 60, 5))),
    ("ellipsis_lines", "\n".join(" ".join(WORDS[i:i + 12]) + "..." for i in range(0, 60, 12))),
    ("dup_lines", "\n".join(["Home", "About us", "Contact"] * 3 + [EN])),
    ("dup_line_chars", "\n".join([EN] * 3 + ["a", "b", "c", "d", "e", "f", "g"])),
    ("top_ngram", " ".join(f"buy now {a} {b}" for a, b in zip(WORDS[:30], WORDS[30:60]))),
    ("top_ngram", "点击这里购买" * 10 + ZH),
    ("dup_ngram", f"{EN} {REPEATED_EN} and {REPEATED_EN}, {REPEATED_EN}."),
    ("dup_ngram", ZH + REPEATED_ZH * 3),
]


@pytest.mark.parametrize("expected, text", JUNK, ids=[f"{rule}-{i}" for i, (rule, _) in
                                                      enumerate(JUNK)])
def test_junk_is_dropped_by_the_expected_rule(expected, text):
    assert quality_reason(text, QualityArgs()) == expected


def test_thresholds_come_from_args():
    assert quality_reason(EN, QualityArgs(min_units=len(units(EN)) + 1)) == "too_short"
    long_doc = " ".join([EN] * 40)
    assert quality_reason(long_doc, QualityArgs(max_units=10**5)) == "dup_ngram"
    relaxed = QualityArgs(max_units=10**5, max_dup_ngram_char_ratio={})
    assert quality_reason(long_doc, relaxed) is None


def ngram_shares(words, n):
    """Plain-loop reference: (top n-gram, repeated n-grams) shares of the unit characters."""
    grams = list(zip(*[words[i:] for i in range(n)]))
    counts, total = Counter(grams), sum(map(len, words))
    top = max(counts.values())
    top_chars = max(sum(map(len, g)) for g in grams if counts[g] == top)
    covered = {i + j for i, g in enumerate(grams) if counts[g] > 1 for j in range(n)}
    dup_chars = sum(len(words[i]) for i in covered)
    return (top * top_chars / total if top > 1 else 0.0), dup_chars / total


def test_vectorised_ngram_rules_match_a_plain_loop():
    rng = random.Random(0)
    for _ in range(20):
        words = rng.choices(["a", "bb", "ccc", "dddd", "e", "ff"], k=rng.randint(10, 40))
        for n in range(2, 11):
            top, dup = ngram_shares(words, n)
            for rule, field, share in ((top_ngram, "max_top_ngram_char_ratio", top),
                                       (dup_ngram, "max_dup_ngram_char_ratio", dup)):
                assert not rule("", words, QualityArgs(**{field: {n: share + 1e-9}}))
                assert rule("", words, QualityArgs(**{field: {n: share - 1e-9}})) or not share


# ------------------------------------------------------------------------------------------ PII

@pytest.mark.parametrize("valid, changed", [
    ("4111 1111 1111 1111", "4111 1111 1111 1112"),
    ("5500-0000-0000-0004", "5500-0000-0000-0005"),
    ("378282246310005", "378282246310006"),
    ("4111111111111111", "4111111111111121"),
])
def test_card_masked_only_when_luhn_valid(valid, changed):
    assert luhn_valid(valid.replace(" ", "").replace("-", ""))
    assert not luhn_valid(changed.replace(" ", "").replace("-", "")) and not luhn_valid("")
    assert mask_pii(f"Paid with {valid} today.") == ("Paid with <CARD> today.", {"CARD": 1})
    text = f"Paid with {changed} today."
    assert mask_pii(text) == (text, {})


def test_failed_card_is_not_reread_as_a_phone():
    # "123 456 7890" inside is phone-shaped; the whole group is a card candidate.
    assert mask_pii("acct 4000 123 456 7899") == ("acct <CARD>", {"CARD": 1})
    assert mask_pii("acct 4000 123 456 7890") == ("acct 4000 123 456 7890", {})


@pytest.mark.parametrize("phone", [
    "+1 (555) 123-4567", "555-123-4567", "(555) 123-4567", "555.123.4567", "+44 20 7946 0958",
    "+86 138 0013 8000", "13800138000", "138-0013-8000",
])
def test_phones_are_masked(phone):
    assert mask_pii(f"Call {phone} after 6pm.") == ("Call <PHONE> after 6pm.", {"PHONE": 1})


def test_overlaps_longer_span_wins_then_priority():
    assert mask_pii("Write to 555-123-4567@example.com") == ("Write to <EMAIL>", {"EMAIL": 1})
    both = next(i for i in (cn_id(f"31010519491231{n:03d}") for n in range(1000))
                if i[-1] != "X" and luhn_valid(i))
    assert cn_id_valid(both) and mask_pii(f"no. {both}") == ("no. <CARD>", {"CARD": 1})


def test_phone_in_brackets_keeps_the_brackets_balanced():
    assert mask_pii("(+44 20 7946 0958)")[0] == "(<PHONE>)"
    assert mask_pii("UK: +44 (0)20 7946 0958.")[0] == "UK: <PHONE>."


def test_email_and_phone_inside_chinese_text():
    text = "请联系 zhang.wei@example.com 或拨打 13800138000"
    assert mask_pii(text) == ("请联系 <EMAIL> 或拨打 <PHONE>", {"EMAIL": 1, "PHONE": 1})
    assert mask_pii("邮箱li.na+cv@mail.example.cn电话13912345678谢谢")[0] == "邮箱<EMAIL>电话<PHONE>谢谢"


def test_emails_and_ips_are_masked():
    text = ("Mail john.doe+news@mail.example.co.uk or ops@example.org. Hosts 192.168.1.20, "
            "10.0.0.1, 2001:db8::1, fe80::1ff:fe23:4567:890a and ::ffff:192.0.2.1 are internal.")
    assert mask_pii(text) == ("Mail <EMAIL> or <EMAIL>. Hosts <IP>, <IP>, <IP>, <IP> and <IP> are "
                              "internal.", {"EMAIL": 2, "IP": 5})
    assert mask_pii("bad 256.1.1.1 and 1:2:3")[1] == {}


def test_ids_chinese_and_ssn():
    valid = cn_id("11010519491231002")
    assert valid[-1] == "X"  # the GB 11643 sample ID
    assert cn_id_valid(valid) and cn_id_valid(valid.lower())
    assert mask_pii(f"身份证号{valid}，SSN 123-45-6789.") == ("身份证号<ID>，SSN <ID>.", {"ID": 2})
    wrong_check = valid[:-1] + "1"
    bad_date = cn_id("11010519491331002")  # month 13, correct check char
    assert not cn_id_valid(wrong_check) and not cn_id_valid(bad_date)
    for text in (f"ID {wrong_check}", f"ID {bad_date}", "SSN 000-12-3456, 666-12-3456, "
                 "900-12-3456, 123-00-4567, 123-45-0000"):
        assert mask_pii(text) == (text, {})


def test_dates_years_prices_versions_times_and_code_are_not_masked():
    text = ("On 2024-01-15 at 10:30:45 (2024/01/15, 15.01.2024, 2024年1月15日) we paid $1,299.99 "
            "or ¥5999 for 3 items in 2024; Python 3.11.4, v2.4.1, build 10.0.19041, a[1::2], "
            "x[10::], std::vector, 1234567890, page 12-34.")
    assert mask_pii(text) == (text, {})


def test_masking_is_idempotent_and_placeholders_whole():
    text = ("Contact ann@corp.io, +1 (555) 123-4567, card 4111-1111-1111-1111, host 10.1.2.3, "
            "SSN 123-45-6789, 请拨打13800138000 或 2001:db8::1.")
    once, counts = mask_pii(text)
    assert counts == {"EMAIL": 1, "PHONE": 2, "CARD": 1, "IP": 2, "ID": 1}
    assert mask_pii(once) == (once, {})
    rest = PLACEHOLDER_RE.sub("", once)
    assert "<" not in rest and ">" not in rest and not re.search(r"\d", rest)


# ------------------------------------------------------------------------------ markup, language, flagged

def test_markup_is_removed_whole_and_every_cjk_character_kept():
    raw = ("\x1b[33m  -- \x1b[32m《静夜思》\x1b[m 床前明月光，疑是地上霜。^[[1;31m举头望明月^[[0m\n"
           "<p>低头思故乡&nbsp;&amp; home</p><br/><div class=\"x\">Tom &lt;3 Jerry</div> &#x4e2d;&#25991;"
           "<!-- hidden --><script>var x = '<b>';</script> \x1b]0;title\x07python <stdin> List<int> a < b")
    clean, found = strip_markup(raw)
    out = normalize(clean)
    assert found == {"ansi": 6, "html_blocks": 2, "html_tags": 5, "html_entities": 5}, found
    assert not re.search(r"\x1b|\^\[|\[\d*(;\d+)*m|&\w+;|<(p|div|br|script)|hidden|var x", out), out
    cjk = "".join(CJK_RE.findall(raw))
    assert "".join(CJK_RE.findall(out)) == cjk + "中文"  # every CJK character kept, entities decoded
    assert "Tom <3 Jerry" in out and "<stdin> List<int> a < b" in out and "低头思故乡 & home" in out
    plain = "No markup here: 3 < 4 & 5 > 2, [33m stays without its ESC."
    assert strip_markup(plain) == (plain, {})
    docs = 'The prompt defaults to "<input>"; def gen(<arguments>): yield <value>; pick a <select> box.'
    assert strip_markup(docs) == (docs, {})  # placeholders in documentation, not HTML


@pytest.mark.parametrize("lang, sample", [
    ("zh", "床前明月光，疑是地上霜。举头望明月，低头思故乡。这是一首关于思念家乡的诗。"),
    ("zh", "學而時習之，不亦說乎？有朋自遠方來，不亦樂乎？人不知而不慍，不亦君子乎？"),
    ("en", "The quick brown fox jumps over the lazy dog while the farmer watches from the porch."),
    ("ja", "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。"),
    ("ru", "Я помню чудное мгновенье: передо мной явилась ты, как мимолётное виденье."),
    ("de", "Der schnelle braune Fuchs springt über den faulen Hund und läuft in den Wald."),
    ("fr", "Le renard brun rapide saute par-dessus le chien paresseux et court vers la forêt."),
])
def test_language_ids_are_right_on_a_multilingual_sample(lang, sample):
    found, share = language(sample)
    assert found == lang and share > 0.9


def test_language_of_nothing_is_und():
    assert language("") == ("und", 0.0) and language("12345 67 ... !!!")[0] in ("und", "en")


def test_flagged_words_cover_words_whole_and_cjk_per_character():
    flagged = flagged_lists(["Damn", "他妈的", "他妈", "# a comment", ""])
    assert flagged == (frozenset({"damn"}), ("他妈的", "他妈"))
    doc = "你他妈的真是 damn good, DAMN it; damnation is fine"
    words = units(doc)
    # 3 CJK characters of "他妈的" (its shorter entry not counted again) + "damn" twice, of 13 units.
    assert flagged_ratio(doc, words, flagged) == pytest.approx(5 / len(words))
    assert flagged_ratio("一切正常 all fine", units("一切正常 all fine"), flagged) == 0


def test_language_mix_lists_the_commonest_and_sums_the_rest():
    from deepkiln.text import language_mix

    mix = {"zh": 450, "en": 350, "ja": 100, "fr": 50, "de": 20, "ru": 10, "ko": 8, "es": 6, "it": 4, "pt": 2}
    assert language_mix(mix, 1000, shown=3) == "zh 450 (45%), en 350 (35%), ja 100 (10%), 7 others 100 (10%)"
    assert language_mix({"en": 3}, 3) == "en 3 (100%)" and language_mix({}, 0) == ""
