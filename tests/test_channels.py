"""The channel-name grammar: what is accepted, what is refused and why."""

from __future__ import annotations

import string

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from broadcastd.core.channels import MAX_CHANNEL_LENGTH, check_channel, is_valid_channel
from broadcastd.errors import BadChannel

ALPHABET = string.ascii_letters + string.digits + "_-.:@#"
valid_names = st.text(alphabet=ALPHABET, min_size=1, max_size=MAX_CHANNEL_LENGTH)


@given(valid_names)
def test_every_name_of_the_grammar_is_accepted_unchanged(name: str) -> None:
    assert check_channel(name) == name


@given(st.text(min_size=1, max_size=MAX_CHANNEL_LENGTH))
@example("#")  # once outside the grammar; user channels (ns:room#alice) brought it in
@example(",")
def test_a_name_is_valid_exactly_when_every_character_is_in_the_alphabet(name: str) -> None:
    assert is_valid_channel(name) == all(c in ALPHABET for c in name)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("x" * (MAX_CHANNEL_LENGTH + 1), "longer than"),
        ("a,b", "only letters"),
        ("a/b", "only letters"),
        ("a%2Fb", "only letters"),
        ("a b", "only letters"),
        ("caf\u00e9", "only letters"),
        ("a\nb", "only letters"),
        (7, "string"),
        (None, "string"),
    ],
)
def test_bad_names_are_refused_with_a_reason(name: object, why: str) -> None:
    with pytest.raises(BadChannel, match=why) as caught:
        check_channel(name)
    assert caught.value.code == "bad_channel"


def test_names_are_case_sensitive_and_never_normalised() -> None:
    assert check_channel("News") != check_channel("news")
    assert not is_valid_channel(" news")
