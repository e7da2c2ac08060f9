"""``ism``: one command with subcommands. Thin: parse, call the library, print.

Every failure exits non-zero with one line ``error: [CODE rule] message`` on
stderr (exit 1 for refusals and malformed input, 2 for usage errors); with
``--verbose`` the traceback follows. ``--json`` prints a machine-readable
result on stdout, including for refusals.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import uuid as uuidlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ism.cli._io import MAX_INPUT, read_file, write_file
from ism.cli.attest import add_attest_commands, format_summary
from ism.cli.lifecycle import add_lifecycle_commands, format_log
from ism.cli.microservice import LifecycleWatch, add_microservice_commands
from ism.cli.provision import add_provision_commands
from ism.crypto import cose
from ism.crypto import suit as suit_auth
from ism.crypto.keys import (
    PublicKey,
    generate,
    load_private,
    load_public,
    pem_from_der,
    read_public_pem,
    signer_id,
    write_keypair,
)
from ism.crypto.policy_seal import seal
from ism.device.trust.boot import check_package
from ism.device.virtual import ANCHOR_ROLES, MAX_POLICY_SIZE, Device
from ism.errors import IsmError, UsageError
from ism.formats import package, suit, wasm
from ism.formats.abi import HOST_ABI
from ism.formats.downgrade import Downgrade
from ism.formats.policy_artifact import make_payload

__all__ = ["main"]


def _read(path: Path, what: str = "file", limit: int = MAX_INPUT) -> bytes:
    return read_file(path, what, limit)


def _write(path: Path, data: bytes) -> None:
    write_file(path, data)


def _emit(args: argparse.Namespace, obj: dict[str, Any], text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(obj, indent=2, sort_keys=False))
    else:
        print(text)


def _fail_json(args: argparse.Namespace, exc: IsmError, extra: dict[str, Any] | None = None) -> NoReturn:
    """For commands whose JSON reports a verdict: print it, then fail."""
    if getattr(args, "json", False):
        obj = {"valid": False, **(extra or {}), **exc.to_dict()}
        print(json.dumps(obj, indent=2))
    raise exc


# -- keygen ---------------------------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> None:
    key = generate(args.alg)
    pub = write_keypair(key, args.out)
    sid = signer_id(key).hex()
    _emit(
        args,
        {"private": str(args.out), "public": str(pub), "alg": args.alg, "signer_id": sid},
        f"wrote {args.out} (0600) and {pub}\nsigner id {sid}",
    )


# -- package --------------------------------------------------------------------------------------


def cmd_package_build(args: argparse.Namespace) -> None:
    meta = package.parse_meta(_read(args.meta, "metadata").decode("utf-8", "replace"), str(args.meta))
    payload = _read(args.wasm, "wasm module")
    wasm.check_imports(wasm.parse_module(payload), HOST_ABI)
    key = load_private(args.key)
    manifest_bytes, members, integrated = package.build_unsigned(meta, payload)
    envelope = suit.encode_envelope(suit_auth.sign_manifest(manifest_bytes, key), manifest_bytes, members, integrated)
    _write(args.out, envelope)
    pkg = package.read_package(suit.parse_envelope(envelope))
    _emit(
        args,
        {"out": str(args.out), "size": len(envelope), **pkg.summary(), "signer": signer_id(key).hex()},
        f"built {args.out}: {meta.name} {meta.version} (sequence {meta.sequence}, {len(envelope)} bytes)",
    )


def _inspect(env: suit.Envelope) -> dict[str, Any]:
    man = env.manifest
    out: dict[str, Any] = {
        "tagged": env.tagged,
        "manifest_digest": {"alg": env.digest.alg_name, "value": env.digest.value.hex()},
        "auth_blocks": [],
        "sequence": man.sequence,
        "components": [[p.hex() for p in c] for c in man.components],
        "shared": [_cmd(c) for c in man.shared],
        "sequences": {str(k): [_cmd(c) for c in v] for k, v in sorted(man.sequences.items())},
        "severable": {
            str(k): ("digest" if isinstance(v, suit.Digest) else "inline") for k, v in sorted(man.severable.items())
        },
        "integrated": {k: len(v) for k, v in env.integrated.items()},
    }
    for block in env.auth_blocks:
        msg = cose.parse(block)
        out["auth_blocks"].append({"kind": msg.kind, "alg": msg.alg_name, "kid": msg.kid.hex() if msg.kid else None})
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, suit.Command):
        return _cmd(value)
    return value if isinstance(value, int | str | float | bool | type(None)) else repr(value)


def _cmd(c: suit.Command) -> dict[str, Any]:
    return {"command": c.name, "arg": _jsonable(c.arg)}


def cmd_package_inspect(args: argparse.Namespace) -> None:
    env = suit.parse_envelope(_read(args.package, "package"))
    pkg = package.read_package(env)
    info = {**pkg.summary(), "envelope": _inspect(env)}
    lines = [f"{k:14} {v}" for k, v in pkg.summary().items()]
    lines.append(
        f"{'signature':14} " + ", ".join(f"{b['alg']} kid={b['kid']}" for b in info["envelope"]["auth_blocks"])
    )
    _emit(args, info, "\n".join(lines))


def _anchors(paths: Sequence[Path]) -> list[PublicKey]:
    return [load_public(p) for p in paths]


def cmd_package_verify(args: argparse.Namespace) -> None:
    data = _read(args.package, "package")
    try:
        acc = check_package(data, _anchors(args.trust), {}, b"")
    except IsmError as exc:
        _fail_json(args, exc, {"package": str(args.package)})
    summary = {"valid": True, "package": str(args.package), **acc.package.summary(), "signer": acc.signer.hex()}
    _emit(
        args,
        summary,
        f"OK {acc.package.meta.name} {acc.package.meta.version}: digest, signature and "
        f"conditions verify (signer {acc.signer.hex()[:16]}...)",
    )


def cmd_package_downgrade(args: argparse.Namespace) -> None:
    try:
        instance = bytes.fromhex(args.instance)
        ms = uuidlib.UUID(args.uuid)
    except ValueError as exc:
        raise UsageError("cli.argument", f"bad --instance or --uuid: {exc}") from None
    auth = Downgrade(ms, args.sequence, args.from_counter, instance)
    key = load_private(args.key)
    _write(args.out, cose.sign1(auth.encode(), key, kid=signer_id(key)))
    _emit(
        args,
        {"out": str(args.out), "uuid": str(ms), "sequence": args.sequence, "from": args.from_counter},
        f"wrote {args.out}: {ms} may go from counter {args.from_counter} down to {args.sequence}",
    )


# -- suit -----------------------------------------------------------------------------------------


def cmd_suit_verify(args: argparse.Namespace) -> None:
    data = _read(args.file, "envelope")
    result: dict[str, Any] = {"valid": False, "file": str(args.file), "sequence": None, "components": None}
    try:
        env = suit.parse_envelope(data)
        result["sequence"] = env.manifest.sequence
        result["components"] = [[p.hex() for p in c] for c in env.manifest.components]
        keys = [load_public(args.key)] if args.key else []
        hmac_key = _read(args.hmac_key, "HMAC key") if args.hmac_key else None
        auth = suit_auth.authenticate(env, keys, hmac_key)
        result["severed"] = suit.check_severed(env)
    except IsmError as exc:
        if args.json:
            print(json.dumps({**result, **exc.to_dict()}, indent=2))
        raise
    result.update(
        valid=True,
        auth={"kind": auth.kind, "alg": auth.alg, "signer": auth.signer_id.hex() if auth.signer_id else None},
    )
    _emit(
        args,
        result,
        f"OK sequence {result['sequence']}, {len(result['components'])} component(s), "
        f"{auth.alg} verifies" + (f", severed members {result['severed']}" if result["severed"] else ""),
    )


# -- device ---------------------------------------------------------------------------------------


def cmd_device_init(args: argparse.Namespace) -> None:
    keystore = None
    if args.keystore == "pkcs11":
        if not (args.pkcs11_module and args.pkcs11_token and args.pkcs11_pin_file):
            raise UsageError(
                "cli.argument", "--keystore pkcs11 needs --pkcs11-module, --pkcs11-token and --pkcs11-pin-file"
            )
        keystore = {
            "backend": "pkcs11",
            "module": args.pkcs11_module,
            "token": args.pkcs11_token,
            "pin_file": args.pkcs11_pin_file.resolve(),
        }
    elif args.keystore == "tpm":
        if not args.tpm_tcti:
            raise UsageError("cli.argument", "--keystore tpm needs --tpm-tcti (e.g. device:/dev/tpmrm0)")
        keystore = {"backend": "tpm", "tcti": args.tpm_tcti}
    with Device.init(args.dir, keystore=keystore) as dev:
        dev.keystore()  # a token that is missing or locked is reported now, not at first use
        _emit(args, dev.info(), f"initialised device {args.dir}\ninstance id {dev.instance_id.hex()}")


def cmd_device_info(args: argparse.Namespace) -> None:
    with Device(args.dir) as dev:
        info = dev.info()
    lines = [f"{k:14} {v}" for k, v in info.items() if k not in ("policy_key", "lifecycle_log")]
    lines += ["lifecycle_log", *format_log(info["lifecycle_log"])]
    _emit(args, info, "\n".join([*lines, "policy_key", (info["policy_key"] or "(destroyed)").rstrip()]))


def cmd_device_trust(args: argparse.Namespace) -> None:
    dev = Device(args.dir)
    added = [dev.add_anchor(_read(p, "trust anchor"), role=args.role).hex() for p in args.add]
    what = "policy signer" if args.role == "policy" else "signer"
    result: dict[str, Any] = {"added": added} if args.role == "microservice" else {"added": added, "role": args.role}
    _emit(args, result, "\n".join(f"trusted {what} {s}" for s in added))


def cmd_device_policy_key(args: argparse.Namespace) -> None:
    with Device(args.dir) as dev:
        pem = pem_from_der(dev.policy_public_key()).decode()
        instance = dev.instance_id.hex()
    if args.out:
        _write(args.out, pem.encode())
    _emit(args, {"instance_id": instance, "policy_key": pem}, pem.rstrip())


def cmd_device_policy(args: argparse.Namespace) -> None:
    data = _read(args.artifact, "policy artifact", MAX_POLICY_SIZE)
    with Device(args.dir) as dev:
        try:
            policy = dev.install_policy(data)
        except IsmError as exc:
            _fail_json(args, exc, {"artifact": str(args.artifact)})
    names = sorted(policy.by_name)
    _emit(
        args,
        {"valid": True, "board": policy.board, "version": policy.version, "microservices": names},
        f"installed protected policy version {policy.version} for board {policy.board} "
        f"({len(names)} microservice(s)); it takes effect at the next start (or now, on a running device)",
    )


# -- policy ---------------------------------------------------------------------------------------


def _device_target(args: argparse.Namespace) -> tuple[PublicKey, bytes]:
    """The device policy key and instance ID, from --device/--instance or from --device-info."""
    key: PublicKey | None = load_public(args.device) if args.device else None
    instance: bytes | None = None
    if args.instance:
        try:
            instance = bytes.fromhex(args.instance)
        except ValueError:
            raise UsageError("cli.argument", "--instance must be hex", got=args.instance) from None
    if args.device_info:
        try:
            info = json.loads(_read(args.device_info, "device info"))
            info_key = read_public_pem(str(info["policy_key"]).encode(), str(args.device_info))
            info_instance = bytes.fromhex(info["instance_id"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(
                "cli.argument",
                "--device-info must be the output of 'ism device info --json'",
                subject=str(args.device_info),
            ) from exc
        if key is not None and signer_id(key) != signer_id(info_key):
            raise UsageError("cli.argument", "--device and --device-info name different keys")
        if instance is not None and instance != info_instance:
            raise UsageError("cli.argument", "--instance and --device-info name different devices")
        key, instance = info_key, info_instance
    if key is None or instance is None:
        raise UsageError(
            "cli.argument", "name the device: --device KEY.pem and --instance HEX, or --device-info INFO.json"
        )
    return key, instance


def cmd_policy_compile(args: argparse.Namespace) -> None:
    device_key, instance = _device_target(args)
    payload = make_payload(
        _read(args.board, "board file").decode("utf-8", "replace"),
        _read(args.policy, "policy").decode("utf-8", "replace"),
        instance,
    )
    signer = load_private(args.sign)
    artifact = seal(payload.encode(), device_key, signer)
    _write(args.out, artifact)
    _emit(
        args,
        {
            "out": str(args.out),
            "size": len(artifact),
            "version": payload.version,
            "instance_id": instance.hex(),
            "signer": signer_id(signer).hex(),
            "device_key": signer_id(device_key).hex(),
        },
        f"wrote {args.out}: policy version {payload.version}, signed by {signer_id(signer).hex()[:16]}..., "
        f"readable only by device {instance.hex()[:18]}...",
    )


def cmd_device_install(args: argparse.Namespace) -> None:
    dev = Device(args.dir)
    downgrade = _read(args.downgrade, "downgrade authorisation") if args.downgrade else None
    try:
        acc = dev.install(_read(args.package, "package"), downgrade)
    except IsmError as exc:
        _fail_json(args, exc, {"package": str(args.package)})
    meta = acc.package.meta
    _emit(
        args,
        {"valid": True, **acc.package.summary(), "downgrade": acc.downgraded},
        f"staged {meta.name} {meta.version} (sequence {meta.sequence}) as {meta.uuid}",
    )


def format_boot_report(report: dict[str, Any]) -> str:
    lines = [
        f"secure boot of device {report['instance_id'][:18]}...: {report['booted']} booted, {report['refused']} refused"
        + (f", {report['held']} held" if report.get("held") else "")
    ]
    for e in report["microservices"]:
        ident = f"{e['name'] or '?'} {e['version'] or '?'} seq={e['sequence']}"
        if e["verdict"] == "booted":
            note = "  (authorised downgrade)" if e["downgraded"] else ""
            lines.append(
                f"  BOOTED   {ident:32} measurement {e['measurement'][:16]}... signer {e['signer'][:16]}...{note}"
            )
        elif e["verdict"] == "held":
            lines.append(f"  HELD     {ident:32} rule {e['rule']}: {e['message']}")
        else:
            lines.append(f"  REFUSED  {ident:32} rule {e['rule']}: {e['message']}")
    return "\n".join(lines)


def cmd_device_boot(args: argparse.Namespace) -> None:
    report = Device(args.dir).boot(full=args.full).to_json()
    _emit(args, report, format_boot_report(report))


def cmd_device_configure(args: argparse.Namespace) -> None:
    dev = Device(args.dir)
    policy = dev.configure(
        _read(args.board, "board file").decode("utf-8", "replace"),
        _read(args.policy, "policy").decode("utf-8", "replace"),
    )
    names = sorted(policy.by_name)
    _emit(
        args,
        {"board": policy.board, "version": policy.version, "microservices": names},
        f"configured board {policy.board}, policy version {policy.version} for {', '.join(names)}",
    )


def cmd_device_key(args: argparse.Namespace) -> None:
    from ism.services.crypto import key_store_id

    dev = Device(args.dir)
    entry = dev.policy().by_name.get(args.microservice)
    ms_uuid = str(entry.uuid) if entry is not None else args.microservice
    try:
        der = dev.keystore().public_key(key_store_id(str(uuidlib.UUID(ms_uuid)), args.key))
    except ValueError:
        raise UsageError(
            "cli.argument", "name a microservice of the policy, or a UUID", got=args.microservice
        ) from None
    pem = pem_from_der(der).decode()
    _emit(args, {"microservice": ms_uuid, "key": args.key, "public_pem": pem}, pem.rstrip())


def _print_records(records: list[dict[str, Any]]) -> None:
    for r in records:
        target = f" [{r['target']}]" if r.get("target") else ""
        print(f"  #{r.get('id')} {r['name']} {r['version']}: {r['rule']}{target} — {r['details']} -> {r['action']}")
        for frame in r.get("backtrace", [])[:4]:
            print(f"      at {frame}")


def cmd_device_erase(args: argparse.Namespace) -> None:
    from ism.runtime import erase_microservice

    with Device(args.dir) as dev:
        entry = dev.policy().by_name.get(args.microservice)
        try:
            ms_uuid = entry.uuid if entry is not None else uuidlib.UUID(args.microservice)
        except ValueError:
            raise UsageError(
                "cli.argument", "name a microservice of the policy, or a UUID", got=args.microservice
            ) from None
        keys = sorted(entry.keys) if entry is not None else []
        erase_microservice(dev, ms_uuid, keys)
    _emit(
        args,
        {"erased": str(ms_uuid), "keys": keys},
        f"crypto-erased {args.microservice}: its storage namespace and keys {keys} are gone",
    )


def cmd_device_violations(args: argparse.Namespace) -> None:
    outbox = Device(args.dir).outbox()
    try:
        records = outbox.records(include_acked=args.all)
    finally:
        outbox.close()
    if args.json:
        print(json.dumps({"violations": records}, indent=2))
        return
    print(f"{len(records)} violation record(s)")
    _print_records(records)


#: seconds between two looks at the stored policy while a device runs
POLICY_POLL = 0.5


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _reload_policy(runtime: Any, quiet: bool) -> None:
    try:
        outcome = runtime.reload_policy()
    except IsmError as exc:
        print(f"policy not applied: {exc}", file=sys.stderr, flush=True)
        return
    if outcome is not None and not quiet:
        changes = ", ".join(f"{k}: {', '.join(v)}" for k, v in outcome.items() if v and k != "unchanged")
        changes = changes or "no microservice affected"
        print(f"policy version {runtime.policy.version} in effect ({changes})", flush=True)


def cmd_device_run(args: argparse.Namespace) -> None:
    from ism.boards.virtual import Fingerprint, Uart
    from ism.hostlink import UartBridge
    from ism.runtime import Runtime

    def on_log(name: str, level: int, text: str) -> None:
        if not args.json:
            print(f"[{name}] {text}", flush=True)

    runtime = Runtime.start(args.dir, on_log=on_log)
    bridge = None
    try:
        sup = runtime.supervisor
        seen = len(sup.records)
        if args.finger:
            sensor = runtime.peripherals.get("spi.fingerprint")
            if isinstance(sensor, Fingerprint):
                sensor.place(_read(args.finger, "finger")[:64].ljust(64, b"\0"))
        uart = runtime.peripherals.get("uart.host")
        if args.uart_port is not None and isinstance(uart, Uart):
            bridge = UartBridge(uart, args.uart_port)
            print(f"uart.host on 127.0.0.1:{bridge.port}", flush=True)
        if not args.json:
            print(f"running {len(sup.microservices)} microservice(s) for {args.seconds:g} s", flush=True)
        end = time.monotonic() + args.seconds
        policy_file = args.dir / "config" / "policy.cose"
        stamp, next_check = _stamp(policy_file), time.monotonic() + POLICY_POLL
        lifecycle = LifecycleWatch(runtime, quiet=args.json)  # 'ism device microservice' from another process
        while time.monotonic() < end:
            sup.step()
            if bridge is not None:
                bridge.flush()
            if time.monotonic() >= next_check:  # 'ism device policy' from another process: apply it live
                next_check = time.monotonic() + POLICY_POLL
                if _stamp(policy_file) != stamp:
                    stamp = _stamp(policy_file)
                    _reload_policy(runtime, args.json)
                lifecycle.check()
            if not args.json and len(sup.records) > seen:
                _print_records([r.to_json() for r in sup.records[seen:]])
                seen = len(sup.records)
            time.sleep(0.002)
        result = {
            "boot": runtime.report.to_json(),
            "microservices": sup.status(),
            "violations": [r.to_json() for r in sup.records],
        }
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            for st in sup.status():
                print(f"  {st['name']:14} {st['state']:12} faults={st['faults']} restarts={st['restarts']}")
    finally:
        if bridge is not None:
            bridge.close()
        runtime.close()


def cmd_device_attest(args: argparse.Namespace) -> None:
    from ism.crypto.attestation import verify_token
    from ism.runtime import attestation_service

    try:
        nonce = bytes.fromhex(args.nonce)
    except ValueError:
        raise UsageError("cli.argument", "--nonce must be hex", got=args.nonce) from None
    if len(nonce) not in (32, 48, 64):
        raise UsageError("cli.argument", "--nonce must be 32, 48 or 64 bytes", got=len(nonce))
    with Device(args.dir) as dev:
        report = dev.boot()
        policy = dev.policy() if dev.configured() else None
        service = attestation_service(dev, report, policy, lambda _uuid: None)
        token = service.device_token(nonce)
        iak_pem = pem_from_der(service.public_key_der)
        iak_path = dev.root / "keys" / "iak.pub.pem"
        _write(iak_path, iak_pem)
    _write(args.out, token)
    verified = verify_token(token, read_public_pem(iak_pem), nonce=nonce)
    _emit(
        args,
        {"token": str(args.out), "size": len(token), "iak": str(iak_path), **verified.to_json()},
        f"wrote {args.out} ({len(token)} bytes), signed by the initial attestation key {iak_path}\n"
        + format_summary(verified),
    )


def cmd_demo(args: argparse.Namespace) -> None:
    from ism.cli.demo import run_demo

    run_demo(args.examples, args.out)


# -- parser ---------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ism", description="iSM, the integrated Security Manager")
    p.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        parent: Any, name: str, func: Callable[[argparse.Namespace], None], help_: str, json_opt: bool = True
    ) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=func)
        if json_opt:
            sp.add_argument("--json", action="store_true", help="print a JSON result")
        return sp

    k = add(sub, "keygen", cmd_keygen, "generate a signing key pair (KEY.pem, mode 0600, and KEY.pub.pem)")
    k.add_argument("--alg", choices=["es256", "ed25519"], default="es256")
    k.add_argument("--out", type=Path, required=True)

    pkg = sub.add_parser("package", help="build, inspect and verify microservice packages").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND"
    )
    b = add(pkg, "build", cmd_package_build, "build and sign a microservice package (SUIT envelope)")
    b.add_argument("--wasm", type=Path, required=True)
    b.add_argument("--meta", type=Path, required=True)
    b.add_argument("--key", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    i = add(pkg, "inspect", cmd_package_inspect, "print every field of a package")
    i.add_argument("package", type=Path)
    v = add(pkg, "verify", cmd_package_verify, "verify digest, signature and conditions of a package")
    v.add_argument("package", type=Path)
    v.add_argument("--trust", type=Path, action="append", required=True, help="trust anchor public key (repeatable)")
    d = add(
        pkg,
        "authorize-downgrade",
        cmd_package_downgrade,
        "sign a downgrade authorisation for one microservice on one device",
    )
    d.add_argument("--uuid", required=True)
    d.add_argument("--sequence", type=int, required=True, help="target sequence number")
    d.add_argument("--from", dest="from_counter", type=int, required=True, help="current counter value")
    d.add_argument("--instance", required=True, help="device instance ID (hex)")
    d.add_argument("--key", type=Path, required=True, help="trust anchor private key")
    d.add_argument("--out", type=Path, required=True)

    s = sub.add_parser("suit", help="general SUIT tools").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND"
    )
    sv = add(s, "verify", cmd_suit_verify, "verify any SUIT envelope (COSE_Sign1 or COSE_Mac0)")
    sv.add_argument("file", type=Path)
    g = sv.add_mutually_exclusive_group(required=True)
    g.add_argument("--key", type=Path, help="public key PEM")
    g.add_argument("--hmac-key", type=Path, help="raw HMAC key file")

    dev = sub.add_parser("device", help="manage a virtual device").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND"
    )
    di = add(dev, "init", cmd_device_init, "create a virtual device directory")
    di.add_argument("dir", type=Path)
    di.add_argument(
        "--keystore",
        choices=["software", "pkcs11", "tpm"],
        default="software",
        help="where the device's keys live (default: software, sealed in the device directory)",
    )
    di.add_argument("--pkcs11-module", help="PKCS#11 module (.so), e.g. SoftHSM2's libsofthsm2.so")
    di.add_argument("--pkcs11-token", help="token label")
    di.add_argument("--pkcs11-pin-file", type=Path, help="file holding the user PIN")
    di.add_argument("--tpm-tcti", help="TPM 2.0 TCTI, e.g. device:/dev/tpmrm0 or swtpm:host=127.0.0.1,port=2321")
    add(dev, "info", cmd_device_info, "show instance ID, trust anchors, counters, packages, lifecycle").add_argument(
        "dir", type=Path
    )
    bt = add(dev, "boot", cmd_device_boot, "secure boot: verify every microservice and print the boot report")
    bt.add_argument("dir", type=Path)
    bt.add_argument(
        "--full",
        action="store_true",
        help="re-verify every package in full, even those unchanged since their last full verification",
    )
    t = add(
        dev,
        "trust",
        cmd_device_trust,
        "factory step (before 'ism device lock'): add a trust anchor for microservice signers (or another role)",
    )
    t.add_argument("dir", type=Path)
    t.add_argument("--add", type=Path, action="append", required=True)
    t.add_argument(
        "--role",
        choices=ANCHOR_ROLES,
        default="microservice",
        help="what the anchor vouches for: microservice packages (default), the access policy, the vendor's "
        "device commands, the store's bans",
    )
    ins = add(dev, "install", cmd_device_install, "verify and stage a package on a device")
    ins.add_argument("dir", type=Path)
    ins.add_argument("package", type=Path)
    ins.add_argument("--downgrade", type=Path, help="downgrade authorisation (COSE)")

    cfg = add(dev, "configure", cmd_device_configure, "install the board file and the access policy")
    cfg.add_argument("dir", type=Path)
    cfg.add_argument("--board", type=Path, required=True)
    cfg.add_argument("--policy", type=Path, required=True)
    dpk = add(dev, "policy-key", cmd_device_policy_key, "print the device's policy key (policies are encrypted to it)")
    dpk.add_argument("dir", type=Path)
    dpk.add_argument("--out", type=Path, help="also write the PEM to this file")
    dpo = add(dev, "policy", cmd_device_policy, "install a protected policy artifact (signed, encrypted to the device)")
    dpo.add_argument("dir", type=Path)
    dpo.add_argument("artifact", type=Path)
    run = add(dev, "run", cmd_device_run, "boot the device and run its microservices")
    run.add_argument("dir", type=Path)
    run.add_argument("--for", dest="seconds", type=float, default=10.0, help="seconds to run (default 10)")
    run.add_argument("--uart-port", type=int, help="serve uart.host on 127.0.0.1:PORT (0 picks a port)")
    run.add_argument("--finger", type=Path, help="place this 64-byte finger on the fingerprint sensor")
    era = add(
        dev,
        "erase",
        cmd_device_erase,
        "crypto-erase a microservice's storage and keys (its records become unreadable, even from copies)",
    )
    era.add_argument("dir", type=Path)
    era.add_argument("microservice", help="microservice name (from the policy) or UUID")
    vio = add(dev, "violations", cmd_device_violations, "list the violation records in the device's outbox")
    vio.add_argument("dir", type=Path)
    vio.add_argument("--all", action="store_true", help="include records the store acknowledged")
    key = add(dev, "key", cmd_device_key, "print the public key of a microservice's key (crypto service)")
    key.add_argument("dir", type=Path)
    key.add_argument("microservice", help="microservice name (from the policy) or UUID")
    key.add_argument("key", help="key name (as granted in the policy)")

    att = add(dev, "attest", cmd_device_attest, "boot the device and produce its PSA attestation token")
    att.add_argument("dir", type=Path)
    att.add_argument("--nonce", required=True, help="the verifier's nonce (hex, 32, 48 or 64 bytes)")
    att.add_argument("--out", type=Path, required=True, help="where to write the token (COSE_Sign1)")
    add_attest_commands(sub, add)
    add_microservice_commands(dev, add)
    add_lifecycle_commands(dev, add)
    add_provision_commands(sub, add)

    pol = sub.add_parser("policy", help="the protected access policy").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND"
    )
    pc = add(
        pol,
        "compile",
        cmd_policy_compile,
        "compile board file + policy into an artifact signed by the vendor and encrypted to one device",
    )
    pc.add_argument("policy", type=Path, help="the access policy (TOML)")
    pc.add_argument("--board", type=Path, required=True, help="the board file (TOML)")
    pc.add_argument("--sign", type=Path, required=True, help="the vendor's policy signing key (private PEM)")
    pc.add_argument("--device", type=Path, help="the device's policy key (PEM, from 'ism device policy-key')")
    pc.add_argument("--instance", help="the device's instance ID (hex, from 'ism device info')")
    pc.add_argument(
        "--device-info", type=Path, help="'ism device info --json' output: gives both the key and the instance ID"
    )
    pc.add_argument("--out", type=Path, required=True)

    dm = add(sub, "demo", cmd_demo, "run the demonstration story", json_opt=False)
    dm.add_argument("--examples", type=Path, default=Path("build/examples"), help="built example modules")
    dm.add_argument("--out", type=Path, default=Path("demo-out"), help="working directory (recreated)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point. Returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except IsmError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
