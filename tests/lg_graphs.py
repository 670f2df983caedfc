"""LangGraph graphs and LangChain runnables for the framework adapter tests
(tests/integration/test_frameworks.py, tests/chaos/test_frameworks_kill.py).

Written as a LangGraph user writes them: the graph code does not know OAO except where
it takes OAO's objects (the factory's ``model`` / ``tools`` arguments, ``OAOChatModel``,
``governed``). Every tool execution appends a line to the file named by
``OAO_TEST_LEDGER`` (when set), so a test counts real executions; the file named by
``OAO_TEST_BLOCK_MARKER`` makes ``slow_lookup`` wait while it exists (the crash point).
"""

from __future__ import annotations

import asyncio
import operator
import os
import time
from typing import Annotated, Any, TypedDict

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda
from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode, tools_condition
from langgraph.types import RetryPolicy, Send, interrupt
from pydantic import BaseModel, Field

from oao_worker.agents.langchain_bridge import OAOChatModel, governed


def effect(line: str) -> None:
    """Record one real execution in the OAO_TEST_LEDGER file (one write per line)."""
    path = os.environ.get("OAO_TEST_LEDGER")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


# ----------------------------------------------------------------- tools


@tool
def word_count(text: str) -> int:
    """Count the words of a text."""
    effect(f"word_count {text}")
    return len(text.split())


@tool
def delete_files(path: str) -> str:
    """Delete files under a path (never allowed in the tests)."""
    effect(f"delete_files {path}")
    return f"deleted {path}"


def lookup(term: str) -> str:
    """A spec tool: look a term up."""
    effect(f"lookup {term}")
    return f"{term}: a term of art"


def slow_lookup(term: str) -> str:
    """A spec tool that waits while the OAO_TEST_BLOCK_MARKER file exists (at most 60 s)."""
    marker = os.environ.get("OAO_TEST_BLOCK_MARKER")
    deadline = time.monotonic() + 60
    while marker and os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    effect(f"slow_lookup {term}")
    return f"{term}: looked up slowly"


# ----------------------------------------------------------------- a ReAct graph


def react(model: Any, tools: list[Any]) -> Any:
    """A ReAct agent graph (agent <-> tools until the model stops calling tools) from the
    factory's model and spec tools, plus two tools of the graph's own."""
    all_tools = [*tools, governed(word_count, idempotent=True), governed(delete_files)]
    bound = model.bind_tools(all_tools)

    async def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await bound.ainvoke(state["messages"])]}

    g = StateGraph(MessagesState)
    g.add_node("agent", agent)
    g.add_node("tools", ToolNode(all_tools))
    g.add_edge(START, "agent")
    g.add_conditional_edges("agent", tools_condition)
    g.add_edge("tools", "agent")
    return g.compile()


def streaming_react(model: Any, tools: list[Any]) -> Any:
    """The ReAct graph, its model call streamed token by token (``astream``), under a
    LangGraph retry policy that would retry anything (OAO's errors are not retried)."""
    bound = model.bind_tools([*tools, governed(word_count)])

    async def agent(state: MessagesState) -> dict[str, Any]:
        effect("agent")
        reply = None
        async for chunk in bound.astream(state["messages"]):
            reply = chunk if reply is None else reply + chunk
            effect(f"chunk {len(str(chunk.content))}")
        assert reply is not None
        return {"messages": [AIMessage(content=reply.content, tool_calls=reply.tool_calls, id=reply.id)]}

    g = StateGraph(MessagesState)
    g.add_node("agent", agent, retry_policy=RetryPolicy(initial_interval=0.01, retry_on=lambda _e: True))
    g.add_node("tools", ToolNode([*tools, governed(word_count)]))
    g.add_edge(START, "agent")
    g.add_conditional_edges("agent", tools_condition)
    g.add_edge("tools", "agent")
    return g.compile()


def sync_react(model: Any, tools: list[Any]) -> Any:
    """The ReAct graph with sync nodes (LangGraph runs them in threads)."""
    bound = model.bind_tools(tools)

    def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [bound.invoke(state["messages"])]}

    g = StateGraph(MessagesState)
    g.add_node("agent", agent)
    g.add_node("tools", ToolNode(tools))
    g.add_edge(START, "agent")
    g.add_conditional_edges("agent", tools_condition)
    g.add_edge("tools", "agent")
    return g.compile()


# ----------------------------------------------------------------- fan-out with Send


class Report(TypedDict):
    topic: str
    subtopics: list[str]
    sections: Annotated[list[str], operator.add]
    summary: str


class Section(TypedDict):
    subtopic: str


llm = OAOChatModel()  # built at import time: it finds the running node when called


async def plan(state: Report) -> dict[str, Any]:
    reply = await llm.ainvoke([HumanMessage(f"List subtopics of {state['topic']}, one per line")])
    return {"subtopics": [s.strip() for s in str(reply.content).splitlines() if s.strip()]}


def fan_out(state: Report) -> list[Send]:
    return [Send("write", {"subtopic": s}) for s in state["subtopics"]]


async def write(state: Section) -> dict[str, Any]:
    await asyncio.sleep(0.01 * (len(state["subtopic"]) % 3))  # finish out of order if run at once
    reply = await llm.ainvoke([HumanMessage(f"Write a section on {state['subtopic']}")])
    return {"sections": [str(reply.content)]}


def combine(state: Report) -> dict[str, Any]:
    return {"summary": f"{len(state['sections'])} sections: " + " | ".join(sorted(state["sections"]))}


def _fanout() -> Any:
    g = StateGraph(Report)
    g.add_node("plan", plan)
    g.add_node("write", write)
    g.add_node("combine", combine)
    g.add_edge(START, "plan")
    g.add_conditional_edges("plan", fan_out, ["write"])
    g.add_edge("write", "combine")
    g.add_edge("combine", END)
    return g.compile()


fanout = _fanout()  # a compiled graph as the entrypoint


# ----------------------------------------------------------------- pydantic state, subgraph


class Draft(BaseModel):
    question: str
    notes: list[str] = Field(default_factory=list)
    messages: Annotated[list[AnyMessage], add_messages] = Field(default_factory=list)
    answer: str = ""


async def research(state: Draft) -> dict[str, Any]:
    reply = await llm.ainvoke([HumanMessage(f"Research: {state.question}")])
    return {"notes": [*state.notes, str(reply.content)], "messages": [reply]}


def _researcher() -> Any:
    g = StateGraph(Draft)
    g.add_node("research", research)
    g.add_edge(START, "research")
    return g.compile()


async def answer(state: Draft) -> dict[str, Any]:
    reply = await llm.ainvoke([HumanMessage(f"Answer {state.question} from {'; '.join(state.notes)}")])
    return {"answer": str(reply.content)}


def route(state: Draft) -> str:
    return "answer" if state.notes else "researcher"


def nested() -> Any:
    """A parent graph over pydantic state with a subgraph node and a conditional edge."""
    g = StateGraph(Draft)
    g.add_node("researcher", _researcher())
    g.add_node("answer", answer)
    g.add_conditional_edges(START, route, ["researcher", "answer"])
    g.add_edge("researcher", "answer")
    g.add_edge("answer", END)
    return g.compile()


# ----------------------------------------------------------------- interrupts


class Approval(TypedDict):
    task: str
    decision: str
    result: str


def ask(state: Approval) -> dict[str, Any]:
    return {"decision": str(interrupt({"question": f"approve {state['task']}?"}))}


async def act(state: Approval) -> dict[str, Any]:
    reply = await llm.ainvoke([HumanMessage(f"{state['decision']}: {state['task']}")])
    return {"result": str(reply.content)}


def _approval() -> Any:
    g = StateGraph(Approval)
    g.add_node("ask", ask)
    g.add_node("act", act)
    g.add_edge(START, "ask")
    g.add_edge("ask", "act")
    return g.compile()


approval = _approval()


# ----------------------------------------------------------------- ungoverned


def _ungoverned() -> Any:
    fake = GenericFakeChatModel(messages=iter([AIMessage("I answer without OAO")]))

    async def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await fake.ainvoke(state["messages"])]}

    return StateGraph(MessagesState).add_node("agent", agent).add_edge(START, "agent").compile()


ungoverned = _ungoverned()


# ----------------------------------------------------------------- LangChain runnables


def chain(model: Any) -> Any:
    """An LCEL chain: prompt | model | parser."""
    prompt = ChatPromptTemplate.from_messages([("system", "Be brief."), ("user", "{input}")])
    return prompt | model | StrOutputParser()


def executor(model: Any, tools: list[Any]) -> Any:
    """A small agent executor: model, tools, model; returns ``{"input", "output"}``."""
    bound = model.bind_tools(tools)
    by_name = {t.name: t for t in tools}

    async def run(inputs: dict[str, Any]) -> dict[str, Any]:
        messages: list[Any] = [HumanMessage(inputs["input"])]
        for _ in range(4):
            reply = await bound.ainvoke(messages)
            messages.append(reply)
            if not reply.tool_calls:
                return {"input": inputs["input"], "output": reply.content}
            for call in reply.tool_calls:
                messages.append(await by_name[call["name"]].ainvoke(call))
        return {"input": inputs["input"], "output": "gave up"}

    return RunnableLambda(run)
