"""Builds the optional C fold kernel; everything else is declared in pyproject.toml."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "lifl._foldc",
            sources=["lifl/_foldc.c"],
            extra_compile_args=["-O3", "-std=c11", "-fno-math-errno"],
            optional=True,  # without a C compiler lifl.fold uses numpy
        )
    ]
)
