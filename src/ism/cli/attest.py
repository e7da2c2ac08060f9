"""``ism attest``: verify a PSA attestation token and appraise it against reference values.

Thin: reads the files (with size caps), calls :mod:`ism.crypto.attestation`,
prints. Wired into ``ism`` by :func:`add_attest_commands`, which
``ism.cli.main`` calls with its top-level subparsers and its ``add`` helper.

``ism attest verify TOKEN (--key PUB.pem | --hmac-key KEY.bin) [--nonce HEX]
[--ref REFERENCE.json] [--json]`` exits 0 only when the signature (or MAC)
verifies, the claims follow their profile, the nonce (if given) matches and,
with ``--ref``, the appraisal is ``affirming``. Otherwise it prints one line
``error: [CODE rule] message`` (an appraisal that is not affirming is
``attest.appraisal``); with ``--json`` the full result is printed first.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from ism.cli._io import read_file
from ism.crypto.attestation import MAX_TOKEN, Appraisal, VerifiedToken, appraise, verify_token
from ism.crypto.keys import load_public
from ism.errors import IsmError, TrustError, UsageError
from ism.formats.psa import Reference, parse_reference

__all__ = ["add_attest_commands", "cmd_attest_verify", "format_summary"]

MAX_REFERENCE: Final = 1024 * 1024
MAX_HMAC_KEY: Final = 1024

#: ``add(parent, name, func, help_, json_opt=True) -> ArgumentParser`` of ``ism.cli.main``.
AddCommand = Callable[..., argparse.ArgumentParser]


def _nonce(text: str | None) -> bytes | None:
    if text is None:
        return None
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise UsageError("cli.argument", "--nonce must be hex", got=text) from None


def format_summary(verified: VerifiedToken, appraisal: Appraisal | None = None) -> str:
    """A human summary of a verified token and (optionally) its appraisal."""
    c = verified.claims
    who = f" (signer {verified.signer.hex()[:16]}...)" if verified.signer else ""
    kind = "COSE_Sign1" if verified.kind == "sign1" else "COSE_Mac0"
    profile = c.profile + (" (legacy)" if c.legacy else "")
    if c.profile_claim not in (None, c.profile):
        profile += f", profile claim {c.profile_claim!r}"
    lines = [
        f"OK {kind} {verified.alg} verifies{who}",
        f"  {'profile':16} {profile}",
        f"  {'nonce':16} {c.nonce.hex()}",
        f"  {'instance id':16} {c.instance_id.hex()}",
        f"  {'implementation':16} {c.implementation_id.hex()}",
        f"  {'client id':16} {c.client_id}",
        f"  {'lifecycle':16} {c.lifecycle_state} ({c.lifecycle:#06x})",
    ]
    if c.lifecycle_log is not None:
        lines.append(f"  {'lifecycle log':16} {c.lifecycle_log.hex()} (head)")
    if c.certification_reference:
        lines.append(f"  {'certification':16} {c.certification_reference}")
    if c.no_sw_measurements:
        lines.append(f"  {'components':16} none measured (no-sw-measurements)")
    for comp in c.software_components:
        lines.append(
            f"  component {comp.measurement_type or '?':14} {comp.version or '-':10} "
            f"measurement {comp.measurement_value.hex()[:16]}... signer {comp.signer_id.hex()[:16]}..."
        )
    for ms in c.microservices():
        lines.append(
            f"  microservice {ms.name:11} {ms.version:10} seq={ms.sequence} {ms.lifecycle:11} "
            f"measurement {ms.measurement.hex()[:16]}..."
        )
    if appraisal is not None:
        lines.append(f"appraisal: {appraisal.status.value}")
        for item in appraisal.components:
            lines.append(f"  [{item.status.value}] {item.kind} {item.name}: {'; '.join(item.reasons)}")
    return "\n".join(lines)


def cmd_attest_verify(args: argparse.Namespace) -> None:
    """``ism attest verify``: see the module docstring."""
    as_json = getattr(args, "json", False)
    result: dict[str, Any] = {"valid": False, "token": str(args.token)}
    try:
        data = read_file(args.token, "token", MAX_TOKEN)
        nonce = _nonce(args.nonce)
        key = load_public(args.key) if args.key else None
        hmac_key = read_file(args.hmac_key, "HMAC key", MAX_HMAC_KEY) if args.hmac_key else None
        reference: Reference | None = None
        if args.ref:
            reference = parse_reference(read_file(args.ref, "reference", MAX_REFERENCE), str(args.ref))
        verified = verify_token(data, key=key, hmac_key=hmac_key, nonce=nonce)
    except IsmError as exc:
        if as_json:
            print(json.dumps({**result, **exc.to_dict()}, indent=2))
        raise
    appraisal = appraise(verified, reference) if reference is not None else None
    result.update(valid=True, **verified.to_json())
    result["appraisal"] = None if appraisal is None else appraisal.to_json()
    result["result"] = "verified" if appraisal is None else appraisal.status.value
    failure = None
    if appraisal is not None and not appraisal.affirming:
        worst = next(c for c in appraisal.components if c.status is appraisal.status)
        failure = TrustError(
            "attest.appraisal",
            f"appraisal is {appraisal.status.value}: {worst.kind} {worst.name}: {worst.reasons[0]}",
            got=appraisal.status.value,
            expected="affirming",
        )
    if as_json:
        print(json.dumps({**result, **(failure.to_dict() if failure else {})}, indent=2))
    else:
        print(format_summary(verified, appraisal))
    if failure is not None:
        raise failure


def add_attest_commands(subparsers: Any, add: AddCommand) -> Any:
    """Adds ``ism attest ...`` to the top-level ``subparsers``; returns the ``attest`` subparsers.

    Args:
        subparsers: the top-level subparsers action of the ``ism`` parser.
        add: ``ism.cli.main``'s helper ``add(parent, name, func, help_, json_opt=True)``.
    """
    group = subparsers.add_parser("attest", help="verify and appraise PSA attestation tokens").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND"
    )
    verify = add(
        group,
        "verify",
        cmd_attest_verify,
        "verify a PSA attestation token (COSE_Sign1 or COSE_Mac0) and appraise it against reference values",
    )
    verify.add_argument("token", type=Path)
    keys = verify.add_mutually_exclusive_group(required=True)
    keys.add_argument("--key", type=Path, help="attestation public key (PEM)")
    keys.add_argument("--hmac-key", type=Path, help="raw HMAC attestation key file (COSE_Mac0 tokens)")
    verify.add_argument("--nonce", help="the nonce the token must carry (hex)")
    verify.add_argument("--ref", type=Path, help="reference values (JSON, see docs/attestation.md)")
    return group
