"""Redis keys built from emails and user ids: escaped, hashed when long, never colliding."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from instruqt_crm import keys

ids = st.text(st.characters(exclude_categories=()), min_size=1, max_size=300) | st.sampled_from(
    ["u1", "u1:meta", "a@x.com:events"]
)
BUILDERS = (
    keys.identity,
    keys.parked,
    keys.parked_meta,
    keys.contact,
    keys.contact_events,
    keys.play,
)


@given(first=ids, second=ids)
def test_keys_of_different_ids_never_collide(first: str, second: str) -> None:
    built = [
        (build.__name__, value, build(value)) for build in BUILDERS for value in {first, second}
    ]
    by_key: dict[str, tuple[str, str]] = {}
    for name, value, key in built:
        assert by_key.setdefault(key, (name, value)) == (name, value), key


@given(value=ids)
def test_key_parts_are_short_and_plain(value: str) -> None:
    part = keys.part(value)
    assert len(part) <= keys.MAX_PART
    assert not set(part) & set(":*?[] ") and part.isascii() and part.isprintable()


def test_readable_ids_stay_readable() -> None:
    assert keys.contact("ada@example.com") == "instruqt_crm:contact:ada@example.com"
    assert keys.contact("o'brien+x@example.com") == "instruqt_crm:contact:o'brien+x@example.com"
    assert keys.parked("u1:meta") == "instruqt_crm:parked:u1%3Ameta"
    assert keys.parked("u1:meta") != keys.parked_meta("u1")
    assert keys.part("x" * 500).startswith("sha256-")
    assert keys.part("\ud800") == "%ED%A0%80"  # text Redis could not take, escaped
