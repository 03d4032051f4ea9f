"""Downstream BSS: billing runs, invoices and wholesale reconciliation fed by CDR files.

Reads CDR files and the catalog only; never imports protocol or the OCS server.
"""
