"""``job.json``: moved to :mod:`MASRefineLib.protocol.jobs` (standard library only); this name stays for scripts."""
from .protocol.jobs import (ATLAS_PARAMETERS, BATCH_PARAMETERS, CANCEL_FILE_NAME, PARAMETERS, PIPELINES,  # noqa: F401
                            SCHEMA_VERSION, cancel_file_inside, default_parameters, make_atlas_job, make_batch_job,
                            make_job, pipeline_target, read_job, resolved_parameters, validate_job, write_job)
