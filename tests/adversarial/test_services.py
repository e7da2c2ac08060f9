"""The crypto and identity services under attack: forged handles, usage outside the grant, identity theft."""

from __future__ import annotations

import os

from _malicious import ITOA, SAY_N, TICKER, TICKER_POLICY, World, build, module
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ism.hypervisor.supervisor import State
from ism.services.identity import LIFETIME, IdentityService, instance_id

TIMER = 'resources = { timer = ["read"] }'
EVERIFY = -8

#: Owns an AES key; encrypts "top secret", decrypts it back and logs both results; then decrypts a
#: copy with one flipped byte and logs that result (ISM_EVERIFY = -8).
VAULT = module(
    "log key_open key_encrypt key_decrypt",
    ITOA
    + SAY_N
    + """
  (data (i32.const 0) "vault")
  (data (i32.const 16) "top secret")
  (data (i32.const 100) "enc ")
  (data (i32.const 110) "dec ")
  (data (i32.const 120) "tampered ")
  (func (export "init") (result i32) (i32.const 0))
  (func (export "tick") (result i32)
    (local $h i32) (local $n i32) (local $m i32)
    (local.set $h (call $key_open (i32.const 0) (i32.const 5)))
    (local.set $n (call $key_encrypt (local.get $h) (i32.const 16) (i32.const 10) (i32.const 0) (i32.const 0)
      (i32.const 1000) (i32.const 256)))
    (call $say_n (i32.const 100) (i32.const 4) (local.get $n))
    (local.set $m (call $key_decrypt (local.get $h) (i32.const 1000) (local.get $n) (i32.const 0) (i32.const 0)
      (i32.const 2000) (i32.const 256)))
    (call $log (i32.const 1) (i32.const 2000) (local.get $m))
    (i32.store8 (i32.const 1020) (i32.xor (i32.load8_u (i32.const 1020)) (i32.const 1)))
    (call $say_n (i32.const 120) (i32.const 9)
      (call $key_decrypt (local.get $h) (i32.const 1000) (local.get $n) (i32.const 0) (i32.const 0)
        (i32.const 2000) (i32.const 256)))
    (i32.const 0))
""",
)
VAULT_POLICY = TIMER + '\nkeys = { vault = { type = "aes-256" } }'

#: Gateway callee that owns a signing key and (foolishly) hands its handle to whoever asks.
LEAKER = module(
    "key_open",
    """
  (data (i32.const 0) "secret-key")
  (global $h (mut i32) (i32.const 0))
  (func (export "gateway_buffer") (result i32) (i32.const 1024))
  (func (export "init") (result i32)
    (global.set $h (call $key_open (i32.const 0) (i32.const 10)))
    (i32.const 0))
  (func (export "op_leak") (param $req i32) (param $len i32) (result i32)
    (i32.store (local.get $req) (global.get $h))
    (i32.const 4))
""",
)
LEAKER_POLICY = 'keys = ["secret-key"]\nexports = ["leak"]'

#: Asks the leaker for its handle, then tries to sign with it.
THIEF = module(
    "gateway_call key_sign",
    """
  (data (i32.const 0) "leaker.leak")
  (func (export "init") (result i32) (i32.const 0))
  (func (export "tick") (result i32)
    (drop (call $gw (i32.const 0) (i32.const 11) (i32.const 0) (i32.const 0) (i32.const 64) (i32.const 4)))
    (call $key_sign (i32.load (i32.const 64)) (i32.const 0) (i32.const 16) (i32.const 128) (i32.const 64)))
""",
)
THIEF_POLICY = TIMER + '\ngateways = ["leaker.leak"]\nkeys = ["own-key"]'

#: Holds a sign-only key and tries to export its public key (not in its usage).
EXPORTER = module(
    "key_open key_export_public",
    """
  (data (i32.const 0) "signer")
  (func (export "init") (result i32) (i32.const 0))
  (func (export "tick") (result i32)
    (call $key_export_public (call $key_open (i32.const 0) (i32.const 6)) (i32.const 64) (i32.const 200)))
""",
)
EXPORTER_POLICY = TIMER + '\nkeys = { signer = { type = "ecc-p256", usage = ["sign"] } }'

#: Asks for an identity certificate for its key, and the trust bundle; logs their lengths.
CLAIMANT = module(
    "log key_open identity_cert trust_bundle identity_id",
    ITOA
    + SAY_N
    + """
  (data (i32.const 0) "id-key")
  (data (i32.const 16) "cert ")
  (data (i32.const 32) "ca ")
  (func (export "init") (result i32) (i32.const 0))
  (func (export "tick") (result i32)
    (call $say_n (i32.const 16) (i32.const 5)
      (call $identity_cert (call $key_open (i32.const 0) (i32.const 6)) (i32.const 4096) (i32.const 4096)))
    (call $say_n (i32.const 32) (i32.const 3) (call $trust_bundle (i32.const 12288) (i32.const 4096)))
    (drop (call $identity_id (i32.const 16384)))
    (i32.const 0))
""",
)
CLAIMANT_POLICY = TIMER + '\nkeys = ["id-key"]'


def _with_identity(world: World, registrations: dict | None = None) -> IdentityService:  # type: ignore[type-arg]
    crypto = world.sup.services["key_open"].__self__
    regs = registrations or {img.uuid: img.measurement for img in world.images.values()}
    identity = IdentityService(crypto.keystore, None, b"\x01" + bytes(32), regs, crypto)
    world.sup.services.update(identity.calls())
    return identity


def test_aes_key_round_trip_and_a_tampered_ciphertext_is_refused() -> None:
    world = build({"vault": (VAULT, VAULT_POLICY)})
    world.run(1)
    assert world.lines("vault") == ["enc 38", "top secret", f"tampered {EVERIFY}"]
    assert world.state("vault") is State.RUNNING


def test_a_handle_passed_by_another_microservice_is_a_violation() -> None:
    world = build({"leaker": (LEAKER, LEAKER_POLICY), "thief": (THIEF, THIEF_POLICY)})
    world.run(1)
    (record,) = world.records_of("thief")
    assert record["rule"] == "crypto.handle"
    assert world.state("thief") is State.RESTARTING
    assert world.state("leaker") is State.RUNNING
    assert world.signed == []  # the key store never signed anything


def test_using_a_key_outside_its_usage_is_a_violation() -> None:
    world = build({"exporter": (EXPORTER, EXPORTER_POLICY)})
    world.run(1)
    (record,) = world.records_of("exporter")
    assert (record["rule"], record["target"]) == ("crypto.usage", "signer")


def test_identity_certificate_names_the_caller_and_chains_to_the_trust_bundle() -> None:
    world = build({"claimant": (CLAIMANT, CLAIMANT_POLICY)})
    identity = _with_identity(world)
    world.run(1)
    cert_line, ca_line = world.lines("claimant")
    sb = world.sup.by_name["claimant"].sandbox
    assert sb is not None
    cert = x509.load_der_x509_certificate(sb.read(4096, int(cert_line.split()[1])))
    ca = x509.load_der_x509_certificate(sb.read(12288, int(ca_line.split()[1])))
    assert ca.public_bytes(serialization.Encoding.DER) == identity.ca_der
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uuid = world.images["claimant"].uuid
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == [uuid.urn, f"urn:ism:instance:{instance_id(identity.ueid, uuid).hex()}"]
    assert cert.subject.rfc4514_string() == "CN=claimant"
    assert sb.read(16384, 32) == instance_id(identity.ueid, uuid)
    # the certificate certifies the caller's own key
    pub = cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    message = os.urandom(16)
    crypto = world.sup.services["key_open"].__self__
    raw = crypto.keystore.sign(f"ms.{uuid}.id-key", message)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    pub.verify(der, message, ec.ECDSA(hashes.SHA256()))


def test_no_identity_for_a_microservice_whose_measurement_does_not_match_its_registration() -> None:
    world = build({"claimant": (CLAIMANT, CLAIMANT_POLICY)})
    registered = {img.uuid: bytes(32) for img in world.images.values()}  # boot registered other code
    _with_identity(world, registered)
    world.run(1)
    (record,) = world.records_of("claimant")
    assert record["rule"] == "identity.measurement"
    assert world.lines("claimant") == []


def test_certificates_are_cached_then_renewed_before_expiry() -> None:
    world = build({"claimant": (CLAIMANT, CLAIMANT_POLICY)})
    identity = _with_identity(world)
    world.run(1)
    ms = world.sup.by_name["claimant"]
    first = identity.certificate(ms, "id-key", f"ms.{ms.uuid}.id-key")
    assert identity.certificate(ms, "id-key", f"ms.{ms.uuid}.id-key") == first
    start = identity.now()
    identity.now = lambda: start + LIFETIME * 0.7
    renewed = identity.certificate(ms, "id-key", f"ms.{ms.uuid}.id-key")
    assert renewed != first
    assert (
        x509.load_der_x509_certificate(renewed).not_valid_after_utc
        > x509.load_der_x509_certificate(first).not_valid_after_utc
    )


#: Asks for its own attestation token with a nonce from the verifier (at 0), logs the token length;
#: then with a 5-byte nonce (refused: ISM_EINVAL = -1).
ATTESTER = module(
    "log attest",
    ITOA
    + SAY_N
    + """
  (data (i32.const 100) "token ")
  (func (export "init") (result i32) (i32.const 0))
  (func (export "tick") (result i32)
    (call $say_n (i32.const 100) (i32.const 6) (call $attest (i32.const 0) (i32.const 32) (i32.const 4096)
      (i32.const 8192)))
    (call $say_n (i32.const 100) (i32.const 6) (call $attest (i32.const 0) (i32.const 5) (i32.const 4096)
      (i32.const 8192)))
    (i32.const 0))
""",
)


def test_a_microservice_token_carries_its_own_claims_and_its_nonce() -> None:
    from ism.crypto.attestation import verify_token
    from ism.crypto.keys import pem_from_der, read_public_pem
    from ism.services.attestation import AttestationService, AttestedMicroservice

    world = build({"attester": (ATTESTER, TIMER), "ticker": (TICKER, TICKER_POLICY)})
    crypto = world.sup.services["key_open"].__self__
    registered = {
        img.uuid: AttestedMicroservice(img.uuid, img.name, img.version, 1, img.measurement, img.signer, bytes(32))
        for img in world.images.values()
    }
    service = AttestationService(crypto.keystore, b"\x01" + bytes(32), registered, lifecycle_log=bytes(32))
    world.sup.services.update(service.calls())
    world.run(0)  # start, so the nonce can be placed in the attester's memory before its tick
    nonce = os.urandom(32)
    sb = world.sup.by_name["attester"].sandbox
    assert sb is not None
    sb.write(0, nonce)
    world.run(1)
    size_line, refused_line = world.lines("attester")
    assert refused_line == "token -1"
    token = sb.read(4096, int(size_line.split()[1]))
    verified = verify_token(token, read_public_pem(pem_from_der(service.public_key_der)), nonce=nonce)
    claims = verified.claims
    assert claims.profile == "tag:ism.example,2026:microservice"
    assert claims.microservice is not None
    assert claims.microservice.uuid == world.images["attester"].uuid
    assert claims.microservice.measurement == world.images["attester"].measurement
    assert claims.client_id < 0
    assert {c.measurement_type for c in claims.software_components} == {"ism", "attester", "ticker"}
