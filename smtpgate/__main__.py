import sys

from smtpgate.cli import main

sys.exit(main())
