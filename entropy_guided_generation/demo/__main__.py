"""``python -m entropy_guided_generation.demo``: the demo's command line (:func:`~entropy_guided_generation.demo.run.main`)."""
import sys

from entropy_guided_generation.demo.run import main

sys.exit(main())
