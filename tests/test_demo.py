"""`./run boot` (pykvm.demo) picks the kernel a user can boot soonest on this kind of host."""

import pytest

from pykvm import demo, pvm


@pytest.fixture
def booted(monkeypatch):
    """Replace the assets and the CLI with recorders: what would `./run boot` boot?"""
    calls = []
    monkeypatch.setattr(demo, "cloud_kernel", lambda: "/cache/vmlinuz-cloud")
    monkeypatch.setattr(demo, "test_kernel", lambda: type("K", (), {"bzimage": "/cache/bzImage"}))
    monkeypatch.setattr(demo, "initramfs", lambda: "/cache/initramfs.cpio")
    monkeypatch.setattr(demo.cli, "main", lambda argv: calls.append(argv) or 0)

    def boot(host_kind, *argv):
        monkeypatch.setattr(pvm, "host_kind", lambda: host_kind)
        assert demo.main(list(argv)) == 0
        return calls[-1]
    return boot


@pytest.mark.parametrize("kind", ["Intel VT-x", "AMD-V"])
def test_hardware_virtualization_hosts_boot_the_stock_kernel_without_building(booted, kind):
    argv = booted(kind)
    assert argv[:2] == ["boot", "/cache/vmlinuz-cloud"]
    assert "--until" not in argv      # on to the busybox shell


def test_pvm_hosts_boot_the_test_kernel_up_to_init(booted):
    argv = booted(pvm.KVM_PVM)
    assert argv[:2] == ["boot", "/cache/bzImage"]
    assert argv[argv.index("--until") + 1] == demo.RUN_INIT


def test_the_user_can_choose(booted):
    assert booted("Intel VT-x", "--test-kernel")[1] == "/cache/bzImage"
    assert booted(pvm.KVM_PVM, "--cloud")[1] == "/cache/vmlinuz-cloud"
    assert "--cloud" not in booted(pvm.KVM_PVM, "--cloud", "--memory", "512M")


def test_help_says_what_run_boot_does_and_builds_nothing(monkeypatch, capsys):
    """`./run boot --help`: its own usage, then pykvm boot's options; no asset is built for it
    (the test kernel's first build takes 10-20 minutes)."""
    def no_build():
        raise AssertionError("--help built an asset")
    for name in ("cloud_kernel", "test_kernel", "initramfs"):
        monkeypatch.setattr(demo, name, no_build)
    with pytest.raises(SystemExit) as e:
        demo.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert out.startswith("usage: ./run boot [--cloud | --test-kernel]") and "--memory" in out
