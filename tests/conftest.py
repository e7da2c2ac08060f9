"""Shared fixtures: example Wasm modules, developer keys, signed packages and fresh devices.

Everything is built from source inside pytest's temporary directories: the
examples' ``.wat`` files are compiled with :func:`wasmtime.wat2wasm`, so the
tests never depend on a prior ``make``.
"""

from __future__ import annotations

import dataclasses
import uuid as uuidlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from ism.crypto import suit as suit_auth
from ism.crypto.keys import PrivateKey, generate, public_pem
from ism.device.virtual import Device
from ism.formats import package, suit

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_NAMES = ("blinky", "echo", "hello")

#: Same length as the greeting in hello.wat, so the variant's module has the same size.
_HELLO_TEXT = "hello from a signed microservice"
_HELLO_VARIANT_TEXT = "HELLO FROM A SIGNED MICROSERVICE"

BuildPackage = Callable[..., bytes]


def example_meta_text(name: str) -> str:
    """The M.toml text of one example."""
    return (EXAMPLES / name / f"{name}.toml").read_text()


@pytest.fixture(scope="session")
def wasm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every example compiled to ``NAME.wasm`` (plus ``hello-variant.wasm``) in a session directory."""
    out = tmp_path_factory.mktemp("wasm")
    for name in EXAMPLE_NAMES:
        wat = (EXAMPLES / name / f"{name}.wat").read_text()
        (out / f"{name}.wasm").write_bytes(bytes(wasmtime.wat2wasm(wat)))
        if name == "hello":
            assert _HELLO_TEXT in wat
            variant = wat.replace(_HELLO_TEXT, _HELLO_VARIANT_TEXT)
            (out / "hello-variant.wasm").write_bytes(bytes(wasmtime.wat2wasm(variant)))
    return out


@pytest.fixture(scope="session")
def wasm_modules(wasm_dir: Path) -> dict[str, bytes]:
    """Example module bytes by name: ``blinky``, ``echo``, ``hello`` and ``hello-variant``.

    ``hello-variant`` differs from ``hello`` in content but not in size.
    """
    modules = {p.stem: p.read_bytes() for p in sorted(wasm_dir.glob("*.wasm"))}
    assert len(modules["hello"]) == len(modules["hello-variant"])
    assert modules["hello"] != modules["hello-variant"]
    return modules


@pytest.fixture(scope="session")
def dev_key() -> PrivateKey:
    """The developer's ES256 signing key; fresh devices trust it."""
    return generate("es256")


@pytest.fixture(scope="session")
def ed25519_key() -> PrivateKey:
    """A developer Ed25519 signing key (not trusted by default)."""
    return generate("ed25519")


@pytest.fixture(scope="session")
def other_key() -> PrivateKey:
    """An ES256 key nobody trusts."""
    return generate("es256")


def meta_for(example: str = "hello", **overrides: Any) -> package.PackageMeta:
    """The parsed metadata of ``example`` with fields replaced by ``overrides``.

    ``uuid`` and ``vendor`` may be given as strings.
    """
    meta = package.parse_meta(example_meta_text(example), f"{example}.toml")
    for key in ("uuid", "vendor"):
        if isinstance(overrides.get(key), str):
            overrides[key] = uuidlib.UUID(overrides[key])
    return dataclasses.replace(meta, **overrides)


def sign_envelope(
    manifest_bytes: bytes,
    members: Mapping[int, bytes],
    integrated: Mapping[str, bytes],
    key: PrivateKey,
    *,
    tagged: bool = True,
) -> bytes:
    """Signs ``manifest_bytes`` with ``key`` and encodes the envelope."""
    auth = suit_auth.sign_manifest(manifest_bytes, key)
    return suit.encode_envelope(auth, manifest_bytes, members, integrated, tagged=tagged)


@pytest.fixture(scope="session")
def build_package(wasm_modules: dict[str, bytes], dev_key: PrivateKey) -> BuildPackage:
    """``build_package(example="hello", wasm=None, key=None, **meta_overrides) -> bytes``.

    Builds and signs a package from an example's M.toml (with overrides) and its
    compiled module (or ``wasm``), signed by ``key`` (default: the dev key).
    """

    def build(
        example: str = "hello", wasm: bytes | None = None, key: PrivateKey | None = None, **overrides: Any
    ) -> bytes:
        meta = meta_for(example, **overrides)
        payload = wasm_modules[example] if wasm is None else wasm
        manifest_bytes, members, integrated = package.build_unsigned(meta, payload)
        return sign_envelope(manifest_bytes, members, integrated, key or dev_key)

    return build


@pytest.fixture
def device(tmp_path: Path, dev_key: PrivateKey) -> Device:
    """A fresh device at ``tmp_path/"dev"`` that trusts the dev key."""
    dev = Device.init(tmp_path / "dev")
    dev.add_anchor(public_pem(dev_key))
    return dev


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, with its content."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def make_meta() -> Callable[..., package.PackageMeta]:
    """``make_meta(example="hello", **overrides)``: see :func:`meta_for`."""
    return meta_for


@pytest.fixture(scope="session")
def sign_parts() -> Callable[..., bytes]:
    """``sign_parts(manifest_bytes, members, integrated, key, tagged=True)``: see :func:`sign_envelope`."""
    return sign_envelope


@pytest.fixture(scope="session")
def tree() -> Callable[[Path], dict[str, bytes]]:
    """``tree(root)``: every file under ``root`` with its content (see :func:`snapshot`)."""
    return snapshot


@pytest.fixture(scope="session")
def uuids() -> dict[str, str]:
    """Microservice UUID (string form) of every example, by name."""
    return {name: str(meta_for(name).uuid) for name in EXAMPLE_NAMES}


TOKEN = Path(__file__).resolve().parents[1] / "examples" / "fingerprint-token"
TOKEN_NAMES = ("biometric", "authenticator", "link", "analytics")


def _ok(*argv: str | Path) -> None:
    from ism.cli.main import main

    assert main([str(a) for a in argv]) == 0, f"ism {' '.join(map(str, argv))} failed"


def provision(tmp_path: Path, *init_options: str, lock: bool = False) -> Path:
    """The fingerprint token through the CLI: developer key, device (``init_options`` choose its key
    store), trust anchor, board + policy, the four microservices built, signed and installed.

    With ``lock``, the factory flow of a product: the vendor's key (``tmp_path/vendor.pem``) is trusted
    for device commands and the device is locked (``secured``) once configured; from then on its trust
    anchors change only through signed provisioning bundles."""
    dev, key = tmp_path / "device", tmp_path / "dev.pem"
    _ok("keygen", "--out", key)
    _ok("device", "init", dev, *init_options)
    _ok("device", "trust", dev, "--add", tmp_path / "dev.pub.pem")
    _ok("device", "configure", dev, "--board", TOKEN / "board.toml", "--policy", TOKEN / "policy.toml")
    if lock:
        _ok("keygen", "--out", tmp_path / "vendor.pem")
        _ok("device", "trust", dev, "--add", tmp_path / "vendor.pub.pem", "--role", "vendor")
        _ok("device", "lock", dev)
    for name in TOKEN_NAMES:
        wasm, suit_path = tmp_path / f"{name}.wasm", tmp_path / f"{name}.suit"
        wasm.write_bytes(bytes(wasmtime.wat2wasm((TOKEN / name / f"{name}.wat").read_text())))
        _ok(
            "package",
            "build",
            "--wasm",
            wasm,
            "--meta",
            TOKEN / name / f"{name}.toml",
            "--key",
            key,
            "--out",
            suit_path,
        )
        _ok("device", "install", dev, suit_path)
    return dev


@pytest.fixture
def provision_token() -> Callable[..., Path]:
    """``provision_token(tmp_path, *init_options, lock=False)``: see :func:`provision`."""
    return provision
