"""The committed generated code is exactly what ``protos/generate.py`` makes, and the contract's style.

If the first test fails, run ``python protos/generate.py`` (with the pinned grpcio-tools) and commit
the result. The floors in pyproject.toml must match what the generated code checks at import.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "protos"
COMMITTED = PROTO_ROOT / "mfserve" / "v1"
PROTO = COMMITTED / "recommender.proto"
GENERATED = ("recommender_pb2.py", "recommender_pb2_grpc.py", "recommender_pb2.pyi")


def _load_generate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_mfserve_generate", PROTO_ROOT / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dependencies() -> list[str]:
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
    with (ROOT / "pyproject.toml").open("rb") as handle:
        project = tomllib.load(handle)["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["dev"]]


def _pinned(name: str, operator: str) -> str:
    pattern = re.compile(rf"^{re.escape(name)}\s*{re.escape(operator)}\s*([0-9][0-9A-Za-z.]*)")
    found = [m.group(1) for d in _dependencies() if (m := pattern.match(d.split("#")[0].strip()))]
    assert len(found) == 1, f"expected one '{name}{operator}X' in pyproject.toml, found {found}"
    return found[0]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("grpc_tools", reason="grpcio-tools is the [dev] extra")
    pinned = _pinned("grpcio-tools", "==")
    installed = metadata.version("grpcio-tools")
    assert installed == pinned, (
        f"grpcio-tools {installed} is installed but pyproject pins {pinned}; "
        "the comparison below only means something with the pinned generator"
    )
    out = tmp_path_factory.mktemp("generated")
    _load_generate().generate(out)
    return out / "mfserve" / "v1"


@pytest.mark.parametrize("name", GENERATED)
def test_committed_code_is_what_generate_makes(regenerated: Path, name: str) -> None:
    fresh = (regenerated / name).read_bytes()
    committed = (COMMITTED / name).read_bytes()
    assert fresh == committed, (
        f"protos/mfserve/v1/{name} differs from what protos/generate.py makes now: "
        "run `python protos/generate.py` and commit the result"
    )


def test_protobuf_floor_matches_the_generated_runtime_check() -> None:
    text = (COMMITTED / "recommender_pb2.py").read_text(encoding="utf-8")
    match = re.search(
        r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*"
        r"(\d+),\s*(\d+),\s*(\d+),\s*'([^']*)'",
        text,
    )
    assert match, "recommender_pb2.py has no ValidateProtobufRuntimeVersion call"
    major, minor, patch, suffix = match.groups()
    assert _pinned("protobuf", ">=") == f"{major}.{minor}.{patch}{suffix}"


def test_grpcio_floor_matches_the_generated_version_check() -> None:
    text = (COMMITTED / "recommender_pb2_grpc.py").read_text(encoding="utf-8")
    match = re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'$", text, re.MULTILINE)
    assert match, "recommender_pb2_grpc.py has no GRPC_GENERATED_VERSION"
    assert _pinned("grpcio", ">=") == match.group(1)
    assert _pinned("grpcio-tools", "==") == match.group(1)


# -- style of the contract ----------------------------------------------------------------


@pytest.fixture(scope="module")
def source_info(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorProto:
    """The .proto parsed by protoc with its comments (the runtime descriptor drops them)."""
    protoc = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools is the [dev] extra")
    out = tmp_path_factory.mktemp("descriptor") / "recommender.binpb"
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={include}",
        "--include_source_info",
        f"--descriptor_set_out={out}",
        "mfserve/v1/recommender.proto",
    ]
    assert protoc.main(args) == 0
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    [proto] = files.file
    return proto


def _comments(proto: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    return {
        tuple(location.path): location.leading_comments.strip()
        for location in proto.source_code_info.location
    }


def _fields(
    messages: list[descriptor_pb2.DescriptorProto], path: tuple[int, ...], prefix: str
) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, source path) of every field of every message, nested ones included."""
    for m, message in enumerate(messages):
        here = (*path, m)
        if message.options.map_entry:  # synthesised for a map<> field; not in the source
            continue
        for f, field in enumerate(message.field):
            yield f"{prefix}{message.name}.{field.name}", (*here, 2, f)
        yield from _fields(list(message.nested_type), (*here, 3), f"{prefix}{message.name}.")


def test_every_field_and_rpc_has_a_comment(
    source_info: descriptor_pb2.FileDescriptorProto,
) -> None:
    comments = _comments(source_info)
    fields = list(_fields(list(source_info.message_type), (4,), ""))
    rpcs = [
        (f"{service.name}.{method.name}", (6, s, 2, r))
        for s, service in enumerate(source_info.service)
        for r, method in enumerate(service.method)
    ]
    assert len(fields) > 20 and len(rpcs) == 7  # the walk found the contract
    undocumented = [name for name, path in [*fields, *rpcs] if not comments.get(path)]
    assert not undocumented, f"no comment line above: {undocumented}"
    messages = [(m.name, (4, i)) for i, m in enumerate(source_info.message_type)]
    services = [(s.name, (6, i)) for i, s in enumerate(source_info.service)]
    assert not [name for name, path in [*messages, *services] if not comments.get(path)]


# How a field's comment opens, as googleapis marks field behaviour: a request field is Required or
# Optional with its default; a response field is Always set or says its Default (empty, 0, unset).
REQUEST_FIELD = re.compile(r"^(Required( unless [^.]+)?\.|Optional; default )")
REQUEST_PARTS = {"Interaction"}  # messages that only ever travel inside a request
RESPONSE_FIELD = re.compile(r"^(Always set|Default )")


def test_every_field_comment_states_its_default(
    source_info: descriptor_pb2.FileDescriptorProto,
) -> None:
    comments = _comments(source_info)
    messages = {m.name: m for m in source_info.message_type}
    wrong = []
    for name, path in _fields(list(source_info.message_type), (4,), ""):
        message, field_name = name.split(".", 1)
        field = next(f for f in messages[message].field if f.name == field_name)
        text = comments[path]
        if field.options.deprecated:
            ok = text.startswith("Deprecated; default ")
        elif message.endswith("Request") or message in REQUEST_PARTS:
            ok = bool(REQUEST_FIELD.match(text))
        else:
            ok = bool(RESPONSE_FIELD.match(text))
        if not ok:
            wrong.append(f"{name}: {text.splitlines()[0]!r}")
    assert not wrong, "field comments that do not open with their default:\n" + "\n".join(wrong)


def test_one_convention_for_unknown_ids(source_info: descriptor_pb2.FileDescriptorProto) -> None:
    """Responses report unknown ids as missing_user_ids / missing_item_ids; TopK's older mixed
    missing_ids stays (deprecated, never renumbered) for old clients."""
    numbers = {
        (m.name, f.name): (f.number, f.options.deprecated)
        for m in source_info.message_type
        for f in m.field
        if f.name.startswith("missing_")
    }
    assert numbers == {
        ("PredictResponse", "missing_user_ids"): (3, False),
        ("PredictResponse", "missing_item_ids"): (4, False),
        ("BatchPredictResponse", "missing_user_ids"): (3, False),
        ("BatchPredictResponse", "missing_item_ids"): (4, False),
        ("TopKResponse", "missing_ids"): (3, True),
        ("TopKResponse", "missing_user_ids"): (4, False),
        ("TopKResponse", "missing_item_ids"): (5, False),
    }


def _enums(descriptor: Descriptor | None, top: list[EnumDescriptor]) -> Iterator[EnumDescriptor]:
    yield from top
    if descriptor is not None:
        for nested in descriptor.nested_types:
            yield from _enums(nested, list(nested.enum_types))


def test_every_enum_starts_with_unspecified() -> None:
    from mfserve.v1 import recommender_pb2

    file = recommender_pb2.DESCRIPTOR
    enums = list(file.enum_types_by_name.values())
    for message in file.message_types_by_name.values():
        enums.extend(_enums(message, list(message.enum_types)))
    assert file.message_types_by_name  # the descriptor was read, so "no enums" is a real answer
    for enum in enums:
        zero = enum.values_by_number[0].name
        assert zero.endswith("_UNSPECIFIED"), f"{enum.full_name}: zero value {zero}"
