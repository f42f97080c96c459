"""Stop values: the reason is an enum that still compares equal to its old string."""

import pytest

from pykvm.cli_run import STOP_STATUS
from pykvm.stop import Stop, StopReason


def test_reason_from_string_is_the_enum_and_equals_the_string():
    stop = Stop("until", message="console matched")
    assert stop.reason is StopReason.UNTIL
    assert stop.reason == "until" and f"{stop.reason}" == "until"
    assert Stop(StopReason.EXIT, 3) == Stop("exit", 3)


def test_misspelt_reason_fails_where_the_stop_is_made():
    with pytest.raises(ValueError):
        Stop("untill")


def test_every_reason_has_a_cli_exit_status():
    assert set(STOP_STATUS) == set(StopReason)
