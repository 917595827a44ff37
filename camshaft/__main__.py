import sys

from camshaft.cli import main

sys.exit(main())
