import sys

from hl7bridge.app.cli import main

sys.exit(main())
