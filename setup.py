"""Only here to compile the C kernels through cffi; project metadata lives in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["kernels/build_cffi.py:ffibuilder"])
