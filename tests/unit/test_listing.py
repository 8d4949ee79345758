"""Where a listing looks, from the caller's patterns (broker/listing.py)."""

from __future__ import annotations

import pytest

from broker.listing import Listing, glob_escaped, listing_for


@pytest.mark.parametrize(
    ("asked", "patterns", "expected"),
    [
        ("", None, Listing("")),  # authorization off: every topic
        ("a", None, Listing("a")),
        ("", [], Listing(None)),  # nothing to see: no walk, no name
        ("", ["tenant1.*"], Listing("tenant1.")),
        ("tenant1.x", ["tenant1.*"], Listing("tenant1.x")),  # ?prefix= narrower
        ("tenant2", ["tenant1.*"], Listing(None)),  # ?prefix= elsewhere
        ("", ["tenant1.*", "tenant12.*"], Listing("tenant1")),  # one walk, shared start
        ("", ["a*", "b*"], Listing("")),  # nothing shared: the whole walk
        ("", ["*"], Listing("")),
        ("", ["pub-*", "news"], Listing("pub-", ("news",))),
        ("", ["pub-*", "pub-x", "news"], Listing("pub-", ("news",))),  # pub-x walked for
        ("n", ["pub-*", "news"], Listing(None, ("news",))),
        ("", ["b", "a", "a"], Listing(None, ("a", "b"))),  # names only: no walk
        ("", ["a?b*", "a b", "x[1]", "*?"], Listing("")),  # "*?" matches no topic, but its walk
        ("", ["a?b*", "a b", "x[1]"], Listing(None)),  # text no topic holds: nothing
        ("", ["x" * 201 + "*"], Listing(None)),
    ],
)
def test_where_a_listing_looks(asked: str, patterns: list[str] | None, expected: Listing) -> None:
    assert listing_for(asked, patterns) == expected


def test_glob_escaped_matches_only_itself() -> None:
    assert glob_escaped("a*b?[c]\\d.e:f-g_h") == "a\\*b\\?\\[c\\]\\\\d.e:f-g_h"
