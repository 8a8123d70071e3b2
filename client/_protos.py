"""The few foreign protobuf messages the client reads, built at import time in a private pool.

The client needs ``grpc.health.v1`` (health checks) and ``google.rpc.Status`` / ``BadRequest`` /
``ResourceInfo`` (rich error details). Their generated code ships in grpcio-health-checking and
googleapis-common-protos, which the thin base install (grpcio + protobuf only) does not have. These
messages are small and frozen by their owners, so describing them here costs ~60 lines and no
dependency. They live in a private ``DescriptorPool``: if the official packages are also imported,
the two definitions never collide in protobuf's default pool. The wire format is what matters, and
it is identical.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
_STRING, _INT32, _ENUM, _MESSAGE = _F.TYPE_STRING, _F.TYPE_INT32, _F.TYPE_ENUM, _F.TYPE_MESSAGE
_OPTIONAL, _REPEATED = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED

_pool = descriptor_pool.DescriptorPool()


def _add_any() -> None:
    proto = descriptor_pb2.FileDescriptorProto()
    any_pb2.DESCRIPTOR.CopyToProto(proto)
    _pool.Add(proto)


def _message(
    file: descriptor_pb2.FileDescriptorProto | descriptor_pb2.DescriptorProto,
    name: str,
    fields: list[tuple[str, int, int, int, str]],
) -> descriptor_pb2.DescriptorProto:
    """Add message ``name`` with ``(name, number, type, label, type_name)`` fields to ``file``."""
    container = (
        file.message_type
        if isinstance(file, descriptor_pb2.FileDescriptorProto)
        else file.nested_type
    )
    message = container.add(name=name)
    for field_name, number, kind, label, type_name in fields:
        added = message.field.add(name=field_name, number=number, type=kind, label=label)
        if type_name:
            added.type_name = type_name
    return message


def _add_health() -> None:
    """``grpc/health/v1/health.proto``: ``HealthCheckRequest`` and ``HealthCheckResponse``."""
    file = descriptor_pb2.FileDescriptorProto(
        name="mfserve_client/grpc_health_v1.proto", package="grpc.health.v1", syntax="proto3"
    )
    _message(file, "HealthCheckRequest", [("service", 1, _STRING, _OPTIONAL, "")])
    response = _message(
        file,
        "HealthCheckResponse",
        [("status", 1, _ENUM, _OPTIONAL, ".grpc.health.v1.HealthCheckResponse.ServingStatus")],
    )
    enum = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")):
        enum.value.add(name=name, number=number)
    _pool.Add(file)


def _add_rpc_status() -> None:
    """``google/rpc/status.proto`` and the parts of ``error_details.proto`` the client reads."""
    file = descriptor_pb2.FileDescriptorProto(
        name="mfserve_client/google_rpc.proto",
        package="google.rpc",
        syntax="proto3",
        dependency=["google/protobuf/any.proto"],
    )
    _message(
        file,
        "Status",
        [
            ("code", 1, _INT32, _OPTIONAL, ""),
            ("message", 2, _STRING, _OPTIONAL, ""),
            ("details", 3, _MESSAGE, _REPEATED, ".google.protobuf.Any"),
        ],
    )
    bad_request = _message(
        file,
        "BadRequest",
        [("field_violations", 1, _MESSAGE, _REPEATED, ".google.rpc.BadRequest.FieldViolation")],
    )
    _message(
        bad_request,
        "FieldViolation",
        [
            ("field", 1, _STRING, _OPTIONAL, ""),
            ("description", 2, _STRING, _OPTIONAL, ""),
            ("reason", 3, _STRING, _OPTIONAL, ""),
        ],
    )
    _message(
        file,
        "ResourceInfo",
        [
            ("resource_type", 1, _STRING, _OPTIONAL, ""),
            ("resource_name", 2, _STRING, _OPTIONAL, ""),
            ("owner", 3, _STRING, _OPTIONAL, ""),
            ("description", 4, _STRING, _OPTIONAL, ""),
        ],
    )
    _pool.Add(file)


_add_any()
_add_health()
_add_rpc_status()


def _class(full_name: str) -> Any:
    """The message class of ``full_name``. ``Any``: built at run time from the pool, its fields
    are unknown to a type checker (and protobuf's stubs no longer take ``Message(**fields)``)."""
    return message_factory.GetMessageClass(_pool.FindMessageTypeByName(full_name))


HealthCheckRequest = _class("grpc.health.v1.HealthCheckRequest")
HealthCheckResponse = _class("grpc.health.v1.HealthCheckResponse")
Status = _class("google.rpc.Status")
BadRequest = _class("google.rpc.BadRequest")
ResourceInfo = _class("google.rpc.ResourceInfo")

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
STATUS_DETAILS_KEY = "grpc-status-details-bin"


def health_methods(channel: Any) -> tuple[Any, Any]:
    """``grpc.health.v1.Health`` Check (unary) and Watch (streaming) callables on ``channel``.

    Sync and ``grpc.aio`` channels share this method-building API, so both clients use it.
    """
    check = channel.unary_unary(
        HEALTH_CHECK,
        request_serializer=HealthCheckRequest.SerializeToString,
        response_deserializer=HealthCheckResponse.FromString,
    )
    watch = channel.unary_stream(
        HEALTH_WATCH,
        request_serializer=HealthCheckRequest.SerializeToString,
        response_deserializer=HealthCheckResponse.FromString,
    )
    return check, watch
