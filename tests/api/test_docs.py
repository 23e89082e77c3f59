"""The API's documentation pages in a real browser (headless Chromium), in a module of their
own: Playwright's event loop stays marked running in a module's thread while its browser is
open, which in-process asyncio code of other tests would trip over."""

from __future__ import annotations

import pytest

from service import __version__

pytestmark = pytest.mark.e2e


def test_the_docs_pages_work_without_the_internet(api_with_token, page):
    """/docs (Swagger UI) and /redoc, in a real browser: what they need to render (scripts,
    styles, fonts, data) comes from `hpo serve` itself, so they work on a machine that cannot
    reach a CDN. With a token configured, Swagger UI offers to authorize."""
    from playwright.sync_api import expect

    url = api_with_token.url
    fetched_elsewhere: list[str] = []

    def note(request) -> None:  # ReDoc's footer shows a logo from its CDN: not needed
        if not request.url.startswith((url, "blob:", "data:")) and request.resource_type != "image":
            fetched_elsewhere.append(f"{request.resource_type} {request.url}")

    page.on("request", note)
    page.goto(f"{url}/docs")
    expect(page.get_by_role("heading", level=1)).to_contain_text(f"hpo {__version__}")
    expect(page.get_by_role("button", name="Authorize")).to_be_visible()
    best = page.get_by_role("link", name="/api/v1/studies/{study}/best", exact=True)
    expect(best).to_be_visible()
    page.goto(f"{url}/redoc")
    expect(page.get_by_role("heading", name=f"hpo ({__version__})", level=1)).to_be_visible()
    expect(page.get_by_role("menuitem", name="studies", exact=True)).to_be_visible()
    assert fetched_elsewhere == []
