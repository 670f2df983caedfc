"""The web dashboard in headless Chromium (Debian's ``chromium``, driven by Playwright),
served by the real API on 127.0.0.1 over the test Valkey, runs executed by an
in-process fleet. Screenshots are saved under ``test-artifacts/`` (or
``$OAO_TEST_ARTIFACTS``)."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from apikit import LiveAPI
from oao_testkit import fleet, make_spec, wait_until

from oao_common.broker import Broker
from oao_common.connection import EmbeddedServer
from oao_scheduler.submit import submit_spec

playwright_api = pytest.importorskip("playwright.async_api", reason="playwright is not installed")
CHROMIUM = os.environ.get("OAO_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary (apt-get install chromium, or set OAO_TEST_CHROMIUM)"
)
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("OAO_TEST_ARTIFACTS") or ROOT / "test-artifacts")
WAIT_MS = 20_000

MODELS = {"m": {"provider": "scripted", "replies": ["notes on the topic", "a summary of the notes"]}}
AGENTS = {
    "chatty": {"kind": "python", "entrypoint": "oao_test_agents:chatty", "model": "m"},
    "sleeper": {"kind": "python", "entrypoint": "oao_test_agents:sleeper"},
    "noop": {"kind": "python", "entrypoint": "oao_test_agents:noop"},
}


@pytest.fixture
def redis_url(valkey_server: EmbeddedServer) -> str:
    """The browser tests need one server only: the embedded Valkey."""
    return valkey_server.url


@pytest.fixture
def api(redis_url: str, prefix: str) -> Iterator[LiveAPI]:
    with LiveAPI(redis_url, prefix) as a:
        yield a


class Page:
    """A Chromium page that records console errors and uncaught exceptions."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    async def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            await b.close()


async def new_page(browser: Any) -> Page:
    ctx = await browser.new_context(viewport={"width": 1400, "height": 900})
    return Page(await ctx.new_page())


def expect(locator: Any) -> Any:
    return playwright_api.expect(locator)


async def test_run_page_turns_nodes_succeeded_live(api: LiveAPI, broker: Broker, browser: Any) -> None:
    spec = make_spec(
        [
            {"id": "research", "agent": "chatty", "task": "topic"},
            {"id": "draft", "agent": "sleeper", "task": "0.3", "depends_on": ["research"]},
            {"id": "critique", "agent": "sleeper", "task": "0.3", "depends_on": ["research"]},
            {"id": "polish", "agent": "noop", "task": "x", "depends_on": ["draft", "critique"]},
        ],
        name="dashboard-live",
        models=MODELS,
        agents=AGENTS,
    )
    run_id = (await submit_spec(broker, spec)).run_id
    page = await new_page(browser)
    p = page.page
    await p.goto(f"{api.url}/#/runs/{run_id}")
    nodes = p.locator("svg.dag g.node")
    await expect(nodes).to_have_count(4, timeout=WAIT_MS)
    await expect(p.locator("svg.dag g.node[data-node=research]")).to_have_attribute("data-status", "READY")
    for nid in ("draft", "critique", "polish"):
        await expect(p.locator(f"svg.dag g.node[data-node={nid}]")).to_have_attribute(
            "data-status", "PENDING"
        )
    await p.evaluate("window.__noReload = 1")

    async with fleet(broker, concurrency=4) as ws:
        for nid in ("research", "draft", "critique", "polish"):
            await expect(p.locator(f"svg.dag g.node[data-node={nid}]")).to_have_attribute(
                "data-status", "SUCCEEDED", timeout=WAIT_MS
            )
        worker_id = ws[0].id
    assert await p.evaluate("window.__noReload") == 1, "the page reloaded"
    await expect(p.locator("#view")).to_have_attribute("data-status", "SUCCEEDED", timeout=WAIT_MS)
    await expect(p.locator("#cancel-run")).to_be_disabled()
    await expect(p.locator("#event-log tr[data-type=RUN_SUCCEEDED]")).to_have_count(1)
    assert await p.locator("#event-log tr[data-type=NODE_SUCCEEDED]").count() == 4
    bars = p.locator("#timeline .tl-bar")
    await expect(bars).to_have_count(4, timeout=WAIT_MS)
    for i in range(4):
        assert await bars.nth(i).get_attribute("data-end") == "NODE_SUCCEEDED"
        assert await bars.nth(i).get_attribute("data-worker") == worker_id
    summary = p.locator("#run-summary")
    await expect(summary).to_contain_text("4/4 done")

    await p.locator("svg.dag g.node[data-node=research]").click()
    panel = p.locator("#node-panel")
    await expect(panel).to_have_attribute("data-node", "research", timeout=WAIT_MS)
    await expect(panel.locator("#node-output")).to_have_text("a summary of the notes")
    steps = panel.locator("#node-steps tbody tr")
    await expect(steps).to_have_count(2)
    assert "llm" in await steps.nth(0).inner_text()
    await page.shot("dashboard-run")
    assert page.errors == []


async def test_cancel_button_cancels_a_running_run(api: LiveAPI, broker: Broker, browser: Any) -> None:
    spec = make_spec(
        [
            {"id": "nap", "agent": "sleeper", "task": "60"},
            {"id": "after", "agent": "noop", "task": "x", "depends_on": ["nap"]},
        ],
        name="dashboard-cancel",
        agents=AGENTS,
    )
    page = await new_page(browser)
    p = page.page
    dialogs: list[str] = []

    async def accept(d: Any) -> None:
        dialogs.append(d.message)
        await d.accept()

    p.on("dialog", accept)
    async with fleet(broker, concurrency=2):
        run_id = (await submit_spec(broker, spec)).run_id
        await p.goto(f"{api.url}/#/runs/{run_id}")
        await expect(p.locator("svg.dag g.node[data-node=nap]")).to_have_attribute(
            "data-status", "RUNNING", timeout=WAIT_MS
        )
        await expect(p.locator("#cancel-run")).to_be_enabled()
        await p.locator("#cancel-run").click()
        await expect(p.locator("#view")).to_have_attribute("data-status", "CANCELLED", timeout=WAIT_MS)
        for nid in ("nap", "after"):
            await expect(p.locator(f"svg.dag g.node[data-node={nid}]")).to_have_attribute(
                "data-status", "CANCELLED", timeout=WAIT_MS
            )
        assert (await broker.get_run(run_id))["status"] == "CANCELLED"
    assert len(dialogs) == 1 and run_id in dialogs[0]
    await page.shot("dashboard-cancelled")
    assert page.errors == []


async def test_runs_list_and_fleet_pages(api: LiveAPI, broker: Broker, browser: Any) -> None:
    done = make_spec([{"id": "one", "agent": "noop", "task": "x"}], name="listed-done", agents=AGENTS)
    # a node on a queue no worker takes stays ready: a depth of 1 on the fleet page
    waiting = make_spec(
        [{"id": "w", "agent": "noop", "task": "x", "queue": "elsewhere"}],
        name="listed-waiting",
        agents=AGENTS,
    )
    page = await new_page(browser)
    p = page.page
    async with fleet(broker, concurrency=2) as ws:
        done_id = (await submit_spec(broker, done)).run_id
        waiting_id = (await submit_spec(broker, waiting)).run_id
        await wait_until(lambda: broker.run_is_terminal(done_id), True, 20, "the first run to end")
        await p.goto(f"{api.url}/")
        await expect(p.locator(f"#runs-table tr[data-run-id='{done_id}']")).to_have_attribute(
            "data-status", "SUCCEEDED", timeout=WAIT_MS
        )
        row = p.locator(f"#runs-table tr[data-run-id='{waiting_id}']")
        await expect(row).to_have_attribute("data-status", "PENDING", timeout=WAIT_MS)
        await expect(row).to_contain_text("listed-waiting")
        await page.shot("dashboard-runs")

        await p.locator("#nav-fleet").click()
        worker = p.locator(f"#workers-table tr[data-worker='{ws[0].id}']")
        await expect(worker).to_have_attribute("data-alive", "true", timeout=WAIT_MS)
        await expect(worker).to_contain_text("alive")
        queue = p.locator("#queues-table tr[data-queue=elsewhere]")
        await expect(queue).to_contain_text("1", timeout=WAIT_MS)
        await page.shot("dashboard-fleet")

        await p.locator("#nav-runs").click()
        await p.locator(f"#runs-table tr[data-run-id='{done_id}'] a").click()
        await expect(p.locator("#view")).to_have_attribute("data-status", "SUCCEEDED", timeout=WAIT_MS)
    assert page.errors == []


async def test_token_is_asked_for_and_sent(redis_url: str, prefix: str, broker: Broker, browser: Any) -> None:
    spec = make_spec([{"id": "one", "agent": "noop", "task": "x"}], name="with-token", agents=AGENTS)
    run_id = (await submit_spec(broker, spec)).run_id
    with LiveAPI(redis_url, prefix, tokens=["s3cret-token"]) as api:
        page = await new_page(browser)
        p = page.page
        await p.goto(f"{api.url}/#/runs/{run_id}")
        box = p.locator("#token-box")
        await expect(box).to_be_visible(timeout=WAIT_MS)
        await p.locator("#token-input").fill("wrong")
        await p.locator("#token-save").click()
        await expect(p.locator("#token-error")).to_contain_text("refused", timeout=WAIT_MS)
        await p.locator("#token-input").fill("s3cret-token")
        await p.locator("#token-input").press("Enter")
        await expect(box).to_be_hidden()
        await expect(p.locator("svg.dag g.node[data-node=one]")).to_have_count(1, timeout=WAIT_MS)
        async with fleet(broker, concurrency=1):
            # live over the authenticated event stream
            await expect(p.locator("svg.dag g.node[data-node=one]")).to_have_attribute(
                "data-status", "SUCCEEDED", timeout=WAIT_MS
            )
    # the console shows the refused requests (HTTP 401): nothing else
    assert [e for e in page.errors if "401" not in e] == []
