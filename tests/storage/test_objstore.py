"""The S3 client a location gets is the one of the endpoint and credentials in effect when it is opened
(ucp.storage.objstore._in_effect): fsspec caches file system instances by their options, so a process
that changes AWS_ENDPOINT_URL or the credentials after its first use must not be handed the old client.
Against a real S3 server (SeaweedFS, tests/s3server.py) and a port where nothing listens."""

from __future__ import annotations

import pytest

from tests.world import free_port
from ucp.storage import objstore
from ucp.storage.objstore import ObjectPath, _options

pytestmark = pytest.mark.s3


def test_the_options_carry_the_endpoint_and_credentials_in_effect(monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
        monkeypatch.delenv(name, raising=False)
    bare = _options("s3")
    assert not {"endpoint_url", "key", "secret", "token", "profile"} & set(bare)  # (botocore's own chain)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://a:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    assert {k: _options("s3")[k] for k in ("endpoint_url", "key", "secret")} == {
        "endpoint_url": "http://a:1", "key": "k", "secret": "s"}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://b:2")  # (the service's own wins, as in botocore)
    assert _options("s3")["endpoint_url"] == "http://b:2"
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    assert "endpoint_url" not in _options("s3")
    assert _options("memory") == {}


def test_a_changed_endpoint_or_secret_gets_a_client_of_its_own_in_one_process(s3, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # (a dead endpoint fails at once; set before the first use)
    url = f"{s3.url('env')}/object"
    ObjectPath(url).write_bytes(b"one")  # the first use: a client of the server
    assert ObjectPath(url).read_bytes() == b"one"

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(OSError) as e:
        ObjectPath(url).read_bytes()
    assert url in str(e.value) and "\n" not in str(e.value), str(e.value)

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)  # back: the server again
    assert ObjectPath(url).read_bytes() == b"one"

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")  # the server refuses this user
    with pytest.raises(OSError) as e:
        ObjectPath(url).read_bytes()
    assert url in str(e.value), str(e.value)

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.environ()["AWS_SECRET_ACCESS_KEY"])
    assert ObjectPath(url).read_bytes() == b"one"


def checksum_headers(url: str, data: bytes) -> dict:
    """The checksum and signature headers of the S3 requests that write ``data`` to ``url`` through
    ucp's writer (recorded by a botocore event hook on the client ucp uses)."""
    ObjectPath(f"{url}.first").write_bytes(b"-")  # (the client exists after a first use)
    fs, _ = objstore._filesystem(url)
    seen: list = []

    def record(request, **_):
        seen.append({k.lower(): v for k, v in request.headers.items()
                     if "checksum" in k.lower() or "content-sha256" in k.lower()})

    fs.s3.meta.events.register("before-send.s3", record)
    try:
        ObjectPath(url).write_bytes(data)
    finally:
        fs.s3.meta.events.unregister("before-send.s3", record)
    assert seen, "no request was recorded"
    return {k: v for h in seen for k, v in h.items()}


def test_over_plain_http_an_upload_is_hashed_once_unless_the_environment_says_otherwise(s3, monkeypatch):
    monkeypatch.delenv("AWS_REQUEST_CHECKSUM_CALCULATION", raising=False)
    headers = checksum_headers(f"{s3.url('hash')}/object", b"x" * 1000)
    assert headers["x-amz-content-sha256"] not in (b"UNSIGNED-PAYLOAD", "UNSIGNED-PAYLOAD")  # SigV4's SHA-256
    assert not [k for k in headers if k.startswith("x-amz-checksum-")], headers  # and no second pass
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_supported")  # the user's choice wins
    assert "x-amz-checksum-crc32" in checksum_headers(f"{s3.url('hash')}/object", b"x" * 1000)


def test_the_one_hash_option_is_for_plain_http_endpoints_only(monkeypatch):
    monkeypatch.delenv("AWS_REQUEST_CHECKSUM_CALCULATION", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://s3.example:443")
    assert "request_checksum_calculation" not in _options("s3").get("config_kwargs", {})  # (TLS: CRC32 is it)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8333")
    assert _options("s3")["config_kwargs"]["request_checksum_calculation"] == "when_required"
    # the user's setting is passed on, so a client made under another one (fsspec caches instances by
    # their options; botocore reads the environment once, when the client is made) is not reused
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "WHEN_SUPPORTED")
    assert _options("s3")["config_kwargs"]["request_checksum_calculation"] == "when_supported"


def test_the_config_files_checksum_setting_counts_as_the_users(tmp_path, monkeypatch):
    """``request_checksum_calculation = when_required`` in the AWS config file (the profile in effect),
    as botocore reads it: uploads carry no CRC-32C and the client is given that setting."""
    from fsspec.asyn import sync

    from ucp.storage.multipart import checksum_setting, checksums_sent

    config = tmp_path / "config"
    config.write_text("[default]\nrequest_checksum_calculation = when_required\n[profile other]\nregion = x\n")
    monkeypatch.delenv("AWS_REQUEST_CHECKSUM_CALCULATION", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://s3.example:443")
    assert checksum_setting() == "when_required"
    assert _options("s3")["config_kwargs"]["request_checksum_calculation"] == "when_required"
    fs = ObjectPath("s3://bucket/run").fs  # (its client made without a request)
    assert not checksums_sent(sync(fs.loop, fs.set_session))
    monkeypatch.setenv("AWS_PROFILE", "other")  # (a profile that says nothing)
    assert checksum_setting() == "" and "request_checksum_calculation" not in _options("s3")["config_kwargs"]
    fs = ObjectPath("s3://bucket/run").fs
    assert checksums_sent(sync(fs.loop, fs.set_session))  # (botocore's default over HTTPS: when_supported)
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_supported")  # (the environment first)
    monkeypatch.setenv("AWS_PROFILE", "default")
    assert checksum_setting() == "when_supported"


def test_a_botocore_without_the_option_is_not_given_it(monkeypatch):
    from botocore.config import Config

    monkeypatch.delenv("AWS_REQUEST_CHECKSUM_CALCULATION", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8333")
    monkeypatch.setattr(Config, "OPTION_DEFAULTS", {k: v for k, v in Config.OPTION_DEFAULTS.items()
                                                    if k != "request_checksum_calculation"})
    assert "request_checksum_calculation" not in _options("s3").get("config_kwargs", {})  # (it would raise)
