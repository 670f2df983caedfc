"""Quick start 1: one agent, a strict policy, the report as JSON."""

from oao import Orchestrator, StrictPolicy


class DummyAgent:
    def invoke(self, task):
        return {"output": f"Processed: {task}"}


orch = Orchestrator(policy=StrictPolicy(max_steps=5))
report = orch.run(agent=DummyAgent(), task="Explain AI orchestration")
print(report.json(indent=2))
