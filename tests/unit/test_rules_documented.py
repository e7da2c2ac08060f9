"""Every rule id the code can raise is listed in docs/spec/rules.md (and nothing stale is listed)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = (
    "abi|attest|board|boot|cbor|cli|cose|crypto|demo|device|downgrade|gateway|identity|keys|keystore|outbox"
    "|lifecycle|ms-lifecycle|package|policy|provision|sandbox|state|storage|suit|supervisor|wasm|x509"
)
RULE = re.compile(rf"^({FAMILIES})\.[a-z0-9-]+$")
#: strings that look like rule ids but name files or key-store ids
NOT_RULES = {
    "board.toml",
    "policy.toml",
    "device.json",
    "device.pem",
    "rollback.cose",
    "outbox.sqlite",
    "state.key",
    "device.storage",
    "device.identity-ca",
    "device.iak",
    "device.policy",
    "device.state",
    "policy.cose",
    "storage.sqlite",
    "lifecycle.cose",
}


def rules_in_source() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "src" / "ism").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and RULE.match(node.value):
                found.add(node.value)
            # cbor.py and wasm.py name their rules without the family prefix: _fail("truncated", ...)
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "_fail"
                and path.stem in ("cbor", "wasm")
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                found.add(f"{path.stem}.{node.args[0].value}")
    return found - NOT_RULES


def rules_in_doc() -> set[str]:
    text = (ROOT / "docs" / "spec" / "rules.md").read_text()
    return {m[0] for m in re.findall(rf"`(({FAMILIES})\.[a-z0-9-]+)`", text)}


def test_every_rule_is_documented() -> None:
    missing = rules_in_source() - rules_in_doc()
    assert not missing, f"rules raised in src/ but not in docs/spec/rules.md: {sorted(missing)}"


def test_no_stale_rule_in_doc() -> None:
    stale = rules_in_doc() - rules_in_source()
    assert not stale, f"rules in docs/spec/rules.md that the code no longer raises: {sorted(stale)}"
