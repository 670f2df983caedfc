"""LangGraph agents of ``examples/langgraph_research.yaml`` (docs/frameworks.md).

Plain LangGraph code. OAO reaches in only through what the graphs are given: the
factories' ``model`` (OAO's chat model for the agent's model) and ``tools`` (the spec's
tools as LangChain tools), ``OAOChatModel()`` for a graph compiled at import time, and
``governed()`` around a tool of the graph's own. Needs the ``frameworks`` extra.
"""

from __future__ import annotations

import operator
from typing import Annotated, Any, TypedDict

from langchain_core.messages import HumanMessage
from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from langgraph.types import Send, interrupt

from oao_worker.agents.langchain_bridge import OAOChatModel, governed


@tool
def count_words(text: str) -> int:
    """Count the words of a text."""
    return len(text.split())


def research_graph(model: Any, tools: list[Any]) -> Any:
    """A ReAct agent: the model calls tools (the spec's notes.search and the graph's own
    count_words) until it answers."""
    all_tools = [*tools, governed(count_words, idempotent=True)]
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


# --------------------------------------------------------------------- one section per theme


class Report(TypedDict):
    topic: str
    findings: dict[str, Any]
    themes: list[str]
    sections: Annotated[list[str], operator.add]  # a reducer: every branch adds its section
    report: str


class Theme(TypedDict):
    topic: str
    theme: str


llm = OAOChatModel()  # the agent's model, found at call time in the running node


async def plan(state: Report) -> dict[str, Any]:
    notes = state["findings"].get("research", "")
    reply = await llm.ainvoke([HumanMessage(f"Themes of {state['topic']}, one per line, from: {notes}")])
    return {"themes": [t.strip() for t in str(reply.content).splitlines() if t.strip()]}


def one_writer_per_theme(state: Report) -> list[Send]:
    return [Send("write", {"topic": state["topic"], "theme": t}) for t in state["themes"]]


async def write(state: Theme) -> dict[str, Any]:
    reply = await llm.ainvoke([HumanMessage(f"Write about {state['theme']}")])
    return {"sections": [str(reply.content)]}


def assemble(state: Report) -> dict[str, Any]:
    return {"report": f"{state['topic']}\n\n" + "\n\n".join(state["sections"])}


def _sections() -> Any:
    g = StateGraph(Report)
    g.add_node("plan", plan)
    g.add_node("write", write)
    g.add_node("assemble", assemble)
    g.add_edge(START, "plan")
    g.add_conditional_edges("plan", one_writer_per_theme, ["write"])
    g.add_edge("write", "assemble")
    g.add_edge("assemble", END)
    return g.compile()


sections_graph = _sections()


# --------------------------------------------------------------------- human approval


class Review(TypedDict):
    task: str
    decision: str
    result: str


def ask_editor(state: Review) -> dict[str, Any]:
    return {"decision": str(interrupt({"question": "Publish this report?", "report": state["task"][:80]}))}


async def publish(state: Review) -> dict[str, Any]:
    reply = await llm.ainvoke([HumanMessage(f"The editor said {state['decision']}: {state['task']}")])
    return {"result": str(reply.content)}


def _review() -> Any:
    g = StateGraph(Review)
    g.add_node("ask_editor", ask_editor)
    g.add_node("publish", publish)
    g.add_edge(START, "ask_editor")
    g.add_edge("ask_editor", "publish")
    return g.compile()


review_graph = _review()
