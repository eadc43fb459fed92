import pytest

from sieve_tasks.masking import MEDIUM_PHRASES, make_masker


def test_official_substring_semantics():
    mask = make_masker()
    assert mask("A Photo of a cat") == " a cat"
    assert mask("Images of dogs") == "s of dogs"  # no word boundaries, as the official code
    assert mask("stock photo") == ""
    assert mask("photo stock image") == " "  # spaces remain: such a caption is not empty


def test_phrase_order_is_the_official_one():
    assert MEDIUM_PHRASES[0] == "an image of" and MEDIUM_PHRASES[-1] == "photo"
    # 'a photo of' goes before 'a photo', so the 'of' goes too
    assert make_masker()("a photo of x") == " x"


def test_word_boundary_variant_keeps_longer_words():
    mask = make_masker(mode="word")
    assert mask("Images of dogs") == "Images of dogs"
    assert mask("an image of a dog") == " a dog"


def test_long_list_masks_more():
    assert make_masker("long")("free vector icon of a dog") == "   of a dog"


def test_unknown_options_are_refused():
    with pytest.raises(ValueError, match="phrase list"):
        make_masker("huge")
    with pytest.raises(ValueError, match="masking mode"):
        make_masker(mode="regex")


@pytest.mark.parametrize("phrases", ["medium", "long"])
@pytest.mark.parametrize("mode", ["substring", "word"])
def test_fast_path_equals_every_rule_applied_in_order(phrases, mode):
    """The masker skips a rule whose phrase an ASCII text's lower case lacks: the result must equal applying every
    rule in order, also for texts where removing one phrase makes another, and with Unicode letters that match
    ASCII ones case-insensitively (long s, Kelvin sign, dotless i)."""
    import random
    import re

    from sieve_tasks.masking import PHRASE_LISTS

    boundary = r"\b" if mode == "word" else ""
    patterns = [re.compile(boundary + re.escape(p) + boundary, re.IGNORECASE) for p in PHRASE_LISTS[phrases]]

    def every_rule(text: str) -> str:
        for pattern in patterns:
            text = pattern.sub("", text)
        return text

    rng = random.Random(0)
    pieces = [*PHRASE_LISTS[phrases], "im", "age", "pho", "to", "of", "a", " ", "-", "dog", "STOCK", "Photo",
              "IMAGE", "ſtock", "\u212aey", "ıcon", "İmage", "é", "ÉMAGE", "猫", "x"]
    texts = ["imimageage", "an imaphotoge of", "a photo of x", "phphotooto"]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 9))) for _ in range(5000)]
    mask = make_masker(phrases, mode)
    mismatches = [t for t in texts if mask(t) != every_rule(t)]
    assert not mismatches
    assert sum(every_rule(t) != t for t in texts) > 1000  # the texts do exercise the rules


def test_ascii_lookalikes_are_all_there_are():
    """The masker's fast path relies on this: no character outside ASCII, save ASCII_LOOKALIKES, matches an ASCII
    letter case-insensitively or lower-cases into an ASCII character or into more than one character."""
    import re

    from sieve_tasks.masking import ASCII_LOOKALIKES

    everything = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    matching = {c for c in re.compile("[a-z]", re.IGNORECASE).findall(everything) if not c.isascii()}
    lowering = {c for c in everything if not c.isascii() and (len(c.lower()) != 1 or c.lower().isascii())}
    assert matching | lowering == set(ASCII_LOOKALIKES.pattern.strip("[]"))
