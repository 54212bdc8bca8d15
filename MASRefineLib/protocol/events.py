"""The worker's wire protocol: the prefix of its event lines on stdout and its exit codes (docs/pipeline.md)."""

#: every event line the worker prints on stdout: ``MASREFINE-EVENT {json}``
EVENT_PREFIX = "MASREFINE-EVENT "
#: exit codes: done, error, invalid job or missing dependency, cancelled
EXIT_DONE, EXIT_ERROR, EXIT_INVALID, EXIT_CANCELLED = 0, 1, 2, 3
#: the status word of each exit code (the runner's ``exit`` event)
STATUS = {EXIT_DONE: "done", EXIT_ERROR: "error", EXIT_INVALID: "invalid", EXIT_CANCELLED: "cancelled"}
