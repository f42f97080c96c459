"""Device models. Each gets register accesses at an *offset* into its range and interrupt lines;
none imports the KVM binding. The contract every device follows (see pykvm/bus.py):

    read(offset: int, size: int) -> int
    write(offset: int, size: int, value: int) -> None
"""
