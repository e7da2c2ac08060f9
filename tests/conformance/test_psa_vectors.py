"""Conformance of the PSA token verifier against public vectors (see vectors/PROVENANCE.md).

* ``vectors/psa/rfc9783``: RFC 9783 Appendix A tokens (COSE_Sign1 under the
  TF-M ES256 IAK, COSE_Mac0 under the TF-M HMAC IAK) and the claims-set test
  cases of the RFC's CDDL (GOOD accepted, FAIL refused for the stated reason).
* ``vectors/psa/tfm-iat-verifier``: tokens of TF-M's iat-verifier tests
  (PSA_IOT_PROFILE_1 claims, Sign1 and Mac0; a psa/2.0.0 token without a
  protected ``alg``).
* ``vectors/psa/veraison-psatoken``, ``vectors/psa/veraison-services-psa-iot``:
  Veraison's claims-sets and signed tokens for PSA_IOT_PROFILE_1 and
  http://arm.com/psa/2.0.0.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ism.crypto import attestation as at
from ism.crypto import keys
from ism.errors import ErrorCode, FormatError, IsmError, SignatureError, TrustError, UsageError
from ism.formats import cbor, psa

VECTORS = Path(__file__).parent / "vectors" / "psa"
RFC = VECTORS / "rfc9783"
CDDL = RFC / "cddl-tests"
TFM = VECTORS / "tfm-iat-verifier"
VERAISON = VECTORS / "veraison-psatoken"
SERVICES = VECTORS / "veraison-services-psa-iot"

RFC_KEY = keys.load_public(RFC / "tfm-es-iak.pub.pem")
RFC_HMAC = (RFC / "tfm-hs-iak.bin").read_bytes()
TFM_KEY = keys.load_public(TFM / "key.pub.pem")
TFM_HMAC = (TFM / "hmac.key").read_bytes()
VERAISON_KEY = keys.load_public(VERAISON / "tf-m" / "key.pub.pem")
SERVICES_KEY = keys.load_public(SERVICES / "key.pub.pem")
SERVICES_EC_KEY = keys.load_public(SERVICES / "ec.p256.pub.pem")


def _error(fn: object) -> IsmError:
    assert callable(fn)
    with pytest.raises(IsmError) as info:
        fn()
    return info.value


# -- RFC 9783 Appendix A ---------------------------------------------------------------------------


def test_rfc9783_sign1_example_verifies_with_its_key() -> None:
    token = at.verify_token((RFC / "psa-sign1.cbor").read_bytes(), key=RFC_KEY, nonce=b"\x01" * 32)
    c = token.claims
    assert (token.kind, token.alg) == ("sign1", "ES256")
    assert c.profile == psa.PROFILE_PSA
    assert not c.legacy
    assert c.instance_id == b"\x01" + b"\x02" * 32
    assert c.implementation_id == b"\x00" * 32
    assert c.client_id == 2147483647
    assert (c.lifecycle, c.lifecycle_state) == (12288, "secured")
    assert c.boot_seed == b"\x00" * 8
    assert c.software_components == (psa.SwComponent(b"\x03" * 32, b"\x04" * 32, "PRoT"),)


def test_rfc9783_mac0_example_verifies_with_its_hmac_key() -> None:
    token = at.verify_token((RFC / "psa-mac0.cbor").read_bytes(), hmac_key=RFC_HMAC, nonce=b"\x01" * 32)
    assert (token.kind, token.alg) == ("mac0", "HMAC256/256")
    assert token.claims.profile == psa.PROFILE_PSA
    assert token.claims.instance_id.hex() == "01c557bd4fadc83f756fca2cd5ea2dcc8b82159bb4e7453d6a744d4eecd6d0ac60"
    assert len(RFC_HMAC) == 64


def test_rfc9783_examples_refuse_other_keys_and_nonces() -> None:
    sign1 = (RFC / "psa-sign1.cbor").read_bytes()
    mac0 = (RFC / "psa-mac0.cbor").read_bytes()
    for err in (
        _error(lambda: at.verify_token(sign1, key=VERAISON_KEY)),
        _error(lambda: at.verify_token(mac0, hmac_key=TFM_HMAC)),
    ):
        assert (type(err), err.rule, err.code) == (SignatureError, "cose.signature", ErrorCode.SIGNATURE)
    err = _error(lambda: at.verify_token(sign1, key=RFC_KEY, nonce=b"\x02" * 32))
    assert (type(err), err.rule) == (TrustError, "attest.nonce")
    err = _error(lambda: at.verify_token(sign1, hmac_key=RFC_HMAC))
    assert (type(err), err.rule) == (UsageError, "attest.key")


# -- the RFC's CDDL claims-set cases --------------------------------------------------------------

GOOD = sorted(p.name for p in CDDL.glob("GOOD_*.cbor"))

#: Each FAIL file and the reason its name states: (rule, claim).
FAIL = {
    "FAIL_BootSeed_too_big.cbor": ("attest.size", "boot-seed"),
    "FAIL_BootSeed_too_small.cbor": ("attest.size", "boot-seed"),
    "FAIL_ImplementationID_missing.cbor": ("attest.missing", "implementation-id"),
    "FAIL_ImplementationID_wrong_format.cbor": ("attest.size", "implementation-id"),
    "FAIL_InstanceID_missing.cbor": ("attest.missing", "instance-id"),
    "FAIL_InstanceID_wrong_format.cbor": ("attest.size", "instance-id"),
    "FAIL_SoftwareComponent_Measurement_missing.cbor": (
        "attest.missing",
        "software-components[0].measurement-value",
    ),
}


def test_every_cddl_case_is_covered() -> None:
    assert set(GOOD) == {"GOOD_full.cbor", "GOOD_mandatory_only.cbor"}
    assert set(FAIL) == {p.name for p in CDDL.glob("FAIL_*.cbor")}


@pytest.mark.parametrize("name", GOOD)
def test_cddl_good_claims_are_accepted(name: str) -> None:
    claims = psa.decode_claims((CDDL / name).read_bytes())
    assert claims.profile == psa.PROFILE_PSA
    assert len(claims.software_components) == 4
    assert psa.decode_claims(claims.encode()) == claims
    if name == "GOOD_full.cbor":
        assert claims.certification_reference == "0123456789012-12345"
        assert claims.verification_service == "psa_verifier"
        assert [c.measurement_type for c in claims.software_components] == ["BL", "PRoT", "ARoT", "App"]


@pytest.mark.parametrize("name", sorted(FAIL))
def test_cddl_fail_claims_are_refused_for_their_reason(name: str) -> None:
    err = _error(lambda: psa.decode_claims((CDDL / name).read_bytes()))
    assert type(err) is FormatError
    assert (err.rule, err.subject) == FAIL[name]


# -- TF-M iat-verifier tokens ---------------------------------------------------------------------


def test_tfm_iat_sign1_and_mac0_are_psa_iot_profile_1() -> None:
    sign1 = at.verify_token((TFM / "iat.cbor").read_bytes(), key=TFM_KEY)
    mac0 = at.verify_token((TFM / "iat-hmac.cbor").read_bytes(), hmac_key=TFM_HMAC)
    for token in (sign1, mac0):
        c = token.claims
        assert c.profile == psa.PROFILE_PSA_IOT_1
        assert c.legacy
        # iat-verifier's tests put free text in the legacy profile claim; it is kept and reported.
        assert c.profile_claim == "http://example.com"
        assert c.client_id == 2
        assert [s.measurement_type for s in c.software_components] == ["BL", "M1", "M2", "M3"]
        assert c.software_components[0].measurement_desc == "TF-M_SHA256MemPreXIP"
        assert c.boot_seed is not None
        assert len(c.boot_seed) == 32
    assert (sign1.kind, mac0.kind) == ("sign1", "mac0")
    assert _error(lambda: at.verify_token((TFM / "iat.cbor").read_bytes(), key=VERAISON_KEY)).rule == "cose.signature"


def test_tfm_psa_2_0_0_token_without_protected_alg_is_refused_but_its_claims_decode() -> None:
    data = (TFM / "psa-2_0_0_sign1-token.cbor").read_bytes()
    err = _error(lambda: at.verify_token(data, key=TFM_KEY))
    # Its protected header is empty: alg is not integrity-protected, so it is refused (algorithm confusion).
    assert (type(err), err.rule) == (FormatError, "cose.alg-missing")
    message = cbor.loads(data)
    assert isinstance(message, cbor.Tag)
    assert message.number == 18
    claims = psa.decode_claims(message.value[2])
    assert claims.profile == psa.PROFILE_PSA_2_0_0
    assert claims.boot_seed == bytes(range(0xA0, 0xC0))
    assert claims.certification_reference == "0604565272829-10010"


# -- Veraison tokens and claims-sets ---------------------------------------------------------------

SIGNED = [
    (VERAISON / "tf-m" / "psa-2_0_0_sign1.bin", VERAISON_KEY, psa.PROFILE_PSA_2_0_0, None),
    (VERAISON / "tf-m" / "psa-iot-1_sign1.bin", VERAISON_KEY, psa.PROFILE_PSA_IOT_1, psa.PROFILE_PSA_IOT_1),
    (SERVICES / "psa-token.cbor", SERVICES_KEY, psa.PROFILE_PSA_IOT_1, psa.PROFILE_PSA_IOT_1),
    (SERVICES / "psa.good.cose", SERVICES_EC_KEY, psa.PROFILE_PSA_2_0_0, None),
]


@pytest.mark.parametrize(("path", "key", "profile", "claim"), SIGNED, ids=[s[0].name for s in SIGNED])
def test_veraison_tokens_verify_and_report_their_legacy_profile(
    path: Path, key: keys.PublicKey, profile: str, claim: str | None
) -> None:
    token = at.verify_token(path.read_bytes(), key=key)
    assert token.claims.profile == profile
    assert token.claims.profile_claim == claim
    assert token.claims.legacy
    assert token.to_json()["legacy_profile"] is True
    others = [k for k in (RFC_KEY, VERAISON_KEY, SERVICES_EC_KEY) if keys.signer_id(k) != keys.signer_id(key)]
    for other in others:
        assert _error(lambda other=other: at.verify_token(path.read_bytes(), key=other)).rule == "cose.signature"


def test_veraison_2_0_0_token_matches_its_claims_file() -> None:
    token = at.verify_token((VERAISON / "tf-m" / "psa-2_0_0_sign1.bin").read_bytes(), key=VERAISON_KEY)
    assert token.claims == psa.decode_claims((VERAISON / "tf-m" / "psa-2_0_0_claims.cbor").read_bytes())


VERAISON_GOOD = {
    "P1ClaimsAll.cbor": (psa.PROFILE_PSA_IOT_1, 1),
    "P1ClaimsAllNoSwMeasurements.cbor": (psa.PROFILE_PSA_IOT_1, 0),
    "P1ClaimsMandatoryOnly.cbor": (psa.PROFILE_PSA_IOT_1, 1),
    "P1ClaimsMandatoryOnlyNoSwMeasurements.cbor": (psa.PROFILE_PSA_IOT_1, 0),
    "P1ClaimsTFM.cbor": (psa.PROFILE_PSA_IOT_1, 2),
    "P2ClaimsAll.cbor": (psa.PROFILE_PSA_2_0_0, 1),
    "P2ClaimsMandatoryOnly.cbor": (psa.PROFILE_PSA_2_0_0, 1),
    "P2ClaimsTFM.cbor": (psa.PROFILE_PSA_2_0_0, 2),
}
VERAISON_FAIL = {
    "P1ClaimsMissingMandatoryNonce.cbor": ("attest.missing", "nonce"),
    "P2ClaimsMissingMandatoryNonce.cbor": ("attest.missing", "nonce"),
    "P2ClaimsInvalidMultiNonce.cbor": ("attest.type", "nonce"),
}


def test_every_veraison_claims_file_is_covered() -> None:
    assert set(VERAISON_GOOD) | set(VERAISON_FAIL) == {p.name for p in (VERAISON / "claims").glob("*.cbor")}


@pytest.mark.parametrize("name", sorted(VERAISON_GOOD))
def test_veraison_good_claims(name: str) -> None:
    claims = psa.decode_claims((VERAISON / "claims" / name).read_bytes())
    profile, components = VERAISON_GOOD[name]
    assert claims.profile == profile
    assert len(claims.software_components) == components
    assert claims.no_sw_measurements == (components == 0)
    assert psa.decode_claims(claims.encode()) == claims


@pytest.mark.parametrize("name", sorted(VERAISON_FAIL))
def test_veraison_bad_claims(name: str) -> None:
    err = _error(lambda: psa.decode_claims((VERAISON / "claims" / name).read_bytes()))
    assert (type(err), err.rule, err.subject) == (FormatError, *VERAISON_FAIL[name])


# -- appraisal of a public token ------------------------------------------------------------------


def test_appraisal_of_the_tfm_p1_token() -> None:
    token = at.verify_token((VERAISON / "tf-m" / "psa-iot-1_sign1.bin").read_bytes(), key=VERAISON_KEY)
    spe, nspe = token.claims.software_components
    reference = psa.Reference(
        components=(
            psa.ReferenceComponent(name="SPE", measurements=(spe.measurement_value,), min_version="1.6.0"),
            psa.ReferenceComponent(name="NSPE", signers=(nspe.signer_id,)),
        ),
        implementation_id=token.claims.implementation_id,
    )
    assert at.appraise(token, reference).status is at.Status.AFFIRMING
    stricter = psa.Reference(components=(psa.ReferenceComponent(name="SPE", min_version="1.7"),))
    result = at.appraise(token, stricter)
    assert result.status is at.Status.CONTRAINDICATED
    assert [c.status for c in result.components if c.name == "NSPE"] == [at.Status.WARNING]
