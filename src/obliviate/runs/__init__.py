"""Run directories: their files, fingerprints, lifecycle and registry records (see ``rundir``)."""

from obliviate.runs.files import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    environment,
    git_commit,
    json_default,
    read_json,
)
from obliviate.runs.rundir import (
    Lifecycle,
    RunDir,
    RunError,
    RunExistsError,
    RunInterrupted,
    input_paths,
    plain_name,
    safe_name,
)

__all__ = ["Lifecycle", "RunDir", "RunError", "RunExistsError", "RunInterrupted", "atomic_write_bytes",
           "atomic_write_json", "atomic_write_text", "environment", "git_commit", "input_paths", "json_default",
           "plain_name", "read_json", "safe_name"]
