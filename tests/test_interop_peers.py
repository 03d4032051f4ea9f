"""Interop with independent stacks: Erlang/OTP diameter (the strictest decoder) as the gateway, directly and
through a freeDiameter relay that parses every message with its own dictionaries.

Uses the clients in ../shared/peers (copied to a temporary directory and built there) and the Debian packages
erlang-diameter / freediameterd, which `.ci/run` installs. Skipped, with the reason, when any is missing.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from balances.model import Subscriber
from tests.gateway import start_app

MSISDN, IMSI = "491700000001", "262010000000001"


@pytest.fixture(scope="module")
def otp_client(tmp_path_factory) -> Path:
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "peers" / "erl"
    if not shared.is_dir():
        pytest.skip("../shared/peers is not present")
    for tool in ("escript", "erlc", "diameterc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (Debian: erlang-base erlang-diameter erlang-dev)")
    work = tmp_path_factory.mktemp("otp")
    shutil.copy(shared / "gy_client.escript", work)
    shutil.copytree(shared / "dict", work / "dict")
    (work / "ebin").mkdir()
    base = "common/diameter_gen_base_rfc6733"
    steps = [
        ["diameterc", "-o", "ebin", "--inherits", base, "dict/rfc4005_nas.dia"],
        ["erlc", "-o", "ebin", "ebin/rfc4005_nas.erl"],
        ["diameterc", "-i", "ebin", "-o", "ebin", "--inherits", base, "dict/gy_3gpp.dia"],
        ["erlc", "-o", "ebin", "-I", "ebin", "ebin/gy_3gpp.erl"],
    ]
    for step in steps:
        subprocess.run(step, cwd=work, check=True, capture_output=True, timeout=120)
    return work / "gy_client.escript"


@pytest.fixture
async def server(valkey_url, tmp_path):
    app = await start_app(valkey_url, tmp_path, OCS_ORIGIN_HOST="ocs.ocs.test")
    await app.store.provision(Subscriber(msisdn=MSISDN, imsi=IMSI, plan="demo"), money=10_000_000,
                              allowances={"data": 1 << 30})
    yield app
    await app.stop()


async def run_otp(client: Path, port: int, *extra: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        "escript", str(client), "--host", "127.0.0.1", "--port", str(port), "--dest-realm", "test",
        "--updates", "2", "--event", *extra, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, output.decode(errors="replace")


async def test_otp_client_full_session(otp_client, server):
    returncode, output = await run_otp(otp_client, server.port)
    assert returncode == 0, output
    assert output.count("=> PASS") == 5, output  # CCR-I, 2 × CCR-U, CCR-T, CCR-E
    assert "DECODE" not in output and "FAIL" not in output, output
    data = {b.bucket: b for b in await server.store.balances(MSISDN)}["data"]
    assert data.balance < 1 << 30 and data.reserved == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_full_session_through_freediameter_relay(otp_client, server, tmp_path):
    if shutil.which("freeDiameterd") is None or not Path("/usr/lib/freeDiameter/dict_dcca_3gpp.fdx").exists():
        pytest.skip("freeDiameterd not installed (Debian: freediameterd freediameter-extensions)")
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "peers" / "freediameter"
    work = tmp_path / "relay"
    work.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=fd-relay.relay.test", "-keyout", work / "key.pem", "-out", work / "cert.pem"],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "dhparam", "-out", work / "dh.pem", "1024"], check=True, capture_output=True)
    shutil.copy(shared / "acl_wl.conf", work / "acl_wl.conf")
    relay_port = free_port()
    conf = (shared / "relay.conf").read_text().replace("@DIR@", str(work))
    conf = re.sub(r"^Port = \d+;", f"Port = {relay_port};", conf, flags=re.M)
    conf = re.sub(r"^SecPort = \d+;", f"SecPort = {free_port()};", conf, flags=re.M)
    conf = conf.replace('ConnectTo = "127.0.0.1"; Port = 3868;', f'ConnectTo = "127.0.0.1"; Port = {server.port};')
    (work / "relay.conf").write_text(conf)
    log = work / "relay.log"
    with log.open("w") as sink:
        relay = subprocess.Popen(["freeDiameterd", "-c", str(work / "relay.conf")], stdout=sink,
                                 stderr=subprocess.STDOUT)
    try:
        for _ in range(100):  # the relay connects to us (CER) before it serves clients
            if server.diameter.peers and "STATE_OPEN" in log.read_text(errors="replace"):
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("freeDiameter never opened its connection to the OCS:\n" + log.read_text()[-3000:])
        returncode, output = await run_otp(otp_client, relay_port)
    finally:
        relay.terminate()  # it sends DPR to us: wait off the event loop so the server can answer it
        try:
            await asyncio.to_thread(relay.wait, 15)
        except subprocess.TimeoutExpired:
            relay.kill()
            relay.wait()
    text = log.read_text(errors="replace")
    assert returncode == 0, output + text[-3000:]
    assert output.count("=> PASS") == 5, output
    assert "PARSING ERROR" not in text
    assert " ERROR " not in text, [line for line in text.splitlines() if " ERROR " in line][:5]
