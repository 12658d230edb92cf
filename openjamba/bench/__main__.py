"""`python -m openjamba.bench --worker SPEC_JSON`: the worker process that `openjamba bench` launches per cell."""

from .worker import main

main()
