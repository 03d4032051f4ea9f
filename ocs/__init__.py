"""The credit-control application: composes protocol, ratecards and balances.

Owns configuration, the server, the CDR writer, the CLI and metrics. Nothing else imports ocs
(except simulators and billing, which sit downstream).
"""
