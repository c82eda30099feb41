import sys

from benchmarks.report.html import main

sys.exit(main())
