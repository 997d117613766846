"""Build hook: compiles csrc/ into sevcore._native through cffi (out-of-line API mode)."""
from setuptools import setup

setup(cffi_modules=["csrc/build_native.py:ffibuilder"])
