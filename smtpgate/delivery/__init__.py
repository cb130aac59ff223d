"""Delivery decisions that do no I/O: what an SMTP reply means, and when to try again."""
