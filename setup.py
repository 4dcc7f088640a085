# The native extension (csrc/, driven through CMakeLists.txt) is added by the native-build work; until then the
# package is pure Python and this file only lets `pip install --no-build-isolation -e .` use setuptools.
from setuptools import setup

setup()
