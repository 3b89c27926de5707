"""The SSRF guard's rules for webhook URLs: which addresses are public, and which schemes,
hosts and ports a webhook may name.

Pure: no lookups, no connections. The edges resolve names and ask ``vet_addresses``: the API
once at submission (api/webhook_urls.py), the worker once per delivery, connecting only to the
addresses vetted (worker/webhook_net.py). ``PCQ_WEBHOOK_ALLOW_PRIVATE=true`` turns both off;
this module knows nothing of it.

An address is public when no special-purpose range of IANA's registries holds it. The ranges
are listed here rather than taken from ``ipaddress``' ``is_global``: its tables were wrong
before CPython 3.11.10/3.12.4 (CVE-2024-4032), multicast counts as global there, and an IPv6
address embedding an IPv4 one (NAT64 ``64:ff9b::/96`` above all) can be "global" whatever it
embeds. ``is_global`` is still asked, as a second opinion that can only refuse.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

IPAddress = IPv4Address | IPv6Address

# Ports a webhook may use: the web's two, and the unprivileged range (receivers on 8080, 8443,
# ...). Not 22, 25, 6379: a webhook must not talk to SSH, mail or a database, even a public one.
WEB_PORTS = frozenset({80, 443})
FIRST_UNPRIVILEGED_PORT = 1024

# First match wins: a narrow range before the wider one that holds it.
_IPV4_RANGES: tuple[tuple[IPv4Network, str], ...] = tuple(
    (IPv4Network(net), why)
    for net, why in (
        ("0.0.0.0/8", "unspecified"),  # "this network": 0.0.0.0 reaches the local host
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared address space (CGNAT)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),  # cloud metadata (169.254.169.254) included
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "6to4 relay anycast"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("240.0.0.0/4", "reserved"),
        # Public, but it answers only the Azure host the caller runs on (its metadata, DNS).
        ("168.63.129.16/32", "cloud platform (Azure host services)"),
    )
)

# IPv6 forms that embed an IPv4 address still in use: judged by the address they embed.
IPV4_MAPPED = IPv6Network("::ffff:0:0/96")
NAT64 = IPv6Network("64:ff9b::/96")  # RFC 6052's well-known prefix (DNS64 answers with it)

_IPV6_RANGES: tuple[tuple[IPv6Network, str], ...] = tuple(
    (IPv6Network(net), why)
    for net, why in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "IPv4-compatible (deprecated)"),
        ("::ffff:0:0:0/96", "IPv4-translated (SIIT)"),
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("100::/64", "discard-only"),
        ("2001::/32", "Teredo"),
        ("2001::/23", "IETF protocol assignments"),  # benchmarking 2001:2::/48, ORCHID included
        ("2001:db8::/32", "documentation"),
        ("2002::/16", "6to4"),
        ("3fff::/20", "documentation"),
        ("fc00::/7", "unique local (private)"),  # AWS metadata fd00:ec2::254 included
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local (deprecated)"),
        ("ff00::/8", "multicast"),
    )
)
GLOBAL_UNICAST = IPv6Network("2000::/3")  # every IPv6 address the internet routes today

# Names that never denote a public host: RFC 6761, RFC 6762 (.local), RFC 8375 (.home.arpa),
# ICANN's private-use .internal, the TLDs ICANN will not delegate (.home, .corp), and the
# habits of home and office networks (.lan, .localdomain).
LOCAL_NAMES = frozenset({"localhost"})
LOCAL_SUFFIXES = (
    ".localhost",
    ".local",
    ".localdomain",
    ".internal",
    ".home.arpa",
    ".home",
    ".corp",
    ".lan",
)

_DIGITS = {10: frozenset("0123456789"), 8: frozenset("01234567"), 16: frozenset("0123456789abcdefABCDEF")}


class NotPublic(ValueError):
    """A webhook target the guard refuses. ``str()`` says why, fit for the client: for a name,
    never what it resolved to (an internal name's addresses stay internal); ``address`` and
    ``reason`` carry that for the logs."""

    def __init__(self, message: str, address: IPAddress | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.address = address
        self.reason = reason


def non_public_reason(address: IPAddress) -> str | None:
    """None for a public address; otherwise why it is not (``"loopback"``, ``"private"``, ...)."""
    if isinstance(address, IPv6Address):
        if address.scope_id is not None:
            return "scoped (zone index)"
        embedded = embedded_ipv4(address)
        if embedded is not None:
            inner, form = embedded
            why = non_public_reason(inner)
            return None if why is None else f"{why}, {form}"
        for net6, why in _IPV6_RANGES:
            if address in net6:
                return why
        if address not in GLOBAL_UNICAST:
            return "reserved (not global unicast)"
    else:
        for net4, why in _IPV4_RANGES:
            if address in net4:
                return why
    if not address.is_global:
        return "not global"
    return None


def embedded_ipv4(address: IPv6Address) -> tuple[IPv4Address, str] | None:
    """The IPv4 address that an IPv4-mapped or NAT64 (64:ff9b::/96) address stands for, with
    the form's name. The deprecated embeddings (IPv4-compatible, 6to4, Teredo) are refused
    whole, whatever they embed, so they are not unwrapped."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped, "IPv4-mapped"
    if address in NAT64:
        return IPv4Address(int(address) & 0xFFFFFFFF), "NAT64"
    return None


def parse_ip_host(host: str) -> IPAddress | None:
    """The address a URL's host denotes if it is a literal, read as browsers (WHATWG URL) and
    libc's ``inet_aton`` read it: ``[::1]``, and IPv4 in any form (``2130706433``, ``0x7f.1``,
    ``0177.0.0.1``, ``127.1``). None for a name. A host that ends in a number but is no valid
    IPv4 address (``1.2.3.4.5``, ``foo.127``) is refused: no parser agrees on what it is."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        try:
            return IPv6Address(host)
        except ValueError:
            raise NotPublic(f"{host!r} is not a valid IPv6 address") from None
    # Trailing dots do not make an address a name: "127.0.0.1." is refused as 127.0.0.1.
    parts = host.rstrip(".").split(".")
    last = parts[-1]
    if not last or (not set(last) <= _DIGITS[10] and _ipv4_number(last) is None):
        return None  # a name (its last label is not a number)
    numbers = [_ipv4_number(part) for part in parts]
    valid = [n for n in numbers if n is not None]
    if len(parts) > 4 or len(valid) != len(parts) or any(n > 255 for n in valid[:-1]):
        raise NotPublic(f"{host!r} ends in a number but is not a valid IPv4 address")
    if valid[-1] >= 256 ** (5 - len(valid)):
        raise NotPublic(f"{host!r} ends in a number but is not a valid IPv4 address")
    value = valid[-1] + sum(n << (8 * (3 - i)) for i, n in enumerate(valid[:-1]))
    return IPv4Address(value)


def _ipv4_number(part: str) -> int | None:
    """One dot-separated part of an IPv4 host: decimal, octal (leading 0) or hex (0x)."""
    radix = 10
    if part[:2] in ("0x", "0X"):
        radix, part = 16, part[2:]
    elif len(part) > 1 and part.startswith("0"):
        radix, part = 8, part[1:]
    if not part:
        return 0 if radix == 16 else None  # "0x" is 0; "" is no number
    if not set(part) <= _DIGITS[radix]:
        return None
    return int(part, radix)


def vet_name(name: str) -> None:
    """Refuse the names that never denote a public host: ``localhost`` and its subdomains,
    the local and private-use domains, and single labels (``db``, ``metadata``: resolved
    through the search domains of the network the service runs in)."""
    bare = name.lower().rstrip(".")
    if not bare:
        raise NotPublic("the URL has no host")
    if bare in LOCAL_NAMES or bare.endswith(LOCAL_SUFFIXES):
        raise NotPublic(f"{name!r} is a local name")
    if "." not in bare:
        raise NotPublic(f"{name!r} is a single-label name; use the host's full domain name")


def vet_host(host: str) -> IPAddress | None:
    """Check a URL's host without resolving it: a literal address must be public (it is
    returned); a name must not be a local one (None: resolve it, then ``vet_addresses``)."""
    address = parse_ip_host(host)
    if address is None:
        vet_name(host)
        return None
    why = non_public_reason(address)
    if why is not None:
        raise NotPublic(f"{address} is not a public address ({why})", address, why)
    return address


def vet_target(scheme: str, host: str, port: int | None, *, userinfo: bool) -> IPAddress | None:
    """Everything about a webhook URL but the resolution of its name: scheme http or https, no
    user name or password, a port of the web or an unprivileged one, a host as ``vet_host``."""
    scheme = scheme.lower()
    if scheme not in ("http", "https"):
        raise NotPublic("the scheme must be http or https")
    if userinfo:
        raise NotPublic("the URL must not contain a user name or password")
    if port is None:
        port = 443 if scheme == "https" else 80
    if port not in WEB_PORTS and not FIRST_UNPRIVILEGED_PORT <= port <= 65535:
        raise NotPublic(f"port {port} is not allowed (use 80, 443 or {FIRST_UNPRIVILEGED_PORT}-65535)")
    return vet_host(host)


def vet_addresses(host: str, addresses: Iterable[str]) -> list[IPAddress]:
    """What ``host`` resolved to, every address public (else NotPublic, naming the first that is
    not in ``address`` and ``reason``, never in the message); at least one."""
    vetted: list[IPAddress] = []
    for text in addresses:
        try:
            address = ip_address(text)
        except ValueError:
            raise NotPublic(f"{host!r} does not resolve to a public address") from None
        why = non_public_reason(address)
        if why is not None:
            raise NotPublic(f"{host!r} does not resolve to a public address", address, why)
        if address not in vetted:
            vetted.append(address)
    if not vetted:
        raise NotPublic(f"{host!r} does not resolve to a public address")
    return vetted
