"""Credit-Control-Failure-Handling / Direct-Debiting-Failure-Handling hints per peer and realm in every CCA."""

from __future__ import annotations

import asyncio

import pytest

from balances.model import Subscriber
from ocs.config import ConfigError, load_config
from simulators.gy import CCR, FLAG_PROXIABLE, FLAG_REQUEST, close_client, open_client
from tests.gateway import start_app

MSISDN = "491705550001"


@pytest.fixture
async def server(valkey_url, tmp_path):
    conf = tmp_path / "ocs.toml"
    conf.write_text("""
[failure_handling]
credit_control_failure_handling = "CONTINUE"
direct_debiting_failure_handling = "TERMINATE_OR_BUFFER"
  [[failure_handling.rules]]
  realm = "strict.test"
  credit_control_failure_handling = "TERMINATE"
  [[failure_handling.rules]]
  peer = "pgw9.strict.test"
  credit_control_failure_handling = "RETRY_AND_TERMINATE"
""")
    app = await start_app(valkey_url, tmp_path, config_file=conf)
    await app.store.provision(Subscriber(msisdn=MSISDN, plan="demo"), money=1_000_000, allowances={})
    yield app
    await app.stop()


async def cca_from(server, host: str, realm: str):
    client = await open_client("127.0.0.1", server.port, host, realm)
    avps = [("Session-Id", f"{host};1"), ("Origin-Host", host), ("Origin-Realm", realm),
            ("Destination-Realm", "test"), ("Auth-Application-Id", 4), ("Service-Context-Id", "32251@3gpp.org"),
            ("CC-Request-Type", 1), ("CC-Request-Number", 0),
            ("Subscription-Id", [("Subscription-Id-Type", 0), ("Subscription-Id-Data", MSISDN)]),
            ("Multiple-Services-Credit-Control", [("Requested-Service-Unit", []), ("Rating-Group", 100)])]
    try:
        return await asyncio.wait_for(client.request(CCR, 4, avps, FLAG_REQUEST | FLAG_PROXIABLE), 5)
    finally:
        await close_client(client)


@pytest.mark.parametrize(("host", "realm", "ccfh"), [
    ("pgw1.lenient.test", "lenient.test", 1),  # default
    ("pgw1.strict.test", "strict.test", 0),  # realm rule
    ("pgw9.strict.test", "strict.test", 2),  # peer rule wins over the realm rule
])
async def test_hints_per_peer_and_realm(server, host, realm, ccfh):
    answer = await cca_from(server, host, realm)
    assert answer.get("Result-Code") == 2001
    assert answer.get("Credit-Control-Failure-Handling") == ccfh
    assert answer.get("Direct-Debiting-Failure-Handling") == 0


def test_bad_hint_is_a_config_error(tmp_path):
    conf = tmp_path / "bad.toml"
    conf.write_text('[failure_handling]\ncredit_control_failure_handling = "MAYBE"\n')
    with pytest.raises(ConfigError, match="credit_control_failure_handling"):
        load_config(conf, environ={})
    conf.write_text('[[failure_handling.rules]]\ncredit_control_failure_handling = "CONTINUE"\n')
    with pytest.raises(ConfigError, match="exactly one of peer or realm"):
        load_config(conf, environ={})
