"""The real Gy messages of ../shared/vectors sent byte for byte to the server (digest §7 items 2, 5, 6).

Expected answers are the captured CCAs where the vectors have them, or the decision documented in
docs/gy-conformance.md. Skipped when ../shared is absent.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from diameter.message import Message as PdMessage

from balances.model import Subscriber
from ocs.server import ServerApp
from protocol.codec import Message, decode_message
from simulators.gy import open_client
from tests.gateway import start_app

RATECARD = """version = "vectors"
currency = "EUR"
currency_minor_digits = 2
rounding = "up"

[plans.vectors]
description = "rating groups of the vectors"
""" + "".join(f"""
  [[plans.vectors.rates]]
  rating_group = {rg}
  service = "data"
  unit = "bytes"
  price = "0.01"
  per = 1048576
  increment = 1024
  default_quota = 1048576
  max_quota = 104857600
""" for rg in (99, 101, 199))

OPTIVA_MSISDN, OPTIVA_IMSI = "96871217162", "4220296871217162"


def vector(shared: Path, name: str) -> bytes:
    for folder in (shared / "vectors", shared / "vectors" / "unattributed"):
        if (folder / f"{name}.bin").is_file():
            return (folder / f"{name}.bin").read_bytes()
    raise FileNotFoundError(name)


async def start(valkey_url: str, tmp_path: Path, **env: str) -> ServerApp:
    card = tmp_path / "vectors.toml"
    card.write_text(RATECARD)
    server = await start_app(valkey_url, tmp_path, OCS_RATECARD=str(card), **env)
    await server.store.provision(Subscriber(msisdn=OPTIVA_MSISDN, imsi=OPTIVA_IMSI, plan="vectors"),
                                 money=10_000_000, allowances={})
    return server


async def send_raw(client, raw: bytes, number: int) -> Message:
    data = bytearray(raw)
    data[12:20] = (0x9000 + number).to_bytes(4, "big") * 2
    future = asyncio.get_running_loop().create_future()
    client.pending[0x9000 + number] = future
    client.transport.write(bytes(data))
    answer = await asyncio.wait_for(future, 10)
    PdMessage.from_bytes(answer.raw)  # well formed for an independent decoder too
    return answer


async def test_optiva_session_with_vendor_allowlist(shared_dir, valkey_url, tmp_path):
    server = await start(valkey_url, tmp_path, OCS_DIAMETER__UNKNOWN_MANDATORY_VENDOR_ALLOWLIST="[12645]")
    try:
        client = await open_client("127.0.0.1", server.port, "replay.test", "test")
        answers = []
        for number, name in enumerate(("optiva_ccr_i", "optiva_ccr_u", "optiva_ccr_t")):
            raw = vector(shared_dir, name)
            answer = await send_raw(client, raw, number)
            request = decode_message(raw)
            assert answer.get("Result-Code") == 2001, name
            assert answer.avps[0].name == "Session-Id" and answer.session_id == request.session_id
            # every Proxy-Info of the request comes back unchanged, in order
            assert [bytes(p.raw) for p in answer.find_all("Proxy-Info")] == \
                [bytes(p.raw) for p in request.find_all("Proxy-Info")]
            assert answer.is_proxiable == request.is_proxiable
            answers.append(answer)
        cca_i, cca_u, cca_t = answers
        assert not cca_i.find_all("Multiple-Services-Credit-Control")  # MSI=1 without MSCC: no quota yet (§8.16)
        [mscc] = cca_u.find_all("Multiple-Services-Credit-Control")
        assert (mscc.get("Rating-Group"), mscc.get("Result-Code")) == (99, 2001)
        assert mscc.find("Granted-Service-Unit").get("CC-Total-Octets") == 1048576  # empty RSU = default quota
        [mscc_t] = cca_t.find_all("Multiple-Services-Credit-Control")
        assert mscc_t.get("Result-Code") == 2001 and mscc_t.find("Granted-Service-Unit") is None
        usu = decode_message(vector(shared_dir, "optiva_ccr_t")).find(
            "Multiple-Services-Credit-Control").find("Used-Service-Unit").get("CC-Total-Octets")
        money = {b.bucket: b for b in await server.store.balances(OPTIVA_MSISDN)}["money"]
        assert money.reserved == 0
        assert money.balance == 10_000_000 - 10_000 * ((usu + 1048575) // 1048576)  # 0.01 per started MB, rounded up
        client.transport.close()
    finally:
        await server.stop()


async def test_optiva_unknown_vendor_avp_is_5001_without_allowlist(shared_dir, valkey_url, tmp_path):
    server = await start(valkey_url, tmp_path)
    try:
        client = await open_client("127.0.0.1", server.port, "replay.test", "test")
        answer = await send_raw(client, vector(shared_dir, "optiva_ccr_i"), 1)
        assert answer.get("Result-Code") == 5001
        assert not answer.is_error
        failed = answer.find("Failed-AVP").children[0]
        assert failed.vendor == 12645 and failed.mandatory
        client.transport.close()
    finally:
        await server.stop()


@pytest.mark.parametrize(("setting", "expected"), [("5002", 5002), ("2001", 2001)])
async def test_termination_of_unknown_session(shared_dir, valkey_url, tmp_path, setting, expected):
    """p2j_gy_ccr_t closes a session this server never saw; the captured OCS answered 2001 (digest §8.2)."""
    server = await start(valkey_url, tmp_path, OCS_DIAMETER__UNKNOWN_SESSION_TERMINATION_RESULT=setting)
    try:
        client = await open_client("127.0.0.1", server.port, "replay.test", "test")
        answer = await send_raw(client, vector(shared_dir, "p2j_gy_ccr_t"), 1)
        assert answer.get("Result-Code") == expected
        assert answer.get("CC-Request-Number") == 2
        client.transport.close()
    finally:
        await server.stop()


@pytest.mark.parametrize(("name", "expected"), [
    ("eseye_ccr_u1", 5002),  # update of a session this server never opened
    ("cmcc_ccr_u_validity_time", 5002),
    ("godiam_ccr_i_psinfo", 5030),  # CCR-I naming no subscriber
])
async def test_other_vectors_get_defined_answers(shared_dir, valkey_url, tmp_path, name, expected):
    server = await start(valkey_url, tmp_path)
    try:
        client = await open_client("127.0.0.1", server.port, "replay.test", "test")
        answer = await send_raw(client, vector(shared_dir, name), 1)
        assert answer.get("Result-Code") == expected
        client.transport.close()
    finally:
        await server.stop()
