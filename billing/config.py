"""The billing catalog and settings: one TOML file validated with msgspec, plus what the rate card says.

The rate card (ratecards/) prices usage online; billing needs more: recurring plan fees, legal entities
that issue invoices, the tax table, payment terms, and the reconciliation settings (wholesale rates, the
host file's column mapping, tolerances). They live in a billing TOML file (see billing/demo/billing.toml,
which documents every key). `Catalog` joins that file with the rate card into the integer values the bill
run uses (fees in micro-units, tax rates as exact fractions, service and unit per rating group).

Imports only msgspec, ratecards and billing.money; no I/O except reading the two files.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from fractions import Fraction
from pathlib import Path

import msgspec

from billing.money import MoneyError, minor_of, parse_money, parse_rate
from ratecards import RateCard, load_ratecard
from ratecards.compile import MONEY_BUCKET
from ratecards.schedule import ROUNDING_MODES

MONEY = "money"  # the unit of money buckets (balances.model.MONEY; billing does not import balances)

DEMO_BILLING_CONFIG = Path(__file__).parent / "demo" / "billing.toml"

# canonical wholesale fields → the default column header in the host's CSV file
WHOLESALE_FIELDS = {
    "seq": "seq", "service": "service", "imsi": "imsi", "msisdn": "msisdn", "other_party": "other_party",
    "charging_id": "charging_id", "rating_group": "rating_group", "start_time": "start_time",
    "bytes_up": "bytes_up", "bytes_down": "bytes_down", "bytes_total": "bytes_total",
    "duration": "duration", "events": "events", "charge": "charge", "currency": "currency",
}
SERVICES = ("data", "voice", "sms")
UNIT_OF_SERVICE = {"data": "bytes", "voice": "seconds", "sms": "events"}
SERVICE_OF_UNIT = {unit: service for service, unit in UNIT_OF_SERVICE.items()}


class BillingConfigError(ValueError):
    """A billing configuration problem, worded for the operator (names the file and the key)."""


class LegalEntity(msgspec.Struct, forbid_unknown_fields=True):
    """A company that issues invoices: each has its own gapless invoice and credit-note sequences."""

    name: str
    address: list[str] = []
    vat_id: str = ""
    email: str = ""
    bank: str = ""
    footer: str = ""
    # {seq} the sequence number, {entity} the entity id; the sequence never resets (gapless for life)
    invoice_number_format: str = "{entity}-{seq:07d}"
    credit_note_number_format: str = "{entity}-CN-{seq:07d}"


class PlanFee(msgspec.Struct, forbid_unknown_fields=True):
    monthly_fee: str  # Decimal string, billed in advance per cycle, prorated by day
    name: str = ""
    tax_category: str = "telecom"


class WholesaleRate(msgspec.Struct, forbid_unknown_fields=True):
    price: str  # Decimal string: what the host charges us per `per` units
    per: int = 1


class WholesaleFormat(msgspec.Struct, forbid_unknown_fields=True):
    delimiter: str = ","
    time_format: str = "iso"  # iso | epoch_s | epoch_ms | a strptime format read as UTC
    trailer_prefix: str = "#"  # lines starting with it are control lines: "# trailer records=N charge_total=X"
    columns: dict[str, str] = {}  # canonical field → the host's header; unset fields use WHOLESALE_FIELDS
    services: dict[str, list[str]] = {}  # our service → the host's values; default: the service's own name


class ReconciliationConfig(msgspec.Struct, forbid_unknown_fields=True):
    start_tolerance_seconds: int = 300  # data: session start times may differ by this much
    event_window_seconds: int = 120  # voice/SMS: records match within this time window
    volume_tolerance: int = 0  # units (bytes, seconds, events) a matched item may differ by
    value_tolerance: str = "0.05"  # currency a matched item's charge may differ from the expected one by
    daily_tolerance: str = "0.50"  # currency a day × service aggregate may differ by
    rounding: str = "half-up"  # how a wholesale charge is rounded to the minor unit
    wholesale_rates: dict[str, WholesaleRate] = {}
    format: WholesaleFormat = msgspec.field(default_factory=WholesaleFormat)


class BillingConfig(msgspec.Struct, forbid_unknown_fields=True):
    legal_entities: dict[str, LegalEntity]
    default_legal_entity: str
    taxes: dict[str, dict[str, str]]  # jurisdiction → charge category → rate ("0.19")
    default_jurisdiction: str
    database_url: str | None = None  # None: SQLite file billing.sqlite3 under the data directory
    payment_terms_days: int = 14
    tax_rounding: str = "half-up"
    proration_rounding: str = "half-up"
    plans: dict[str, PlanFee] = {}
    default_usage_category: str = "telecom"
    usage_categories: dict[str, str] = {}  # rating group (a TOML string key) → tax category
    # the unit of buckets the rate card does not name (bonus money, add-ons, shared buckets): bucket id, or a
    # pattern with * and ?, → "money" or an allowance unit. A '@' ref (a group's bucket) is looked up
    # without the '@'. Until CDRs carry each bucket's unit (billing.cdrs), import needs this for such buckets.
    bucket_units: dict[str, str] = {}
    # money buckets whose debits a postpaid account is invoiced for (own, or its group's '@<id>'); money from
    # any other money bucket (bonus, promotion) was paid already and is never invoiced
    invoiced_money_buckets: list[str] = msgspec.field(default_factory=lambda: [MONEY_BUCKET])
    reconciliation: ReconciliationConfig = msgspec.field(default_factory=ReconciliationConfig)


def load_billing_config(path: str | Path) -> BillingConfig:
    """Read and validate a billing TOML file. Raises BillingConfigError naming the key."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BillingConfigError(f"billing config not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise BillingConfigError(f"{path}: invalid TOML: {exc}") from None
    try:
        config = msgspec.convert(raw, BillingConfig)
    except msgspec.ValidationError as exc:
        raise BillingConfigError(f"{path}: {exc}") from None
    try:
        _check(config)
    except (BillingConfigError, MoneyError) as exc:
        raise BillingConfigError(f"{path}: {exc}") from None
    return config


def _check(c: BillingConfig) -> None:
    if c.default_legal_entity not in c.legal_entities:
        raise BillingConfigError(f"default_legal_entity {c.default_legal_entity!r} is not in legal_entities")
    if c.default_jurisdiction not in c.taxes:
        raise BillingConfigError(f"default_jurisdiction {c.default_jurisdiction!r} is not in taxes")
    for name in ("tax_rounding", "proration_rounding"):
        if getattr(c, name) not in ROUNDING_MODES:
            raise BillingConfigError(f"{name} must be one of {', '.join(ROUNDING_MODES)}")
    if not 0 <= c.payment_terms_days <= 365:
        raise BillingConfigError("payment_terms_days must be 0..365")
    for entity_id, entity in c.legal_entities.items():
        for key in ("invoice_number_format", "credit_note_number_format"):
            fmt = getattr(entity, key)
            try:
                sample = fmt.format(seq=1, entity=entity_id)
            except (KeyError, IndexError, ValueError) as exc:
                raise BillingConfigError(f"legal_entities.{entity_id}.{key}: bad format {fmt!r}: {exc}") from None
            if sample == fmt.format(seq=2, entity=entity_id):
                raise BillingConfigError(f"legal_entities.{entity_id}.{key} must contain {{seq}}")
    categories = {c.default_usage_category, *c.usage_categories.values(), *(p.tax_category for p in c.plans.values())}
    for jurisdiction, rates in c.taxes.items():
        for category, rate in rates.items():
            parse_rate(rate, what=f"taxes.{jurisdiction}.{category}")
        missing = categories - set(rates) - {"*"}
        if missing and "*" not in rates:
            raise BillingConfigError(f"taxes.{jurisdiction} has no rate for {', '.join(sorted(missing))} "
                                     "(add it, or a \"*\" default)")
    for bucket, unit in c.bucket_units.items():
        if not bucket or bucket.startswith("@") or not unit:
            raise BillingConfigError(f"bucket_units.{bucket}: give a bucket id (without '@') and a unit")
    if not c.invoiced_money_buckets:
        raise BillingConfigError("invoiced_money_buckets must name at least one money bucket (default money)")
    for rg in c.usage_categories:
        if not rg.isdigit():
            raise BillingConfigError(f"usage_categories keys are rating groups, got {rg!r}")
    r = c.reconciliation
    if r.rounding not in ROUNDING_MODES:
        raise BillingConfigError(f"reconciliation.rounding must be one of {', '.join(ROUNDING_MODES)}")
    if min(r.start_tolerance_seconds, r.event_window_seconds, r.volume_tolerance) < 0:
        raise BillingConfigError("reconciliation tolerances must not be negative")
    for service, rate in r.wholesale_rates.items():
        if service not in SERVICES:
            raise BillingConfigError(f"reconciliation.wholesale_rates.{service}: service must be one of {SERVICES}")
        if rate.per < 1:
            raise BillingConfigError(f"reconciliation.wholesale_rates.{service}.per must be ≥ 1")
        parse_rate(rate.price, what=f"reconciliation.wholesale_rates.{service}.price")
    unknown = set(r.format.columns) - set(WHOLESALE_FIELDS)
    if unknown:
        raise BillingConfigError(f"reconciliation.format.columns: unknown field(s) {', '.join(sorted(unknown))}; "
                                 f"known: {', '.join(WHOLESALE_FIELDS)}")
    if set(r.format.services) - set(SERVICES):
        raise BillingConfigError(f"reconciliation.format.services keys must be among {SERVICES}")
    if len(r.format.delimiter) != 1:
        raise BillingConfigError("reconciliation.format.delimiter must be one character")


@dataclass(frozen=True)
class ServiceInfo:
    """What the rate card says about a rating group."""

    rating_group: int
    service: str  # the rate card's service name ("data", "voice", "sms")
    unit: str  # bytes | seconds | events


@dataclass
class Catalog:
    """Billing config + rate card, converted once into the integers and fractions the billing code uses."""

    config: BillingConfig
    currency: str
    minor_digits: int
    minor: int
    usage_rounding: str  # the rate card's policy (usage amounts arrive already rounded with it)
    rating_version: str
    plan_fees: dict[str, int]  # plan → monthly fee, micro-units
    services: dict[int, ServiceInfo]
    ratecard: RateCard
    tax_rates: dict[tuple[str, str], Fraction] = field(default_factory=dict)
    # bucket id → unit as the rate card names them: its money bucket and the plans' allowance buckets
    card_bucket_units: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, config: BillingConfig, ratecard: RateCard) -> Catalog:
        digits = ratecard.currency_minor_digits
        fees = {}
        for plan, fee in config.plans.items():
            try:
                fees[plan] = parse_money(fee.monthly_fee, digits, allow_zero=True, what=f"plans.{plan}.monthly_fee")
            except MoneyError as exc:
                raise BillingConfigError(str(exc)) from None
        services: dict[int, ServiceInfo] = {}
        for plan in ratecard.plans.values():
            for rate in plan.rates:
                services.setdefault(rate.rating_group, ServiceInfo(rate.rating_group, rate.service, rate.unit))
        taxes = {(j, cat): parse_rate(rate) for j, rates in config.taxes.items() for cat, rate in rates.items()}
        buckets = {MONEY_BUCKET: MONEY}
        for plan in ratecard.plans.values():
            for allowance in plan.allowances:
                buckets.setdefault(allowance.bucket, allowance.unit)
        return cls(config=config, currency=ratecard.currency, minor_digits=digits, minor=minor_of(digits),
                   usage_rounding=ratecard.rounding, rating_version=ratecard.version, plan_fees=fees,
                   services=services, ratecard=ratecard, tax_rates=taxes, card_bucket_units=buckets)

    @classmethod
    def load(cls, billing_config: str | Path, ratecard: str | Path) -> Catalog:
        return cls.build(load_billing_config(billing_config), load_ratecard(ratecard))

    def tax_rate(self, jurisdiction: str, category: str) -> Fraction:
        rate = self.tax_rates.get((jurisdiction, category))
        if rate is None:
            rate = self.tax_rates.get((jurisdiction, "*"))
        if rate is None:
            raise BillingConfigError(f"no tax rate for jurisdiction {jurisdiction!r}, category {category!r}")
        return rate

    def usage_category(self, rating_group: int | None) -> str:
        return self.config.usage_categories.get(str(rating_group), self.config.default_usage_category)

    def service_name(self, rating_group: int | None) -> str:
        info = self.services.get(rating_group) if rating_group is not None else None
        return info.service if info else f"rating group {rating_group}"

    def unit_of(self, rating_group: int | None) -> str | None:
        info = self.services.get(rating_group) if rating_group is not None else None
        return info.unit if info else None

    def bucket_unit(self, ref: str) -> str | None:
        """The unit of a CDR bucket ref ('<id>' or a group's '@<id>') from the billing config's bucket_units
        (exact id first, then patterns in file order), else the rate card; None when neither knows it."""
        bucket = ref[1:] if ref.startswith("@") else ref
        units = self.config.bucket_units
        unit = units.get(bucket)
        if unit is None:
            unit = next((u for pattern, u in units.items() if fnmatchcase(bucket, pattern)), None)
        return unit if unit is not None else self.card_bucket_units.get(bucket)

    def invoiced_money(self, ref: str) -> bool:
        """Does money drawn from this money bucket ref go on a postpaid invoice (not bonus money)?"""
        return (ref[1:] if ref.startswith("@") else ref) in self.config.invoiced_money_buckets

    def entity(self, entity_id: str) -> LegalEntity:
        try:
            return self.config.legal_entities[entity_id]
        except KeyError:
            raise BillingConfigError(f"unknown legal entity {entity_id!r}") from None
