"""Benchmarks of stui-twisted against its floors and peers.

Run everything with ``.venv/bin/python -m benchmarks.run --quick`` (a few
minutes) or ``--full`` (the published numbers; see ``docs/performance.md``).
Every figure is measured in the same run as its reference, with the client,
the server and the server's image child pinned to CPU 0.
"""
