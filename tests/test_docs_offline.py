"""The docs page works with no internet: the running server serves it and everything it loads.

What a page loads is what its HTML references (src, href), what its stylesheets reference (url(),
@import) and what its scripts are configured to fetch: all of it must be on this server. The Swagger UI
bundle itself carries URL-shaped strings that it never fetches (XML namespaces, JSON Schema dialect IDs,
links in its error texts); the one it would fetch by default, the online validator, is switched off by
the page, and the Content-Security-Policy forbids every other origin to the browser anyway.
"""

import re
import urllib.request

from .test_serve_limits import _serving

ELSEWHERE = re.compile(r"(?i)(?:\b[a-z][a-z0-9+.-]*:)?//[a-z0-9]")  # http://x, https://x, //x: another host


def _get(url: str) -> tuple[int, dict[str, str], str]:
    with urllib.request.urlopen(url) as response:  # noqa: S310 - loopback
        return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read().decode()


def _fetch(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url) as response:  # noqa: S310 - loopback
        return response.status, response.read()


def _css_references(css: str) -> list[str]:
    found = re.findall(r"url\(\s*['\"]?([^'\")]+)", css) + re.findall(r"@import\s+['\"]([^'\"]+)", css)
    return [reference for reference in found if not reference.startswith("data:")]


def test_the_docs_page_and_all_it_loads_come_from_the_server(tmp_path):
    with _serving(tmp_path) as (_, port, _):
        base = f"http://127.0.0.1:{port}"
        status, headers, page = _get(f"{base}/api/docs")
        assert status == 200 and "text/html" in headers["content-type"]
        assert not ELSEWHERE.search(page), ELSEWHERE.search(page)

        policy = dict(part.strip().split(" ", 1) for part in headers["content-security-policy"].split(";"))
        assert policy["default-src"] == "'none'"
        assert {policy["script-src"], policy["style-src"], policy["connect-src"]} == {"'self'"}
        assert policy["img-src"] == "'self' data:"
        assert not ELSEWHERE.search(headers["content-security-policy"]) and "unsafe" not in str(policy)

        references = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)""", page)
        assert len(references) == 4  # the stylesheet, the icon, the bundle, the start script
        for reference in references:
            assert reference.startswith("/") and not reference.startswith("//"), reference
            status, body = _fetch(f"{base}{reference}")
            assert status == 200 and body, reference
            text = body.decode() if reference.endswith((".css", ".js")) else ""
            if reference.endswith(".css"):
                assert _css_references(text) == [], _css_references(text)
            if reference.endswith("start.js"):
                assert not ELSEWHERE.search(text)
                assert "validatorUrl: null" in text  # Swagger UI's online validator, off
                (document,) = re.findall(r'url: "([^"]+)"', text)
                assert _get(f"{base}{document}")[0] == 200 and document.startswith("/api/")
            if reference.endswith("swagger-ui-bundle.js"):
                assert "SwaggerUIBundle" in text
                assert not re.search(r"sourceMappingURL=\S*//", text)


def test_the_bundle_renders_openapi_3_1(tmp_path):
    """FastAPI writes OpenAPI 3.1, which Swagger UI renders from version 5 on (the swagger-ui-bundle package
    on PyPI ships version 4, which cannot)."""
    with _serving(tmp_path) as (_, port, _):
        base = f"http://127.0.0.1:{port}"
        assert _get(f"{base}/api/openapi.json")[2].startswith('{"openapi":"3.1.')
        bundle = _get(f"{base}/api/docs/assets/swagger-ui-bundle.js")[2]
        (version,) = re.findall(r'PACKAGE_VERSION:"(\d+)\.\d+\.\d+"', bundle)
        assert int(version) >= 5
