import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llama_stack_provider_batches.domain.webhook_urls import (
    AllowedHosts,
    Unresolvable,
    UnsafeURL,
    check_url,
    is_public,
    resolve_allowed,
)

NOTHING = AllowedHosts()
LOOPBACK = AllowedHosts.parse(["127.0.0.1"])

NOT_PUBLIC = [
    "127.0.0.1",
    "127.8.9.10",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",  # cloud metadata
    "100.64.0.1",  # shared address space
    "0.0.0.0",
    "224.0.0.1",
    "::1",
    "fe80::1",
    "fc00::1",
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:169.254.169.254",
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
]


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_private_loopback_and_metadata_addresses_are_not_public(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_are_public(address: str) -> None:
    assert is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://hooks.example.com/x", "https"),
        ("ftp://hooks.example.com/x", "https"),
        ("https://", "host"),
        ("hooks.example.com/x", "https"),
        ("https://user:pw@hooks.example.com/", "user name"),
        ("https://127.0.0.1/x", "not a public address"),
        ("https://[::1]:8443/x", "not a public address"),
        ("https://169.254.169.254/latest/meta-data", "not a public address"),
        ("https://hooks.example.com:99999/", "not valid"),
        ("https://hooks.example.com/a b", "whitespace"),
        ("https://x" + "y" * 3000, "characters"),
    ],
)
def test_urls_are_refused_with_a_reason(url: str, why: str) -> None:
    with pytest.raises(UnsafeURL, match=why):
        check_url(url, NOTHING)


def test_an_allowed_host_may_be_private_and_plain_http() -> None:
    destination = check_url("http://127.0.0.1:9000/hook", LOOPBACK)
    assert (destination.scheme, destination.host, destination.port) == ("http", "127.0.0.1", 9000)
    assert check_url("https://127.0.0.1/hook", AllowedHosts.parse(["127.0.0.0/8"])).port == 443
    assert (
        check_url("http://receiver.internal/hook", AllowedHosts.parse(["receiver.internal"])).host
        == "receiver.internal"
    )
    with pytest.raises(UnsafeURL):
        check_url("http://127.0.0.2/hook", LOOPBACK)  # an address outside the allow list


def resolver(addresses: list[str]):  # type: ignore[no-untyped-def]
    async def resolve(host: str, port: int) -> list[str]:
        return addresses

    return resolve


async def test_a_name_is_refused_if_any_address_it_resolves_to_is_not_public() -> None:
    destination = check_url("https://hooks.example.com/x", NOTHING)
    assert await resolve_allowed(destination, NOTHING, resolver(["93.184.215.14"])) == ["93.184.215.14"]
    with pytest.raises(UnsafeURL, match=r"169\.254\.169\.254"):
        await resolve_allowed(destination, NOTHING, resolver(["93.184.215.14", "169.254.169.254"]))
    with pytest.raises(UnsafeURL, match=r"127\.0\.0\.1"):  # a name that later points inside
        await resolve_allowed(destination, NOTHING, resolver(["127.0.0.1"]))
    assert await resolve_allowed(destination, LOOPBACK, resolver(["127.0.0.1"])) == ["127.0.0.1"]


async def test_a_name_that_does_not_resolve_is_refused() -> None:
    async def fails(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    with pytest.raises(Unresolvable, match="does not resolve"):
        await resolve_allowed(check_url("https://nowhere.invalid/", NOTHING), NOTHING, fails)


ipv4 = st.ip_addresses(v=4)
ipv6 = st.ip_addresses(v=6)


@given(st.one_of(ipv4, ipv6))
def test_a_literal_address_passes_only_if_public_or_allowed(address: ipaddress.IPv4Address) -> None:
    host = f"[{address}]" if address.version == 6 else str(address)
    url = f"https://{host}/hook"
    if is_public(address):
        assert check_url(url, NOTHING).host == str(address)
    else:
        with pytest.raises(UnsafeURL):
            check_url(url, NOTHING)
        assert check_url(url, AllowedHosts.parse([str(address)])).host == str(address)


@given(st.text(max_size=300))
def test_any_text_is_either_a_checked_destination_or_refused_with_unsafe_url(text: str) -> None:
    try:
        destination = check_url(text, NOTHING)
    except UnsafeURL:
        return
    assert destination.scheme == "https" and destination.host and 0 < destination.port < 65536
