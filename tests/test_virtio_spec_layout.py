"""Register offsets and constants against the VIRTIO 1.2 specification's own tables, written out
here. The mock drivers (pykvm/virtio/mock.py) import their offsets from the transports they
test, so a wrong offset would be wrong on both sides and every mock test would still pass; this
file is the independent check (firmware/virtio_blk.c, with its own #defines, is another)."""

from pykvm.virtio import device as D
from pykvm.virtio import mmio as R
from pykvm.virtio import pci as P
from pykvm.virtio import queue as Q

# 4.2.2 "MMIO Device Register Layout", Table 4.1: name, offset.
MMIO_TABLE = [
    ("MAGIC_VALUE", 0x000), ("VERSION", 0x004), ("DEVICE_ID", 0x008), ("VENDOR_ID", 0x00C),
    ("DEVICE_FEATURES", 0x010), ("DEVICE_FEATURES_SEL", 0x014), ("DRIVER_FEATURES", 0x020),
    ("DRIVER_FEATURES_SEL", 0x024), ("QUEUE_SEL", 0x030), ("QUEUE_NUM_MAX", 0x034),
    ("QUEUE_NUM", 0x038), ("QUEUE_READY", 0x044), ("QUEUE_NOTIFY", 0x050),
    ("INTERRUPT_STATUS", 0x060), ("INTERRUPT_ACK", 0x064), ("STATUS", 0x070),
    ("QUEUE_DESC_LOW", 0x080), ("QUEUE_DESC_HIGH", 0x084), ("QUEUE_DRIVER_LOW", 0x090),
    ("QUEUE_DRIVER_HIGH", 0x094), ("QUEUE_DEVICE_LOW", 0x0A0), ("QUEUE_DEVICE_HIGH", 0x0A4),
    ("SHM_SEL", 0x0AC), ("SHM_LEN_LOW", 0x0B0), ("SHM_LEN_HIGH", 0x0B4), ("SHM_BASE_LOW", 0x0B8),
    ("SHM_BASE_HIGH", 0x0BC), ("QUEUE_RESET", 0x0C0), ("CONFIG_GENERATION", 0x0FC),
    ("CONFIG", 0x100),
]

# 4.1.4.3 struct virtio_pci_common_cfg, field by field in the spec's order: (name, bytes). The
# offsets follow from the sizes (the struct has no padding), not from pykvm.
PCI_COMMON_CFG = [
    ("DEVICE_FEATURE_SELECT", 4), ("DEVICE_FEATURE", 4), ("DRIVER_FEATURE_SELECT", 4),
    ("DRIVER_FEATURE", 4), ("CONFIG_MSIX_VECTOR", 2), ("NUM_QUEUES", 2), ("DEVICE_STATUS", 1),
    ("CONFIG_GENERATION", 1), ("QUEUE_SELECT", 2), ("QUEUE_SIZE", 2), ("QUEUE_MSIX_VECTOR", 2),
    ("QUEUE_ENABLE", 2), ("QUEUE_NOTIFY_OFF", 2), ("QUEUE_DESC", 8), ("QUEUE_DRIVER", 8),
    ("QUEUE_DEVICE", 8),
]


def test_mmio_register_offsets_are_the_specs():
    for name, offset in MMIO_TABLE:
        assert getattr(R, name) == offset, name
    assert R.MMIO_MAGIC == int.from_bytes(b"virt", "little")           # 4.2.2: 0x74726976


def test_pci_common_cfg_offsets_follow_the_specs_struct():
    offset = 0
    for name, size in PCI_COMMON_CFG:
        assert getattr(P, name) == offset, name
        assert P._WIDTH[getattr(P, name)] == size, name
        offset += size
    assert offset == 0x38


def test_pci_ids_and_capability_types():
    assert P.VIRTIO_PCI_VENDOR == 0x1AF4 and P.VIRTIO_PCI_DEVICE_BASE == 0x1040     # 4.1.2
    assert (P.VIRTIO_PCI_CAP_COMMON_CFG, P.VIRTIO_PCI_CAP_NOTIFY_CFG, P.VIRTIO_PCI_CAP_ISR_CFG,
            P.VIRTIO_PCI_CAP_DEVICE_CFG, P.VIRTIO_PCI_CAP_PCI_CFG) == (1, 2, 3, 4, 5)   # 4.1.4
    # struct virtio_pci_cap: cap_vndr, cap_next, cap_len, cfg_type, bar, id, padding[2],
    # le32 offset, le32 length; virtio_pci_cfg_cap appends u8 pci_cfg_data[4].
    assert (P._CAP_BAR, P._CAP_OFFSET, P._CAP_LENGTH, P._CAP_DATA) == (4, 8, 12, 16)


def test_status_bits_feature_bits_and_descriptors():
    assert (D.STATUS_ACKNOWLEDGE, D.STATUS_DRIVER, D.STATUS_DRIVER_OK, D.STATUS_FEATURES_OK,
            D.STATUS_DEVICE_NEEDS_RESET) == (1, 2, 4, 8, 64)                  # 2.1
    assert D.VIRTIO_F_INDIRECT_DESC == 1 << 28 and D.VIRTIO_F_EVENT_IDX == 1 << 29   # 6
    assert D.VIRTIO_F_VERSION_1 == 1 << 32
    # 2.7.5 struct virtq_desc: le64 addr, le32 len, le16 flags, le16 next
    assert Q.DESC.size == Q.DESC_SIZE == 8 + 4 + 2 + 2
    assert Q.DESC.unpack(bytes(range(16))) == (0x0706050403020100, 0x0B0A0908, 0x0D0C, 0x0F0E)
    assert (Q.VIRTQ_DESC_F_NEXT, Q.VIRTQ_DESC_F_WRITE, Q.VIRTQ_DESC_F_INDIRECT) == (1, 2, 4)
