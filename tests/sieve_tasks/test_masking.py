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
