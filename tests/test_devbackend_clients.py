"""The client-version rule, as a Convex deployment applies it to every route.

Sources (get-convex/convex-backend): ``crates/common/src/version.rs`` (parsing,
client types, messages), ``crates/common/deprecation.json`` (thresholds) and
``crates/common/src/http/mod.rs`` (``client_version_state_middleware``,
``client_version_from_req_parts``, the deprecation headers).
"""

from __future__ import annotations

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from stella_devbackend.clients import ClientVersion, ClientVersionError, Semver, State, client_version_of
from stella_devbackend.control import DevBackend

NPM_GONE = ("The Convex npm package at version 0.1.0 is no longer supported. Update your Convex npm version with "
            "`npx convex update` or `npm update`.")
PYTHON_SOON = ("The Convex python package at 0.1.0 is deprecated and will no longer be supported soon. When this "
               "version is no longer supported, requests to Convex will fail, so it is best to upgrade and "
               "redeploy your application as soon as possible. Update your Convex python version with "
               "`pip install --upgrade convex`.")


@pytest.mark.parametrize(("header", "client", "version"), [
    ("python-convex-0.8.1", "python", "0.8.1"),
    ("npm-1.45.0", "npm", "1.45.0"),
    ("npm-1.2.3-beta-1", "npm", "1.2.3-beta-1"),  # the longest semver from the right keeps the pre-release
    ("NPM-CLI-1.0.0", "npm-cli", "1.0.0"),  # client names are case-insensitive
    ("my-esolang-client-0.0.1", "my-esolang-client", "0.0.1"),
    ("stella-materializer-0.1.0", "stella-materializer", "0.1.0"),
    ("npm-v1.0.0", "npm", "v1.0.0"),  # not semver: an unrecognized version of npm
    ("python-convex-01.0.0", "python", "convex-01.0.0"),  # leading zeros are not semver either
])
def test_header_parsing(header: str, client: str, version: str) -> None:
    """crates/common/src/version.rs ClientVersion::from_str."""
    parsed = ClientVersion.parse(header)
    assert (parsed.client, parsed.version_text) == (client, version)


@pytest.mark.parametrize(("header", "state"), [
    ("npm-0.19.1", State.UNSUPPORTED),
    ("npm-0.19.1-rc.1", State.UNSUPPORTED),  # a pre-release sorts below its release
    ("npm-0.19.2", State.SUPPORTED),
    ("npm-cli-0.1.0", State.UNSUPPORTED),
    ("actions-0.19.0", State.UNSUPPORTED),
    ("npm-v1.0.0", State.UNSUPPORTED),  # an unrecognized version of a known client is below every threshold
    ("python-convex-0.0.2", State.UNSUPPORTED),
    ("python-0.0.3", State.UPGRADE_REQUIRED),
    ("python-convex-0.2.0", State.UPGRADE_REQUIRED),  # below_threshold is <=
    ("python-convex-0.2.1", State.SUPPORTED),
    ("rust-0.0.1", State.UNSUPPORTED),
    ("rust-0.0.2", State.SUPPORTED),
    ("my-esolang-client-0.0.1", State.SUPPORTED),  # unknown clients have no thresholds
    ("dashboard-0.0.0", State.SUPPORTED),
])
def test_thresholds(header: str, state: State) -> None:
    """crates/common/deprecation.json, compared by ClientVersionIdent::below_threshold (<=)."""
    assert ClientVersion.parse(header).state()[0] is state


def test_path_versions_belong_to_npm_on_sync_and_the_header_wins() -> None:
    """crates/common/src/version.rs from_path_param; crates/common/src/http/mod.rs reads the header first."""
    assert str(client_version_of(None, "1.45.0", "/api/1.45.0/sync")) == "npm-1.45.0"
    assert str(client_version_of(None, "1.45.0", "/api/1.45.0/udf")) == "npm-1.45.0"
    assert str(client_version_of(None, "1.45.0", "/api/1.45.0/other")) == "npm-cli-1.45.0"
    assert str(client_version_of("python-convex-0.8.1", "0.1.0", "/api/0.1.0/sync")) == "python-0.8.1"
    assert str(client_version_of(None, None, "/api/sync")) == "unknown-unknownversion"
    assert client_version_of("bad\u00e9-1.0.0", None, "/api/sync").client == "unknown"  # not a visible-ASCII value
    with pytest.raises(ClientVersionError, match="Expected format is {client_name}-{semver}"):
        client_version_of("nodash", None, "/api/sync")
    with pytest.raises(ClientVersionError):
        client_version_of(None, "latest", "/api/latest/sync")


def test_only_new_npm_clients_take_transition_chunks() -> None:
    """crates/local_backend/src/subs/mod.rs new_sync_worker_config, MIN_NPM_VERSION_FOR_TRANSITION_CHUNKS."""
    takes = {header: ClientVersion.parse(header).supports_transition_chunks
             for header in ("npm-1.28.0", "npm-1.49.0", "npm-1.27.9", "npm-1.28.0-alpha", "npm-cli-1.45.0",
                            "python-convex-0.8.1", "rust-0.5.0", "stella-materializer-0.1.0")}
    assert [header for header, yes in takes.items() if yes] == ["npm-1.28.0", "npm-1.49.0"]
    alpha = Semver.parse("1.28.0-alpha")
    assert alpha is not None and alpha < Semver(1, 28, 0)


# -- on the wire ---------------------------------------------------------------------------------------


def query(backend: DevBackend, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{backend.url}/api/query", headers=headers,
                      json={"path": "media_jobs:listSucceededSince", "args": [{"since": 0}]})


def test_unsupported_client_is_refused_with_the_deprecation_headers(backend: DevBackend) -> None:
    """crates/common/src/http/mod.rs client_version_state_middleware: 400 ClientVersionUnsupported plus
    x-convex-deprecation-state/-message (crates/convex/sync_types/src/headers.rs)."""
    refused = query(backend, {"Convex-Client": "npm-0.1.0"})
    assert refused.status_code == 400
    assert refused.json() == {"code": "ClientVersionUnsupported", "message": NPM_GONE}
    assert refused.headers["x-convex-deprecation-state"] == "Unsupported"
    assert refused.headers["x-convex-deprecation-message"] == NPM_GONE


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/api/media/v1/generate"),
    ("GET", "/api/auth/convex/token"),
    ("GET", "/api/sync"),
])
def test_every_api_route_applies_the_rule(backend: DevBackend, method: str, path: str) -> None:
    """crates/common/src/http/mod.rs: the middleware wraps the whole router."""
    refused = httpx.request(method, backend.url + path, headers={"Convex-Client": "npm-0.1.0"})
    assert refused.status_code == 400 and refused.json()["code"] == "ClientVersionUnsupported"


def test_upgrade_required_client_is_served_with_the_headers(backend: DevBackend) -> None:
    """crates/common/src/http/mod.rs: UpgradeRequired answers normally, with the state and message headers."""
    served = query(backend, {"Convex-Client": "python-convex-0.1.0"})
    assert served.status_code == 200 and served.json()["status"] == "success"
    assert served.headers["x-convex-deprecation-state"] == "UpgradeRequired"
    assert served.headers["x-convex-deprecation-message"] == PYTHON_SOON
    with connect(backend.url.replace("http://", "ws://") + "/api/sync",
                 additional_headers={"Convex-Client": "python-convex-0.1.0"}) as ws:
        assert ws.response is not None
        assert ws.response.headers["x-convex-deprecation-state"] == "UpgradeRequired"


@pytest.mark.parametrize("header", ["python-convex-0.8.1", "stella-materializer-0.1.0", "npm-1.49.0", None])
def test_supported_and_unknown_clients_get_no_headers(backend: DevBackend, header: str | None) -> None:
    """crates/common/src/version.rs: Supported (and unknown clients, which have no thresholds)."""
    served = query(backend, {"Convex-Client": header} if header else {})
    assert served.status_code == 200
    assert "x-convex-deprecation-state" not in served.headers


def test_unparseable_versions_are_bad_requests(backend: DevBackend) -> None:
    """crates/common/src/http/mod.rs ExtractClientVersion wraps parse errors in InvalidClientVersion."""
    bad = query(backend, {"Convex-Client": "nodash"})
    assert bad.status_code == 400 and bad.json()["code"] == "InvalidClientVersion"
    assert bad.json()["message"] == ("Failed to parse client version string: 'nodash'. Expected format is "
                                     "{client_name}-{semver}, e.g. my-esolang-client-0.0.1")
    path = httpx.get(f"{backend.url}/api/latest/sync")
    assert path.status_code == 400 and path.json()["code"] == "InvalidClientVersion"


@pytest.mark.parametrize(("path", "headers", "opens"), [
    ("/api/0.19.1/sync", {}, False),  # a path version is npm's: too old
    ("/api/0.19.2/sync", {}, True),
    ("/api/1.45.0/sync", {}, True),
    ("/api/sync", {"Convex-Client": "npm-0.19.1"}, False),
    ("/api/sync", {"Convex-Client": "python-convex-0.0.2"}, False),
    ("/api/sync", {"Convex-Client": "rust-0.0.1"}, False),
    ("/api/0.1.0/sync", {"Convex-Client": "stella-materializer-0.1.0"}, True),  # the header wins
    ("/api/sync", {}, True),
])
def test_refused_clients_never_get_a_websocket(backend: DevBackend, path: str, headers: dict[str, str],
                                               opens: bool) -> None:
    """crates/common/src/http/mod.rs: the middleware answers before the upgrade handler runs."""
    url = backend.url.replace("http://", "ws://") + path
    if opens:
        with connect(url, additional_headers=headers) as ws:
            assert ws.response is not None and ws.response.status_code == 101
        return
    with pytest.raises(InvalidStatus) as refused:
        connect(url, additional_headers=headers)
    assert refused.value.response.status_code == 400
    assert refused.value.response.headers["x-convex-deprecation-state"] == "Unsupported"


def test_files_stand_for_the_cdn_and_skip_the_rule(backend: DevBackend) -> None:
    """The provider's CDN is not a Convex route: no client-version rule there."""
    doc = backend.wait_for_job(backend.generate({"capability": "icon"}).json()["jobId"])
    file = httpx.get(doc["output"]["images"][0]["url"], headers={"Convex-Client": "npm-0.1.0"})
    assert file.status_code == 200
