"""LinuxConfig: flat keywords routed to their groups, checks at construction, a dict round trip."""

import json

import pytest

from pykvm.cli_checks import InputError
from pykvm.config import BootConfig, DeviceConfig, LinuxConfig, MachineConfig


def test_flat_keywords_land_in_their_groups():
    c = LinuxConfig.from_options("bzImage", memory="1G", disk="root.img", disk_bus="ide",
                                 append="quiet", until="Run /init")
    assert c.boot == BootConfig("bzImage", append="quiet")
    assert c.machine == MachineConfig(memory=1 << 30)
    assert c.devices == DeviceConfig(disk="root.img", disk_bus="ide")
    assert c.until == "Run /init"
    assert c.replace(rng=True).devices.rng and not c.devices.rng


def test_dict_round_trip_is_json_able():
    c = LinuxConfig.from_options("bzImage", initrd="init.cpio", irqchip="user", net_tap="tap0")
    assert LinuxConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


@pytest.mark.parametrize("options", [dict(memory="1M"), dict(memory="lots"), dict(disk_bus="scsi"),
                                     dict(console="ttyS1"), dict(irqchip="none"),
                                     dict(readonly=True, snapshot=True)])
def test_bad_values_fail_with_one_line_when_made(options):
    with pytest.raises(InputError) as e:
        LinuxConfig.from_options("bzImage", **options)
    assert "\n" not in str(e.value)


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="disck"):
        LinuxConfig.from_options("bzImage", disck="root.img")


def test_too_little_memory_names_the_amount_as_given():
    """`memory=512` is 512 bytes, not the 512 MiB QEMU's -m would read: the error says so, where it
    once said "0 MiB"."""
    with pytest.raises(InputError, match=r"^512 bytes of memory is too little for Linux: give at "
                                         r"least 32 MiB \(--memory; a number with no K, M, G or T"):
        LinuxConfig.from_options("bzImage", memory="512")
    with pytest.raises(InputError, match=r"^4 KiB of memory .*\(--memory\)$"):
        LinuxConfig.from_options("bzImage", memory=4096)


def test_a_bad_until_pattern_fails_when_made():
    """Before any VM is built: LinuxVM compiles `until` only after its machine exists."""
    with pytest.raises(InputError, match=r"^until '\(' is not a valid regular expression"):
        LinuxConfig.from_options("bzImage", until="(")


def test_a_bad_until_pattern_for_a_restore_is_said_as_such(tmp_path):
    """Not "its VM configuration does not fit this pykvm": the pattern is checked first."""
    from pykvm import LinuxVM
    with pytest.raises(InputError, match=r"^until '\(' is not a valid regular expression"):
        LinuxVM.restore(tmp_path / "vm.snap", until="(")
