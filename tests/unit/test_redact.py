import pytest

from mino_jupyter.redact import MASK, Redactor, mask


def feed_all(secrets, chunks):
    r = Redactor(secrets)
    return "".join(r.feed(c) for c in chunks) + r.flush()


@pytest.mark.parametrize("chunks", [
    ["token=hunter2!"], ["token=hun", "ter2!"], ["token=h", "u", "n", "t", "e", "r", "2", "!"], ["token=hunter", "2"],
])
def test_secret_split_across_chunks_is_masked(chunks):
    out = feed_all(["hunter2"], chunks)
    assert "hunter2" not in out and MASK in out and out.startswith("token=")


def test_partial_prefix_that_is_not_the_secret_is_released():
    r = Redactor(["hunter2"])
    assert r.feed("a hun") == "a "
    assert r.feed("gry cat") == "hungry cat"
    assert r.flush() == ""


def test_several_secrets_longest_first_and_none():
    assert mask("ab abc", ["ab", "abc"]) == f"{MASK} {MASK}"
    assert mask("plain", []) == "plain"
    assert feed_all([""], ["x"]) == "x"
