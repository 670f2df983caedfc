"""Quick start 3: one task, several agents, independent reports."""

import asyncio

from oao.runtime.multi_agent import MultiAgentOrchestrator


class A:
    def __init__(self, name):
        self.name = name

    def invoke(self, task):
        return {"output": f"{self.name}: {task}"}


async def main():
    multi = MultiAgentOrchestrator(max_concurrency=2)
    results = await multi.run_multi_async(
        agents={"researcher": A("R"), "critic": A("C")}, task="Discuss AI governance"
    )
    for name, report in results.items():
        print(name, report.status)


asyncio.run(main())
