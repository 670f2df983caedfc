"""What the dashboard needs from the API, over a real socket: the page and its files
(local only, under a strict Content-Security-Policy), a run's graph and one node's
report with its step ledger."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from apikit import LiveAPI
from oao_testkit import make_spec, run_spec

from oao_common.broker import Broker
from oao_scheduler.api.dashboard import STATIC_DIR

MODELS = {"m": {"provider": "scripted", "replies": ["first reply", "second reply"]}}
AGENTS = {
    "chatty": {"kind": "python", "entrypoint": "oao_test_agents:chatty", "model": "m"},
    "noop": {"kind": "python", "entrypoint": "oao_test_agents:noop"},
}


@pytest.fixture
def api(redis_url: str, prefix: str) -> Iterator[LiveAPI]:
    with LiveAPI(redis_url, prefix, tokens=["tok"]) as a:
        yield a


def test_page_and_files_are_local_and_need_no_token(api: LiveAPI) -> None:
    with httpx.Client(base_url=api.url, timeout=10) as c:
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp
        refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert "/ui/app.js" in refs and "/ui/app.css" in refs
        for ref in refs:
            if ref.startswith("/ui/"):
                r = c.get(ref)
                assert r.status_code == 200, ref
                assert r.headers["content-security-policy"] == csp
        assert c.get("/ui/missing.js").status_code == 404
        assert c.get("/openapi.json").json()["paths"].get("/") is None  # not part of the API
        assert c.get("/runs").status_code == 401  # the data still needs the token
    for f in STATIC_DIR.iterdir():  # nothing is fetched from another origin
        text = f.read_text().replace('"http://www.w3.org/2000/svg"', "")  # a name, not a fetch
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text), f.name


async def test_graph_and_node_report_with_ledger(api: LiveAPI, broker: Broker) -> None:
    spec = make_spec(
        [
            {"id": "a", "agent": "chatty", "task": "t"},
            {"id": "b", "agent": "noop", "task": "x", "depends_on": ["a"]},
            {"id": "c", "agent": "noop", "task": "x", "depends_on": ["a", "b"]},
        ],
        models=MODELS,
        agents=AGENTS,
    )
    run_id = await run_spec(broker, spec)
    async with httpx.AsyncClient(base_url=api.url, headers={"Authorization": "Bearer tok"}) as c:
        graph = (await c.get(f"/runs/{run_id}/graph")).json()
        assert graph == {
            "nodes": [
                {"id": "a", "agent": "chatty", "depends_on": []},
                {"id": "b", "agent": "noop", "depends_on": ["a"]},
                {"id": "c", "agent": "noop", "depends_on": ["a", "b"]},
            ]
        }
        node = (await c.get(f"/runs/{run_id}/nodes/a")).json()
        assert node["status"] == "SUCCEEDED" and node["output"] == "second reply"
        assert [(s["seq"], s["kind"], s["name"]) for s in node["ledger"]] == [
            (1, "llm", "m"),
            (2, "llm", "m"),
        ]
        assert [s["result"]["content"] for s in node["ledger"]] == ["first reply", "second reply"]
        assert sum(s["usage"]["in"] for s in node["ledger"]) == node["tokens_in"] > 0
        assert (await c.get(f"/runs/{run_id}/nodes/b")).json()["ledger"] == []
        for path in (f"/runs/{run_id}/nodes/zzz", "/runs/nope/graph", "/runs/nope/nodes/a"):
            r = await c.get(path)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path
        assert (await c.get(f"/runs/{run_id}/graph", headers={"Authorization": ""})).status_code == 401
