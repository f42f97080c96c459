# The cffi extension (csrc/build_ffi.py) is compiled against the system's <linux/kvm.h> at install
# time; everything else about the package is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["csrc/build_ffi.py:ffibuilder"])
