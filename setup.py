"""The direct-spawn helper (src/sandspawn/_spawn.c), built where a C compiler is available.

It is plain C loaded with ctypes (no Python.h). optional=True: without a compiler the package
still installs, and the landlock engine starts payloads from pre-forked children instead
(`sandspawn doctor` shows the spawn_helper fact).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("sandspawn._spawn", ["src/sandspawn/_spawn.c"],
                             extra_compile_args=["-O2", "-Wall"], optional=True)])
