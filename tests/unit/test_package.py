"""The package profile: M.toml parsing, building and reading back a package."""

from __future__ import annotations

import hashlib
import uuid as uuidlib
from collections.abc import Callable

import pytest

from ism.crypto import suit as suit_auth
from ism.crypto.keys import PrivateKey
from ism.errors import FormatError
from ism.formats import cbor, package, suit

GOOD_TOML = """\
uuid = "5c0fa1e2-0b6e-4d43-9d1c-7d2f1c7f0a09"
vendor = "0b1d6f3a-6a7e-4f2e-8f3e-5b2c9d1e7a10"
name = "full-example"
version = "1.2.3-rc.1+build.5"
sequence = 7
description = "Every field set."
vendor_name = "iSM tests"
certifications = ["cert-a", "cert-b"]

[requests]
resources = { "gpio.led0" = ["write", "read"], "timer" = "read", "uart_1.tx" = ["control"] }
gateways = ["echo.op_echo", "hello.init"]
storage = 4096
"""

REQUIRED = ("uuid", "vendor", "name", "version", "sequence")


def _replace_line(key: str, line: str | None) -> str:
    """GOOD_TOML with the top-level line of ``key`` replaced (or removed when ``line`` is None)."""
    out = []
    for current in GOOD_TOML.splitlines():
        if current.startswith(f"{key} ="):
            if line is not None:
                out.append(line)
        else:
            out.append(current)
    return "\n".join(out) + "\n"


def _with_requests(body: str) -> str:
    head = GOOD_TOML.split("[requests]")[0]
    return head + "[requests]\n" + body + "\n"


BAD_META: dict[str, tuple[str, str, str]] = {
    # name: (M.toml text, rule, key named in the subject)
    "unknown-key": (GOOD_TOML.replace("sequence = 7", "sequence = 7\nsequense = 8"), "package.meta-key", "sequense"),
    "unknown-requests-key": (
        _with_requests('resources = {}\nnetwork = ["tcp"]'),
        "package.meta-key",
        "requests.network",
    ),
    "bad-uuid": (_replace_line("uuid", 'uuid = "not-a-uuid"'), "package.meta-uuid", "uuid"),
    "bad-vendor-uuid": (_replace_line("vendor", 'vendor = "5c0fa1e2-0b6e"'), "package.meta-uuid", "vendor"),
    "uuid-not-text": (_replace_line("uuid", "uuid = 12"), "package.meta-type", "uuid"),
    "bad-semver-two-parts": (_replace_line("version", 'version = "1.2"'), "package.meta-version", "version"),
    "bad-semver-leading-zero": (_replace_line("version", 'version = "01.2.3"'), "package.meta-version", "version"),
    "bad-semver-v-prefix": (_replace_line("version", 'version = "v1.2.3"'), "package.meta-version", "version"),
    "bad-name-upper-case": (_replace_line("name", 'name = "Hello"'), "package.meta-name", "name"),
    "bad-name-leading-digit": (_replace_line("name", 'name = "1hello"'), "package.meta-name", "name"),
    "bad-name-underscore": (_replace_line("name", 'name = "hello_world"'), "package.meta-name", "name"),
    "bad-name-too-long": (_replace_line("name", f'name = "{"a" * 33}"'), "package.meta-type", "name"),
    "bad-name-trailing-newline": (_replace_line("name", 'name = "hello\\n"'), "package.meta-name", "name"),
    "bad-version-trailing-newline": (
        _replace_line("version", 'version = "1.0.0\\n"'),
        "package.meta-version",
        "version",
    ),
    "negative-sequence": (_replace_line("sequence", "sequence = -1"), "package.meta-sequence", "sequence"),
    "sequence-as-string": (_replace_line("sequence", 'sequence = "7"'), "package.meta-sequence", "sequence"),
    "sequence-as-bool": (_replace_line("sequence", "sequence = true"), "package.meta-sequence", "sequence"),
    "sequence-too-large": (_replace_line("sequence", f"sequence = {1 << 63}"), "package.meta-sequence", "sequence"),
    "bad-resource-mode": (
        _with_requests('resources = { "gpio.led0" = ["execute"] }'),
        "package.meta-resource",
        "requests.resources.gpio.led0",
    ),
    "duplicate-resource-mode": (
        _with_requests('resources = { "timer" = ["read", "read"] }'),
        "package.meta-resource",
        "requests.resources.timer",
    ),
    "empty-resource-modes": (
        _with_requests('resources = { "timer" = [] }'),
        "package.meta-resource",
        "requests.resources.timer",
    ),
    "nested-resource-modes": (
        _with_requests('resources = { "timer" = [["read"]] }'),
        "package.meta-resource",
        "requests.resources.timer",
    ),
    "bad-resource-name": (
        _with_requests('resources = { "GPIO" = ["read"] }'),
        "package.meta-resource",
        "requests.resources.GPIO",
    ),
    "bad-gateway-no-operation": (_with_requests('gateways = ["echo"]'), "package.meta-gateway", "requests.gateways"),
    "bad-gateway-upper-case": (_with_requests('gateways = ["Echo.op"]'), "package.meta-gateway", "requests.gateways"),
    "gateway-twice": (
        _with_requests('gateways = ["echo.op_echo", "echo.op_echo"]'),
        "package.meta-gateway",
        "requests.gateways",
    ),
    "negative-storage": (_with_requests("storage = -1"), "package.meta-type", "requests.storage"),
    "requests-not-a-table": (
        GOOD_TOML.split("[requests]")[0].replace("sequence = 7", 'sequence = 7\nrequests = "all"'),
        "package.meta-type",
        "requests",
    ),
    "certifications-not-strings": (
        _replace_line("certifications", "certifications = [1, 2]"),
        "package.meta-type",
        "certifications",
    ),
    "description-not-text": (_replace_line("description", "description = 3"), "package.meta-type", "description"),
    "not-toml": ("uuid = \n", "package.meta-syntax", ""),
}
BAD_META.update({f"missing-{key}": (_replace_line(key, None), "package.meta-missing", key) for key in REQUIRED})


def test_good_meta_parses_every_field() -> None:
    meta = package.parse_meta(GOOD_TOML)
    assert meta.uuid == uuidlib.UUID("5c0fa1e2-0b6e-4d43-9d1c-7d2f1c7f0a09")
    assert meta.vendor == uuidlib.UUID("0b1d6f3a-6a7e-4f2e-8f3e-5b2c9d1e7a10")
    assert (meta.name, meta.version, meta.sequence) == ("full-example", "1.2.3-rc.1+build.5", 7)
    assert (meta.description, meta.vendor_name) == ("Every field set.", "iSM tests")
    assert meta.certifications == ("cert-a", "cert-b")
    assert dict(meta.requests.resources) == {
        "gpio.led0": ("write", "read"),
        "timer": ("read",),
        "uart_1.tx": ("control",),
    }
    assert meta.requests.gateways == ("echo.op_echo", "hello.init")
    assert meta.requests.storage == 4096


def test_optional_fields_default() -> None:
    text = "\n".join(line for line in GOOD_TOML.split("[requests]")[0].splitlines() if line.split(" =")[0] in REQUIRED)
    meta = package.parse_meta(text)
    assert (meta.description, meta.vendor_name, meta.certifications) == ("", "", ())
    assert meta.requests == package.Requests()


@pytest.mark.parametrize("case", sorted(BAD_META))
def test_parse_meta_rejects(case: str) -> None:
    text, rule, key = BAD_META[case]
    with pytest.raises(FormatError) as info:
        package.parse_meta(text, "svc/M.toml")
    assert info.value.rule == rule
    expected_subject = f"svc/M.toml: {key}" if key else "svc/M.toml"
    assert info.value.subject == expected_subject
    assert str(info.value).startswith(f"[100 {rule}]")


def test_every_example_meta_parses(make_meta: Callable[..., package.PackageMeta]) -> None:
    names = {make_meta(example).name for example in ("blinky", "echo", "hello")}
    assert names == {"blinky", "echo", "hello"}


# -- build -> read ---------------------------------------------------------------------------------


@pytest.fixture
def full_meta() -> package.PackageMeta:
    return package.parse_meta(GOOD_TOML)


def test_build_then_read_round_trips_every_field(
    full_meta: package.PackageMeta,
    wasm_modules: dict[str, bytes],
    sign_parts: Callable[..., bytes],
    dev_key: PrivateKey,
) -> None:
    wasm = wasm_modules["echo"]
    manifest_bytes, members, integrated = package.build_unsigned(full_meta, wasm)
    assert integrated == {package.PAYLOAD_URI: wasm}
    assert set(members) == {suit.TEXT, suit.ISM_METADATA}
    data = sign_parts(manifest_bytes, members, integrated, dev_key)

    pkg = package.read_package(suit.parse_envelope(data))

    assert pkg.meta == full_meta
    assert pkg.payload == wasm
    assert pkg.measurement == hashlib.sha256(wasm).digest()
    assert pkg.envelope.manifest_bytes == manifest_bytes
    assert pkg.envelope.manifest.components == (package.COMPONENT,)
    assert pkg.summary() == {
        "uuid": str(full_meta.uuid),
        "vendor": str(full_meta.vendor),
        "name": "full-example",
        "version": "1.2.3-rc.1+build.5",
        "sequence": 7,
        "description": "Every field set.",
        "vendor_name": "iSM tests",
        "measurement": hashlib.sha256(wasm).hexdigest(),
        "payload_size": len(wasm),
        "requests": {
            "resources": {"gpio.led0": ["write", "read"], "timer": ["read"], "uart_1.tx": ["control"]},
            "gateways": ["echo.op_echo", "hello.init"],
            "storage": 4096,
            "keys": [],
        },
        "certifications": ["cert-a", "cert-b"],
        "components": ["microservice"],
    }


@pytest.mark.parametrize("example", ["blinky", "echo", "hello"])
def test_examples_round_trip(
    example: str, build_package: Callable[..., bytes], make_meta: Callable[..., package.PackageMeta]
) -> None:
    pkg = package.read_package(suit.parse_envelope(build_package(example)))
    assert pkg.meta == make_meta(example)


def test_manifest_follows_the_profile(full_meta: package.PackageMeta, wasm_modules: dict[str, bytes]) -> None:
    wasm = wasm_modules["hello"]
    manifest_bytes, members, _ = package.build_unsigned(full_meta, wasm)
    man = suit.parse_manifest(manifest_bytes)
    assert man.sequence == 7
    assert [c.code for c in man.shared] == [suit.CMD_OVERRIDE_PARAMETERS, suit.CMD_VENDOR_ID, suit.CMD_CLASS_ID]
    params = man.shared[0].arg
    assert params[suit.P_VENDOR_ID] == full_meta.vendor.bytes
    assert params[suit.P_CLASS_ID] == full_meta.uuid.bytes
    assert params[suit.P_IMAGE_SIZE] == len(wasm)
    assert cbor.loads(params[suit.P_IMAGE_DIGEST]) == [-16, hashlib.sha256(wasm).digest()]
    assert [c.code for c in man.sequences[suit.INSTALL]] == [
        suit.CMD_OVERRIDE_PARAMETERS,
        suit.CMD_FETCH,
        suit.CMD_IMAGE_MATCH,
    ]
    assert [c.code for c in man.sequences[suit.M_VALIDATE]] == [suit.CMD_IMAGE_MATCH]
    assert [c.code for c in man.sequences[suit.M_INVOKE]] == [suit.CMD_INVOKE]
    for label, content in members.items():
        assert man.severable[label] == suit.make_digest(content)


def test_build_is_deterministic(full_meta: package.PackageMeta, wasm_modules: dict[str, bytes]) -> None:
    first = package.build_unsigned(full_meta, wasm_modules["hello"])
    second = package.build_unsigned(full_meta, wasm_modules["hello"])
    assert first == second


def test_requests_keys_round_trip(wasm_modules: dict[str, bytes], dev_key: PrivateKey) -> None:
    """Named keys a microservice asks for travel in the signed metadata."""
    text = (
        'uuid = "5c0fa1e2-0b6e-4d43-9d1c-7d2f1c7f0a09"\nvendor = "0b1d6f3a-6a7e-4f2e-8f3e-5b2c9d1e7a10"\n'
        'name = "keyed"\nversion = "1.0.0"\nsequence = 1\n[requests]\nkeys = ["device-2fa"]\n'
    )
    meta = package.parse_meta(text)
    assert meta.requests.keys == ("device-2fa",)
    manifest_bytes, members, integrated = package.build_unsigned(meta, wasm_modules["hello"])
    auth = suit_auth.sign_manifest(manifest_bytes, dev_key)
    env = suit.parse_envelope(suit.encode_envelope(auth, manifest_bytes, members, integrated))
    assert package.read_package(env).meta.requests.keys == ("device-2fa",)
    with pytest.raises(FormatError) as info:
        package.parse_meta(text.replace('["device-2fa"]', '["Device 2FA"]'))
    assert info.value.rule == "package.meta-key-name"
