"""Checks shared by the virtio transport fuzz tests (mmio and pci): what must hold after any
sequence of register accesses, however wrong (virtio 1.2, 2.1 "Device Status Field", 4.x)."""

from pykvm.virtio.device import STATUS_DRIVER_OK, STATUS_FEATURES_OK


def assert_transport_sound(t, dev, mem, irq) -> None:
    """The interrupt line follows the interrupt status; DRIVER_OK implies FEATURES_OK; only a
    device the driver set live is active; every ready queue lies in RAM, properly aligned."""
    assert irq.level == (t.interrupt_status != 0)
    if t.status & STATUS_DRIVER_OK:
        assert t.status & STATUS_FEATURES_OK
    if dev.active:
        assert t.status & STATUS_DRIVER_OK
    for q in dev.queues:
        if q.ready:
            assert q.check(mem) is None


def assert_recovers(drv) -> None:
    """After a reset and a clean initialisation the device works, whatever came before."""
    drv.queues.clear()
    drv.init()
    head = drv.queues[0].add_chain([], [4])
    drv.kick(0)
    assert drv.queues[0].take_used() == [(head, 4)]
