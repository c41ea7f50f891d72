"""One bad request is its own failure: never a 500 for what a caller sent, never its neighbours' failure.

Concurrent requests are signed together in one run (see shared/coalesce.py) and batches in one call, so
a CSR that trips the parser must not reach the others of its run.
"""

import asyncio

import httpx2
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.api import create_app
from shared.errors import CaError
from shared.ledger.models import CertificateQuery
from shared.service import IssuedCertificate, SignRequest

from .apiclient import make_api
from .conftest import run_cli, settings_environment
from .csrs import device_key, make_csr
from .oddcsrs import csr_with_raw_cn

BAD_UTF8_CN = b"dev-\xff\xfe"


def _ledger_serials(service) -> set[str]:
    return {c.serial for c in service.ledger.list_certificates(CertificateQuery(limit=1000)).items}


def test_sign_csrs_gives_one_result_per_request(service):
    requests = [SignRequest(make_csr(f"dev-{n}"), f"dev-{n}") for n in range(3)]
    requests.insert(1, SignRequest(csr_with_raw_cn("dev-x", BAD_UTF8_CN), "dev-x"))
    requests.append(SignRequest(b"\x30\x03\x02\x01", "dev-y"))
    results = service.sign_csrs(requests)
    assert len(results) == len(requests)
    good = [r for r in results if isinstance(r, IssuedCertificate)]
    assert [r.record.device_id for r in good] == ["dev-0", "dev-1", "dev-2"]
    bad_cn, garbage = results[1], results[4]
    assert isinstance(bad_cn, CaError) and bad_cn.status == 400 and bad_cn.code == "invalid-cn"
    assert isinstance(garbage, CaError) and garbage.status == 400 and garbage.code == "not-a-csr"
    assert _ledger_serials(service) == {r.record.serial for r in good}


def test_thirty_good_csrs_and_one_bad_posted_at_the_same_moment(service):
    """All 31 reach the event loop together, so they are coalesced into one signing run."""
    api = make_api(service)
    app = create_app(service)
    headers = {"Authorization": f"Bearer {api.factory_a}", "Content-Type": "application/pkcs10"}

    async def post_all():
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://ca") as client:
            good = [
                client.post(f"/api/devices/dev-{n}/certificate", content=make_csr(f"dev-{n}"), headers=headers)
                for n in range(30)
            ]
            bad = client.post(
                "/api/devices/dev-x/certificate", content=csr_with_raw_cn("dev-x", BAD_UTF8_CN), headers=headers
            )
            return await asyncio.gather(*good[:15], bad, *good[15:])

    responses = asyncio.run(post_all())
    bad = responses.pop(15)
    assert [r.status_code for r in responses] == [201] * 30
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid-cn"
    assert _ledger_serials(service) == {r.json()["serialNumber"] for r in responses}


@pytest.mark.child_process
def test_the_cli_answers_a_bad_csr_in_one_line(service, tmp_path):
    path = tmp_path / "bad.der"
    path.write_bytes(csr_with_raw_cn("dev-x", BAD_UTF8_CN))
    done = run_cli(
        "sign-csr",
        str(path),
        "--device-id",
        "dev-x",
        home=service.settings.pki_home,
        env=settings_environment(service.settings),
    )
    assert done.returncode == 1
    assert done.stderr.count(b"\n") == 1 and b"Traceback" not in done.stderr and b"UTF-8" in done.stderr


def _good_der(curve_index: int) -> bytes:
    from cryptography.hazmat.primitives.asymmetric import ec

    curve = (ec.SECP256R1(), ec.SECP384R1())[curve_index]
    return make_csr("mut-dev", key=device_key(curve), encoding=serialization.Encoding.DER)


PARENTS = [_good_der(0), _good_der(1)]


def _mutate(der: bytes, data: st.DataObject) -> bytes:
    kind = data.draw(st.sampled_from(["flip", "truncate", "tag", "version", "insert", "delete"]))
    position = data.draw(st.integers(0, len(der) - 1))
    mutable = bytearray(der)
    if kind == "flip":
        mutable[position] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        del mutable[position:]
    elif kind == "tag":
        mutable[position] = data.draw(st.sampled_from([0x02, 0x03, 0x04, 0x05, 0x06, 0x0C, 0x13, 0x30, 0x31, 0xA0]))
    elif kind == "version":
        mutable[9 if len(mutable) > 9 else 0] = data.draw(st.integers(0, 255))  # 30 81/82 .. 30 81/82 .. 02 01 vv
    elif kind == "insert":
        mutable[position:position] = data.draw(st.binary(min_size=1, max_size=4))
    else:
        del mutable[position : position + data.draw(st.integers(1, 4))]
    return bytes(mutable)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutants_signed_beside_good_csrs_never_hurt_them(service, data):
    """Mutated CSRs in one run with good ones: the good are signed, no mutant gets a 5xx, and the ledger
    holds exactly what was answered with a certificate."""
    before = _ledger_serials(service)
    mutants = [_mutate(data.draw(st.sampled_from(PARENTS)), data) for _ in range(data.draw(st.integers(1, 4)))]
    prefix = f"g{len(before)}"
    good = [SignRequest(make_csr(f"{prefix}-{n}"), f"{prefix}-{n}") for n in range(3)]
    requests = [*good[:1], *(SignRequest(m, "mut-dev") for m in mutants), *good[1:]]
    results = service.sign_csrs(requests, renew=True)
    assert len(results) == len(requests)
    issued = [r for r in results if isinstance(r, IssuedCertificate)]
    assert {r.record.device_id for r in issued} >= {g.device_id for g in good}
    for result in results:
        assert isinstance(result, IssuedCertificate) or (isinstance(result, CaError) and result.status < 500), result
    assert _ledger_serials(service) - before == {r.record.serial for r in issued if r.created}
