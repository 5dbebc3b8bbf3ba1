"""The tool sandbox: verification tools a judge (or a rule-based reward) calls for evidence.

Runs as its own service (`rmserve sandbox`, a sidecar beside each worker); untrusted code only
ever runs inside bubblewrap, started by this service.
"""
