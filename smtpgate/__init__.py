"""smtpgate: a local SMTP gateway. Read along the data path:
listener -> policy -> router -> spool -> scheduler -> transports (see docs/architecture.md).
"""

__version__ = "0.1.0"
