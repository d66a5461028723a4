"""Generated gRPC code for the wire contracts in `proto/memlm/v1/*.proto`, built on demand.

The generated modules are build output, never edited or committed: the first import of
`memlm.protos.<name>_pb2` (or `<name>_pb2_grpc`) runs `grpc_tools.protoc` into
`memlm/_proto/` (gitignored) when a generated file is missing or older than its .proto,
then imports it:

    from memlm.protos import store_pb2, store_pb2_grpc

protoc names the modules after the .proto's path, `memlm.v1.store_pb2`, and the generated
`_pb2_grpc` files import each other by that name. So the output folder
`memlm/_proto/memlm` is added to the `memlm` package's search path, which makes
`memlm.v1` the generated package without rewriting any generated line.

Also here: `to_tensor`/`from_tensor`, the raw-bytes array codec every service uses.
"""

from __future__ import annotations

import importlib
import math
import os
import tempfile
import threading
from importlib import resources
from pathlib import Path
from types import ModuleType

import numpy as np

import memlm

PROTO_DIR = Path(__file__).resolve().parent.parent / "proto"
OUT_DIR = Path(__file__).resolve().parent / "_proto"
PACKAGE = "memlm/v1"  # where the .proto files live under PROTO_DIR, and their proto package

_build_lock = threading.Lock()


def _generated_files(name: str) -> list[Path]:
    folder = OUT_DIR / PACKAGE
    return [folder / f"{name}_pb2.py", folder / f"{name}_pb2.pyi", folder / f"{name}_pb2_grpc.py"]


def build(name: str, force: bool = False) -> None:
    """Run protoc for `proto/memlm/v1/<name>.proto` unless its generated code is up to date."""
    source = PROTO_DIR / PACKAGE / f"{name}.proto"
    outputs = _generated_files(name)
    if not source.exists():
        if all(path.exists() for path in outputs):
            return  # an installed copy without the .proto sources: use what was built
        raise FileNotFoundError(f"no proto file {source}")
    with _build_lock:
        mtime = source.stat().st_mtime
        if not force and all(path.exists() and path.stat().st_mtime >= mtime for path in outputs):
            return
        from grpc_tools import protoc  # build-time dependency only

        OUT_DIR.mkdir(parents=True, exist_ok=True)
        # Generate into a private folder and rename into place, so that two processes
        # building at once (a test and the server it starts) never import a half-written file.
        with tempfile.TemporaryDirectory(dir=OUT_DIR) as tmp:
            args = [
                "grpc_tools.protoc",
                f"-I{PROTO_DIR}",
                f"-I{resources.files('grpc_tools') / '_proto'}",  # google/protobuf/*.proto
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                str(source),
            ]
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed on {source}: {' '.join(args)}")
            (OUT_DIR / PACKAGE).mkdir(parents=True, exist_ok=True)
            for path in outputs:
                os.replace(Path(tmp) / PACKAGE / path.name, path)


def load(module: str) -> ModuleType:
    """`load("store_pb2")` -> the module `memlm.v1.store_pb2`, built first if needed."""
    name = module.removesuffix("_grpc").removesuffix("_pb2")
    build(name)
    generated_root = str(OUT_DIR / "memlm")
    if generated_root not in memlm.__path__:
        memlm.__path__.append(generated_root)
    return importlib.import_module(f"memlm.v1.{module}")


def __getattr__(attribute: str) -> ModuleType:
    """`from memlm.protos import store_pb2` builds and imports on first use (PEP 562)."""
    if attribute.endswith(("_pb2", "_pb2_grpc")):
        module = load(attribute)
        globals()[attribute] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")


# -- auth metadata --------------------------------------------------------------------------


AUTH_METADATA = "authorization"


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata a client sends to a server that asks for a bearer token (empty without one)."""
    return ((AUTH_METADATA, f"Bearer {token}"),) if token else ()


# -- raw-bytes arrays -----------------------------------------------------------------------


def to_tensor(array: np.ndarray, tensor=None):
    """numpy -> `memlm.v1.Tensor` (little-endian bytes, C order). Fills `tensor` if given
    (a field of a message being built), else returns a new one."""
    if tensor is None:
        tensor = load("store_pb2").Tensor()
    array = np.asarray(array)
    # ascontiguousarray returns at least 1-d: reshape, so that 0-d arrays (scalars in a
    # memory's state) come back 0-d.
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).reshape(array.shape)
    tensor.dtype = array.dtype.name
    tensor.shape[:] = array.shape
    tensor.data = array.tobytes()
    return tensor


def from_tensor(tensor, name: str, dtypes: tuple[str, ...], ndim: int | None = None) -> np.ndarray:
    """`memlm.v1.Tensor` -> read-only numpy array without a copy. Raises ValueError that says
    what is wrong (the services answer it with INVALID_ARGUMENT)."""
    if tensor.dtype not in dtypes:
        raise ValueError(f"{name}: dtype {tensor.dtype or '(unset)'!r} is not accepted; send {' or '.join(dtypes)}")
    shape = tuple(tensor.shape)
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {list(shape)}")
    if any(size < 0 for size in shape):
        raise ValueError(f"{name}: negative size in shape {list(shape)}")
    dtype = np.dtype(tensor.dtype).newbyteorder("<")
    expected = math.prod(shape) * dtype.itemsize
    if len(tensor.data) != expected:
        raise ValueError(
            f"{name}: shape {list(shape)} of {tensor.dtype} needs {expected} bytes, got {len(tensor.data)}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
