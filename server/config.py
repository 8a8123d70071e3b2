"""``ServerConfig``, and the ``mfserve serve`` flags generated from its fields.

Imports nothing heavy (no grpc, torch or numpy), so ``mfserve serve --help`` works on the thin
client install and a bad flag is refused before the server's imports load. The serving modules
take their defaults from here, so a default is written once. Each field's metadata holds its help
text, its ``--help`` group and how its flag parses, as ``mfserve.training.config`` does for the
training flags; docs/serving.md gives the measured trade-off behind every tuning flag.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mfserve.server.cpu_pinning import PinningError, parse_cpu_list

MiB = 1 << 20
# At most this many concurrent calls of one kind share one tensor operation (server/batching.py).
DEFAULT_MAX_BATCH_SIZE = 64
# "none", "auto", then the index kinds of mfserve.training.scoring.ann.KINDS, spelled out because
# that module loads numpy; tests/server/test_server_cli.py checks that the server accepts exactly
# these.
ANN_MODES = ("none", "auto", "hnsw", "ivf")

# --help groups, in the order shown.
GROUPS = {
    "model": "model",
    "network": "network",
    "security": "security (docs/security.md)",
    "limits": "limits",
    "performance": "performance tuning (what each one measured: docs/serving.md)",
    "logging": "logging",
}


def _option(
    default: Any,
    help: str,
    group: str,
    *,
    flag: str | None = None,
    metavar: str | None = None,
    parse: Callable[[str], Any] | None = None,
    shown: str | None = None,
    choices: tuple[str, ...] | None = None,
    optional_value: str | None = None,
    flag_value: Callable[[Any], Any] | None = None,
) -> Any:
    """A ``ServerConfig`` field and its flag. ``flag``: the flag's name when it is not the field's
    (several fields may share one flag; "" for a field with no flag); ``parse``: the flag's text to
    the field's value; ``shown``: the default as ``--help`` writes it; ``optional_value``: what the
    flag given alone means; ``flag_value``: the field's value as the flag writes it, for
    ``--print-config`` (None: the flag cannot spell it)."""
    metadata = {
        "help": help,
        "group": group,
        "flag": flag,
        "metavar": metavar,
        "parse": parse,
        "shown": shown,
        "choices": choices,
        "optional_value": optional_value,
        "flag_value": flag_value,
    }
    return field(default=default, metadata=metadata)


def _mebibytes(text: str) -> int:
    return int(text) * MiB


def _zero_unbounded(text: str) -> int | None:
    return int(text) or None


class ConfigError(ValueError):
    """A ``ServerConfig`` field out of its range; ``rule`` says what the range is."""

    def __init__(self, name: str, value: Any, rule: str) -> None:
        super().__init__(f"ServerConfig.{name}={value!r} is out of range ({rule})")
        self.name, self.value, self.rule = name, value, rule


@dataclass(frozen=True)
class ServerConfig:
    """Everything a server process is configured with. Defaults suit one process on one host."""

    # --- model ---
    # Approximate TopK for known users without an allow-list (SimilarItems and Predict stay
    # exact). A version without the required index fails to load rather than silently serve exact.
    ann: str = _option(
        "none",
        "approximate TopK through the index beside the version (mfserve index): auto uses one "
        "if it is there, hnsw or ivf require it",
        "model",
        choices=ANN_MODES,
    )
    ann_ef_search: int = _option(
        0, "HNSW efSearch per query: more is more exact and slower", "model", shown="the index's"
    )
    ann_nprobe: int = _option(
        0, "IVF lists probed per query: more is more exact and slower", "model", shown="the index's"
    )
    poll_seconds: float = _option(
        5.0,
        "with a model folder, how often to look for a newer version and hot-reload it (SIGHUP "
        "and the ReloadModel RPC reload at once); 0: never look; a version folder is never watched",
        "model",
        metavar="SECONDS",
    )
    # --- network ---
    host: str = _option("127.0.0.1", "address to listen on; 0.0.0.0: every interface", "network")
    port: int = _option(50051, "port; 0 binds a free one, which the start line logs", "network")
    # Bound on --host, like gRPC; the series: docs/serving.md ("Metrics").
    metrics_port: int = _option(0, "Prometheus /metrics HTTP port; 0: off", "network")
    grace_seconds: float = _option(
        5.0,
        "on SIGTERM or SIGINT, how long in-flight calls may take to finish",
        "network",
        flag="--grace",
        metavar="SECONDS",
    )
    # Client-side balancing resolves addresses when a connection opens: without an age, a client
    # that connected before a scale-up never reaches the new replicas.
    max_connection_age_seconds: float = _option(
        0.0,
        "ask clients to reconnect (GOAWAY) after a connection is this old, so that they "
        "re-resolve and reach new replicas; calls in flight get --grace to finish; 0: never",
        "network",
        flag="--max-connection-age",
        metavar="SECONDS",
    )
    so_reuseport: bool = _option(
        False,
        "several processes bind one port: --workers sets it in its workers",
        "network",
        flag="",
    )
    # --- security ---
    # Paths rather than contents, so that SIGHUP and ReloadModel can re-read them (rotation with
    # no restart); they are checked when the server is built (mfserve.server.security).
    tls_cert: str = _option(
        "",
        "serve TLS with this PEM certificate chain (needs --tls-key)",
        "security",
        metavar="FILE",
    )
    tls_key: str = _option("", "the PEM private key of --tls-cert", "security", metavar="FILE")
    tls_client_ca: str = _option(
        "",
        "mutual TLS: require client certificates signed by this PEM CA bundle",
        "security",
        metavar="FILE",
    )
    auth_tokens: str = _option(
        "",
        "every call but health needs 'authorization: Bearer TOKEN' with a token of FILE (one per "
        "line, # comments)",
        "security",
        metavar="FILE",
    )
    admin_tokens: str = _option(
        "",
        "tokens (same format) that may call everything, ReloadModel included (with --auth-tokens "
        "and without this file, no token may call ReloadModel)",
        "security",
        metavar="FILE",
    )
    no_reflection: bool = _option(False, "turn server reflection off", "security")
    reflection_needs_token: bool = _option(
        False, "server reflection needs a token like every other call", "security"
    )
    # --- limits ---
    max_batch_pairs: int = _option(100_000, "most (user, item) pairs in one BatchPredict", "limits")
    max_k: int = _option(1_000, "largest k of TopK and SimilarItems", "limits", metavar="K")
    max_interactions: int = _option(
        1_000, "most interactions one call may send to fold its user in", "limits", metavar="N"
    )
    max_batch_users: int = _option(
        100_000, "most TopK requests in one BatchTopK", "limits", metavar="N"
    )
    max_concurrent_rpcs: int | None = _option(
        256,
        "calls served at once; more get RESOURCE_EXHAUSTED; 0: unbounded",
        "limits",
        parse=_zero_unbounded,
        flag_value=lambda value: value or 0,
    )
    # 100,000 pairs of 36-character ids are ~8 MB on the wire; 64 MiB leaves ample headroom while
    # still bounding what one call can make the server buffer. One flag sets both directions.
    max_receive_message_bytes: int = _option(
        64 * MiB,
        "largest request or response in MiB; larger ones get RESOURCE_EXHAUSTED",
        "limits",
        flag="--max-message-mb",
        metavar="MB",
        parse=_mebibytes,
        shown="64",
        flag_value=lambda value: value // MiB,
    )
    max_send_message_bytes: int = _option(64 * MiB, "", "limits", flag="--max-message-mb")
    # --- performance tuning ---
    workers: int = _option(
        1,
        "server processes sharing the port, forked after the model loads; 0: one per usable CPU "
        "(the affinity mask and a container's cgroup CPU quota)",
        "performance",
    )
    # Applied by serve() only, as binding is process-wide: create_server() leaves the process be.
    pin_cpus: tuple[int, ...] = _option(
        (),
        "bind each server process to one CPU of CPUS, a --workers worker to the next in turn: "
        "auto (the flag alone) or a list like 0,2-3 (Linux)",
        "performance",
        metavar="CPUS",
        parse=parse_cpu_list,
        shown="off",
        optional_value="auto",
        flag_value=lambda cpus: ",".join(map(str, cpus)) or None,
    )
    idle_poll: bool = _option(
        False,
        "keep every CPU busy between calls with SCHED_IDLE spinners, so that wake-ups never wait "
        "for a halted virtual CPU; every CPU then looks 100%% busy (Linux)",
        "performance",
    )
    max_batch_size: int = _option(
        DEFAULT_MAX_BATCH_SIZE,
        "most concurrent calls of one kind answered by one tensor operation; 1: no batching",
        "performance",
    )
    # Batches run off the event loop so that a large TopK never stalls health checks and
    # cancellations; 0 computes them on the loop.
    compute_threads: int = _option(
        1, "threads computing batches off the event loop; 0: on the loop", "performance"
    )
    # One by default: batching already amortises the work, and idle OpenMP threads spinning on a
    # busy host steal the cores the event loops need (server/threads.py).
    torch_threads: int = _option(
        1, "torch intra-op threads per server process; 0: torch's, one per core", "performance"
    )
    # --- logging ---
    access_log: bool = _option(
        False, "one log line per call: method, status, milliseconds, peer", "logging"
    )

    def __post_init__(self) -> None:
        rules: dict[str, tuple[bool, str]] = {
            "port": (0 <= self.port <= 65535, "0 to 65535"),
            "metrics_port": (0 <= self.metrics_port <= 65535, "0 to 65535"),
            "max_batch_pairs": (self.max_batch_pairs >= 1, "at least 1"),
            "max_k": (self.max_k >= 1, "at least 1"),
            "max_interactions": (self.max_interactions >= 1, "at least 1"),
            "max_batch_users": (self.max_batch_users >= 1, "at least 1"),
            "max_concurrent_rpcs": (
                self.max_concurrent_rpcs is None or self.max_concurrent_rpcs >= 1,
                "at least 1, or unbounded",
            ),
            "max_receive_message_bytes": (self.max_receive_message_bytes >= 1024, "at least 1 KiB"),
            "max_send_message_bytes": (self.max_send_message_bytes >= 1024, "at least 1 KiB"),
            "grace_seconds": (self.grace_seconds >= 0, "at least 0"),
            "max_connection_age_seconds": (self.max_connection_age_seconds >= 0, "at least 0"),
            "poll_seconds": (self.poll_seconds >= 0, "at least 0"),
            "compute_threads": (self.compute_threads >= 0, "at least 0"),
            "max_batch_size": (self.max_batch_size >= 1, "at least 1"),
            "workers": (0 <= self.workers <= 1024, "0 to 1024"),
            "torch_threads": (self.torch_threads >= 0, "at least 0"),
            "ann": (self.ann in ANN_MODES, "one of " + ", ".join(ANN_MODES)),
            "ann_ef_search": (self.ann_ef_search >= 0, "at least 0"),
            "ann_nprobe": (self.ann_nprobe >= 0, "at least 0"),
            "pin_cpus": (all(cpu >= 0 for cpu in self.pin_cpus), "CPU numbers, at least 0"),
        }
        for name, (ok, rule) in rules.items():
            if not ok:
                raise ConfigError(name, getattr(self, name), rule)

    def address(self, port: int | None = None) -> str:
        """``host:port`` as gRPC wants it (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port if port is None else port}"

    def ann_search(self) -> dict[str, int]:
        """The search-parameter overrides given (``ef_search``, ``nprobe``)."""
        search = {"ef_search": self.ann_ef_search, "nprobe": self.ann_nprobe}
        return {name: value for name, value in search.items() if value}

    def channel_options(self) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [
            ("grpc.so_reuseport", 1 if self.so_reuseport else 0),
            ("grpc.max_receive_message_length", self.max_receive_message_bytes),
            ("grpc.max_send_message_length", self.max_send_message_bytes),
        ]
        if self.max_connection_age_seconds > 0:
            options += [
                ("grpc.max_connection_age_ms", int(self.max_connection_age_seconds * 1000)),
                ("grpc.max_connection_age_grace_ms", int(self.grace_seconds * 1000)),
            ]
        return options


# --------------------------------------------------------------------------- flags
def flag_fields() -> dict[str, list[dataclasses.Field[Any]]]:
    """Each ``mfserve serve`` flag generated from ``ServerConfig``, with the fields it sets."""
    flags: dict[str, list[dataclasses.Field[Any]]] = {}
    for spec in dataclasses.fields(ServerConfig):
        flag = spec.metadata["flag"]
        if flag is None:
            flag = "--" + spec.name.replace("_", "-")
        if flag:
            flags.setdefault(flag, []).append(spec)
    return flags


def _converter(flag: str, specs: list[dataclasses.Field[Any]], kind: type) -> Callable[[str], Any]:
    parse = specs[0].metadata["parse"] or kind
    choices = specs[0].metadata["choices"]

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except PinningError as exc:  # it names the flag and the bad part itself
            raise argparse.ArgumentTypeError(str(exc)) from None
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if choices:  # argparse checks those itself, with a clearer message
            return value
        try:  # the field's range, checked now so that argparse reports it with the usage line
            ServerConfig(**{spec.name: value for spec in specs})
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is out of range ({exc.rule})") from None
        return value

    convert.__name__ = flag  # argparse names a type in some messages
    return convert


ArgumentGroups = dict[str, "argparse._ArgumentGroup"]


def flag_groups(parser: argparse.ArgumentParser) -> ArgumentGroups:
    """``GROUPS`` added to ``parser``, by key: a command adds its own flags that are not config
    (the model path, the log level) where they belong, then ``add_server_flags``."""
    return {key: parser.add_argument_group(title) for key, title in GROUPS.items()}


def add_server_flags(groups: ArgumentGroups) -> None:
    """One flag per ``ServerConfig`` field (or fields, for a shared flag), in its group."""
    defaults = ServerConfig()
    for flag, specs in flag_fields().items():
        meta = specs[0].metadata
        default = getattr(defaults, specs[0].name)
        options: dict[str, Any] = {"dest": specs[0].name, "default": default}
        if isinstance(default, bool):
            options.update(action="store_true", help=meta["help"])
        else:
            kind = type(default)
            shown = meta["shown"] if meta["shown"] is not None else default
            options.update(
                type=_converter(flag, specs, kind),
                metavar=meta["metavar"] or (None if meta["choices"] else _metavar(kind, flag)),
                choices=meta["choices"],
                help=f"{meta['help']} (default: {shown})",
            )
            if meta["optional_value"] is not None:
                options.update(nargs="?", const=meta["optional_value"])
        groups[meta["group"]].add_argument(flag, **options)


def _metavar(kind: type, flag: str) -> str:
    return "N" if kind is int else flag.removeprefix("--").upper()


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The ``ServerConfig`` that parsed ``mfserve serve`` flags describe; a flag missing from
    ``args`` (the CLI's parser suppresses defaults, see ``config_sources``) keeps its default."""
    defaults = ServerConfig()
    values = {
        spec.name: getattr(args, specs[0].name, getattr(defaults, specs[0].name))
        for specs in flag_fields().values()
        for spec in specs
    }
    return ServerConfig(**values)
