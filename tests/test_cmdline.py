"""The kernel command line builder."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.boot import BootError, Cmdline
from pykvm.boot.cmdline import split_args


def test_order_is_kept_and_add_appends():
    c = Cmdline("console=ttyS0 quiet")
    c.add("panic", -1).add("earlyprintk", "serial")
    assert str(c) == "console=ttyS0 quiet panic=-1 earlyprintk=serial"


def test_root_rule_user_wins():
    assert str(Cmdline("root=/dev/sda1 ro").add_default("root", "/dev/vda")) == "root=/dev/sda1 ro"
    assert str(Cmdline("ro").add_default("root", "/dev/vda")) == "ro root=/dev/vda"
    # a key that merely starts with "root" is not root=
    assert str(Cmdline("rootwait").add_default("root", "/dev/vda")) == "rootwait root=/dev/vda"
    assert str(Cmdline("rootfstype=ext4").add_default("root", "/dev/vda")).endswith("root=/dev/vda")


def test_init_arguments_stay_after_double_dash():
    c = Cmdline("console=ttyS0 -- single emergency")
    c.add("root", "/dev/vda")
    assert str(c) == "console=ttyS0 root=/dev/vda -- single emergency"
    assert not c.has("single")                      # init's arguments are not kernel keys
    c.extend("init_arg2")
    assert str(c).endswith("-- single emergency init_arg2")


def test_values_with_spaces_are_quoted_and_split_like_the_kernel():
    c = Cmdline().add("dyndbg", "file foo.c +p").add("empty", "")
    assert str(c) == 'dyndbg="file foo.c +p" empty=""'
    assert split_args(str(c)) == ['dyndbg="file foo.c +p"', 'empty=""']
    assert c.get("dyndbg") == "file foo.c +p"


def test_get_and_has():
    c = Cmdline("console=tty0 console=ttyS0 quiet")
    assert c.get("console") == "ttyS0" and c.get("quiet") == "" and c.get("nope") is None
    assert c.has("quiet") and not c.has("quie")


def test_whitespace_is_normalized():
    assert str(Cmdline("  a=1\t\tb  \n c ")) == "a=1 b c"


@pytest.mark.parametrize("key", ["", "a b", "a=b", 'a"', "a\0"])
def test_bad_keys(key):
    with pytest.raises(BootError):
        Cmdline().add(key, "1")


def test_bad_values_and_text():
    with pytest.raises(BootError, match="double quote"):
        Cmdline().add("k", 'a"b')
    with pytest.raises(BootError, match="NUL"):
        Cmdline("a\0b")
    with pytest.raises(BootError, match="unbalanced"):
        Cmdline('a="b c')


def test_encode_length_limit_and_nul():
    c = Cmdline("x" * 10)
    assert c.encode(10) == b"x" * 10 + b"\0"
    with pytest.raises(BootError) as e:
        c.encode(9)
    assert str(e.value).count("\n") == 0 and "10 bytes" in str(e.value) and "at most 9" in str(e.value)
    assert Cmdline().encode(0) == b"\0"


def test_limit_counts_utf8_bytes():
    c = Cmdline("name=é")                  # 7 bytes in UTF-8, 6 characters
    c.encode(7)
    with pytest.raises(BootError):
        c.encode(6)


token = st.text(st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters='"='),
                min_size=1, max_size=8)


@given(st.lists(st.tuples(token, st.one_of(st.none(), st.text(
    st.characters(min_codepoint=32, max_codepoint=126, blacklist_characters='"'), max_size=8))),
    max_size=10))
def test_build_then_parse_round_trip(args):
    c = Cmdline()
    for key, value in args:
        if key == "--":
            continue
        c.add(key, value)
    again = Cmdline(str(c))
    assert str(again) == str(c)
    for key, value in args:
        if key != "--" and value is not None:
            assert again.has(key)
    assert len(c.encode(10_000)) == len(str(c).encode()) + 1
