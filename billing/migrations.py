"""Schema migrations of the billing database, numbered, applied once each in order (billing.db.migrate).

Never edit a released migration: add the next number. SQL here must run unchanged on SQLite and
PostgreSQL: BIGINT for micro-units and epoch milliseconds, TEXT for ISO dates ('2026-11-01') and ids,
INTEGER 0/1 for flags, no SERIAL/AUTOINCREMENT (ids come from the counters table).
"""

from __future__ import annotations

_V1 = [
    # ids handed out inside transactions (billing.db.Database.next_ids); invoice number sequences too,
    # named "number:<legal entity>:<invoice|credit_note>", so a rolled-back finalization leaves no gap
    "CREATE TABLE counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
    # rows whose update serializes bill runs, finalization and guiding on PostgreSQL
    "CREATE TABLE locks (name TEXT PRIMARY KEY, taken BIGINT NOT NULL)",
    """CREATE TABLE accounts (
        account_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        address TEXT NOT NULL,          -- lines separated by newlines
        email TEXT NOT NULL,
        legal_entity TEXT NOT NULL,
        jurisdiction TEXT NOT NULL,
        cycle_day INTEGER NOT NULL,     -- 1..28: cycles run from this day of a month to the same day of the next
        payment_type TEXT NOT NULL,     -- postpaid: usage charged; prepaid: usage shown as consumed
        currency TEXT NOT NULL,
        status TEXT NOT NULL,           -- active | closed
        created_at BIGINT NOT NULL)""",
    """CREATE TABLE subscriptions (
        subscription_id BIGINT PRIMARY KEY,
        account_id TEXT NOT NULL REFERENCES accounts (account_id),
        msisdn TEXT NOT NULL,
        imsi TEXT,
        plan TEXT NOT NULL,
        start_date TEXT NOT NULL,       -- valid on [start_date, end_date)
        end_date TEXT)""",
    "CREATE INDEX subscriptions_msisdn ON subscriptions (msisdn)",
    "CREATE INDEX subscriptions_imsi ON subscriptions (imsi)",
    "CREATE INDEX subscriptions_account ON subscriptions (account_id)",
    """CREATE TABLE cdr_files (
        name TEXT PRIMARY KEY,          -- path relative to the CDR directory (pNNN/cdr-....jsonl)
        size BIGINT NOT NULL,
        lines BIGINT NOT NULL,
        inserted BIGINT NOT NULL,
        duplicates BIGINT NOT NULL,
        malformed BIGINT NOT NULL,
        imported_at BIGINT NOT NULL)""",
    """CREATE TABLE usage_records (
        record_id TEXT PRIMARY KEY,     -- the CDR's recordId: importing a record twice changes nothing
        record_type TEXT NOT NULL,      -- usage | event | refund | close
        msisdn TEXT,
        imsi TEXT,
        session_id TEXT,
        charging_id TEXT,
        rating_group INTEGER,
        service_id INTEGER,
        opening_time BIGINT,
        record_time BIGINT NOT NULL,
        record_date TEXT NOT NULL,       -- UTC date of record_time: guiding and cycles compare ISO dates
        usage_time BIGINT,
        octets_in BIGINT,
        octets_out BIGINT,
        octets_total BIGINT,
        usage_units BIGINT,
        allowance_units BIGINT NOT NULL, -- units taken from allowance buckets (for re-rating)
        amount BIGINT NOT NULL,          -- micro-units exactly as online charging rated them
        currency TEXT NOT NULL,
        rating_version TEXT,
        source_file TEXT NOT NULL,
        source_line INTEGER NOT NULL,
        state TEXT NOT NULL,             -- received → guided → billed; rejected (reject queue)
        account_id TEXT,
        subscription_id BIGINT,
        reject_reason TEXT,
        invoice_id BIGINT,
        imported_at BIGINT NOT NULL)""",
    "CREATE INDEX usage_state ON usage_records (state, account_id, record_time)",
    "CREATE INDEX usage_invoice ON usage_records (invoice_id)",
    "CREATE INDEX usage_time ON usage_records (record_time)",
    """CREATE TABLE import_errors (
        file TEXT NOT NULL,
        line INTEGER NOT NULL,
        reason TEXT NOT NULL,
        raw TEXT NOT NULL,
        seen_at BIGINT NOT NULL,
        PRIMARY KEY (file, line))""",
    """CREATE TABLE charges (
        charge_id BIGINT PRIMARY KEY,
        account_id TEXT NOT NULL REFERENCES accounts (account_id),
        kind TEXT NOT NULL,              -- one_off | adjustment | rerating
        description TEXT NOT NULL,
        category TEXT NOT NULL,          -- tax category
        amount BIGINT NOT NULL,          -- signed micro-units
        charge_date TEXT NOT NULL,
        reference TEXT UNIQUE,           -- idempotency key
        invoice_id BIGINT,
        created_at BIGINT NOT NULL)""",
    "CREATE INDEX charges_pending ON charges (account_id, invoice_id)",
    """CREATE TABLE bill_runs (
        run_id BIGINT PRIMARY KEY,
        period TEXT NOT NULL UNIQUE,     -- YYYY-MM: the cycle that starts in this month
        status TEXT NOT NULL,            -- draft | finalized
        created_at BIGINT NOT NULL,
        finalized_at BIGINT,
        invoices INTEGER NOT NULL,
        usage_amount BIGINT NOT NULL,
        total BIGINT NOT NULL)""",
    """CREATE TABLE invoices (
        invoice_id BIGINT PRIMARY KEY,
        kind TEXT NOT NULL,              -- invoice | credit_note
        status TEXT NOT NULL,            -- draft | finalized (immutable)
        run_id BIGINT,
        account_id TEXT NOT NULL REFERENCES accounts (account_id),
        legal_entity TEXT NOT NULL,
        jurisdiction TEXT NOT NULL,
        payment_type TEXT NOT NULL,
        sequence BIGINT,                 -- gapless per legal entity and kind, assigned at finalization
        number TEXT,
        period TEXT,
        cycle_start TEXT,                -- usage in arrears: [cycle_start, cycle_end)
        cycle_end TEXT,
        fee_end TEXT,                    -- recurring fees in advance up to here
        usage_to BIGINT,                 -- epoch ms: usage recorded before this is on the invoice
        issue_date TEXT,
        due_date TEXT,
        currency TEXT NOT NULL,
        subtotal BIGINT NOT NULL,
        tax_total BIGINT NOT NULL,
        total BIGINT NOT NULL,
        usage_amount BIGINT NOT NULL,    -- all usage lines (charged or prepaid-consumed)
        credited_invoice_id BIGINT,      -- a credit note's invoice
        reason TEXT,
        created_at BIGINT NOT NULL,
        finalized_at BIGINT,
        UNIQUE (legal_entity, kind, sequence),
        UNIQUE (number))""",
    "CREATE INDEX invoices_run ON invoices (run_id, account_id)",
    "CREATE INDEX invoices_account ON invoices (account_id)",
    """CREATE TABLE invoice_lines (
        invoice_id BIGINT NOT NULL REFERENCES invoices (invoice_id),
        line_no INTEGER NOT NULL,
        kind TEXT NOT NULL,              -- usage | recurring | recurring_credit | one_off | adjustment | rerating
                                         -- | credit (a credit note's line)
        description TEXT NOT NULL,
        category TEXT NOT NULL,
        msisdn TEXT,
        rating_group INTEGER,
        subscription_id BIGINT,
        quantity BIGINT,
        unit TEXT,
        records BIGINT,
        period_from TEXT,
        period_to TEXT,
        unit_price BIGINT,               -- recurring lines: the monthly fee the days were prorated from
        amount BIGINT NOT NULL,
        charged INTEGER NOT NULL,        -- 0: prepaid usage shown as consumed, not in the total
        tax_rate TEXT NOT NULL,
        tax_amount BIGINT NOT NULL,
        credited_line_no INTEGER,        -- a credit note line's invoice line
        PRIMARY KEY (invoice_id, line_no))""",
    "CREATE INDEX invoice_lines_subscription ON invoice_lines (subscription_id, period_to)",
    """CREATE TABLE payments (
        payment_id BIGINT PRIMARY KEY,
        account_id TEXT NOT NULL REFERENCES accounts (account_id),
        amount BIGINT NOT NULL,
        received_date TEXT NOT NULL,
        reference TEXT NOT NULL UNIQUE,  -- a payment recorded twice changes nothing
        method TEXT NOT NULL,
        created_at BIGINT NOT NULL)""",
    """CREATE TABLE payment_allocations (
        payment_id BIGINT NOT NULL REFERENCES payments (payment_id),
        invoice_id BIGINT NOT NULL REFERENCES invoices (invoice_id),
        amount BIGINT NOT NULL,
        PRIMARY KEY (payment_id, invoice_id))""",
    """CREATE TABLE reconciliations (
        reconciliation_id BIGINT PRIMARY KEY,
        file_name TEXT NOT NULL,
        file_sha256 TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        summary TEXT NOT NULL)""",
]

# Version 2: what each record drew from which bucket, by the bucket's real unit (billing.cdrs), and the rating
# keys re-rating needs (billing.rerating). Records imported before keep everything as invoiced money. Invoice
# lines gain the kind "allowance" (units from allowance buckets, amount 0, charged 0: informational).
_V2 = [
    # money from invoiced money buckets (the plan's money bucket, own or a group's '@'): what a postpaid
    # account owes for the record
    "ALTER TABLE usage_records ADD COLUMN money_invoiced BIGINT NOT NULL DEFAULT 0",
    "UPDATE usage_records SET money_invoiced = amount",
    # money from other money buckets (bonus, promotions): already paid, never invoiced
    "ALTER TABLE usage_records ADD COLUMN money_bonus BIGINT NOT NULL DEFAULT 0",
    # money and allowance units taken from the group's shared ('@') buckets (part of the above)
    "ALTER TABLE usage_records ADD COLUMN money_shared BIGINT NOT NULL DEFAULT 0",
    "ALTER TABLE usage_records ADD COLUMN allowance_shared BIGINT NOT NULL DEFAULT 0",
    "ALTER TABLE usage_records ADD COLUMN buckets TEXT",  # JSON {ref: [amount, unit]} as resolved at import
    "ALTER TABLE usage_records ADD COLUMN request_number BIGINT",  # ccRequestNumber
    "ALTER TABLE usage_records ADD COLUMN serving_plmn TEXT",  # servingNodePLMN (roaming zone)
    "ALTER TABLE usage_records ADD COLUMN service_context TEXT",  # serviceContextId
    "ALTER TABLE usage_records ADD COLUMN destination TEXT",  # the called party, when the CDR carries it
    "ALTER TABLE usage_records ADD COLUMN tariff TEXT",  # the tariff online charging rated with
    "ALTER TABLE usage_records ADD COLUMN tariff_parts TEXT",  # JSON: the CDR's tariffParts
    "CREATE INDEX usage_session ON usage_records (session_id, rating_group)",
    "CREATE INDEX usage_msisdn_time ON usage_records (msisdn, record_time)",
]

# Version 3: when online charging chose the schedule that priced a record (the CDR's ratedAt: the grant's time),
# for re-rating; NULL for records imported before or from CDRs without it (re-rating derives it then).
_V3 = [
    "ALTER TABLE usage_records ADD COLUMN rated_at BIGINT",
]

# Version 4: fee records (recordType "fee": a catalog plan period's fee or an add-on purchase, charged online by
# lua/catalog.lua) are imported beside usage, one invoice line each (kind "fee"). They keep the catalog item and,
# for a plan, the period it pays for; a plan fee record also tells the bill run that the subscription's recurring
# fee comes from the catalog from that period on (billing.billrun).
_V4 = [
    "ALTER TABLE usage_records ADD COLUMN fee_type TEXT",  # plan | addon; NULL for other records
    "ALTER TABLE usage_records ADD COLUMN fee_item TEXT",  # the catalog plan or add-on name
    "ALTER TABLE usage_records ADD COLUMN fee_period_start BIGINT",  # a plan fee's period [start, end), epoch ms
    "ALTER TABLE usage_records ADD COLUMN fee_period_end BIGINT",
    "CREATE INDEX usage_fee ON usage_records (record_type, subscription_id)",
]

# (version, description, statements)
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "accounts, usage records, bill runs, invoices, payments, reconciliations", _V1),
    (2, "usage by bucket unit (invoiced, bonus and shared money, allowances) and rating keys", _V2),
    (3, "the rating time of usage records (CDR ratedAt)", _V3),
    (4, "catalog fee records (plan periods, add-on purchases)", _V4),
]
