"""Quick start 2: the same agent from async code."""

import asyncio

from oao import Orchestrator


class DummyAgent:
    def invoke(self, task):
        return {"output": f"Processed: {task}"}


async def main():
    report = await Orchestrator().run_async(agent=DummyAgent(), task="Async execution demo")
    print(report.status, report.output)


asyncio.run(main())
