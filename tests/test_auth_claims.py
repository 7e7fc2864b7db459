"""Who may subscribe to what: channel patterns, user channels and the subscribe rules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broadcastd.auth.claims import Claims, Refusal, matches, may_subscribe, users_of

RULES = ("public", "token", "user")


def claims(user: str = "alice", *channels: str) -> Claims:
    return Claims(user=user, expires=None, channels=channels)


@pytest.mark.parametrize(
    ("pattern", "channel", "expected"),
    [
        ("news", "news", True),
        ("news", "news2", False),
        ("news", "new", False),
        ("orders:*", "orders:eu", True),
        ("orders:*", "orders:", True),
        ("orders:*", "orders", False),
        ("orders*", "orders", True),
        ("orders*", "ordersX", True),
        ("*", "anything:at.all", True),
        # Only a trailing * is special: elsewhere it is literal, and as * is not a
        # channel character such a pattern grants no real channel.
        ("a*b", "axb", False),
        ("a*b", "ab", False),
        ("*:news", "eu:news", False),
        ("a*b*", "axbc", False),
        ("", "news", False),
    ],
)
def test_matches(pattern: str, channel: str, expected: bool) -> None:
    assert matches(pattern, channel) is expected


@pytest.mark.parametrize(
    ("channel", "expected"),
    [
        ("news", None),
        ("chat:dm#alice", frozenset({"alice"})),
        ("chat:dm#alice,bob", frozenset({"alice", "bob"})),
        ("a#b#carol", frozenset({"carol"})),  # the last # decides
        ("news#", frozenset()),
        ("news#,alice,,", frozenset({"alice"})),
    ],
)
def test_users_of(channel: str, expected: frozenset[str] | None) -> None:
    assert users_of(channel) == expected


@pytest.mark.parametrize("rule", RULES)
def test_a_user_channel_is_its_users_alone_whatever_the_rule(rule: str) -> None:
    assert may_subscribe(claims("alice"), "dm#alice,bob", rule) is None
    assert may_subscribe(claims("bob"), "dm#alice,bob", rule) is None
    assert may_subscribe(claims("carol", "*"), "dm#alice,bob", rule) == "not_your_channel"
    assert may_subscribe(None, "dm#alice", rule) == "token_required"


@pytest.mark.parametrize("rule", RULES)
def test_a_token_without_sub_owns_no_user_channel(rule: str) -> None:
    assert may_subscribe(claims("", "*"), "news#", rule) == Refusal.NOT_YOUR_CHANNEL
    assert may_subscribe(claims("", "*"), "news#,", rule) == Refusal.NOT_YOUR_CHANNEL


def test_public_channels_need_nothing() -> None:
    assert may_subscribe(None, "news", "public") is None
    assert may_subscribe(claims("alice"), "news", "public") is None


def test_token_channels_need_a_matching_pattern() -> None:
    assert may_subscribe(None, "orders:eu", "token") == "token_required"
    assert may_subscribe(claims("alice"), "orders:eu", "token") == "channel_not_allowed"
    assert may_subscribe(claims("alice", "news", "orders:*"), "orders:eu", "token") is None
    assert may_subscribe(claims("alice", "orders:us"), "orders:eu", "token") == (
        "channel_not_allowed"
    )


def test_user_channels_need_any_valid_token() -> None:
    assert may_subscribe(None, "members:lounge", "user") == "token_required"
    assert may_subscribe(claims("alice"), "members:lounge", "user") is None
    assert may_subscribe(claims("alice"), "members:room#bob", "user") == "not_your_channel"


def test_refusals_are_plain_strings_on_the_wire() -> None:
    refusal = may_subscribe(None, "news", "token")
    assert isinstance(refusal, str)
    assert f"{refusal}" == "token_required"


def test_an_unknown_rule_is_a_bug_not_a_refusal() -> None:
    with pytest.raises(ValueError, match="unknown subscribe rule"):
        may_subscribe(claims(), "news", "everyone")


# A straightforward restatement of the rules, to check the real ones against.


def reference_matches(pattern: str, channel: str) -> bool:
    if pattern[-1:] == "*":
        prefix = pattern[:-1]
        return channel[: len(prefix)] == prefix
    return pattern == channel


def reference_may_subscribe(token: Claims | None, channel: str, rule: str) -> str | None:
    if "#" in channel:
        owners = [user for user in channel.split("#")[-1].split(",") if user != ""]
        if token is None:
            return "token_required"
        return None if token.user in owners else "not_your_channel"
    if rule == "public":
        return None
    if token is None:
        return "token_required"
    if rule == "user":
        return None
    for pattern in token.channels:
        if reference_matches(pattern, channel):
            return None
    return "channel_not_allowed"


# A tiny alphabet so that patterns, channels and users collide often.
small_text = st.text(alphabet="ab:#,*", max_size=8)
users = st.sampled_from(["", "a", "b", "ab", "a,b"])


@st.composite
def pattern_and_channel(draw: st.DrawFn) -> tuple[str, str]:
    channel = draw(small_text)
    pattern = draw(
        st.one_of(
            small_text,
            st.just(channel),
            st.integers(0, len(channel)).map(lambda n: channel[:n] + "*"),
        )
    )
    return pattern, channel


@given(pattern_and_channel())
def test_matches_agrees_with_the_reference(case: tuple[str, str]) -> None:
    pattern, channel = case
    assert matches(pattern, channel) == reference_matches(pattern, channel)


@given(
    st.one_of(
        st.none(),
        st.builds(
            Claims,
            user=users,
            expires=st.none(),
            channels=st.lists(small_text, max_size=4).map(tuple),
        ),
    ),
    small_text,
    st.sampled_from(RULES),
)
def test_may_subscribe_agrees_with_the_reference(
    token: Claims | None, channel: str, rule: str
) -> None:
    assert may_subscribe(token, channel, rule) == reference_may_subscribe(token, channel, rule)
