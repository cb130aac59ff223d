"""`smtpgate suggest`: find the user's SMTP server in the mail programs they already use,
and write it into the config as a relay (AY Mail's "Suggest" button).

One detector module per program reads that program's own files through a `Scan`;
`survey` merges and ranks what they found; `proposal` writes the chosen one. Passwords are
never read: a written relay names a `password_env` instead.
"""

from smtpgate.suggest.proposal import Proposal, write
from smtpgate.suggest.scan import Finding, Scan
from smtpgate.suggest.survey import Suggestion, survey

__all__ = ["Finding", "Proposal", "Scan", "Suggestion", "survey", "write"]
