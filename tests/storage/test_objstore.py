"""The S3 client a location gets is the one of the endpoint and credentials in effect when it is opened
(ucp.storage.objstore._in_effect): fsspec caches file system instances by their options, so a process
that changes AWS_ENDPOINT_URL or the credentials after its first use must not be handed the old client.
Against a real S3 server (SeaweedFS, tests/s3server.py) and a port where nothing listens."""

from __future__ import annotations

import pytest

from tests.world import free_port
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
