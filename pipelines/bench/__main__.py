import sys

from pipelines.bench import main

sys.exit(main())
