"""Whatever a caller sends, the API answers with a 4xx and the JSON error shape, never a 5xx."""

from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .apiclient import make_api
from .csrs import make_csr

VALID_CSR = make_csr("dev-fuzz")
media_types = st.sampled_from(
    ["application/pkcs10", "application/x-pem-file", "text/plain", "application/json", "application/xml", ""]
) | st.text(max_size=30)
bodies = (
    st.binary(max_size=3000)
    | st.builds(lambda cut: VALID_CSR[:cut], st.integers(0, len(VALID_CSR)))
    | st.builds(lambda junk: VALID_CSR + junk, st.binary(max_size=50))
    | st.builds(lambda text: b'{"csr": ' + text.encode() + b"}", st.text(max_size=100))
)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from shared.composition import build_service
    from shared.config import Settings

    service = build_service(Settings(pki_home=tmp_path_factory.mktemp("fuzz")))
    service.create_root()
    service.create_intermediate("factory-a")
    yield make_api(service)
    service.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(device_id=st.text(max_size=80), media=media_types, body=bodies, renew=st.text(max_size=8))
def test_anything_sent_to_the_device_route_is_answered_without_a_5xx(api, device_id, media, body, renew):
    headers = {"Authorization": f"Bearer {api.factory_a}"}
    if media and all(32 <= ord(c) < 127 for c in media):
        headers["Content-Type"] = media
    path = f"/api/devices/{quote(device_id, safe='') or 'x'}/certificate"
    response = api.client.post(path, content=body, headers=headers, params={"renew": renew})
    assert response.status_code < 500, (response.status_code, response.text)
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"code", "message"}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    route=st.sampled_from(["/api/ca/intermediates", "/api/factories", "/api/ca/root/proof-of-possession"]),
    document=st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=20),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=4),
        max_leaves=10,
    ),
)
def test_any_json_sent_to_admin_routes_is_answered_without_a_5xx(api, route, document):
    response = api.client.post(route, json=document, headers={"Authorization": f"Bearer {api.admin}"})
    assert response.status_code < 500, (route, document, response.text)
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"code", "message"}
