"""Generates convo's gRPC stubs from the repository's proto/ at build time.

The generated modules land in the build tree as the top-level package
`convo.v1` (the proto's own package), with `.pyi` type stubs from
mypy-protobuf, and go into the wheel beside `convo_client`.
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PROTO_FILE = "convo/v1/convo.proto"


def proto_root() -> Path:
    # A checkout keeps the contract two levels up; an sdist carries a copy.
    for candidate in (HERE / "proto", HERE.parent.parent / "proto"):
        if (candidate / PROTO_FILE).is_file():
            return candidate
    raise SystemExit(f"cannot find {PROTO_FILE} in ./proto or ../../proto")


def plugin(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    if not found:
        raise SystemExit(f"{name} not found: is mypy-protobuf installed in the build environment?")
    return found


class BuildWithStubs(build_py):
    def run(self):
        super().run()
        from grpc_tools import protoc
        import grpc_tools

        out = Path(self.build_lib)
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root()}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--plugin=protoc-gen-mypy={plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={plugin('protoc-gen-mypy_grpc')}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            PROTO_FILE,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed on " + PROTO_FILE)
        for package in (out / "convo", out / "convo" / "v1"):
            (package / "__init__.py").touch()


setup(cmdclass={"build_py": BuildWithStubs})
