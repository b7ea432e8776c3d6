"""``sensorhub-sim``: simulated line devices for load and fault testing.

Subcommands:

- ``run``: publish (bounded by ``--duration`` and/or ``--count``) and write the truth file.
- ``verify``: compare a truth file with ClickHouse.
- ``loadtest``: run, wait until the store holds everything (bounded), verify; ``--json``
  prints one JSON object.

Broker, credentials and TLS: ``--mqtt HOST:PORT``, ``--username`` with
``--password-file`` (secrets never go on the command line: there is no
``--password``), ``--device-credentials FILE`` (each device connects as
itself), ``--tls`` with ``--ca-file`` and ``--cert-file``/``--key-file``; or
``--stack DIR``, which takes the broker, its account, the TLS port and CA and
the ClickHouse URL from a running ``sensorhub stack`` (options given as well win).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

from firmware_sim.devices import parse_mix
from firmware_sim.mqtt import MqttError
from firmware_sim.signals import SIGNALS
from firmware_sim.sim import (
    FAULTS,
    PROFILES,
    FaultConfig,
    RunStats,
    SimConfig,
    Simulator,
    parse_fault,
)
from firmware_sim.truth import merge_truth, read_summary

__all__ = ["build_parser", "main"]

log = logging.getLogger("firmware_sim")


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _dictionary(text: str) -> dict[int, str]:
    raw = Path(text).read_text() if os.path.isfile(text) else text
    try:
        d = json.loads(raw)
        return {int(k): str(v) for k, v in d.items()}
    except (ValueError, AttributeError) as exc:
        raise argparse.ArgumentTypeError(f"dictionary: expected a JSON object of id -> name: {exc}") from None


def _shard(text: str) -> tuple[int, int]:
    a, _, b = text.partition("/")
    try:
        i, n = int(a), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N, got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"shard {text!r}: need 0 <= I < N")
    return i, n


class _NoSecretInArgv(argparse.Action):
    """``--password``: refused without echoing it (and so no prefix of ``--password-file`` matches)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        parser.error(f"{option_string}: secrets never go on the command line (other users see it in the "
                     "process list); put the password on the first line of a file of mode 0600 and pass "
                     "--password-file FILE")


STACK_HELP = ("a `sensorhub stack` directory: its broker, account, TLS port and CA, and its ClickHouse URL "
              "(options given as well win)")


def add_broker_arguments(p: argparse.ArgumentParser) -> None:
    """Where the broker is and how to authenticate: shared by the commands that publish."""
    g = p.add_argument_group("broker, credentials and TLS")
    g.add_argument("--mqtt", type=_hostport, default=None, metavar="HOST:PORT",
                   help="the broker (default: the stack's, else 127.0.0.1:1883; with --tls the TLS port)")
    g.add_argument("--stack", type=Path, default=None, metavar="DIR", help=STACK_HELP)
    g.add_argument("--username", default=None, help="the account every connection authenticates as")
    g.add_argument("--password-file", type=Path, default=None, metavar="FILE",
                   help="the password of --username, on the first line of FILE")
    g.add_argument("--password", nargs="?", action=_NoSecretInArgv, help=argparse.SUPPRESS)
    g.add_argument("--device-credentials", type=Path, default=None, metavar="FILE",
                   help='JSON {"device-id": "password"}: each device connects as itself (user name = '
                        "device id; per-device connections)")
    g.add_argument("--tls", action="store_true", help="TLS 1.2+, the broker's certificate checked")
    g.add_argument("--ca-file", type=Path, default=None, metavar="FILE",
                   help="CA certificates (PEM) the broker's must chain to (default: the stack's, else the system's)")
    g.add_argument("--cert-file", type=Path, default=None, metavar="FILE", help="client certificate (PEM)")
    g.add_argument("--key-file", type=Path, default=None, metavar="FILE", help="its private key (PEM)")


def add_sim_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``run`` and ``loadtest``."""
    add_broker_arguments(p)
    g = p.add_argument_group("load")
    g.add_argument("--devices", type=int, default=200)
    g.add_argument("--lines", type=int, default=4, help="devices are spread over line1..lineN")
    g.add_argument(
        "--format",
        "--mix",
        dest="mix",
        default="frame",
        help="frame|json|ilp|sparkplug|mixed, or ratios: frame=0.7,json=0.1,ilp=0.1,sparkplug=0.1",
    )
    g.add_argument("--per-message", type=int, default=1, help="readings per message (1..1024)")
    g.add_argument("--qos", type=int, choices=(0, 1), default=1)
    g.add_argument("--rate", type=float, default=1000.0, help="total readings per second")
    g.add_argument("--duration", type=float, default=10.0, help="seconds of publishing (0: until --count)")
    g.add_argument("--count", type=int, default=None, help="stop after this many readings")
    g.add_argument("--profile", choices=PROFILES, default="steady")
    g.add_argument("--mode", choices=("per-device", "pooled"), default=None,
                   help="a shared pool of connections (default: about 3x less CPU per message), "
                        "or one MQTT connection per device (Sparkplug nodes always have their own; "
                        "the default with --device-credentials)")
    g.add_argument("--pool", type=int, default=4, help="connections in pooled mode")
    g.add_argument("--procs", type=int, default=1, help="publishing processes")
    g.add_argument("--shard", type=_shard, default=(0, 1), help=argparse.SUPPRESS)
    g.add_argument("--mqtt-version", choices=("3.1.1", "5"), default="3.1.1")
    g.add_argument("--persistent", action="store_true", help="persistent sessions (clean session off)")
    g.add_argument("--session-expiry", type=int, default=3600, help="MQTT 5 session expiry with --persistent")
    g.add_argument("--inflight", type=int, default=None,
                   help="unacknowledged QoS 1 messages per connection (default 64 per device, 512 pooled)")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--dictionary", type=_dictionary, default={}, help="frame metric id -> name (JSON or file)")
    g.add_argument("--nan-rate", type=float, default=0.001, help="fraction of frame values that are NaN")
    g.add_argument("--float32", action="store_true", help="frame values as float32")
    g.add_argument("--signal", choices=SIGNALS, default="random",
                   help="value shape: random (drifting sines with noise) or walk "
                        "(quantized random walks, as field sensors send)")
    g.add_argument("--fault", action="append", default=[], metavar="NAME[=VALUE]",
                   help="inject a fault: " + "; ".join(f"{k}: {v}" for k, v in FAULTS.items()))
    g.add_argument("--full-limit", type=int, default=2_000_000,
                   help="keep every reading in the truth file up to this many")
    g.add_argument("--ack-timeout", type=float, default=10.0,
                   help="seconds to wait for outstanding PUBACKs at the end")
    g.add_argument("--client-prefix", default="sim", help="MQTT client id prefix")
    g.add_argument("--device-prefix", default="dev", help="device ids are PREFIX-0001..")


def _read_secret(path: Path) -> str:
    """The first line of ``path`` without its line end (as every sensorhub process reads a secret)."""
    with open(path, encoding="utf-8") as f:
        return f.readline().rstrip("\r\n")


def _device_credentials(path: Path) -> dict[str, str]:
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"--device-credentials {path}: not JSON ({exc.__class__.__name__})") from None
    if not isinstance(d, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in d.items()):
        raise ValueError(f'--device-credentials {path}: expected a JSON object {{"device-id": "password"}}')
    return d


def _stack(args: argparse.Namespace) -> dict[str, Any]:
    """The public state of ``--stack`` (empty without it)."""
    if getattr(args, "stack", None) is None:
        return {}
    from sensorhub.errors import SensorhubError
    from sensorhub.service.stack import stack_status

    try:
        return stack_status(Path(args.stack))
    except SensorhubError as exc:
        raise ValueError(f"--stack {args.stack}: {exc}") from None


def resolve_targets(args: argparse.Namespace, stack: dict[str, Any] | None = None) -> None:
    """Fill in the broker, credentials, TLS files and ClickHouse URL: the options given, else
    the stack's (``stack``: its public JSON, read from ``--stack`` when not given), else the
    defaults. Raises ValueError for what cannot be had."""
    st = _stack(args) if stack is None else stack
    mq = st.get("mqtt") or {}
    if hasattr(args, "mqtt"):
        if args.mqtt is None:
            host = str(mq.get("host") or "127.0.0.1")
            if args.tls and st:
                if not mq.get("tls_port"):
                    raise ValueError(f"--stack {args.stack} --tls: the stack has no TLS listener (no tls_port)")
                args.mqtt = (host, int(mq["tls_port"]))
            else:
                args.mqtt = (host, int(mq.get("port") or (8883 if args.tls else 1883)))
        if args.ca_file is None and args.tls and mq.get("ca_file"):
            args.ca_file = Path(mq["ca_file"])
        if (args.cert_file is None) != (args.key_file is None):
            raise ValueError("--cert-file and --key-file together, or neither")
        if (args.ca_file or args.cert_file) and not args.tls:
            raise ValueError("--ca-file and --cert-file need --tls")
        args.password = None
        if args.username is not None:
            if args.password_file is not None:
                args.password = _read_secret(args.password_file)
        elif args.password_file is not None:
            raise ValueError("--password-file needs --username")
        elif mq.get("username"):
            args.username, args.password = str(mq["username"]), mq.get("password")
        args.device_passwords = (
            _device_credentials(args.device_credentials) if args.device_credentials is not None else None
        )
        if args.mode is None:
            args.mode = "per-device" if args.device_passwords is not None else "pooled"
    if hasattr(args, "clickhouse"):
        if args.clickhouse is None:
            if not st.get("clickhouse_url"):
                raise ValueError("--clickhouse URL or --stack DIR is needed")
            args.clickhouse = str(st["clickhouse_url"])
        if args.database is None:
            args.database = _url_database(args.clickhouse) or st.get("clickhouse_database") or "sensorhub"


def _url_database(url: str) -> str | None:
    path = urllib.parse.urlsplit(url).path.strip("/")
    return path or None


def _config(args: argparse.Namespace, truth: Path | None, shard: tuple[int, int], rate: float) -> SimConfig:
    faults = dict(parse_fault(f) for f in args.fault)
    return SimConfig(
        host=args.mqtt[0],
        port=args.mqtt[1],
        username=args.username,
        password=args.password,
        device_credentials=args.device_passwords,
        tls=args.tls,
        ca_file=str(args.ca_file) if args.ca_file else None,
        cert_file=str(args.cert_file) if args.cert_file else None,
        key_file=str(args.key_file) if args.key_file else None,
        devices=args.devices,
        mix=parse_mix(args.mix),
        per_message=args.per_message,
        qos=args.qos,
        rate=rate,
        duration_s=args.duration,
        count=args.count,
        profile=args.profile,
        mode=args.mode,
        pool=args.pool,
        mqtt_version=5 if args.mqtt_version == "5" else 4,
        clean=not args.persistent,
        session_expiry_s=args.session_expiry if args.persistent else 0,
        max_inflight=args.inflight or (512 if args.mode == "pooled" else 64),
        lines=args.lines,
        seed=args.seed,
        dictionary=args.dictionary,
        nan_rate=args.nan_rate,
        float32=args.float32,
        signal=args.signal,
        faults=FaultConfig(faults),
        truth_path=truth,
        full_limit=args.full_limit,
        shard=shard[0],
        shards=shard[1],
        client_prefix=args.client_prefix,
        drain_timeout_s=args.ack_timeout,
        device_prefix=args.device_prefix,
    )


def _child_argv(argv: list[str], i: int, n: int, truth: Path) -> list[str]:
    """The ``run`` command line of child ``i`` of ``n``, from the parent's own options."""
    out: list[str] = []
    skip = False
    drop_with_value = {"--procs", "--truth", "--shard", "--clickhouse", "--database", "--settle",
                       "--drain-timeout", "--log-level"}
    for a in argv:
        if skip:
            skip = False
            continue
        key = a.split("=", 1)[0]
        if key in drop_with_value:
            skip = "=" not in a
            continue
        if key in ("--json", "run", "loadtest"):
            continue
        out.append(a)
    return [sys.executable, "-m", "firmware_sim", "run", *out, "--shard", f"{i}/{n}",
            "--truth", str(truth), "--json"]


def publish(args: argparse.Namespace, truth: Path, argv: list[str], show: bool) -> dict[str, Any]:
    """Run the simulator (in this process or ``--procs`` children) and write ``truth``."""
    if args.procs > 1:
        return _publish_procs(args, truth, argv)
    shard = args.shard
    rate = args.rate
    cfg = _config(args, truth, shard, rate)
    progress = None
    console = None
    if show:
        from rich.console import Console

        console = Console(stderr=True)

        def progress(st: RunStats) -> None:
            assert console is not None
            console.print(
                f"[dim]{st.elapsed_s:6.1f}s[/] published {st.published:>10,} readings "
                f"({st.published / max(st.elapsed_s, 1e-9):,.0f}/s), sent {st.sent_messages:,} messages"
            )

    sim = Simulator(cfg, progress)
    try:
        stats = asyncio.run(sim.run())
    finally:
        # Written even when the run fails: it holds what was published until then.
        summary = sim.close_truth()
    out = stats.as_dict()
    out["devices"] = len(sim.devices)
    out["truth_full"] = summary["full"]
    return out


def _publish_procs(args: argparse.Namespace, truth: Path, argv: list[str]) -> dict[str, Any]:
    n = args.procs
    tmp = Path(tempfile.mkdtemp(prefix="sim-truth-"))
    parts = [tmp / f"part{i}.truth" for i in range(n)]
    children = [
        subprocess.Popen(_child_argv(argv, i, n, parts[i]), stdout=subprocess.PIPE, text=True)
        for i in range(n)
    ]
    results = []
    limit = (args.duration or 0) + args.ack_timeout + 120
    for c in children:
        try:
            out, _ = c.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            c.kill()
            out, _ = c.communicate()
        if c.returncode != 0:
            raise RuntimeError(f"publishing process {c.pid} exited with {c.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    summary = merge_truth(parts, truth)
    for p in parts:
        p.unlink()
    tmp.rmdir()
    merged: dict[str, Any] = {}
    for key in ("published", "birth_readings", "published_messages", "sent_messages", "unacked_messages", "refused_messages",
                "dead_letters_sent", "duplicates_sent", "reconnects", "deaths", "rebirths", "cpu_s", "devices"):
        merged[key] = sum(r[key] for r in results)
    merged["elapsed_s"] = max(r["elapsed_s"] for r in results)
    merged["start_unix_us"] = min(r["start_unix_us"] for r in results)
    merged["end_unix_us"] = max(r["end_unix_us"] for r in results)
    merged["achieved_rate"] = round(
        (merged["published"] - merged["birth_readings"]) / max(merged["elapsed_s"], 1e-9), 1
    )
    pm = merged["published_messages"]
    merged["cpu_us_per_message"] = round(merged["cpu_s"] / pm * 1e6, 2) if pm else None
    merged["truth_full"] = summary["full"]
    merged["procs"] = n
    return merged


# ------------------------------------------------------------------ commands


def cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    truth = Path(args.truth)
    out = publish(args, truth, argv, show=not args.json)
    out["truth"] = str(truth)
    _emit(args, out, "published")
    return 0


def cmd_verify(args: argparse.Namespace, argv: list[str]) -> int:
    from firmware_sim.verify import connect, verify

    client = connect(args.clickhouse, args.database)
    try:
        result = verify(client, args.truth, database=args.database)
    finally:
        client.close()
    _emit(args, result, "verify")
    return 0 if _clean(result) else 1


def _clean(r: dict[str, Any]) -> bool:
    return not r.get("lost") and not r.get("duplicated") and not r.get("mismatched") and not r.get(
        "mismatched_devices"
    )


def cmd_loadtest(args: argparse.Namespace, argv: list[str]) -> int:
    from firmware_sim.verify import connect, stored_count, verify

    tmp = Path(tempfile.mkdtemp(prefix="sim-loadtest-"))
    truth = Path(args.truth) if args.truth else tmp / "run.truth"
    client = connect(args.clickhouse, args.database)
    try:
        pub = publish(args, truth, argv, show=not args.json)
        summary = read_summary(truth)
        # Wait until the store holds every reading or stops growing (both bounded).
        deadline = time.monotonic() + args.drain_timeout_store
        last = -1
        last_change = time.monotonic()
        while time.monotonic() < deadline:
            _, distinct = stored_count(client, summary, args.database)
            if distinct >= summary["published"]:
                break
            if distinct != last:
                last, last_change = distinct, time.monotonic()
            elif time.monotonic() - last_change > args.settle:
                break
            time.sleep(0.5)
        result = verify(client, truth, database=args.database)
    finally:
        client.close()
    result["achieved_rate"] = pub["achieved_rate"]
    result["target_rate"] = args.rate
    for k in ("birth_readings", "published_messages", "sent_messages", "elapsed_s", "cpu_s", "cpu_us_per_message",
              "dead_letters_sent", "duplicates_sent", "reconnects", "deaths", "unacked_messages", "refused_messages"):
        result[k] = pub.get(k)
    if not args.truth:
        truth.unlink(missing_ok=True)
        tmp.rmdir()
    _emit(args, result, "loadtest")
    return 0 if _clean(result) else 1


def _emit(args: argparse.Namespace, out: dict[str, Any], title: str) -> None:
    if args.json:
        print(json.dumps({k: v for k, v in out.items() if k != "per_second"}, separators=(",", ":")))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for k, v in out.items():
        if k == "per_second":
            continue
        table.add_row(k, f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v))
    Console().print(table)


def build_parser() -> argparse.ArgumentParser:
    """The ``sensorhub-sim`` argument parser."""
    parser = argparse.ArgumentParser(prog="sensorhub-sim", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get("SENSORHUB_LOG_LEVEL", "WARNING"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="publish and write the truth file")
    add_sim_arguments(p)
    p.add_argument("--truth", default="sim.truth", help="ground-truth file to write")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(_run=cmd_run)

    p = sub.add_parser("verify", help="compare a truth file with ClickHouse")
    p.add_argument("--clickhouse", default=None, metavar="URL",
                   help="http://[USER:PASSWORD@]HOST:PORT[/DATABASE] (default: the --stack's)")
    p.add_argument("--stack", type=Path, default=None, metavar="DIR", help=STACK_HELP)
    p.add_argument("--database", default=None, help="default: the stack's, the URL's, else sensorhub")
    p.add_argument("--truth", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(_run=cmd_verify)

    p = sub.add_parser("loadtest", help="run, wait for the store, verify")
    add_sim_arguments(p)
    p.add_argument("--clickhouse", default=None, metavar="URL",
                   help="http://[USER:PASSWORD@]HOST:PORT[/DATABASE] (default: the --stack's)")
    p.add_argument("--database", default=None, help="default: the stack's, the URL's, else sensorhub")
    p.add_argument("--truth", default=None, help="keep the truth file here")
    p.add_argument("--drain-timeout", dest="drain_timeout_store", type=float, default=60.0,
                   help="seconds to wait at most for the store to hold everything")
    p.add_argument("--settle", type=float, default=5.0,
                   help="stop waiting once the store has not grown for this long")
    p.add_argument("--json", action="store_true")
    p.set_defaults(_run=cmd_loadtest)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``sensorhub-sim`` and ``python -m firmware_sim``."""
    raw = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(raw)
    logging.basicConfig(level=str(args.log_level).upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        resolve_targets(args)
        rc: int = args._run(args, raw)
    except (ValueError, OSError, RuntimeError, MqttError) as exc:
        print(f"sensorhub-sim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
