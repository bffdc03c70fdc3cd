"""app.image_sources without a network: base64 and data URLs, the host list, the address policy, settings.

Fetching from a real server is in tests/unit/test_image_urls.py.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.errors import InvalidImage, InvalidRequest, PayloadTooLarge, ServiceError
from app.image_sources import ImageSources, inline
from app.image_sources.hosts import (
    address_category,
    check_address,
    match_host,
    normalise_host_entries,
    parse_host_entry,
)
from app.image_sources.inline import decode_base64_image
from app.settings import SettingsError, load_settings
from tests.images import jpeg

IMAGE = jpeg(64, 48)
ENCODED = base64.b64encode(IMAGE).decode()
LIMIT = 4096


def refusal(value: str, error: type[ServiceError], max_bytes: int = LIMIT) -> str:
    with pytest.raises(ServiceError) as caught:
        decode_base64_image(value, max_bytes)
    assert type(caught.value) is error, caught.value.message
    assert caught.value.param == "image"
    return caught.value.message


# ----------------------------------------------------------------------------------- base64, data URLs
@pytest.mark.parametrize("value", [
    ENCODED,
    ENCODED.rstrip("="),  # padding is optional
    "\n".join(ENCODED[i:i + 76] for i in range(0, len(ENCODED), 76)),  # MIME line breaks
    "\r\n".join(ENCODED[i:i + 64] for i in range(0, len(ENCODED), 64)) + "\r\n",
    f"  {ENCODED}\t\n",
    " ".join(ENCODED[i:i + 4] for i in range(0, len(ENCODED), 4)),
    f"data:image/jpeg;base64,{ENCODED}",
    f"DATA:IMAGE/JPEG;BASE64,{ENCODED}",
    f"data:image/png;name=photo.png;base64,{ENCODED}",  # the type need not match: bytes are sniffed later
    f"data:application/octet-stream;base64,{ENCODED}",
    f"data:image/jpeg;base64,\n{ENCODED.rstrip('=')}\n",
])
def test_base64_and_data_urls_decode_to_the_image(value: str) -> None:
    assert decode_base64_image(value, 10**6) == IMAGE


@pytest.mark.parametrize(("encoded", "data"), [("QQ==", b"A"), ("QQ", b"A"), ("QUI=", b"AB"), ("QUI", b"AB"),
                                                ("QUJD", b"ABC"), ("+/+/", b"\xfb\xff\xbf")])
def test_every_padding_length(encoded: str, data: bytes) -> None:
    assert decode_base64_image(encoded, LIMIT) == data


@pytest.mark.parametrize(("value", "reason"), [
    ("QUJD!", "holds '!' at character 4"),
    ("QU JD*QUJD", "holds '*' at character 5"),
    ("QUJD\x00", "holds '\\x00'"),
    ("QU\x1fJD", "holds '\\x1f' at character 2"),  # whitespace to str.isspace, not to base64
    ("QUJDé", "non-ASCII character 'é'"),
    ("PDw_Pz4-", "URL-safe alphabet"),
    ("QQ=", "padding is wrong"),
    ("QQ===", "padding is wrong"),
    ("QUJD=", "padding is wrong"),
    ("QUJDQ", "length or padding is wrong (5 characters"),
    ("Q=Q=", "comes before more data at character 1"),
    ("QQ==QQ==", "padding (`=`) comes before more data at character 2"),
    ("QQ== \nQUJD", "padding (`=`) comes before more data at character 2"),
    ("https://example.com/x.jpg ftp", "holds ':' at character 5"),
])
def test_invalid_base64_is_a_400_naming_the_accepted_forms(value: str, reason: str) -> None:
    message = refusal(value, InvalidRequest)
    assert message.startswith("`image` is not valid base64")
    assert reason in message
    for form in ("file field `image`", "base64", "data URL", "http(s) URL"):
        assert form in message


@pytest.mark.parametrize(("value", "reason"), [
    ("data:image/png,rawbytes", "without `;base64`"),
    ("data:image/svg+xml;utf8,<svg/>", "without `;base64`"),
    ("data:text/plain;base64,QUJD", "of type 'text/plain'"),
    ("data:;base64,QUJD", "of type '(none)'"),
    ("data:image/png;base64", "no `,`"),
])
def test_data_urls_that_are_not_base64_images_are_refused(value: str, reason: str) -> None:
    assert reason in refusal(value, InvalidRequest)


@pytest.mark.parametrize("value", ["", "   \n", "====", "data:image/png;base64,", "data:image/png;base64, \n"])
def test_empty_is_an_invalid_image(value: str) -> None:
    assert "empty" in refusal(value, InvalidImage)


def test_the_limit_is_checked_on_the_length_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_decode(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("decoded a value over the limit")

    monkeypatch.setattr(inline.base64, "b64decode", must_not_decode)
    one_over = base64.b64encode(b"\0" * (LIMIT + 1)).decode()
    message = refusal(one_over, PayloadTooLarge)
    assert f"decodes to {LIMIT + 1} bytes" in message and f"limit of {LIMIT} bytes" in message
    assert "PALIGEMMA_MAX_IMAGE_BYTES" in message
    # Far over (what a 2 GB string would be): refused on its length, before even the ASCII check.
    message = refusal("é" * (100 * LIMIT), PayloadTooLarge)
    assert f"({100 * LIMIT} characters)" in message
    # Far over but mostly whitespace: the length without whitespace decides.
    assert "decodes to" in refusal("QUJD\n" * (LIMIT // 2), PayloadTooLarge)


def test_exactly_the_limit_is_accepted() -> None:
    data = bytes(range(256)) * (LIMIT // 256)
    assert decode_base64_image(base64.b64encode(data).decode(), LIMIT) == data
    assert decode_base64_image(base64.b64encode(data).decode().rstrip("="), LIMIT) == data


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="AQUJDw+/=-_ \n\t\x1f:;,é\x00", max_size=40)
       | st.builds("data:{}{}".format, st.sampled_from(["image/png;base64,", "image/png,", ";base64,", "x"]),
                   st.text(alphabet="QUJD=\n ,;", max_size=20)))
def test_any_string_decodes_or_is_refused_with_a_client_error(value: str) -> None:
    try:
        data = decode_base64_image(value, 16)
    except ServiceError as exc:
        assert exc.status_code in (400, 413) and exc.param == "image"
    else:
        assert 0 < len(data) <= 16
        payload = value.partition(",")[2] if value.lower().startswith("data:") else value
        compact = "".join(char for char in payload if char not in " \t\n\r\f\v")
        assert base64.b64decode(compact + "=" * (-len(compact) % 4)) == data  # what the reference decoder reads


# -------------------------------------------------------------------------------------- load dispatch
def load(value: str, **options: object) -> bytes:
    settings = {"max_bytes": LIMIT * 100, **options}
    return asyncio.run(ImageSources(**settings).load(value))  # type: ignore[arg-type]


def test_load_takes_base64_and_data_urls() -> None:
    assert load(ENCODED) == IMAGE
    assert load(f"data:image/jpeg;base64,{ENCODED}") == IMAGE


def test_load_refuses_urls_while_no_host_is_listed() -> None:
    with pytest.raises(InvalidRequest) as caught:
        load("https://images.example.com/cat.jpg")
    assert "image URLs are off" in caught.value.message and "PALIGEMMA_IMAGE_URL_HOSTS" in caught.value.message
    assert caught.value.param == "image"


@pytest.mark.parametrize("value", ["ftp://images.example.com/cat.jpg", "file:///etc/passwd", "javascript:x"])
def test_load_refuses_other_schemes(value: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        load(value, url_hosts=["images.example.com"])
    assert "none of the accepted forms" in caught.value.message and "data URL" in caught.value.message


@pytest.mark.parametrize(("url", "reason"), [
    ("http://user:secret@images.example.com/x.jpg", "user name or password"),
    ("http://images.example.com:8080/x.jpg", "on port 8080"),
    ("https://images.example.com:80/x.jpg", "on port 80"),
    ("http://example.com/x.jpg", "points to example.com, which"),
    ("http://images.example.com.evil.test/x.jpg", "points to images.example.com.evil.test"),
    ("http:///x.jpg", "no host"),
])
def test_urls_are_checked_before_any_lookup(url: str, reason: str) -> None:
    async def no_lookup(host: str, port: int) -> list:
        raise AssertionError(f"looked up {host}")

    with pytest.raises(InvalidRequest) as caught:
        load(url, url_hosts=["images.example.com"], resolver=no_lookup)
    assert reason in caught.value.message


def test_a_refusal_does_not_show_the_list() -> None:
    with pytest.raises(InvalidRequest) as caught:
        load("http://example.com/x.jpg", url_hosts=["minio.internal:9000", ".cdn.example.org"])
    assert "minio" not in caught.value.message and "cdn" not in caught.value.message
    assert "PALIGEMMA_IMAGE_URL_HOSTS" in caught.value.message and "host:port" in caught.value.message


# ---------------------------------------------------------------------------------------- host list
@pytest.mark.parametrize(("entry", "canonical"), [
    ("images.example.com", "images.example.com"),
    ("  Images.Example.COM.  ", "images.example.com"),
    (".example.com", ".example.com"),
    (".Example.com:8443", ".example.com:8443"),
    ("images.example.com:80", "images.example.com:80"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("127.0.0.1", "127.0.0.1"),
    ("10.0.0.7:8080", "10.0.0.7:8080"),
    ("[::1]", "[::1]"),
    ("[0:0::1]:8080", "[::1]:8080"),
    ("localhost", "localhost"),
    ("minio_internal", "minio_internal"),
])
def test_host_entries_are_normalised(entry: str, canonical: str) -> None:
    assert str(parse_host_entry(entry)) == canonical


@pytest.mark.parametrize(("entry", "reason"), [
    ("https://images.example.com", "not a host entry"),
    ("images.example.com/cats", "not a host entry"),
    ("user@images.example.com", "not a host entry"),
    ("*.example.com", "write .example.com (a leading dot)"),
    (".com", "every host under a top-level domain"),
    (".", "not a valid host name"),
    ("images.example.com:0", "port 0"),
    ("images.example.com:70000", "port 70000"),
    ("images.example.com:http", "not a host entry"),
    (".10.0.0.1", "needs a domain name, not an IP address"),
    ("[not:an:address]", "not an IPv6 address"),
    ("-bad-.example.com", "not a valid host name"),
    ("a..example.com", "not a valid host name"),
    ("::1", "not a host entry"),  # IPv6 needs brackets, or its colons read as a port
])
def test_bad_host_entries_say_why(entry: str, reason: str) -> None:
    with pytest.raises(ValueError, match=None) as caught:
        parse_host_entry(entry)
    assert reason in str(caught.value)


def test_normalised_entries_drop_blanks_and_duplicates() -> None:
    assert normalise_host_entries(["A.example.com", " ", "a.example.com.", ".b.example.com"]) == (
        "a.example.com", ".b.example.com")


ENTRIES = [parse_host_entry(entry) for entry in
           ["images.example.com", ".cdn.example.org", "10.0.0.7:8080", "cdn.example.org:8443", "[::1]:9000"]]


@pytest.mark.parametrize(("host", "port", "default_port", "expected"), [
    ("images.example.com", 443, 443, "exact"),
    ("images.example.com", 80, 80, "exact"),
    ("images.example.com", 8443, 443, None),  # no port in the entry: the default port only
    ("images.example.com", 443, 80, None),  # http on 443 is not http's default
    ("a.images.example.com", 443, 443, None),  # exact entries do not cover subdomains
    ("example.com", 443, 443, None),
    ("a.cdn.example.org", 443, 443, "suffix"),
    ("a.b.cdn.example.org", 80, 80, "suffix"),
    ("cdn.example.org", 443, 443, None),  # `.cdn.example.org` is its subdomains only
    ("cdn.example.org", 8443, 443, "exact"),  # ... but this one is listed with its port
    ("xcdn.example.org", 443, 443, None),
    ("10.0.0.7", 8080, 80, "exact"),
    ("10.0.0.7", 80, 80, None),
    ("::1", 9000, 443, "exact"),
])
def test_match_host(host: str, port: int, default_port: int, expected: str | None) -> None:
    assert match_host(host, port, default_port, ENTRIES) == expected


# ----------------------------------------------------------------------------------- address policy
@pytest.mark.parametrize(("address", "category"), [
    ("8.8.8.8", None), ("1.1.1.1", None), ("93.184.216.34", None), ("2606:4700::1111", None),
    ("172.15.255.255", None), ("172.32.0.1", None), ("192.169.0.1", None), ("11.0.0.1", None),
    ("10.0.0.1", "private"), ("10.255.255.255", "private"),
    ("172.16.0.1", "private"), ("172.31.255.254", "private"),
    ("192.168.0.1", "private"), ("192.168.255.255", "private"),
    ("100.64.0.1", "private"),  # carrier-grade NAT
    ("fc00::1", "private"), ("fd12:3456::1", "private"), ("fec0::1", "private"),
    ("127.0.0.1", "loopback"), ("127.255.255.254", "loopback"), ("::1", "loopback"),
    ("169.254.169.254", "link-local"),  # cloud metadata services
    ("169.254.0.1", "link-local"), ("fe80::1", "link-local"), ("febf::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("0.0.0.0", "unspecified"), ("0.1.2.3", "unspecified"), ("::", "unspecified"),
    ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"), ("ff02::1", "multicast"),
    ("ff0e::1", "multicast"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"), ("192.0.2.1", "reserved"),
    ("198.18.0.1", "reserved"), ("2001:db8::1", "reserved"), ("::127.0.0.1", "reserved"),
    ("100::1", "reserved"), ("4000::1", "reserved"),
    # IPv6 forms that carry an IPv4 address are judged by that address.
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"), ("::ffff:169.254.169.254", "link-local"),
    ("::ffff:8.8.8.8", None), ("::ffff:0.0.0.0", "unspecified"),
    ("2002:7f00:1::", "loopback"), ("2002:a00:1::", "private"), ("2002:808:808::", None),  # 6to4
    ("64:ff9b::a00:1", "private"), ("64:ff9b::7f00:1", "loopback"), ("64:ff9b::808:808", None),  # NAT64
    ("64:ff9b:1::1", "private"),
])
def test_address_category(address: str, category: str | None) -> None:
    assert address_category(ipaddress.ip_address(address)) == category


@pytest.mark.parametrize("address", ["127.0.0.1", "10.0.0.1", "::1", "169.254.169.254", "::ffff:127.0.0.1"])
def test_addresses_outside_the_public_range_need_an_exact_entry(address: str) -> None:
    ip = ipaddress.ip_address(address)
    check_address("minio.internal", ip, listed_exactly=True)
    with pytest.raises(InvalidRequest) as caught:
        check_address("a.cdn.example.org", ip, listed_exactly=False)
    assert f"a.cdn.example.org resolves to a {address_category(ip)} address" in caught.value.message
    assert "listed exactly" in caught.value.message and "PALIGEMMA_IMAGE_URL_HOSTS" in caught.value.message


def test_public_addresses_pass_for_suffix_entries() -> None:
    check_address("a.cdn.example.org", ipaddress.ip_address("93.184.216.34"), listed_exactly=False)


# ------------------------------------------------------------------------------------------ settings
def test_settings_read_the_host_list_and_timeout_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().image_url_hosts == ()
    assert load_settings().image_url_timeout_s == 10.0
    monkeypatch.setenv("PALIGEMMA_IMAGE_URL_HOSTS", " Images.Example.com, .cdn.example.org:8443,,[::1]:9000 ")
    monkeypatch.setenv("PALIGEMMA_IMAGE_URL_TIMEOUT_S", "2.5")
    settings = load_settings()
    assert settings.image_url_hosts == ("images.example.com", ".cdn.example.org:8443", "[::1]:9000")
    assert settings.image_url_timeout_s == 2.5
    sources = ImageSources(max_bytes=settings.max_image_bytes, url_hosts=settings.image_url_hosts)
    assert sources.url_hosts == settings.image_url_hosts


@pytest.mark.parametrize(("variable", "value", "reason"), [
    ("PALIGEMMA_IMAGE_URL_HOSTS", "images.example.com,*.example.org", "write .example.org"),
    ("PALIGEMMA_IMAGE_URL_HOSTS", "https://images.example.com", "not a host entry"),
    ("PALIGEMMA_IMAGE_URL_TIMEOUT_S", "0", "greater than 0"),
    ("PALIGEMMA_IMAGE_URL_TIMEOUT_S", "301", "less than or equal to 300"),
])
def test_bad_settings_stop_start_up_naming_the_variable(monkeypatch: pytest.MonkeyPatch, variable: str,
                                                        value: str, reason: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert variable in str(caught.value) and reason in str(caught.value)
