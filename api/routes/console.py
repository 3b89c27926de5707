"""The read-only console: server-rendered pages at ``/console`` for a person with an API key.

Sign-in takes the key from a form (never a URL) and keeps it in a cookie (``pcq_console``:
HttpOnly, SameSite=Strict, Path=/console, Secure over https, and a session cookie: no expiry,
so the browser never writes the key to disk). Each request checks the key
again as the API does (api.deps.tenant_of_key): no session table to keep in step with
revocation, and a revoked key ends its session at the next click. A signed session token would
outlive the key it was made from, so would need that check as well. The cookie is the key, so
the pages guard it: a strict Content-Security-Policy (no inline script or style: the script and
stylesheet are files served here), ``Cache-Control: no-store``, no Referer sent to other sites
(``same-origin``: with none at all, a browser sends ``Origin: null`` with the forms), and POSTs
from another origin refused.

Read-only: nothing here cancels, retries or submits. Live progress comes from the batch's event
stream (api.events), served again at ``/console/batches/{id}/events`` because an EventSource
cannot send an Authorization header; it counts against the tenant's open streams like the
API's. Without JavaScript the pages show the counts as they were at load.

Not in the OpenAPI document: these are pages, not the API.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from datetime import datetime
from importlib import resources
from typing import Annotated, Any
from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, PackageLoader
from starlette.concurrency import run_in_threadpool

from api import console, events
from api.deps import Resources, ResourcesDep, SessionDep, tenant_of_key
from api.routes.batches import open_event_stream
from pcq import logs
from pcq.jobs.errors import NotFound, PcqError, TooManyRequests, Unauthorized
from pcq.tenants import INVALID_KEY, KeyRefused

COOKIE = "pcq_console"
MAX_FORM_BYTES = 4096  # a sign-in form holds one key
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}
STATIC = {  # name -> media type; read once, from the package (the wheel ships them)
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
}
_STATIC_BODY = {name: (resources.files("api") / "static" / "console" / name).read_bytes() for name in STATIC}


def _when(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _safe_href(url: str) -> str | None:
    """A citation's URL as a link only if it is http(s): a ``javascript:`` URL stays text."""
    return url if urlsplit(url).scheme.lower() in ("http", "https") else None


templates = Environment(loader=PackageLoader("api", "templates/console"), autoescape=True)
templates.filters["when"] = _when
templates.filters["pretty_json"] = lambda value: json.dumps(value, indent=2, ensure_ascii=False)
templates.globals["safe_href"] = _safe_href


def page(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    html = templates.get_template(name).render(request=request, **context)
    return HTMLResponse(html, status_code=status_code, headers=PAGE_HEADERS)


class SignedOut(Exception):
    """No cookie, or its key no longer authenticates: back to the sign-in form."""


class Forbidden(PcqError):
    code = "forbidden"
    http_status = 403


class ConsoleRoute(APIRoute):
    """Errors of the console's routes as pages, not the API's JSON: a 404 page for another
    tenant's batch, the sign-in form once the key stops working."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except SignedOut:
                back = RedirectResponse("/console", status_code=303, headers=PAGE_HEADERS)
                back.delete_cookie(COOKIE, path="/console", httponly=True, samesite="strict")
                return back
            except PcqError as exc:
                titles = {404: "Not found", 401: "Signed out", 429: "Too many requests"}
                out = page(
                    request,
                    "error.html",
                    status_code=exc.http_status,
                    title=titles.get(exc.http_status, "Cannot show this"),
                    detail=exc.detail,
                )
                if isinstance(exc, TooManyRequests):
                    out.headers["Retry-After"] = str(exc.retry_after)
                return out

        return handle


router = APIRouter(prefix="/console", include_in_schema=False, route_class=ConsoleRoute)


def _tenant_or_none(res: Resources, key: str | None) -> str | None:
    if not key:
        return None
    try:
        return tenant_of_key(res, key)
    except KeyRefused:
        return None


def _cookie_tenant(request: Request, res: Resources) -> str | None:
    """The tenant whose key the cookie holds, counted against its API rate limit (the console
    is a client of the same data); None when there is none or it no longer works."""
    tenant = _tenant_or_none(res, request.cookies.get(COOKIE))
    if tenant is not None and res.rate_limiter is not None:
        res.rate_limiter.check(tenant)
    return tenant


async def console_tenant(request: Request, res: ResourcesDep) -> str:
    """The signed-in tenant, bound for the request's log lines (async, as api.deps.bound_tenant
    is, so the binding reaches the route and the access line)."""
    tenant = await run_in_threadpool(_cookie_tenant, request, res)
    if tenant is None:
        raise SignedOut
    logs.bind(tenant=tenant)
    return tenant


async def stream_tenant(request: Request, res: ResourcesDep) -> str:
    """As console_tenant, but a 401: an EventSource cannot follow a redirect to a form."""
    tenant = await run_in_threadpool(_cookie_tenant, request, res)
    if tenant is None:
        raise Unauthorized("signed out of the console")
    logs.bind(tenant=tenant)
    return tenant


ConsoleTenant = Annotated[str, Depends(console_tenant)]
StreamTenant = Annotated[str, Depends(stream_tenant)]


def same_origin(request: Request) -> None:
    """A POST from a page of another origin is refused (login CSRF); browsers send Origin on
    every cross-origin POST, and a client without one is not a browser acting for someone.

    Only the host and port are compared, with the request's ``Host`` or, behind a reverse
    proxy, the ``X-Forwarded-Host`` it sets: a proxy that ends TLS makes the scheme ``http``
    here while the browser's Origin says ``https``. A cross-site form cannot set either header,
    so neither can be used to pass this check."""
    origin = request.headers.get("origin")
    if origin is None:
        return
    hosts = {request.headers.get("host", ""), request.headers.get("x-forwarded-host", "")} - {""}
    if urlsplit(origin).netloc.lower() not in {h.lower() for h in hosts}:
        raise Forbidden("this form must be sent from the console's own pages")


def _over_https(request: Request) -> bool:
    """Whether the browser reached the console over https, directly or through a proxy that ends
    TLS (it says so in X-Forwarded-Proto, or the form's Origin does): the cookie is then
    Secure. Believing a forged header here only makes the cookie stricter."""
    return (
        request.url.scheme == "https"
        or request.headers.get("x-forwarded-proto", "").lower() == "https"
        or request.headers.get("origin", "").lower().startswith("https://")
    )


@router.get("")
def home(request: Request, res: ResourcesDep) -> Response:
    if _tenant_or_none(res, request.cookies.get(COOKIE)) is not None:
        return RedirectResponse("/console/batches", status_code=303, headers=PAGE_HEADERS)
    return page(request, "login.html")


@router.post("/login", dependencies=[Depends(same_origin)])
async def login(request: Request, res: ResourcesDep) -> Response:
    body = await request.body()
    try:
        form = parse_qs(body[:MAX_FORM_BYTES].decode("utf-8", "replace"), max_num_fields=4)
    except ValueError:  # more fields than a sign-in form has
        return page(request, "login.html", status_code=400, error="Send the sign-in form as it is.")
    key = (form.get("api_key") or [""])[0].strip()
    if not key:
        return page(request, "login.html", status_code=401, error="Enter your API key.")
    try:
        await run_in_threadpool(tenant_of_key, res, key)
    except KeyRefused as exc:
        # Why, as far as the API would say it: a typo (checksum), an expired key, or one that is
        # not valid or revoked (never which of those two).
        message = "That key is not valid, or it has been revoked."
        if str(exc) != INVALID_KEY:
            message = f"That key was refused: {exc}."
        return page(request, "login.html", status_code=401, error=message)
    out = RedirectResponse("/console/batches", status_code=303, headers=PAGE_HEADERS)
    out.set_cookie(
        COOKIE,
        key,
        path="/console",
        secure=_over_https(request),
        httponly=True,
        samesite="strict",
    )
    return out


@router.post("/logout", dependencies=[Depends(same_origin)])
def logout() -> Response:
    out = RedirectResponse("/console", status_code=303, headers=PAGE_HEADERS)
    out.delete_cookie(COOKIE, path="/console", httponly=True, samesite="strict")
    return out


@router.get("/static/{name}")
def static(name: str) -> Response:
    if name not in STATIC:
        raise NotFound(f"no file {name!r}")
    return Response(_STATIC_BODY[name], media_type=STATIC[name], headers={"Cache-Control": "no-cache"})


@router.get("/batches")
def batches(
    request: Request, session: SessionDep, tenant: ConsoleTenant, cursor: str | None = None
) -> Response:
    rows, next_cursor = console.list_batches(session, tenant, cursor or None)
    return page(request, "batches.html", batches=rows, next_cursor=next_cursor, ended=console.ended)


@router.get("/batches/{batch_id}")
def batch(
    request: Request, batch_id: str, session: SessionDep, tenant: ConsoleTenant, cursor: str | None = None
) -> Response:
    shown = console.batch_page(session, tenant, batch_id, cursor or None)
    return page(request, "batch.html", view=shown, ended=console.ended(shown.batch))


@router.get("/batches/{batch_id}/events")
async def batch_events(
    batch_id: str,
    res: ResourcesDep,
    tenant: StreamTenant,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> Response:
    """The batch's event stream (api.events), as ``GET /v1/batches/{id}/events`` serves it."""
    return await open_event_stream(res, tenant, batch_id, events.EventId.parse(last_event_id))


@router.get("/jobs/{job_id}")
def job(request: Request, job_id: str, session: SessionDep, tenant: ConsoleTenant) -> Response:
    return page(request, "job.html", view=console.job_page(session, tenant, job_id))


@router.get("/citations")
def citations(
    request: Request,
    session: SessionDep,
    tenant: ConsoleTenant,
    domain: str | None = None,
    cursor: str | None = None,
) -> Response:
    """The tenant's citations by domain; with ``domain``, that domain's citations."""
    if domain:
        rows, next_cursor = console.citations_of_domain(session, tenant, domain, cursor or None)
        return page(request, "domain.html", domain=domain, rows=rows, next_cursor=next_cursor)
    shown = console.domains(session, tenant)
    return page(request, "citations.html", domains=shown, limit=console.DOMAINS_SHOWN)


@router.get("/{rest:path}")
def unknown(rest: str) -> Response:
    """Any other console address: the 404 page (the API's JSON 404 is for API clients)."""
    raise NotFound(f"no console page /console/{rest}")
