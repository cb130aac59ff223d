"""Transports: hand a leased delivery to the next mail server, report per recipient."""

from smtpgate.transports.base import Transport
from smtpgate.transports.relay import RelayTransport

__all__ = ["RelayTransport", "Transport"]
