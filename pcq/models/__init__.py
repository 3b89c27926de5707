"""All tables; importing this package registers them on ``Base.metadata``."""

from pcq.models.base import Base, new_id, utcnow
from pcq.models.job import (
    ACTIVE_STATUSES,
    JOB_STATUSES,
    TERMINAL_STATUSES,
    Attempt,
    Batch,
    BatchStatus,
    Job,
    JobStatus,
)
from pcq.models.result import BasisField, BatchDomain, Citation, Result, Usage
from pcq.models.tenant import ApiKey, Tenant

__all__ = [
    "ACTIVE_STATUSES",
    "JOB_STATUSES",
    "TERMINAL_STATUSES",
    "ApiKey",
    "Attempt",
    "Base",
    "BasisField",
    "Batch",
    "BatchDomain",
    "BatchStatus",
    "Citation",
    "Job",
    "JobStatus",
    "Result",
    "Tenant",
    "Usage",
    "new_id",
    "utcnow",
]
