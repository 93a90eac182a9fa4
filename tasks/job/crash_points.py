"""Test-only kill points: where a test makes the process die, to prove each step of finishing is crash-safe.

Finishing a job takes steps (assemble the output, rename it into place, mark the manifest
complete, clean the work folder). A kill between any two must leave a state that the same command
completes without sending a row. The crash-point test sets ``PARALLEL_REQUESTS_TEST_KILL_AT`` to a
step's name; when the run reaches that step, the process kills itself with SIGKILL, as ``kill -9``
would. Unset (always, outside tests), ``kill_point`` does nothing.

Usage:
    >>> kill_point("rename")   # dies here when PARALLEL_REQUESTS_TEST_KILL_AT=rename

The points: ``assembly`` (half the rows written to the temporary output), ``rename`` (the
temporary output complete, before it is renamed or the upload completed), ``manifest`` (the
output in place, the manifest not yet marked complete), ``cleanup`` (marked complete, nothing
cleaned yet). Batch mode: ``batch-creating`` (the creation token recorded, the batch not yet
created), ``batch-created`` (created on the server, its id not yet recorded), ``batch-downloaded``
(its results downloaded, not yet read into the parts).
"""

# Standard library imports
import os
import signal

# The environment variable that names the step to die at.
KILL_AT_VARIABLE = "PARALLEL_REQUESTS_TEST_KILL_AT"


def kill_point(step: str) -> None:
    """Die with SIGKILL here when the test asked for this step."""
    if os.environ.get(KILL_AT_VARIABLE) == step:
        os.kill(os.getpid(), signal.SIGKILL)
