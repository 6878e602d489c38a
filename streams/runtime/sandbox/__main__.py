"""``python -m streams.runtime.sandbox serve [SOCKET]``: the code verifier's sandbox server (a sidecar)."""

import sys

from streams.runtime.sandbox import main

sys.exit(main())
