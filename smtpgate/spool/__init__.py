"""The spool: durable messages and per-recipient state (see base.Spool)."""

from smtpgate.spool.base import (
    Delivery,
    MessageView,
    NewMessage,
    NewRecipient,
    RecipientState,
    RecipientUpdate,
    RecipientView,
    Spool,
    SpoolLockedError,
)
from smtpgate.spool.sqlite import SqliteSpool

__all__ = [
    "Delivery",
    "MessageView",
    "NewMessage",
    "NewRecipient",
    "RecipientState",
    "RecipientUpdate",
    "RecipientView",
    "Spool",
    "SpoolLockedError",
    "SqliteSpool",
]
