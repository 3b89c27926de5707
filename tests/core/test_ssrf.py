"""The SSRF guard's rules (pcq/ssrf.py): pure, no lookup and no connection.

Every non-public range is checked here, as addresses and in every spelling a URL or the C
library accepts; the API's and the worker's tests drive the guard with loopback only.
"""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pcq.ssrf import (
    IPAddress,
    NotPublic,
    embedded_ipv4,
    non_public_reason,
    parse_ip_host,
    vet_addresses,
    vet_host,
    vet_name,
    vet_target,
)


def is_public(address: IPAddress) -> bool:
    return non_public_reason(address) is None


REFUSED_V4 = {
    "0.0.0.0/8": "unspecified",
    "10.0.0.0/8": "private",
    "100.64.0.0/10": "CGNAT",
    "127.0.0.0/8": "loopback",
    "169.254.0.0/16": "link-local",
    "172.16.0.0/12": "private",
    "192.0.0.0/24": "IETF",
    "192.0.2.0/24": "documentation",
    "192.88.99.0/24": "6to4",
    "192.168.0.0/16": "private",
    "198.18.0.0/15": "benchmarking",
    "198.51.100.0/24": "documentation",
    "203.0.113.0/24": "documentation",
    "224.0.0.0/4": "multicast",
    "240.0.0.0/4": "reserved|broadcast",  # 255.255.255.255 is named for itself
}
REFUSED_V6 = {
    "fc00::/7": "unique local",
    "fe80::/10": "link-local",
    "fec0::/10": "site-local",
    "ff00::/8": "multicast",
    "2001:db8::/32": "documentation",
    "3fff::/20": "documentation",
    "2001::/32": "Teredo",
    "2001:2::/48": "IETF",  # benchmarking
    "2002::/16": "6to4",
    "100::/64": "discard",
    "64:ff9b:1::/48": "local-use NAT64",
    "::/96": "IPv4-compatible|unspecified|loopback",  # :: and ::1 are in it
}
PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.215.14",
    "11.0.0.0",
    "100.63.255.255",  # just outside CGNAT
    "100.128.0.0",
    "126.255.255.255",
    "128.0.0.1",
    "172.15.255.255",  # just outside 172.16/12
    "172.32.0.0",
    "192.167.255.255",
    "198.17.255.255",  # just outside benchmarking
    "198.20.0.0",
    "223.255.255.255",
    "2606:4700:4700::1111",
    "2a00:1450:4001:81c::200e",
    "2001:4860:4860::8888",
    "::ffff:8.8.8.8",  # IPv4-mapped, of a public address
    "64:ff9b::808:808",  # NAT64 (DNS64), of 8.8.8.8
]

v4_public = st.sampled_from([a for a in PUBLIC if ":" not in a]).map(IPv4Address)


def mapped(v4: IPv4Address) -> IPv6Address:
    return IPv6Address(f"::ffff:{v4}")


def nat64(v4: IPv4Address) -> IPv6Address:
    return IPv6Address(int(IPv6Address("64:ff9b::")) | int(v4))


def compatible(v4: IPv4Address) -> IPv6Address:
    return IPv6Address(int(v4))


def six_to_four(v4: IPv4Address) -> IPv6Address:
    return IPv6Address((0x2002 << 112) | (int(v4) << 80) | 1)


def teredo(server: IPv4Address, client: IPv4Address) -> IPv6Address:
    """2001:0000:<server>:<flags>:<port ^ ffff>:<client ^ ffffffff>"""
    flags_and_port = (0x8000 << 16) | 0x1234
    return IPv6Address(
        (0x20010000 << 96) | (int(server) << 64) | (flags_and_port << 32) | (int(client) ^ 0xFFFFFFFF)
    )


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("10.1.2.3", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "CGNAT"),
        ("100.100.100.200", "CGNAT"),  # Alibaba Cloud's metadata
        ("169.254.169.254", "link-local"),  # AWS, GCP, Azure, OpenStack metadata
        ("168.63.129.16", "Azure"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("240.0.0.1", "reserved"),
        ("192.0.2.1", "documentation"),
        ("198.51.100.7", "documentation"),
        ("203.0.113.9", "documentation"),
        ("198.18.0.1", "benchmarking"),
        ("192.0.0.8", "IETF"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "scoped"),
        ("fc00::1", "unique local"),
        ("fd00:ec2::254", "unique local"),  # AWS metadata over IPv6
        ("ff02::1", "multicast"),
        ("fec0::1", "site-local"),
        ("2001:db8::1", "documentation"),
        ("100::1", "discard"),
        ("::ffff:127.0.0.1", "loopback, IPv4-mapped"),
        ("::ffff:169.254.169.254", "link-local, IPv4-mapped"),
        ("::ffff:10.0.0.1", "private, IPv4-mapped"),
        ("64:ff9b::7f00:1", "loopback, NAT64"),
        ("64:ff9b::a9fe:a9fe", "link-local, NAT64"),
        ("64:ff9b:1::a00:1", "local-use NAT64"),
        ("::127.0.0.1", "IPv4-compatible"),
        ("::8.8.8.8", "IPv4-compatible"),  # deprecated: refused whatever it embeds
        ("::ffff:0:7f00:1", "SIIT"),
        ("2002:7f00:1::1", "6to4"),
        ("2002:808:808::1", "6to4"),  # refused whatever it embeds
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
        ("5f00::1", "not global unicast"),
        ("4000::1", "not global unicast"),
    ],
)
def test_every_non_public_class_is_refused_and_named(address: str, why: str) -> None:
    reason = non_public_reason(ip_address(address))
    assert reason is not None
    assert why in reason
    assert not is_public(ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address: str) -> None:
    assert non_public_reason(ip_address(address)) is None


@pytest.mark.parametrize("network", list(REFUSED_V4))
@given(data=st.data())
def test_any_address_of_a_refused_ipv4_range_is_refused_in_every_ipv6_form(
    network: str, data: st.DataObject
) -> None:
    v4 = data.draw(st.ip_addresses(network=network))
    assert isinstance(v4, IPv4Address)
    reason = non_public_reason(v4)
    assert reason is not None
    assert any(why in reason for why in REFUSED_V4[network].split("|")), reason
    for form in (mapped(v4), nat64(v4), compatible(v4), six_to_four(v4)):
        assert not is_public(form), form
    public = data.draw(v4_public)
    assert not is_public(teredo(v4, public))  # either end of a Teredo tunnel
    assert not is_public(teredo(public, v4))


@pytest.mark.parametrize("network", list(REFUSED_V6))
@given(data=st.data())
def test_any_address_of_a_refused_ipv6_range_is_refused(network: str, data: st.DataObject) -> None:
    v6 = data.draw(st.ip_addresses(network=network))
    reason = non_public_reason(v6)
    assert reason is not None
    assert any(why in reason for why in REFUSED_V6[network].split("|")), reason


@given(v4=st.ip_addresses(v=4))
def test_mapped_and_nat64_forms_are_judged_by_the_ipv4_address_they_embed(v4: IPv4Address) -> None:
    assert is_public(mapped(v4)) == is_public(v4)
    assert is_public(nat64(v4)) == is_public(v4)


@given(v4=st.ip_addresses(v=4))
def test_deprecated_embeddings_are_refused_whatever_they_embed(v4: IPv4Address) -> None:
    assert not is_public(compatible(v4))
    assert not is_public(six_to_four(v4))
    assert not is_public(teredo(v4, v4))


@given(address=st.ip_addresses(v=4) | st.ip_addresses(network="2000::/3") | st.ip_addresses(v=6))
def test_nothing_the_standard_library_calls_non_global_passes(address: IPv4Address | IPv6Address) -> None:
    """A second opinion: ipaddress' flags (of the embedded IPv4 address, for the forms that
    are judged by it) can only agree with a pass."""
    embedded = embedded_ipv4(address) if isinstance(address, IPv6Address) else None
    judged = address if embedded is None else embedded[0]
    if is_public(address):
        assert judged.is_global
        flags = (
            "is_loopback",
            "is_private",
            "is_link_local",
            "is_multicast",
            "is_reserved",
            "is_unspecified",
        )
        assert [flag for flag in flags if getattr(judged, flag)] == []


@given(
    address=st.one_of(
        *(st.ip_addresses(network=net) for net in ("10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16"))
    ),
    data=st.data(),
)
def test_any_numeric_spelling_of_a_refused_ipv4_address_is_read_as_libc_reads_it(
    address: IPv4Address, data: st.DataObject
) -> None:
    spelling = data.draw(spellings(address))
    assert parse_ip_host(spelling) == address
    assert IPv4Address(socket.inet_aton(spelling)) == address  # the C library (no lookup)
    with pytest.raises(NotPublic):
        vet_host(spelling)


@st.composite
def spellings(draw: st.DrawFn, address: IPv4Address) -> str:
    """``address`` as one, two, three or four numbers, each in decimal, octal or hex."""
    value = int(address)
    count = draw(st.integers(1, 4))
    octets = list(address.packed)
    numbers = [*octets[: count - 1], int.from_bytes(bytes(octets[count - 1 :]), "big")]
    assert sum(n << (8 * (3 - i)) for i, n in enumerate(numbers[:-1])) + numbers[-1] == value
    parts = []
    for n in numbers:
        radix = draw(st.sampled_from(["dec", "oct", "hex", "HEX"]))
        parts.append({"dec": str(n), "oct": f"0{n:o}", "hex": f"0x{n:x}", "HEX": f"0X{n:X}"}[radix])
    return ".".join(parts)


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("0x", "0.0.0.0"),
        ("127.0.0.1.", "127.0.0.1"),
        ("[::1]", "::1"),
        ("::ffff:7f00:1", "::ffff:127.0.0.1"),
        ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1"),
        ("169.254.43518", "169.254.169.254"),
    ],
)
def test_literal_hosts_are_read_in_every_spelling(host: str, address: str) -> None:
    assert parse_ip_host(host) == ip_address(address)
    with pytest.raises(NotPublic, match="not a public address"):
        vet_host(host)


@pytest.mark.parametrize(
    "host", ["1.2.3.4.5", "foo.127", "256.0.0.1", "08.0.0.1", "4294967296", "1..2", "[::1", "::g"]
)
def test_a_host_that_ends_in_a_number_but_is_no_address_is_refused(host: str) -> None:
    with pytest.raises(NotPublic):
        parse_ip_host(host)


@pytest.mark.parametrize(
    "host", ["example.com", "hooks.example.com.", "1a.example", "0x7g.example", "xn--ida.com"]
)
def test_names_are_not_addresses(host: str) -> None:
    assert parse_ip_host(host) is None
    assert vet_host(host) is None  # to be resolved, then vet_addresses


@pytest.mark.parametrize(
    "name",
    [
        "localhost",
        "LOCALHOST.",
        "api.localhost",
        "printer.local",
        "metadata.google.internal",
        "router.home.arpa",
        "localhost.localdomain",
        "nas.lan",
        "intranet.corp",
        "db",  # one label: resolved through the search domains of our own network
        "metadata",
        "",
    ],
)
def test_local_names_are_refused_before_any_lookup(name: str) -> None:
    with pytest.raises(NotPublic):
        vet_name(name)
    with pytest.raises(NotPublic):
        vet_host(name)


@pytest.mark.parametrize(
    ("scheme", "port", "userinfo", "refused"),
    [
        ("https", None, False, None),
        ("http", None, False, None),
        ("HTTPS", 443, False, None),
        ("http", 80, False, None),
        ("https", 1024, False, None),
        ("https", 8443, False, None),
        ("https", 65535, False, None),
        ("ftp", None, False, "scheme"),
        ("file", None, False, "scheme"),
        ("gopher", 70, False, "scheme"),
        ("https", None, True, "user name"),
        ("http", 22, False, "port 22"),
        ("http", 25, False, "port 25"),
        ("http", 0, False, "port 0"),
        ("http", 1023, False, "port 1023"),
    ],
)
def test_scheme_userinfo_and_port(scheme: str, port: int | None, userinfo: bool, refused: str | None) -> None:
    if refused is None:
        assert vet_target(scheme, "hooks.example.com", port, userinfo=userinfo) is None
        assert vet_target(scheme, "93.184.215.14", port, userinfo=userinfo) == IPv4Address("93.184.215.14")
    else:
        with pytest.raises(NotPublic, match=refused):
            vet_target(scheme, "hooks.example.com", port, userinfo=userinfo)


def test_resolved_addresses_all_public_are_kept_in_order_once() -> None:
    got = vet_addresses("hooks.example.com", ["93.184.215.14", "2606:4700::1", "93.184.215.14"])
    assert got == [IPv4Address("93.184.215.14"), IPv6Address("2606:4700::1")]


@pytest.mark.parametrize(
    "addresses",
    [
        ["127.0.0.1"],
        ["93.184.215.14", "10.0.0.1"],  # one is enough
        ["::1", "93.184.215.14"],
        ["64:ff9b::a9fe:a9fe"],
        ["not an address"],
        [],
    ],
)
def test_a_name_with_any_non_public_address_is_refused_without_saying_which(addresses: list[str]) -> None:
    with pytest.raises(NotPublic) as refused:
        vet_addresses("internal.example.com", addresses)
    assert str(refused.value) == "'internal.example.com' does not resolve to a public address"
    if addresses and addresses != ["not an address"]:
        assert refused.value.address is not None  # for the logs
        assert refused.value.reason is not None


def test_the_ranges_do_not_overlap_a_public_sample() -> None:
    for text in PUBLIC:
        address = ip_address(text)
        if isinstance(address, IPv4Address):
            assert not any(address in IPv4Network(n) for n in REFUSED_V4)
        else:
            assert not any(address in IPv6Network(n) for n in REFUSED_V6 if n != "::/96")
