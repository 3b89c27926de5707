"""All tables; importing this package registers them on ``Base.metadata``."""

from pcq.models.base import Base, new_id, utcnow
from pcq.models.delivery import (
    JOB_EVENT_TYPES,
    DeliveryStatus,
    DisabledWebhookUrl,
    EventType,
    WebhookAttempt,
    WebhookEvent,
)
from pcq.models.file import File
from pcq.models.job import (
    ACTIVE_STATUSES,
    JOB_STATUSES,
    PRIORITIES,
    TERMINAL_STATUSES,
    Attempt,
    Batch,
    BatchStatus,
    Job,
    JobStatus,
    Priority,
)
from pcq.models.result import BasisField, BatchDomain, Citation, Result, Usage
from pcq.models.tenant import ApiKey, Tenant, TenantSpend
from pcq.models.webhook import WebhookSecret

__all__ = [
    "ACTIVE_STATUSES",
    "JOB_EVENT_TYPES",
    "DeliveryStatus",
    "DisabledWebhookUrl",
    "EventType",
    "WebhookAttempt",
    "WebhookEvent",
    "JOB_STATUSES",
    "PRIORITIES",
    "Priority",
    "TERMINAL_STATUSES",
    "ApiKey",
    "Attempt",
    "Base",
    "BasisField",
    "Batch",
    "BatchDomain",
    "BatchStatus",
    "Citation",
    "File",
    "Job",
    "JobStatus",
    "Result",
    "Tenant",
    "TenantSpend",
    "Usage",
    "WebhookSecret",
    "new_id",
    "utcnow",
]
