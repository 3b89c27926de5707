"""Webhooks: the tenant's signing secret, and its rotation."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from api import webhook_secrets
from api.deps import SINGLE_VALUED_QUERY, ResourcesDep, TenantDep
from api.errors import error_responses
from api.schemas import WebhookSecretOut

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])

# A secret must not linger in a browser's or a proxy's cache.
_NO_STORE = {"Cache-Control": "no-store"}


@router.get("/secret", response_model=WebhookSecretOut, responses=error_responses(401, 503))
def get_secret(res: ResourcesDep, tenant: TenantDep, response: Response) -> WebhookSecretOut:
    """The secret that signs your webhook deliveries (created on first use)."""
    response.headers.update(_NO_STORE)
    return WebhookSecretOut(secret=webhook_secrets.current(res.sessions, tenant))


@router.post(
    "/secret/rotate",
    response_model=WebhookSecretOut,
    responses=error_responses(401, 422, 503),
    dependencies=SINGLE_VALUED_QUERY,
)
def rotate_secret(
    res: ResourcesDep,
    tenant: TenantDep,
    response: Response,
    expire_previous: Annotated[
        bool,
        Query(
            description="true: every earlier secret stops signing at once, with no grace period "
            "(a secret that leaked). Receivers that still use one will reject deliveries."
        ),
    ] = False,
) -> WebhookSecretOut:
    """A new signing secret; the previous one also signs for PCQ_WEBHOOK_SECRET_GRACE_SECONDS."""
    response.headers.update(_NO_STORE)
    grace = 0 if expire_previous else res.settings.webhook_secret_grace_seconds
    return WebhookSecretOut(secret=webhook_secrets.rotate(res.sessions, tenant, grace_seconds=grace))
