"""The access policy: the reference policy compiles to the right lookups, and bad policies are refused."""

from __future__ import annotations

import timeit
import uuid as uuidlib
from pathlib import Path

import pytest
import wasmtime

from ism.errors import FormatError
from ism.formats import wasm
from ism.formats.board import Board, Resource, parse_board
from ism.formats.policy import (
    MAX_STACK,
    KeyGrant,
    MicroservicePolicy,
    Policy,
    RestartPolicy,
    check_module,
    check_modules,
    parse_policy,
)
from ism.hypervisor.sandbox import engine_for

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fingerprint-token"
BOARD_TEXT = (EXAMPLE / "board.toml").read_text()
POLICY_TEXT = (EXAMPLE / "policy.toml").read_text()

BIOMETRIC = uuidlib.UUID("a71f7f87-fecb-4cc4-bd29-c92ce146a9d1")
AUTHENTICATOR = uuidlib.UUID("efeaddc6-46ed-42b1-b68f-7c0d1cd7f69c")
LINK = uuidlib.UUID("f934149c-75bf-4236-9b14-16cf34b94bbc")
ANALYTICS = uuidlib.UUID("193cd08e-78fe-47d0-b3ee-50f90988a3bf")
READ, WRITE, CONTROL = 1, 2, 4


@pytest.fixture(scope="module")
def board() -> Board:
    return parse_board(BOARD_TEXT, "board.toml")


@pytest.fixture(scope="module")
def policy(board: Board) -> Policy:
    return parse_policy(POLICY_TEXT, board, "policy.toml")


def edited(old: str, new: str, text: str = POLICY_TEXT) -> str:
    """The example policy with ``old`` replaced by ``new`` (which must occur exactly once)."""
    assert text.count(old) == 1, old
    return text.replace(old, new)


def refused(text: str, board: Board, rule: str, key: str | None) -> FormatError:
    with pytest.raises(FormatError) as info:
        parse_policy(text, board, "policy.toml")
    assert info.value.rule == rule, str(info.value)
    assert info.value.subject == (f"policy.toml: {key}" if key else "policy.toml"), str(info.value)
    return info.value


# -- the reference policy ------------------------------------------------------------------------


def test_example_policy_names_its_four_microservices(policy: Policy) -> None:
    assert policy.version == 1
    assert policy.board == "fingerprint-token"
    assert set(policy.by_name) == {"biometric", "authenticator", "link", "analytics"}
    assert {str(u) for u in policy.by_uuid} == {str(u) for u in (BIOMETRIC, AUTHENTICATOR, LINK, ANALYTICS)}
    for name, entry in policy.by_name.items():
        assert entry.name == name
        # by_uuid and by_name hold the same compiled entries (gateways are filled in after parsing)
        assert policy.get(entry.uuid) is entry
    assert policy.get(uuidlib.UUID(int=1)) is None


def test_example_policy_resource_lookups(policy: Policy) -> None:
    bio, auth, link, ana = (policy.get(u) for u in (BIOMETRIC, AUTHENTICATOR, LINK, ANALYTICS))
    assert bio is not None
    assert auth is not None
    assert link is not None
    assert ana is not None
    assert dict(bio.resources) == {"spi.fingerprint": READ | CONTROL}
    assert dict(auth.resources) == {}
    assert dict(link.resources) == {"uart.host": READ | WRITE | CONTROL, "gpio.led0": WRITE}
    assert dict(ana.resources) == {"timer": READ}

    assert bio.allows("spi.fingerprint", READ)
    assert bio.allows("spi.fingerprint", CONTROL)
    assert bio.allows("spi.fingerprint", READ | CONTROL)
    assert not bio.allows("spi.fingerprint", WRITE)
    assert not bio.allows("spi.fingerprint", READ | WRITE)
    assert not bio.allows("spi.fingerprint", 0)  # asking for nothing is not a grant
    assert not bio.allows("uart.host", READ)
    assert link.allows("gpio.led0", WRITE)
    assert not link.allows("gpio.led0", READ)  # the board offers read, the policy does not grant it
    assert link.allows("uart.host", READ | WRITE | CONTROL)
    assert ana.allows("timer", READ)
    assert not ana.allows("timer", CONTROL)
    assert not ana.allows("spi.fingerprint", READ)  # the analytics story: never granted
    assert not ana.allows("rng", READ)
    assert not auth.allows("timer", READ)
    assert not ana.allows("no.such.resource", READ)


def test_example_policy_gateways_exports_and_keys(policy: Policy) -> None:
    by = policy.by_name
    assert by["biometric"].exports == frozenset({"enroll", "verify"})
    assert by["biometric"].gateways == frozenset()
    assert by["authenticator"].gateways == frozenset({("biometric", "verify")})
    assert by["authenticator"].exports == frozenset({"sign"})
    assert set(by["authenticator"].keys) == {"device-2fa"}
    assert by["authenticator"].keys["device-2fa"] == KeyGrant(
        "ecc-p256", frozenset({"sign", "verify", "export-public"})
    )
    assert by["link"].gateways == frozenset({("authenticator", "sign"), ("biometric", "enroll")})
    assert by["link"].exports == frozenset()
    assert by["analytics"].gateways == frozenset()
    for name in ("biometric", "link", "analytics"):
        assert dict(by[name].keys) == {}


def test_example_policy_limits_and_restart(policy: Policy) -> None:
    for entry in policy.by_name.values():
        assert entry.memory_pages == 2
        assert entry.fuel == 5_000_000
        assert entry.storage == (4096 if entry.name == "biometric" else 0)
    assert policy.by_name["biometric"].restart == RestartPolicy()
    assert policy.by_name["analytics"].restart == RestartPolicy("backoff", 3, 60.0, 100, 10_000)


def test_restart_defaults_and_overrides(board: Board) -> None:
    text = edited(
        "[defaults]\n",
        "[defaults]\nrestart = { policy = 'backoff', max_faults = 5, window = 10, backoff_ms = 50 }\n",
    )
    text = edited(
        'keys = ["device-2fa"]\n', 'keys = ["device-2fa"]\nrestart = "stop"\nmemory_pages = 4\nfuel = 2000\n', text
    )
    text = edited(
        'restart = { policy = "backoff", max_faults = 3, window = 60, backoff_ms = 100 }',
        "restart = { max_faults = 2, max_backoff_ms = 400 }",
        text,
    )
    by = parse_policy(text, board).by_name
    assert by["biometric"].restart == RestartPolicy("backoff", 5, 10.0, 50, 10_000)  # the defaults
    assert by["authenticator"].restart == RestartPolicy("stop", 5, 10.0, 50, 10_000)  # name only
    assert by["analytics"].restart == RestartPolicy("backoff", 2, 10.0, 50, 400)  # table merges over defaults
    assert (by["authenticator"].memory_pages, by["authenticator"].fuel) == (4, 2000)
    assert (by["link"].memory_pages, by["link"].fuel) == (2, 5_000_000)


def test_a_policy_with_no_microservices_grants_nothing(board: Board) -> None:
    policy = parse_policy('version = 3\nboard = "fingerprint-token"\n', board)
    assert policy.version == 3
    assert dict(policy.by_name) == {}


# -- rejections ----------------------------------------------------------------------------------

OTHER_UUID = "0b0e1c3e-2f1a-4b7e-9d55-4f6c1a2b3c4d"


@pytest.mark.parametrize(
    ("old", "new", "rule", "key"),
    [
        pytest.param("version = 1\n", "version = 1\nowner = 'me'\n", "policy.key", "owner", id="unknown-top-key"),
        pytest.param(
            "fuel = 5_000_000\n",
            "fuel = 5_000_000\nturbo = true\n",
            "policy.key",
            "defaults.turbo",
            id="unknown-defaults-key",
        ),
        pytest.param(
            'keys = ["device-2fa"]\n',
            'keys = ["device-2fa"]\nsudo = true\n',
            "policy.key",
            "microservice.authenticator.sudo",
            id="unknown-microservice-key",
        ),
        pytest.param(
            "backoff_ms = 100 }",
            "backoff_ms = 100, jitter = 1 }",
            "policy.key",
            "microservice.analytics.restart.jitter",
            id="unknown-restart-key",
        ),
        pytest.param("version = 1\n", "", "policy.version", "version", id="missing-version"),
        pytest.param("version = 1\n", "version = -1\n", "policy.version", "version", id="negative-version"),
        pytest.param(
            'board = "fingerprint-token"',
            'board = "smart-lock"',
            "policy.board",
            "board",
            id="policy-for-another-board",
        ),
        pytest.param('board = "fingerprint-token"\n', "", "policy.board", "board", id="no-board"),
        pytest.param(
            "[microservice.link]",
            "[microservice.Link]",
            "policy.name",
            "microservice.Link",
            id="bad-microservice-name",
        ),
        pytest.param(
            'uuid = "f934149c-75bf-4236-9b14-16cf34b94bbc"',
            'uuid = "not-a-uuid"',
            "policy.uuid",
            "microservice.link.uuid",
            id="bad-uuid",
        ),
        pytest.param(
            'uuid = "f934149c-75bf-4236-9b14-16cf34b94bbc"',
            'uuid = "a71f7f87-fecb-4cc4-bd29-c92ce146a9d1"',
            "policy.uuid",
            "microservice.link.uuid",
            id="duplicate-uuid",
        ),
        pytest.param(
            'resources = { timer = ["read"] }',
            'resources = { "spi.camera" = ["read"] }',
            "policy.unknown-resource",
            "microservice.analytics.resources.spi.camera",
            id="unknown-resource",
        ),
        pytest.param(
            'resources = { timer = ["read"] }',
            'resources = { timer = ["write"] }',
            "policy.resource",
            "microservice.analytics.resources.timer",
            id="mode-not-offered-by-the-resource",
        ),
        pytest.param(
            'resources = { timer = ["read"] }',
            'resources = { timer = ["fly"] }',
            "policy.resource",
            "microservice.analytics.resources.timer",
            id="unknown-mode",
        ),
        pytest.param(
            'resources = { timer = ["read"] }',
            "resources = { timer = [] }",
            "policy.resource",
            "microservice.analytics.resources.timer",
            id="no-modes",
        ),
        pytest.param(
            'resources = { timer = ["read"] }',
            'resources = { timer = [["read"]] }',
            "policy.resource",
            "microservice.analytics.resources.timer",
            id="modes-not-strings",
        ),
        pytest.param(
            'resources = { timer = ["read"] }',
            'resources = { timer = ["read"], "spi.fingerprint" = ["read"] }',
            "policy.exclusive",
            "microservice.analytics.resources.spi.fingerprint",
            id="exclusive-granted-twice",
        ),
        pytest.param(
            'gateways = ["biometric.verify"]',
            'gateways = ["vault.verify"]',
            "policy.gateway",
            "microservice.authenticator.gateways",
            id="gateway-to-unknown-microservice",
        ),
        pytest.param(
            'gateways = ["biometric.verify"]',
            'gateways = ["biometric.dump_template"]',
            "policy.gateway",
            "microservice.authenticator.gateways",
            id="gateway-to-operation-not-exported",
        ),
        pytest.param(
            'gateways = ["biometric.verify"]',
            'gateways = ["authenticator.sign"]',
            "policy.gateway",
            "microservice.authenticator.gateways",
            id="self-gateway",
        ),
        pytest.param(
            'gateways = ["biometric.verify"]',
            'gateways = ["biometric"]',
            "policy.gateway",
            "microservice.authenticator.gateways",
            id="gateway-without-operation",
        ),
        pytest.param(
            'gateways = ["biometric.verify"]',
            'gateways = ["biometric.verify", "biometric.verify"]',
            "policy.gateway",
            "microservice.authenticator.gateways",
            id="gateway-twice",
        ),
        pytest.param(
            'exports = ["enroll", "verify"]',
            'exports = ["enroll", "Verify!"]',
            "policy.export",
            "microservice.biometric.exports",
            id="bad-export-name",
        ),
        pytest.param(
            'keys = ["device-2fa"]',
            'keys = ["device-2fa\\n"]',
            "policy.key-grant",
            "microservice.authenticator.keys",
            id="key-name-with-trailing-newline",
        ),
        pytest.param(
            'policy = "backoff"',
            'policy = "pray"',
            "policy.restart",
            "microservice.analytics.restart.policy",
            id="bad-restart-policy",
        ),
        pytest.param(
            "max_faults = 3",
            "max_faults = 0",
            "policy.restart",
            "microservice.analytics.restart.max_faults",
            id="restart-max-faults-zero",
        ),
        pytest.param(
            "window = 60",
            "window = 0",
            "policy.restart",
            "microservice.analytics.restart.window",
            id="restart-window-zero",
        ),
        pytest.param(
            "window = 60",
            "window = nan",
            "policy.restart",
            "microservice.analytics.restart.window",
            id="restart-window-nan",
        ),
        pytest.param(
            "backoff_ms = 100 }",
            "backoff_ms = 100, max_backoff_ms = 50 }",
            "policy.restart",
            "microservice.analytics.restart.max_backoff_ms",
            id="max-backoff-below-backoff",
        ),
        pytest.param(
            'restart = { policy = "backoff", max_faults = 3, window = 60, backoff_ms = 100 }',
            "restart = 3",
            "policy.restart",
            "microservice.analytics.restart",
            id="restart-not-a-table",
        ),
        pytest.param(
            "memory_pages = 2\n",
            "memory_pages = 0\n",
            "policy.limits",
            "defaults.memory_pages",
            id="default-memory-pages-zero",
        ),
        pytest.param(
            "memory_pages = 2\n",
            "memory_pages = 65537\n",
            "policy.limits",
            "defaults.memory_pages",
            id="default-memory-pages-too-many",
        ),
        pytest.param("fuel = 5_000_000\n", "fuel = 999\n", "policy.limits", "defaults.fuel", id="default-fuel-low"),
        pytest.param(
            'keys = ["device-2fa"]\n',
            'keys = ["device-2fa"]\nfuel = 1_000_000_000_001\n',
            "policy.limits",
            "microservice.authenticator.fuel",
            id="fuel-too-high",
        ),
        pytest.param(
            'keys = ["device-2fa"]\n',
            'keys = ["device-2fa"]\nstack = 1024\n',
            "policy.limits",
            "microservice.authenticator.stack",
            id="stack-too-small",
        ),
        pytest.param(
            'keys = ["device-2fa"]\n',
            'keys = ["device-2fa"]\nstack = 2_097_153\n',  # wasmtime would abort the process on it
            "policy.limits",
            "microservice.authenticator.stack",
            id="stack-too-large",
        ),
        pytest.param(
            'keys = ["device-2fa"]\n',
            'keys = ["device-2fa"]\nmemory_pages = true\n',
            "policy.limits",
            "microservice.authenticator.memory_pages",
            id="memory-pages-bool",
        ),
        pytest.param(
            'keys = ["device-2fa"]\n',
            'keys = ["device-2fa"]\nstorage = -1\n',
            "policy.limits",
            "microservice.authenticator.storage",
            id="negative-storage",
        ),
        pytest.param("version = 1\n", "version = 1\n[[\n", "policy.syntax", None, id="bad-toml"),
    ],
)
def test_rejections_name_rule_file_and_key(board: Board, old: str, new: str, rule: str, key: str | None) -> None:
    refused(edited(old, new), board, rule, key)


def test_exclusive_message_names_the_first_owner(board: Board) -> None:
    text = edited('resources = { timer = ["read"] }', 'resources = { timer = ["read"], "uart.host" = ["write"] }')
    err = refused(text, board, "policy.exclusive", "microservice.analytics.resources.uart.host")
    assert "uart.host" in err.message
    assert "link" in err.message  # link was granted it first


def test_a_non_exclusive_resource_may_be_shared(board: Board) -> None:
    text = edited('resources = { timer = ["read"] }', 'resources = { timer = ["read"], "gpio.led0" = ["write"] }')
    by = parse_policy(text, board).by_name
    assert by["analytics"].allows("gpio.led0", WRITE)
    assert by["link"].allows("gpio.led0", WRITE)


def test_gateway_messages_say_what_is_wrong(board: Board) -> None:
    unknown = refused(
        edited('gateways = ["biometric.verify"]', 'gateways = ["vault.open"]'),
        board,
        "policy.gateway",
        "microservice.authenticator.gateways",
    )
    assert "vault" in unknown.message
    missing = refused(
        edited('gateways = ["biometric.verify"]', 'gateways = ["biometric.peek"]'),
        board,
        "policy.gateway",
        "microservice.authenticator.gateways",
    )
    assert "peek" in missing.message
    assert "exports" in missing.message
    itself = refused(
        edited('gateways = ["biometric.verify"]', 'gateways = ["authenticator.sign"]'),
        board,
        "policy.gateway",
        "microservice.authenticator.gateways",
    )
    assert "itself" in itself.message


# -- static check of modules against their policy entry ------------------------------------------

_IMPORTS = {
    "log": "(param i32 i32 i32)",
    "resource_open": "(param i32 i32 i32) (result i32)",
    "resource_read": "(param i32 i32 i32) (result i32)",
    "gateway_call": "(param i32 i32 i32 i32 i32 i32) (result i32)",
    "key_open": "(param i32 i32) (result i32)",
    "storage_get": "(param i64 i32 i32 i32) (result i32)",
    "random": "(param i32 i32) (result i32)",
    "self_id": "(param i32) (result i32)",
}


def module(*imports: str, exports: str = "") -> wasm.WasmModule:
    """A tiny module importing ``imports`` from ``ism`` and defining the ``exports`` WAT text."""
    lines = ["(module"]
    lines += [f'  (import "ism" "{name}" (func {_IMPORTS[name]}))' for name in imports]
    lines += ['  (memory (export "memory") 1)', '  (func (export "init") (result i32) (i32.const 0))', exports, ")"]
    return wasm.parse_module(bytes(wasmtime.wat2wasm("\n".join(lines))))


GATEWAY_BUFFER = '(func (export "gateway_buffer") (result i32) (i32.const 1024))'


def op(name: str, sig: str = "(param i32 i32) (result i32)", body: str = "(i32.const 0)") -> str:
    return f'(func (export "op_{name}") {sig} {body})'


def test_check_module_accepts_modules_that_match_their_policy(policy: Policy) -> None:
    by = policy.by_name
    check_module(
        by["biometric"],
        module("log", "resource_open", "resource_read", exports=GATEWAY_BUFFER + op("enroll") + op("verify")),
    )
    check_module(by["authenticator"], module("gateway_call", "key_open", exports=GATEWAY_BUFFER + op("sign")))
    check_module(by["link"], module("resource_open", "gateway_call"))
    check_module(by["analytics"], module("log", "resource_open", "resource_read", "self_id"))
    # extra exports that the policy does not mention are harmless: nobody may call them
    check_module(by["analytics"], module(exports=op("whatever")))


@pytest.mark.parametrize(
    "exports",
    [
        pytest.param(op("enroll"), id="granted-operation-not-exported"),
        pytest.param(GATEWAY_BUFFER + op("enroll"), id="one-of-two-operations-missing"),
        pytest.param(GATEWAY_BUFFER + op("enroll") + op("verify", "(param i32) (result i32)"), id="op-takes-one-arg"),
        pytest.param(GATEWAY_BUFFER + op("enroll") + op("verify", "(param i32 i32)", body=""), id="op-returns-nothing"),
        pytest.param(
            GATEWAY_BUFFER + op("enroll") + op("verify", "(param i64 i32) (result i32)"), id="op-wrong-param-type"
        ),
        pytest.param(op("enroll") + op("verify"), id="no-gateway-buffer"),
        pytest.param(
            '(func (export "gateway_buffer") (param i32) (result i32) (i32.const 0))' + op("enroll") + op("verify"),
            id="gateway-buffer-wrong-type",
        ),
        pytest.param(
            '(global (export "gateway_buffer") i32 (i32.const 1024))' + op("enroll") + op("verify"),
            id="gateway-buffer-is-a-global",
        ),
    ],
)
def test_check_module_refuses_a_callee_that_does_not_serve_its_operations(policy: Policy, exports: str) -> None:
    with pytest.raises(FormatError) as info:
        check_module(policy.by_name["biometric"], module("resource_open", exports=exports))
    assert info.value.rule == "policy.gateway"
    assert info.value.subject == "biometric"


@pytest.mark.parametrize(
    ("name", "imports", "needs"),
    [
        pytest.param("authenticator", ("resource_open",), "resources", id="resource-without-resources"),
        pytest.param("authenticator", ("resource_read",), "resources", id="resource-read-without-resources"),
        pytest.param("analytics", ("gateway_call",), "gateways", id="gateway-call-without-gateways"),
        pytest.param("link", ("key_open",), "keys", id="key-without-keys"),
        pytest.param("link", ("storage_get",), "storage", id="storage-without-storage"),
        pytest.param("analytics", ("random",), "rng", id="random-without-rng"),
        pytest.param("analytics", ("log", "key_open", "gateway_call"), "keys", id="several-missing"),
    ],
)
def test_check_module_refuses_imports_the_policy_does_not_grant(
    policy: Policy, name: str, imports: tuple[str, ...], needs: str
) -> None:
    entry = policy.by_name[name]
    exports = GATEWAY_BUFFER + "".join(op(o) for o in sorted(entry.exports))
    with pytest.raises(FormatError) as info:
        check_module(entry, module(*imports, exports=exports))
    assert info.value.rule == "policy.capability"
    assert info.value.subject == name
    assert needs in info.value.message


def test_random_is_allowed_with_the_rng_resource(board: Board) -> None:
    text = edited('resources = { timer = ["read"] }', 'resources = { timer = ["read"], rng = ["read"] }')
    check_module(parse_policy(text, board).by_name["analytics"], module("random"))


def test_check_modules_checks_every_named_module_and_ignores_unnamed_ones(policy: Policy) -> None:
    good = module("log")
    bad = module("key_open")
    check_modules(policy, {ANALYTICS: good, uuidlib.UUID(int=7): bad})  # not in the policy: the runtime refuses it
    with pytest.raises(FormatError) as info:
        check_modules(policy, {ANALYTICS: good, LINK: bad})
    assert (info.value.rule, info.value.subject) == ("policy.capability", "link")


# -- lookups cost the same with 10 grants or 10,000 ----------------------------------------------


def _sized(n: int) -> tuple[MicroservicePolicy, list[str]]:
    """A board with ``n`` resources and a policy granting every one of them; returns the entry and names."""
    names = [f"res.r{i:05d}" for i in range(n)]
    # Built directly: parse_board caps a board file at MAX_RESOURCES, the policy compiler does not care.
    board = Board("big-board", {r: Resource(r, "led", False, frozenset({"read", "write"})) for r in names})
    grants = "\n".join(f'"{r}" = ["read"]' for r in names)
    text = f'version = 1\nboard = "big-board"\n[microservice.m]\nuuid = "{OTHER_UUID}"\n[microservice.m.resources]\n'
    policy = parse_policy(text + grants + "\n", board)
    entry = policy.by_name["m"]
    assert len(entry.resources) == n
    return entry, names


def _best_time(entry: MicroservicePolicy, probes: list[str], rounds: int = 9, number: int = 3000) -> float:
    def run() -> None:
        allows = entry.allows
        for name in probes:
            allows(name, 1)
            allows(name, 2)

    return min(timeit.repeat(run, number=number, repeat=rounds))


def test_lookup_cost_does_not_grow_with_the_policy() -> None:
    small, small_names = _sized(10)
    large, large_names = _sized(10_000)
    assert large.allows(large_names[-1], 1)
    assert not large.allows(large_names[-1], 2)
    assert not large.allows("res.absent", 1)
    # the same number of distinct probes in both, hits and misses alike
    small_probes = [*small_names, "res.absent"]
    large_probes = [large_names[i] for i in range(0, 10_000, 1000)] + ["res.absent"]
    assert len(small_probes) == len(large_probes)
    t_small = _best_time(small, small_probes)
    t_large = _best_time(large, large_probes)
    assert t_large < 3 * t_small, (t_small, t_large)


def test_key_grants_as_a_table_with_type_and_usage(board: Board) -> None:
    text = edited(
        'keys = ["device-2fa"]',
        'keys = { device-2fa = { type = "ecc-p256", usage = ["sign"] }, vault = { type = "aes-256" } }',
    )
    keys = parse_policy(text, board).by_name["authenticator"].keys
    assert keys["device-2fa"] == KeyGrant("ecc-p256", frozenset({"sign"}))
    assert keys["vault"] == KeyGrant("aes-256", frozenset({"encrypt", "decrypt"}))


@pytest.mark.parametrize(
    "grant",
    [
        pytest.param('{ type = "rsa-2048" }', id="unknown-type"),
        pytest.param('{ type = "aes-256", usage = ["sign"] }', id="usage-not-for-type"),
        pytest.param("{ usage = [] }", id="empty-usage"),
        pytest.param('{ type = "ecc-p256", colour = "red" }', id="unknown-field"),
    ],
)
def test_bad_key_grants_are_refused(board: Board, grant: str) -> None:
    with pytest.raises(FormatError) as info:
        parse_policy(edited('keys = ["device-2fa"]', f"keys = {{ device-2fa = {grant} }}"), board)
    assert info.value.rule == "policy.key-grant"


def test_the_largest_stack_a_policy_grants_makes_an_engine() -> None:
    """The policy's stack bound is one the engine accepts (a larger one aborts the whole process)."""
    assert isinstance(engine_for(MAX_STACK), wasmtime.Engine)
