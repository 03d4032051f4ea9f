"""The `ocs` CLI against a real Valkey: provisioning, top-up idempotency, and bad input that changes nothing."""

from __future__ import annotations

import json

import pytest
import redis
from typer.testing import CliRunner

from ocs.cli import app


@pytest.fixture
def ocs(valkey_url, tmp_path):
    runner = CliRunner()
    env = {"OCS_REDIS_URL": valkey_url, "OCS_DATA_DIR": str(tmp_path), "OCS_METRICS_PORT": "0"}

    def invoke(*args: str):
        return runner.invoke(app, list(args), env=env, catch_exceptions=False)

    return invoke


def dump(url: str) -> dict:
    client = redis.Redis.from_url(url)
    state = {}
    for key in client.scan_iter():
        kind = client.type(key)
        if kind == b"hash":
            state[key] = client.hgetall(key)
        elif kind == b"string":
            state[key] = client.get(key)
        elif kind == b"stream":
            state[key] = client.xlen(key)
        else:
            state[key] = kind
    client.close()
    return state


def test_add_show_topup_balance(ocs):
    result = ocs("subscriber", "add", "491701234567", "--imsi", "262011234567890", "--plan", "demo",
                 "--money", "1.50", "--json")
    assert result.exit_code == 0, result.output
    added = json.loads(result.stdout)
    assert added["money"] == 1_500_000

    result = ocs("topup", "491701234567", "2.25", "--ref", "r-1", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["applied"] is True
    assert json.loads(result.stdout)["balance"] == 3_750_000

    again = ocs("topup", "491701234567", "2.25", "--ref", "r-1", "--json")
    assert again.exit_code == 0
    assert json.loads(again.stdout)["applied"] is False
    assert json.loads(again.stdout)["balance"] == 3_750_000

    shown = json.loads(ocs("subscriber", "show", "491701234567", "--json").stdout)
    assert shown["subscriber"]["imsi"] == "262011234567890"
    buckets = {b["bucket"]: b for b in json.loads(ocs("balance", "491701234567", "--json").stdout)["buckets"]}
    assert buckets["money"]["balance"] == 3_750_000
    assert buckets["data"]["balance"] == 1073741824

    human = ocs("balance", "491701234567")
    assert human.exit_code == 0 and "3.75" in human.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("topup", "491700000404", "5.00"), "unknown subscriber"),
        (("topup", "491701234567", "-5"), "positive"),
        (("topup", "491701234567", "abc"), "not a number"),
        (("topup", "491701234567", "1.001"), "decimals"),
        (("topup", "491701234567", "0"), "positive"),
        (("balance", "491700000404"), "unknown subscriber"),
        (("subscriber", "show", "491700000404"), "unknown subscriber"),
        (("subscriber", "add", "12ab"), "MSISDN"),
        (("subscriber", "add", "491701234568", "--plan", "gold"), "unknown plan"),
        (("subscriber", "add", "491701234567"), "already exists"),
    ],
)
def test_bad_input_is_one_clear_line_and_changes_nothing(ocs, valkey_url, args, message):
    assert ocs("subscriber", "add", "491701234567", "--money", "1.00").exit_code == 0
    before = dump(valkey_url)
    result = ocs(*args)
    assert result.exit_code != 0
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert dump(valkey_url) == before


def test_bad_config_is_a_clear_error(tmp_path, valkey_url):
    bad = tmp_path / "bad.toml"
    bad.write_text("[diameter]\nport = -1\n")
    result = CliRunner().invoke(app, ["balance", "491700000001", "--config", str(bad)],
                                env={"OCS_REDIS_URL": valkey_url})
    assert result.exit_code != 0
    assert "diameter.port" in result.stderr


def test_import_csv_all_or_nothing(ocs, valkey_url, tmp_path):
    good = tmp_path / "subs.csv"
    good.write_text("msisdn,imsi,plan,money\n" + "".join(
        f"4917055500{n:02d},2620155500000{n:02d},demo,1.00\n" for n in range(50)))
    result = ocs("subscriber", "import", str(good), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["created"] == 50

    bad = tmp_path / "bad.csv"
    bad.write_text("msisdn,imsi,plan,money\n491706660001,262016660000001,demo,1.00\n491706660002,x,demo,1\n")
    before = dump(valkey_url)
    result = ocs("subscriber", "import", str(bad))
    assert result.exit_code != 0
    assert "bad.csv:3" in result.stderr
    assert dump(valkey_url) == before
