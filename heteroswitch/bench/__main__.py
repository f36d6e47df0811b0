"""Worker entry of the benchmark: ``python -m heteroswitch.bench _job CFG SEED METHOD OUT [ADDR]``
(the command line is ``heteroswitch bench``: :mod:`heteroswitch.cli`)."""

import sys

from .job import job_main

if len(sys.argv) > 1 and sys.argv[1] == "_job":
    sys.exit(job_main(sys.argv[2:]))
sys.exit("python -m heteroswitch.bench is the benchmark's worker entry; run `heteroswitch bench` instead")
