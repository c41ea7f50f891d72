"""function_app.py as the Functions host sees it: indexed functions, and a request through the HTTP function."""

import asyncio
import json
import os
from pathlib import Path

import azure.functions as func
import pytest

from shared.composition import build_service
from shared.config import Settings
from shared.ledger.sqlite import SqliteLedger

from .certrules import check_ledger
from .conftest import reload_function_app
from .csrs import make_csr


@pytest.fixture
def function_app(tmp_path, monkeypatch):
    """function_app imported fresh, its service on a PKI home with a root, an intermediate and a factory."""
    home = tmp_path / "pki"
    monkeypatch.setenv("PKI_HOME", str(home))
    monkeypatch.chdir(tmp_path)  # no developer's local.settings.json
    ca = build_service(Settings(pki_home=home))
    ca.create_root()
    ca.create_intermediate("factory-a")
    key = ca.principals.create_factory("line-1", ["factory-a"]).secret
    ca.close()
    return reload_function_app(), key


def test_the_host_indexes_one_anonymous_http_function_on_every_route(function_app):
    module, _ = function_app
    functions = [f for f in module.app.get_functions() if f.get_trigger().get_binding_name() == "httpTrigger"]
    assert [f.get_function_name() for f in functions] == ["http_app_func"]
    trigger = functions[0].get_trigger()
    assert trigger.get_binding_name() == "httpTrigger"
    assert trigger.route == "/{*route}"
    assert trigger.auth_level == func.AuthLevel.ANONYMOUS
    assert {m.value for m in trigger.methods} >= {"GET", "POST"}


def test_a_request_through_the_http_function(function_app):
    module, key = function_app
    (http,) = [f for f in module.app.get_functions() if f.get_function_name() == "http_app_func"]
    handler = http.get_user_function()
    request = func.HttpRequest(
        method="POST",
        url="http://localhost/api/devices/dev-fn/certificate",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/pkcs10"},
        body=make_csr("dev-fn"),
    )
    response = asyncio.run(handler(request, None))
    assert response.status_code == 201, response.get_body()
    bundle = json.loads(response.get_body())
    assert bundle["deviceId"] == "dev-fn" and bundle["intermediateId"] == "factory-a"
    ledger = SqliteLedger(Path(os.environ["PKI_HOME"]) / "ledger.sqlite3")
    assert check_ledger(ledger) == 3
    ledger.close()

    refused = func.HttpRequest(method="GET", url="http://localhost/api/certificates", headers={}, body=b"")
    response = asyncio.run(handler(refused, None))
    assert response.status_code == 401
    assert json.loads(response.get_body())["error"]["code"] == "missing-credentials"
