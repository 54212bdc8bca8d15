"""The job protocol, standard library only: what the Slicer process, the runner and the command line share.

- :mod:`.jobs`: ``job.json`` (schema, :data:`~.jobs.PARAMETERS` with their types, choices and defaults, validation)
- :mod:`.events`: the worker's event-line prefix and exit codes
- :mod:`.atomic`: atomic file writes (temporary file + rename)
- :mod:`.files`: image file names (suffixes, stems)
- :mod:`.manifest`: reading a finished run's ``manifest.json``
- :mod:`.loadplan`: what a viewer loads from a finished run

Nothing here imports numpy, SimpleITK, torch, MONAI or scipy (Testing/test_protocol.py imports it where they are
blocked): the Slicer module imports it into Slicer's own process.
"""
